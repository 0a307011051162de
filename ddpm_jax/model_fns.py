"""Builds the configured UNet and turns it into a pure function of a parameter pytree.

The shape rules of the UNet (`check_model_shape`) live here, next to the one function that
builds it, and `validate.py` calls them.

Training, sampling, evaluation and the importers all hold parameters as a plain nested dict of
arrays (what Orbax saves); `model_fn` merges them back into the NNX module under `jit`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax import unet

Params = dict[str, Any]

LEARNED_VARIANCES = ("learned", "learned_range")


def output_channels(config) -> int:
    """The model predicts the mean part, plus a variance part for learned variances."""
    channels = config.data.channels
    return 2 * channels if config.diffusion.var_type in LEARNED_VARIANCES else channels


def check_model_shape(config) -> None:
    """The UNet can take `data.image_size`, and attention sits at resolutions it has."""
    mc, size = config.model, config.data.image_size
    if size < 1:
        raise ValueError(f"data.image_size={size!r} must be ≥ 1; set --config.data.image_size.")
    if config.data.channels not in (1, 3):
        raise ValueError(f"data.channels={config.data.channels!r} must be 1 or 3; set "
                         "--config.data.channels.")
    halvings = len(mc.ch_mult) - 1
    if size % 2 ** halvings:
        raise ValueError(
            f"data.image_size={size} cannot be halved {halvings} times by "
            f"model.ch_mult={tuple(mc.ch_mult)}; use an image size divisible by {2 ** halvings}.")
    if mc.ch % 32:
        raise ValueError(f"model.ch={mc.ch} must be a multiple of 32 (GroupNorm uses 32 groups); "
                         "set --config.model.ch to e.g. 32, 64 or 128.")
    resolutions = [size // 2 ** level for level in range(halvings + 1)]
    stray = [r for r in mc.attn_resolutions if r not in resolutions]
    if stray:
        raise ValueError(
            f"model.attn_resolutions={tuple(mc.attn_resolutions)}: {stray[0]} is not a "
            f"resolution of this UNet ({', '.join(map(str, resolutions))}); "
            "set --config.model.attn_resolutions to some of those, or () for none.")


def create_model(config, seed: int | None = None) -> unet.UNet:
    """The UNet of `config.model`, initialised like the original (docs/original.md §1.2)."""
    check_model_shape(config)
    model_config = config.model
    return unet.UNet(
        ch=model_config.ch,
        ch_mult=tuple(model_config.ch_mult),
        num_res_blocks=model_config.num_res_blocks,
        attn_resolutions=tuple(model_config.attn_resolutions),
        dropout=model_config.dropout,
        resolution=config.data.image_size,
        in_ch=config.data.channels,
        out_ch=output_channels(config),
        num_classes=model_config.num_classes,
        dtype=jnp.dtype(model_config.dtype),
        rngs=nnx.Rngs(config.seed if seed is None else seed),
    )


def init_params(config, seed: int | None = None) -> tuple[nnx.GraphDef, Params]:
    """The module's structure and its freshly initialised parameters as a pure dict."""
    model = create_model(config, seed)
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(config) -> tuple[nnx.GraphDef, Params]:
    """Structure and parameter shapes without allocating or computing anything."""
    model = nnx.eval_shape(lambda: create_model(config))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef: nnx.GraphDef, params: Params) -> unet.UNet:
    state = nnx.State(jax.tree.map(lambda x: nnx.Param(x), params,
                                   is_leaf=lambda x: not isinstance(x, dict)))
    return nnx.merge(graphdef, state)


def model_fn(graphdef: nnx.GraphDef, params: Params, labels: jax.Array | None = None
               ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(x_t, t) -> model output` with dropout off, as used by every sampler and the bound.

    `labels` [B] (class-conditional models only) condition every call; None = unconditional
    (the null class of a conditional model).
    """
    model = merge(graphdef, params)

    def apply(x: jax.Array, t: jax.Array) -> jax.Array:
        return model(x, t, labels)

    return apply


def guide(cond_output: jax.Array, uncond_output: jax.Array, guidance_scale: float | jax.Array,
          channels: int) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022) of the mean part of the model output:

    ε̃ = ε_uncond + w (ε_cond − ε_uncond), computed as (1 − w) ε_uncond + w ε_cond, which is the
    same number in exact arithmetic and in floating point returns ε_uncond exactly at w = 0 and
    ε_cond exactly at w = 1 (0·a = 0 and 1·a = a are exact).

    Only the first `channels` channels (ε, x̂0 or x_{t-1}, by `diffusion.mean_type`) are mixed;
    for learned variances the variance channels are taken from the conditional output.
    """
    w = jnp.asarray(guidance_scale, jnp.float32)
    mean_part = (1.0 - w) * uncond_output[..., :channels] + w * cond_output[..., :channels]
    return jnp.concatenate([mean_part, cond_output[..., channels:]], axis=-1)


def guided_model_fn(graphdef: nnx.GraphDef, params: Params, labels: jax.Array,
                      guidance_scale: float | jax.Array
                      ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(x_t, t) -> guided model output` of a class-conditional model, in ONE batched model call
    per step: the UNet sees concat([x, x]) with labels concat([y, null]) and the two halves are
    combined by `guide`. Works in any sampler that takes a `model_fn`."""
    model = merge(graphdef, params)
    if not unet.is_conditional(model.num_classes):
        raise ValueError(
            f"classifier-free guidance needs a class-conditional model (model.num_classes > 1), "
            f"this one has model.num_classes={model.num_classes}; set "
            "--config.sample.guidance_scale=0 and --config.sample.labels=''.")
    labels = jnp.asarray(labels, jnp.int32)
    null = jnp.full_like(labels, unet.null_class(model.num_classes))

    def apply(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([labels, null]))
        return guide(both[:batch], both[batch:], guidance_scale, model.in_ch)

    return apply
