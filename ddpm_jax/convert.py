"""Weight conversion onto `ddpm_jax.unet.UNet`.

`params_from_diffusers` maps a diffusers `UNet2DModel` state dict (e.g. `google/ddpm-cifar10-32`,
`google/ddpm-celebahq-256`) onto our parameters. Names are derived through the original TF names
(`unet.tf_variable_names`), so every level/block index is computed from the model, not hard-coded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddpm_jax.unet import UNet, tf_variable_names

# TF layer scope -> diffusers submodule name.
_RESNET_LAYERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_LAYERS = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_LEAVES = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
_TOP_LEVEL = {
    "temb/dense0": "time_embedding.linear_1",
    "temb/dense1": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_MID_SUBMODULES = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
# Attention parameter names of diffusers < 0.15 checkpoints (as stored on the Hub).
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_layer(tf_layer_scopes: list[str]) -> str:
    """Translate TF scopes below a level (e.g. ['block_0', 'nin_shortcut']) to a diffusers path."""
    head, *rest = tf_layer_scopes
    kind, index = head.rsplit("_", 1)
    if kind == "block":
        return f"resnets.{index}.{_RESNET_LAYERS[rest[0]]}"
    if kind == "attn":
        return f"attentions.{index}.{_ATTN_LAYERS[rest[0]]}"
    raise KeyError(head)


def diffusers_name(tf_name: str, num_levels: int) -> str:
    """The diffusers `UNet2DModel` state-dict key holding the original TF variable `tf_name`.

    Our up level i is diffusers' `up_blocks[num_levels - 1 - i]` (diffusers numbers up blocks in
    execution order); down levels keep their index.
    E.g. 'model/up_1/block_2/nin_shortcut/W' -> 'up_blocks.2.resnets.2.conv_shortcut.weight' (L=4).
    """
    scopes = tf_name.split("/")
    if scopes[0] != "model":
        raise KeyError(tf_name)
    scopes, leaf = scopes[1:-1], _LEAVES[scopes[-1]]
    joined = "/".join(scopes)
    if joined in _TOP_LEVEL:
        return f"{_TOP_LEVEL[joined]}.{leaf}"
    head = scopes[0]
    if head == "mid":
        sub = _MID_SUBMODULES[scopes[1]]
        layer = _RESNET_LAYERS[scopes[2]] if scopes[1].startswith("block") else _ATTN_LAYERS[scopes[2]]
        return f"mid_block.{sub}.{layer}.{leaf}"
    direction, level = head.rsplit("_", 1)
    if direction == "down":
        prefix = f"down_blocks.{level}"
    elif direction == "up":
        prefix = f"up_blocks.{num_levels - 1 - int(level)}"
    else:
        raise KeyError(tf_name)
    if scopes[1] == "downsample":
        return f"{prefix}.downsamplers.0.conv.{leaf}"
    if scopes[1] == "upsample":
        return f"{prefix}.upsamplers.0.conv.{leaf}"
    return f"{prefix}.{_diffusers_layer(scopes[1:])}.{leaf}"


def _normalize_legacy_key(key: str) -> str:
    """Rename old diffusers attention keys (query/key/value/proj_attn) to the current names."""
    match = re.fullmatch(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))", key)
    if match is None:
        return key
    return f"{match.group(1)}{_LEGACY_ATTN[match.group(2)]}{match.group(3)}"


def _to_target_layout(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> TF/Flax layout.

    Conv OIHW -> HWIO; a 1x1 conv (O, I, 1, 1) or Linear (O, I) -> dense [I, O]; vectors unchanged.
    """
    if array.ndim == 4 and len(target_shape) == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
        return np.transpose(array[:, :, 0, 0])
    if array.ndim == 2:
        return np.transpose(array)
    return array


def params_from_diffusers(state_dict: Mapping[str, Any], model: UNet) -> nnx.State:
    """Build our parameter State from a diffusers `UNet2DModel` state dict.

    Pure: `model` (which may be an `nnx.eval_shape` model) is only read for structure; apply the
    result with `nnx.update(model, state)` or `nnx.merge(nnx.graphdef(model), state)`.
    Values are float32 jax arrays. Raises ValueError naming the variable if any parameter of
    `model` has no source tensor, any source tensor is unused or duplicated, or a shape differs.
    Architecture hyperparameters that leave no trace in the weights (timestep-embedding shift,
    padding, eps, heads) are checked by `check_diffusers_config`, not here.
    """
    source: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = _normalize_legacy_key(key)
        if name in source:
            raise ValueError(f"diffusers tensor {key!r} duplicates {name!r}")
        source[name] = np.asarray(value)

    num_levels = len(model.ch_mult)
    targets = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    filled = []
    used: set[str] = set()
    for tf_name, path in tf_variable_names(model).items():
        key = diffusers_name(tf_name, num_levels)
        target = targets[path]
        if key not in source:
            raise ValueError(f"diffusers state dict lacks {key!r} (needed for {tf_name})")
        if key in used:
            raise ValueError(f"diffusers tensor {key!r} would fill two parameters (second: {tf_name})")
        value = _to_target_layout(source[key], tuple(target.shape))
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {key!r} -> {tf_name}: source {source[key].shape} gives "
                f"{value.shape}, expected {tuple(target.shape)}"
            )
        used.add(key)
        filled.append((path, target.replace(jnp.asarray(value, dtype=jnp.float32))))
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"unused diffusers tensors: {unused}")
    return nnx.from_flat_state(filled)


def _expected_block_types(model: UNet) -> tuple[list[str], list[str]]:
    down = ["AttnDownBlock2D" if len(level.attn) else "DownBlock2D" for level in model.down]
    # diffusers lists up blocks in execution order: our level L-1 first.
    up = ["AttnUpBlock2D" if len(level.attn) else "UpBlock2D" for level in reversed(list(model.up))]
    return down, up


def check_diffusers_config(config: Mapping[str, Any], model: UNet) -> None:
    """Raise ValueError unless a diffusers `UNet2DModel` config computes the same function as `model`.

    Keys whose diffusers default differs from the original model (flip_sin_to_cos, freq_shift,
    downsample_padding, norm_eps, attention_head_dim) must be present; others are checked if present.
    """
    down_types, up_types = _expected_block_types(model)
    required = {
        "flip_sin_to_cos": False,  # sin first
        "freq_shift": 1,  # divisor half - 1
        "downsample_padding": 0,  # TF SAME (0, 1) padding, not symmetric 1
        "norm_eps": 1e-6,
    }
    optional = {
        "act_fn": "silu",
        "norm_num_groups": 32,
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "resnet_time_scale_shift": "default",
        "mid_block_scale_factor": 1,
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
        "in_channels": model.in_ch,
        "out_channels": model.out_ch,
        "sample_size": model.resolution,
        "layers_per_block": model.num_res_blocks,
        "block_out_channels": [model.ch * m for m in model.ch_mult],
        "down_block_types": down_types,
        "up_block_types": up_types,
    }
    for key, expected in required.items():
        if key not in config:
            raise ValueError(f"diffusers config lacks {key!r} (its default differs from the original)")
    for key, expected in {**required, **optional}.items():
        if key in config:
            value = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
            if value != expected:
                raise ValueError(f"diffusers config {key}={config[key]!r}, expected {expected!r}")
    # Single-head attention: diffusers uses heads = channels // attention_head_dim, with None = channels.
    if "attention_head_dim" not in config:
        raise ValueError("diffusers config lacks 'attention_head_dim' (default 8 means multi-head)")
    head_dim = config["attention_head_dim"]
    attn_channels = {model.ch * model.ch_mult[-1]} | {
        model.ch * model.ch_mult[i] for i, level in enumerate(model.down) if len(level.attn)
    }
    if head_dim is not None and any(head_dim != c for c in attn_channels):
        raise ValueError(f"diffusers config attention_head_dim={head_dim!r}: not single-head")
