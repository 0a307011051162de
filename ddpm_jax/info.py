"""`--mode=info`: what the configured model is, without touching any data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax import model_fns, unet


def model_info(config, *, flops: bool = True) -> dict:
    """Parameter count and tensors, per-scope counts with resolutions, and XLA's FLOPs/image."""
    model = nnx.eval_shape(lambda: model_fns.create_model(config))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    info = {
        "num_params": unet.count_params(model),
        "num_tensors": len(leaves),
        "scopes": unet.param_summary(model),
        "resolutions": [config.data.image_size // 2 ** i
                        for i in range(len(config.model.ch_mult))],
        "channels": [config.model.ch * m for m in config.model.ch_mult],
    }
    if flops:
        graphdef, params = model_fns.abstract_params(config)
        size, channels = config.data.image_size, config.data.channels
        x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)

        def forward(params, x, t):
            return model_fns.model_fn(graphdef, params)(x, t)

        compiled = jax.jit(forward).lower(params, x, t).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops_per_image"] = float(cost.get("flops", float("nan")))
    return info


def format_info(config, info: dict) -> str:
    lines = [
        f"model: ch={config.model.ch} ch_mult={tuple(config.model.ch_mult)} "
        f"num_res_blocks={config.model.num_res_blocks} "
        f"attn_resolutions={tuple(config.model.attn_resolutions)} dropout={config.model.dropout}",
        f"input: {config.data.image_size}x{config.data.image_size}x{config.data.channels}, "
        f"output channels {model_fns.output_channels(config)}",
        f"parameters: {info['num_params']:,} in {info['num_tensors']} tensors",
        "per scope:",
    ]
    levels = dict(enumerate(zip(info["resolutions"], info["channels"])))
    for scope, count in info["scopes"]:
        where = ""
        if scope.startswith(("down_", "up_")):
            resolution, channels = levels[int(scope.split("_")[1])]
            where = f"  ({resolution}x{resolution}, {channels} ch)"
        lines.append(f"  {scope:<10s}{count:>14,}{where}")
    if "flops_per_image" in info:
        lines.append(f"forward FLOPs per image (XLA cost analysis): "
                     f"{info['flops_per_image'] / 1e9:.2f} GFLOP")
    return "\n".join(lines)
