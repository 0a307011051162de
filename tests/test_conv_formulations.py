"""Each CPU formulation of `ddpm_jax.conv` against XLA's own gradients (`jax.vjp` of
`lax.conv_general_dilated`), at the learner shapes (batch 64, 32-64 channels, 28-32 px), the
1- and 3-channel input layers, odd sizes and stride 2."""

import jax
import numpy as np
import pytest
from jax import lax

from ddpm_jax import conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (batch, size, in, out, stride); SAME padding as the UNet's `_conv3x3`.
SHAPES = [
    (64, 28, 1, 32, 1),   # conv_in of a 28 px grey model
    (64, 32, 3, 32, 1),   # conv_in of a 32 px colour model
    (64, 28, 32, 32, 1),
    (64, 28, 32, 32, 2),  # downsample 28 -> 14
    (64, 14, 64, 64, 2),  # downsample 14 -> 7
    (64, 7, 64, 64, 1),   # the 7x7 attention level
    (64, 7, 3, 32, 2),    # odd size, stride 2, few channels
    (8, 7, 1, 8, 2),
    (64, 32, 64, 32, 1),
    (64, 28, 32, 1, 1),   # conv_out to one channel
]


def _native(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)


def _ours(x, w, stride):
    return conv.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)


def _relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("batch,size,c_in,c_out,stride", SHAPES)
def test_cpu_formulations_equal_xla_gradients(monkeypatch, batch, size, c_in, c_out, stride):
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    kx, kw, kg = jax.random.split(jax.random.key(size * 100 + c_in), 3)
    x = jax.random.normal(kx, (batch, size, size, c_in))
    w = jax.random.normal(kw, (3, 3, c_in, c_out))
    out = _native(x, w, stride)
    g = jax.random.normal(kg, out.shape)
    want = jax.jit(lambda x, w, g: (out, *jax.vjp(lambda x, w: _native(x, w, stride), x, w)[1](g)))
    got = jax.jit(lambda x, w, g: (_ours(x, w, stride),
                                   *jax.vjp(lambda x, w: _ours(x, w, stride), x, w)[1](g)))
    for name, a, b in zip(("y", "dx", "dw"), got(x, w, g), want(x, w, g)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _relative(a, b) <= 1e-5, name


@pytest.mark.parametrize("formulation", ["canonical", "im2col"])
@pytest.mark.parametrize("c_in,stride", [(1, 1), (3, 2), (32, 1), (32, 2)])
def test_each_kernel_gradient_formulation_equals_xla(formulation, c_in, stride):
    """Both kernel-gradient formulations at every kind of shape, whichever the rule picks."""
    batch, size, c_out = 16, 7, 8
    kx, kg = jax.random.split(jax.random.key(c_in + stride), 2)
    x = jax.random.normal(kx, (batch, size, size, c_in))
    w = jax.numpy.zeros((3, 3, c_in, c_out))
    padding = tuple(lax.padtype_to_pads((size, size), (3, 3), (stride, stride), "SAME"))
    g = jax.random.normal(kg, _native(x, w, stride).shape)
    want = jax.vjp(lambda w: _native(x, w, stride), w)[1](g)[0]
    fn = {"canonical": conv._kernel_grad_canonical, "im2col": conv._kernel_grad_im2col}[formulation]
    got = fn(x, g, (3, 3), (stride, stride), padding, None)
    assert got.shape == want.shape
    assert _relative(got, want) <= 1e-5


def test_tpu_and_gpu_keep_xla_gradients(monkeypatch):
    """Off the CPU backend `auto` is XLA's own convolution and gradients, op for op."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    x = jax.numpy.ones((2, 8, 8, 1))
    w = jax.numpy.ones((3, 3, 1, 4))
    loss = lambda w: _ours(x, w, 1).sum()
    hlo = jax.jit(jax.grad(loss)).lower(w).as_text()
    assert "conv_kernel_gradient" not in hlo and "conv_input_gradient" not in hlo
