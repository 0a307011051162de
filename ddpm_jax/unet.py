"""The DDPM UNet (Ho et al. 2020, `diffusion_tf/models/unet.py`) in Flax NNX.

Submodule names mirror the TF variable scopes, so that a TF checkpoint name such as
`model/down_1/block_0/nin_shortcut/W` maps mechanically onto a parameter path
(`tf_variable_names`). Layouts match TF: 3x3 conv kernels are HWIO, dense and 1x1 ("nin")
kernels are [in, out].

Parameters are always float32. `dtype` is the compute dtype of convolutions and dense layers;
GroupNorm, the attention softmax and the returned output stay float32.

The module holds no RNG state: dropout is driven by an explicit `dropout_key` argument, so a
train step is a pure function of (params, batch, key).

With `num_classes > 1` the UNet is class-conditional (not part of the original): a learned
embedding of the label, `class_embed` with `num_classes + 1` rows, is added to the timestep
embedding after the `temb` MLP. Row `num_classes` is the null class ("no label") used for
classifier-free guidance; it is never a real label. With `num_classes <= 1` the model is the
original, parameter for parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from ddpm_jax import conv

NUM_GROUPS = 32
# `dtype` (model.dtype) names: the compute dtypes of convolutions and dense layers.
COMPUTE_DTYPES = ("float32", "bfloat16")
GROUP_NORM_EPS = 1e-6
# The original `default_init(scale=0.)` uses this scale instead of exact zeros.
ZERO_INIT_SCALE = 1e-10


# ----------------------------------------------------------------------------------------------
# Primitives (diffusion_tf/nn.py)
# ----------------------------------------------------------------------------------------------


def default_init(scale: float = 1.0) -> nnx.Initializer:
    """variance_scaling(scale, 'fan_avg', 'uniform'): W ~ U(-L, L), L = sqrt(3 scale / fan_avg).

    As in the original, `scale == 0` means `scale = 1e-10` (near-zero, not exactly zero).
    """
    return nnx.initializers.variance_scaling(
        ZERO_INIT_SCALE if scale == 0 else scale, "fan_avg", "uniform"
    )


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of integer timesteps (`nn.get_timestep_embedding`).

    f_k = exp(-k ln(10000) / (half - 1)), k = 0..half-1, half = dim // 2;
    emb = concat([sin(t f), cos(t f)]) (sin first), zero-padded to `dim` if `dim` is odd.

    Args:
      t: [B] integer timesteps (0-indexed).
      dim: embedding width.
    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    frequencies = jnp.exp(
        jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1))
    )
    angles = jnp.asarray(t).astype(jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if dim % 2 == 1:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def swish(x: jax.Array) -> jax.Array:
    """swish(x) = x * sigmoid(x)."""
    return jax.nn.silu(x)


def inverted_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Elementwise dropout as `tf.nn.dropout`: keep w.p. 1 - rate and scale kept values by 1/(1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling (NHWC): out[y, x] = in[y // 2, x // 2]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv3x3(
    in_ch: int, out_ch: int, *, stride: int = 1, init_scale: float = 1.0, dtype: Any, rngs: nnx.Rngs
) -> nnx.Conv:
    # padding='SAME' computes TF's SAME padding, i.e. (0, 1) per spatial dim for stride 2 on even sizes.
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=default_init(init_scale),
        bias_init=nnx.initializers.zeros_init(),
        conv_general_dilated=conv.conv_general_dilated,
        rngs=rngs,
    )


def _dense(
    in_ch: int, out_ch: int, *, init_scale: float = 1.0, dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    """`nn.dense` / `nn.nin`: a [in, out] kernel applied to the last axis."""
    return nnx.Linear(
        in_ch,
        out_ch,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=default_init(init_scale),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


# "auto": the hand-written GroupNorm below on the CPU backend (GroupNorm.__call__); "native":
# nnx's (TPU/GPU always take nnx's).
GROUP_NORM_STATS = "auto"


def _group_mean(channels: int, num_groups: int, count: int) -> Callable:
    """[b, c] per-channel sums -> [b, 1, c]: each channel's group sum / `count`, broadcast back
    to the group's channels (two [c, g] membership matmuls; the groups are contiguous)."""
    member = (jnp.arange(channels)[:, None] // (channels // num_groups)
              == jnp.arange(num_groups)[None, :]).astype(jnp.float32)

    def group_mean(sums):
        per_group = jnp.einsum("bc,cg->bg", sums, member, precision="highest") / count
        return jnp.einsum("bg,cg->bc", per_group, member, precision="highest")[:, None, :]

    return group_mean


def _group_statistics(flat: jax.Array, num_groups: int, epsilon: float):
    """(mean, 1/sqrt(var + eps)) [b, 1, c] of `flat` [b, hw, c], two-pass variance."""
    b, hw, c = flat.shape
    group_mean = _group_mean(c, num_groups, hw * (c // num_groups))
    mean = group_mean(jnp.sum(flat, axis=1))
    centred = flat - mean
    return mean, lax.rsqrt(group_mean(jnp.sum(centred * centred, axis=1)) + epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                   epsilon: float) -> jax.Array:
    """GroupNorm of NHWC `x` (float32): the math of nnx.GroupNorm(use_fast_variance=False),
    y = (x - μ_g) / sqrt(σ²_g + eps) · γ + β, with a hand-written gradient.

    Why: XLA:CPU runs autodiff's GroupNorm as many small passes (transposes for the reductions,
    the normalised input recomputed per use) and nnx's [B, HW, G, C/G] reductions far below
    memory speed; here every reduction is a sum over the pixels of [b, hw, c] (XLA:CPU's fast
    form) and the backward pass is two sweeps: with x̂ = (x - μ)·r, r = 1/sqrt(σ² + eps),
        dβ = Σ dy,  dγ = Σ dy·x̂,  dx = r·(γ·dy - mean_g(γ·dy) - x̂·mean_g(γ·dy·x̂))
    (benchmarks/README.md, "Learner shapes", measures it).
    """
    return _group_norm_forward(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_forward(x, scale, bias, num_groups, epsilon):
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    mean, inv_std = _group_statistics(flat, num_groups, epsilon)
    y = ((flat - mean) * inv_std * scale + bias).reshape(x.shape)
    return y, (x, scale, mean, inv_std)


def _group_norm_backward(num_groups, epsilon, residuals, dy):
    x, scale, mean, inv_std = residuals
    b, h, w, c = x.shape
    flat, dy = x.reshape(b, h * w, c), dy.reshape(b, h * w, c)
    normed = (flat - mean) * inv_std
    dbias_bc, dscale_bc = jnp.sum(dy, axis=1), jnp.sum(dy * normed, axis=1)  # [b, c]
    group_mean = _group_mean(c, num_groups, h * w * (c // num_groups))
    dx = inv_std * (dy * scale - group_mean(dbias_bc * scale) - normed * group_mean(dscale_bc * scale))
    return dx.reshape(x.shape), jnp.sum(dscale_bc, axis=0), jnp.sum(dbias_bc, axis=0)


group_norm_cpu.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm (same parameters, same math); on CPU `group_norm_cpu`."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        use_matmul = (GROUP_NORM_STATS == "auto" and jax.default_backend() == "cpu"
                      and mask is None and x.ndim == 4 and self.reduction_axes is None
                      and self.scale is not None and self.bias is not None)
        if not use_matmul:
            return super().__call__(x, mask=mask)
        return group_norm_cpu(x.astype(jnp.float32), self.scale[...], self.bias[...],
                              self.num_groups, self.epsilon)


def _group_norm(ch: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """tf.contrib group_norm defaults: 32 contiguous groups, eps 1e-6, biased two-pass variance.

    Computed in float32 whatever the model's compute dtype.
    """
    return GroupNorm(
        ch,
        num_groups=NUM_GROUPS,
        epsilon=GROUP_NORM_EPS,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


# ----------------------------------------------------------------------------------------------
# Blocks (diffusion_tf/models/unet.py)
# ----------------------------------------------------------------------------------------------


class TimestepMLP(nnx.Module):
    """Scope `temb`: temb = dense1(swish(dense0(emb))); no activation after dense1."""

    def __init__(self, ch: int, temb_ch: int, *, dtype: Any, rngs: nnx.Rngs):
        self.dense0 = _dense(ch, temb_ch, dtype=dtype, rngs=rngs)
        self.dense1 = _dense(temb_ch, temb_ch, dtype=dtype, rngs=rngs)

    def __call__(self, embedding: jax.Array) -> jax.Array:
        return self.dense1(swish(self.dense0(embedding)))


class ResnetBlock(nnx.Module):
    """`resnet_block`: x' = shortcut(x) + conv2(dropout(swish(norm2(conv1(swish(norm1(x))) + temb_proj(swish(temb)))))).

    The shortcut is a 1x1 `nin_shortcut` iff in_ch != out_ch, else identity.
    """

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int, *, dropout: float, dtype: Any, rngs: nnx.Rngs
    ):
        self.dropout = dropout
        self.dtype = dtype
        self.norm1 = _group_norm(in_ch, rngs=rngs)
        self.conv1 = _conv3x3(in_ch, out_ch, dtype=dtype, rngs=rngs)
        self.temb_proj = _dense(temb_ch, out_ch, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(out_ch, rngs=rngs)
        self.conv2 = _conv3x3(out_ch, out_ch, init_scale=0.0, dtype=dtype, rngs=rngs)
        self.nin_shortcut = _dense(in_ch, out_ch, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(
        self, x: jax.Array, temb: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, None, None, :]
        h = swish(self.norm2(h))
        if dropout_key is not None and self.dropout > 0:
            h = inverted_dropout(h, self.dropout, dropout_key)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return (x + h).astype(self.dtype)


class AttnBlock(nnx.Module):
    """`attn_block`: single-head self-attention over all H*W positions, residual.

    w = softmax(q k^T * C^-0.5) over keys; x' = x + proj_out(w v), with q, k, v = nin(norm(x)).
    """

    def __init__(self, ch: int, *, dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = _group_norm(ch, rngs=rngs)
        self.q = _dense(ch, ch, dtype=dtype, rngs=rngs)
        self.k = _dense(ch, ch, dtype=dtype, rngs=rngs)
        self.v = _dense(ch, ch, dtype=dtype, rngs=rngs)
        self.proj_out = _dense(ch, ch, init_scale=0.0, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, ch = x.shape
        h = self.norm(x)  # no nonlinearity here
        q = self.q(h).reshape(batch, height * width, ch)
        k = self.k(h).reshape(batch, height * width, ch)
        v = self.v(h).reshape(batch, height * width, ch)
        logits = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32) * (ch**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bnm,bmc->bnc", weights, v).reshape(batch, height, width, ch)
        return (x + self.proj_out(h)).astype(self.dtype)


class _Level(nnx.Module):
    """A level's `block[j]` (one per input width), at attention resolutions `attn[j]` after each
    block, and its optional resampling conv between levels, named by the subclass."""

    resample_scope: str
    resample_stride: int

    def __init__(
        self,
        block_in_channels: Sequence[int],
        out_ch: int,
        temb_ch: int,
        *,
        with_attn: bool,
        with_resample: bool,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.block = nnx.List([ResnetBlock(c, out_ch, temb_ch, dropout=dropout, dtype=dtype, rngs=rngs)
                               for c in block_in_channels])
        self.attn = nnx.List([AttnBlock(out_ch, dtype=dtype, rngs=rngs) for _ in block_in_channels]
                             if with_attn else [])
        resample = (_conv3x3(out_ch, out_ch, stride=self.resample_stride, dtype=dtype, rngs=rngs)
                    if with_resample else None)
        setattr(self, self.resample_scope, resample)


class DownLevel(_Level):
    """Scope `down_{i}`: `block[j]`, optional `attn[j]` after each block, optional `downsample`
    conv (stride 2)."""

    resample_scope, resample_stride = "downsample", 2


class MidLevel(nnx.Module):
    """Scope `mid`: block_1 -> attn_1 -> block_2 (attention always present)."""

    def __init__(self, ch: int, temb_ch: int, *, dropout: float, dtype: Any, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(ch, ch, temb_ch, dropout=dropout, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(ch, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(ch, ch, temb_ch, dropout=dropout, dtype=dtype, rngs=rngs)


class UpLevel(_Level):
    """Scope `up_{i}`: `block[j]` on concat([h, skip]), optional `attn[j]`, optional `upsample`
    conv (after a nearest-neighbour 2x)."""

    resample_scope, resample_stride = "upsample", 1


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class LabelsOnUnconditionalModelError(ValueError, NotImplementedError):
    """Labels were passed to an unconditional UNet (the original is unconditional only)."""


def is_conditional(num_classes: int) -> bool:
    """`model.num_classes` ≤ 1 is the original unconditional model; > 1 adds a class embedding."""
    return num_classes > 1


def null_class(num_classes: int) -> int:
    """Index of the "no label" embedding row used for classifier-free guidance: one past the
    last real class, so no real label 0..num_classes-1 can ever select it."""
    return num_classes


def _block_dropout_key(dropout_key: jax.Array | None, block_index: int) -> jax.Array | None:
    return None if dropout_key is None else jax.random.fold_in(dropout_key, block_index)


def _down_levels(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, temb_ch: int,
                 common: dict[str, Any]) -> tuple[list[DownLevel], list[int]]:
    """The `down_{i}` levels, and the channels of every tensor the forward pass pushes on the
    skip stack (conv_in's output first), in push order."""
    skip_channels = [ch]
    current_res = resolution
    block_in = ch
    down = []
    for i_level in range(len(ch_mult)):
        block_out = ch * ch_mult[i_level]
        in_channels = [block_in] + [block_out] * (num_res_blocks - 1)
        is_last = i_level == len(ch_mult) - 1
        down.append(
            DownLevel(
                in_channels,
                block_out,
                temb_ch,
                with_attn=current_res in attn_resolutions,
                with_resample=not is_last,
                **common,
            )
        )
        skip_channels += [block_out] * num_res_blocks
        block_in = block_out
        if not is_last:
            skip_channels.append(block_out)
            current_res //= 2
    return down, skip_channels


def _up_levels(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               attn_resolutions: tuple[int, ...], resolution: int, temb_ch: int,
               skip_channels: list[int], common: dict[str, Any]) -> list[UpLevel]:
    """The `up_{i}` levels (indexed by i, built from the lowest resolution up, the order in
    which they take their parameters from `rngs`); each block takes one skip from the top of
    the stack, concatenated to its input."""
    skip_channels = list(skip_channels)
    num_levels = len(ch_mult)
    current_res = resolution // 2 ** (num_levels - 1)
    block_in = ch * ch_mult[-1]
    up = [None] * num_levels
    for i_level in reversed(range(num_levels)):
        block_out = ch * ch_mult[i_level]
        in_channels = []
        for _ in range(num_res_blocks + 1):
            in_channels.append(block_in + skip_channels.pop())
            block_in = block_out
        up[i_level] = UpLevel(
            in_channels,
            block_out,
            temb_ch,
            with_attn=current_res in attn_resolutions,
            with_resample=i_level != 0,
            **common,
        )
        if i_level != 0:
            current_res *= 2
    assert not skip_channels
    return up


class UNet(nnx.Module):
    """The DDPM UNet (`unet.model`); CIFAR10 is ch=128, ch_mult=(1,2,2,2), 2 blocks, attn at 16.

    Forward pass (docs/original.md §1.7):
      temb = temb_mlp(sinusoid(t, ch)); hs = [conv_in(x)]
      down levels: resblocks (+attn at attn_resolutions), pushing every output; downsample
      between levels; mid: block_1, attn_1, block_2; up levels (num_res_blocks + 1 blocks each)
      pop skips and concatenate [h, skip]; upsample between levels;
      out = conv_out(swish(norm_out(h))).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        resolution: int,
        in_ch: int = 3,
        out_ch: int = 3,
        num_classes: int = 0,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.ch = ch
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.dropout = dropout
        self.resolution = resolution
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.num_classes = num_classes
        self.dtype = dtype

        temb_ch = 4 * ch
        common = dict(dropout=dropout, dtype=dtype, rngs=rngs)
        shape = (ch, self.ch_mult, num_res_blocks, self.attn_resolutions, resolution, temb_ch)

        self.temb = TimestepMLP(ch, temb_ch, dtype=dtype, rngs=rngs)
        # Created only for conditional models, so the unconditional parameter tree is unchanged.
        self.class_embed = (
            nnx.Embed(num_classes + 1, temb_ch, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
            if is_conditional(num_classes) else None
        )
        self.conv_in = _conv3x3(in_ch, ch, dtype=dtype, rngs=rngs)

        down, skip_channels = _down_levels(*shape, common)
        self.down = nnx.List(down)
        self.mid = MidLevel(ch * self.ch_mult[-1], temb_ch, **common)
        self.up = nnx.List(_up_levels(*shape, skip_channels, common))

        self.norm_out = _group_norm(ch * self.ch_mult[0], rngs=rngs)
        self.conv_out = _conv3x3(ch * self.ch_mult[0], out_ch, init_scale=0.0, dtype=dtype,
                                 rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the model output (eps, x0 or x_{t-1} mean part) for x [B,H,W,in_ch] at steps t [B].

        `y` [B] int labels (conditional models only): 0..num_classes-1, or `null_class` for the
        unconditional prediction; None means the null class. temb = temb_mlp(sinusoid(t)) +
        class_embed[y].

        Dropout is applied iff `dropout_key` is given and `dropout > 0`; resblock number n (in
        execution order: down, mid, up) uses `fold_in(dropout_key, n)`. Returns float32
        [B, H, W, out_ch].
        """
        self._check_inputs(x, y)
        temb = self._embedding(t, y, x.shape[0])
        hs, block_index = self._downsampling(x, temb, dropout_key)

        h = hs[-1]
        h = self.mid.block_1(h, temb, _block_dropout_key(dropout_key, block_index))
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb, _block_dropout_key(dropout_key, block_index + 1))

        h = self._upsampling(h, hs, temb, dropout_key, block_index + 2)
        h = self.conv_out(swish(self.norm_out(h)))
        return h.astype(jnp.float32)

    def _check_inputs(self, x: jax.Array, y: jax.Array | None) -> None:
        if y is not None and self.class_embed is None:
            raise LabelsOnUnconditionalModelError(
                f"this UNet is unconditional (model.num_classes={self.num_classes}); class labels "
                "need a model trained with model.num_classes > 1.")
        _, height, width, channels = x.shape
        if height != width or height != self.resolution or channels != self.in_ch:
            raise ValueError(
                f"expected input [B, {self.resolution}, {self.resolution}, {self.in_ch}], got {x.shape}"
            )

    def _embedding(self, t: jax.Array, y: jax.Array | None, batch: int) -> jax.Array:
        """temb = temb_mlp(sinusoid(t)) (+ class_embed[y], the null class for y = None)."""
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        temb = self.temb(timestep_embedding(t, self.ch))
        if self.class_embed is not None:
            if y is None:
                y = jnp.full((batch,), null_class(self.num_classes), jnp.int32)
            y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
            temb = temb + self.class_embed(y).astype(temb.dtype)
        return temb

    def _downsampling(self, x: jax.Array, temb: jax.Array, dropout_key: jax.Array | None
                      ) -> tuple[list[jax.Array], int]:
        """The skip stack (conv_in's output, then every block's and downsample's) and the
        number of resblocks run."""
        block_index = 0
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb, _block_dropout_key(dropout_key, block_index))
                block_index += 1
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))
        return hs, block_index

    def _upsampling(self, h: jax.Array, hs: list[jax.Array], temb: jax.Array,
                    dropout_key: jax.Array | None, block_index: int) -> jax.Array:
        """The up levels from the lowest resolution, each block on concat([h, skip])."""
        for i_level in reversed(range(len(self.up))):
            level = self.up[i_level]
            for j, block in enumerate(level.block):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(h, temb, _block_dropout_key(dropout_key, block_index))
                block_index += 1
                if len(level.attn):
                    h = level.attn[j](h)
            if level.upsample is not None:
                h = level.upsample(upsample_nearest_2x(h))
        assert not hs
        return h


# ----------------------------------------------------------------------------------------------
# Introspection: TF names, parameter counts
# ----------------------------------------------------------------------------------------------

_INDEXED_SCOPES = ("down", "up", "block", "attn")
_RESAMPLE_SCOPES = ("downsample", "upsample")


def _param_leaves(model: nnx.Module) -> list[tuple[tuple, Any]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def tf_variable_names(model: UNet) -> dict[str, tuple]:
    """Map each original TF variable name to the NNX parameter path holding it.

    E.g. 'model/down_1/block_0/nin_shortcut/W' -> ('down', 1, 'block', 0, 'nin_shortcut', 'kernel'),
    'model/down_0/downsample/conv/W' -> ('down', 0, 'downsample', 'kernel'),
    'model/up_0/block_2/norm2/gamma' -> ('up', 0, 'block', 2, 'norm2', 'scale').
    Conv/dense kernel -> W, bias -> b; GroupNorm scale -> gamma, bias -> beta.
    """
    group_norm_paths = {
        tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.GroupNorm)
    }
    names: dict[str, tuple] = {}
    for path, _ in _param_leaves(model):
        path = tuple(path)
        scopes = ["model"]
        i = 0
        while i < len(path) - 1:
            part = path[i]
            if part in _INDEXED_SCOPES:
                scopes.append(f"{part}_{path[i + 1]}")
                i += 2
                continue
            scopes.append(str(part))
            if part in _RESAMPLE_SCOPES:
                scopes.append("conv")
            i += 1
        is_norm = path[:-1] in group_norm_paths
        leaf = {
            "kernel": "W",
            "bias": "beta" if is_norm else "b",
            "scale": "gamma",
            "embedding": "embedding",  # class_embed: conditional models only, no TF original
        }[path[-1]]
        names["/".join(scopes + [leaf])] = path
    return names


def count_params(model: nnx.Module) -> int:
    """Total number of scalar parameters (works on `nnx.eval_shape` models too)."""
    return sum(math.prod(variable.shape) for _, variable in _param_leaves(model))


def param_summary(model: UNet) -> list[tuple[str, int]]:
    """Parameter count per top-level TF scope, in the reference order:
    temb, [class_embed,] conv_in, down_0..down_{L-1}, mid, up_{L-1}..up_0, norm_out, conv_out."""
    totals: dict[str, int] = {}
    for path, variable in _param_leaves(model):
        scope = f"{path[0]}_{path[1]}" if path[0] in ("down", "up") else str(path[0])
        totals[scope] = totals.get(scope, 0) + math.prod(variable.shape)
    num_levels = len(model.ch_mult)
    order = (
        ["temb"]
        + (["class_embed"] if "class_embed" in totals else [])
        + ["conv_in"]
        + [f"down_{i}" for i in range(num_levels)]
        + ["mid"]
        + [f"up_{i}" for i in reversed(range(num_levels))]
        + ["norm_out", "conv_out"]
    )
    return [(scope, totals[scope]) for scope in order]
