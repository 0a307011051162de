"""2-D convolution whose two gradients are written as canonical NHWC/HWIO convolutions.

Why: inside a `lax.scan`/`while` body (the `steps_per_call` train loop), XLA:CPU leaves the
gradient convolutions of `lax.conv_general_dilated` in non-canonical dimension orders and runs
them on slow paths: the kernel gradient (`f01b_i01o->01bf`) on a naive loop emitter, 20-200x
slower than outside the loop, and the input gradient (kernel dims `01oi`) about 6x slower.
Expressing the same sums as ordinary NHWC convolutions keeps both on the fast path; the results
equal XLA's own gradients up to float32 summation order (on XLA:CPU the two convolutions below
come out bit-identical, the im2col kernel gradient further down differs by ~1e-6 relative):

    dW[kh, kw, i, o] = Σ_{b,y,x} x_pad[b, s·y + kh, s·x + kw, i] · g[b, y, x, o]

a convolution of x_padᵀ [i, H, W, b] with gᵀ [Ho, Wo, b, o] dilated by the stride s, and

    dx = conv(g dilated by s, W flipped in space with i and o swapped)

padded by (k − 1 − p_lo, k − 1 − p_hi + r), r = (H + p_lo + p_hi − k) mod s (the rows the
strided forward pass never reached). `KERNEL_GRAD = "auto"` uses them on the CPU backend only;
TPU/GPU keep XLA's own gradients.

The kernel gradient of a layer with few input channels (the image's 1 or 3, `IM2COL_MAX_IN`)
is instead one matmul of the 9 shifted windows of x (im2col, [B·Ho·Wo, k²·i]) with g
([B·Ho·Wo, o]): the canonical convolution then has only i = 1-3 "images" and runs at a third
of the matmul's rate, and the shifted copies are cheap at 1-3 channels. At 32-256 channels the
canonical convolution stays fastest (benchmarks/README.md: the formulations measured per shape).

Under `vmap` (the clipping groups of `ddpm_jax/gradients.py`: 4 groups of 16 per device at
batch 64) x and g of the kernel gradient are both batched, and XLA would turn the canonical
convolution into one with `feature_group_count` = groups, which XLA:CPU runs 4-7x slower than
the same convolutions one group at a time (56 % of the learner step's op time before). A
`custom_vmap` rule gives every vmapped slice its own product instead (`PER_SLICE_UNDER_VMAP`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# "auto" (explicit on CPU), "explicit" or "native"; read when a model is traced.
KERNEL_GRAD = "auto"

_NHWC = ("NHWC", "HWIO", "NHWC")
# Layers with at most this many input channels take the im2col kernel gradient.
IM2COL_MAX_IN = 3
# Under vmap, up to this many slices get a kernel-gradient product each in the program; more
# are looped over (lax.map), which keeps the program small at some cost in speed.
MAX_UNROLLED_SLICES = 16
# False: let XLA batch the kernel gradient under vmap (the grouped convolution; for A/B runs).
PER_SLICE_UNDER_VMAP = True


def _use_explicit() -> bool:
    if KERNEL_GRAD == "auto":
        return jax.default_backend() == "cpu"
    return KERNEL_GRAD == "explicit"


def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_explicit_kernel_grad(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision)


def _forward(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def _backward(strides, padding, precision, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    input_padding = tuple(
        (k - 1 - lo, k - 1 - hi + (size + lo + hi - k) % s)
        for k, size, s, (lo, hi) in zip((kh, kw), x.shape[1:3], strides, padding))
    # The scope names label these ops in profiles (benchmarks/common.py sorts time by them).
    with jax.named_scope("conv_input_gradient"):
        w_flipped = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # [kh, kw, o, i]
        dx = lax.conv_general_dilated(g, w_flipped.astype(g.dtype), (1, 1), input_padding,
                                      lhs_dilation=strides, dimension_numbers=_NHWC,
                                      precision=precision).astype(x.dtype)
    with jax.named_scope("conv_kernel_gradient"):
        dw = _kernel_grad((kh, kw), strides, padding, precision)(x, g)
    return dx, dw.astype(w.dtype)


def _kernel_grad(window, strides, padding, precision):
    """The kernel gradient `(x, g) -> dW`, one formulation per unbatched slice under `vmap`.

    Why: the clipping groups (`ddpm_jax/gradients.py`) vmap the gradient over the groups of a
    device's shard, with x and g batched. XLA batches the canonical convolution into one with
    `feature_group_count` = groups, which XLA:CPU (YNNPACK) runs 4-7x slower than the same
    convolutions one group at a time (benchmarks/README.md, "Learner shapes"), so under `vmap`
    each slice gets its own kernel-gradient product.
    """
    def unbatched(x, g):
        if x.shape[3] <= IM2COL_MAX_IN and min(min(p) for p in padding) >= 0:
            return _kernel_grad_im2col(x, g, window, strides, padding, precision)
        return _kernel_grad_canonical(x, g, window, strides, padding, precision)

    if not PER_SLICE_UNDER_VMAP:
        return unbatched
    kernel_grad = jax.custom_batching.custom_vmap(unbatched)

    @kernel_grad.def_vmap
    def _per_slice(axis_size, in_batched, x, g):
        x_batched, g_batched = in_batched
        one = lambda j: kernel_grad(x[j] if x_batched else x, g[j] if g_batched else g)
        # `kernel_grad` again, so that an enclosing vmap applies this rule once more.
        if axis_size <= MAX_UNROLLED_SLICES:
            return jnp.stack([one(j) for j in range(axis_size)]), True
        return lax.map(one, jnp.arange(axis_size)), True

    return kernel_grad


def _kernel_grad_canonical(x, g, window, strides, padding, precision):
    """dW as a canonical convolution of xᵀ [i, H, W, b] with gᵀ [Ho, Wo, b, o]."""
    kh, kw = window
    x_t = jnp.transpose(x, (3, 1, 2, 0))  # [i, H, W, b]
    g_t = jnp.transpose(g, (1, 2, 0, 3))  # [Ho, Wo, b, o]
    dw = lax.conv_general_dilated(x_t, g_t, (1, 1), padding, rhs_dilation=strides,
                                  dimension_numbers=_NHWC, precision=precision)
    return jnp.transpose(dw[:, :kh, :kw, :], (1, 2, 0, 3))  # [kh, kw, i, o]


def _kernel_grad_im2col(x, g, window, strides, padding, precision):
    """dW[kh, kw] = Σ_{b,y,x} x_pad[b, s·y + kh, s·x + kw]ᵀ g[b, y, x] as one matmul over the
    k² shifted (and strided) windows of x stacked on the channel axis."""
    kh, kw = window
    (sh, sw), (ho, wo) = strides, g.shape[1:3]
    x_pad = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = [x_pad[:, a:a + sh * (ho - 1) + 1:sh, c:c + sw * (wo - 1) + 1:sw, :]
               for a in range(kh) for c in range(kw)]
    columns = jnp.concatenate(windows, axis=-1)  # [b, Ho, Wo, kh·kw·i]
    dw = jnp.einsum("bhwk,bhwo->ko", columns, g.astype(x.dtype), precision=precision,
                    preferred_element_type=jnp.float32)
    return dw.reshape(kh, kw, x.shape[3], g.shape[3])


_conv_explicit_kernel_grad.defvjp(_forward, _backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision: Any = None, **kwargs
                         ) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (as `nnx.Conv(conv_general_dilated=...)`)."""
    simple = (lhs.ndim == 4 and feature_group_count == 1
              and all(d in (None, 1) for d in (lhs_dilation or ()) + (rhs_dilation or ()))
              and kwargs.get("preferred_element_type") is None)
    if not (simple and _use_explicit()):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                        dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        precision=precision, **kwargs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        raise ValueError(f"explicit kernel gradient supports NHWC/HWIO only, got {dn}")
    if isinstance(padding, str):
        padding = tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                            padding))
    return _conv_explicit_kernel_grad(lhs, rhs, tuple(window_strides),
                                      tuple(tuple(p) for p in padding), precision)
