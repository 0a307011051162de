"""`ddpm_jax.conv`: the CPU gradient formulation against XLA's own convolution gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddpm_jax import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def native(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def rewritten(x, w, strides, padding):
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@pytest.fixture(autouse=True)
def explicit_gradients(monkeypatch):
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")


@pytest.mark.parametrize("size,kernel,strides,padding", [
    (8, 3, (1, 1), ((1, 1), (1, 1))),  # the UNet's 3x3 convolutions
    (8, 3, (2, 2), ((0, 1), (0, 1))),  # its downsampling convolution (the original's padding)
    (7, 3, (2, 2), ((0, 1), (0, 1))),  # odd size: the last input row never reached by a stride
    (9, 3, (2, 1), ((1, 0), (2, 1))),  # asymmetric strides and paddings
    (6, 1, (1, 1), ((0, 0), (0, 0))),  # 1x1
    (10, 5, (3, 3), ((2, 2), (2, 2))),
])
def test_gradients_equal_xla_gradients(size, kernel, strides, padding):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, size, size + 1, 4))
    w = jax.random.normal(kw, (kernel, kernel, 4, 5))
    out = native(x, w, strides, padding)
    g = jax.random.normal(kg, out.shape)
    np.testing.assert_array_equal(rewritten(x, w, strides, padding), out)
    want = jax.vjp(lambda x, w: native(x, w, strides, padding), x, w)[1](g)
    got = jax.vjp(lambda x, w: rewritten(x, w, strides, padding), x, w)[1](g)
    for name, a, b in zip(("dx", "dw"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_inside_a_scan_equal_xla_gradients():
    """The train loop's situation: parameters carried through `lax.scan`."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    w0 = jax.random.normal(jax.random.key(2), (3, 3, 4, 4)) * 0.1

    def train(conv_fn):
        def body(w, _):
            loss = lambda w: jnp.sum(conv_fn(x, w, (1, 1), ((1, 1), (1, 1))) ** 2)
            return w - 1e-3 * jax.grad(loss)(w), None
        return jax.jit(lambda w: lax.scan(body, w, None, length=3)[0])(w0)

    np.testing.assert_allclose(train(rewritten), train(native), rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_keep_their_dtypes():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (3, 3, 4, 4), jnp.bfloat16)
    g = jnp.ones((2, 4, 4, 4), jnp.bfloat16)
    padding = ((0, 1), (0, 1))
    got = jax.vjp(lambda x, w: rewritten(x, w, (2, 2), padding), x, w)[1](g)
    want = jax.vjp(lambda x, w: native(x, w, (2, 2), padding), x, w)[1](g)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("c_in", [4, 1])  # 1: the kernel gradient is the im2col matmul
def test_profile_labels_and_flops_of_the_three_convolutions(c_in):
    """benchmarks/common.hlo_ops finds forward, input- and kernel-gradient convolutions by the
    scopes `conv.py` names, with FLOPs 2·B·H·W·C_in·C_out·k² each (stride 1, SAME)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import common

    batch, size, c_out = 2, 8, 6
    x = jnp.ones((batch, size, size, c_in))
    w = jnp.ones((3, 3, c_in, c_out))

    def loss(x, w):
        return jnp.sum(rewritten(x, w, (1, 1), ((1, 1), (1, 1))) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    flops_by_kind = {}
    for kind, flops in common.hlo_ops(hlo).values():
        if kind.startswith("convolution"):
            flops_by_kind[kind] = flops
    expected = 2 * batch * size * size * c_in * c_out * 9
    assert flops_by_kind == {"convolution: forward": expected,
                             "convolution: input gradient": expected,
                             "convolution: kernel gradient": expected}
