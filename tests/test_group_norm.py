"""`unet.GroupNorm` (on CPU `unet.group_norm_cpu`, with its hand-written gradient) against
nx.GroupNorm's autodiff and a NumPy float64 GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_jax import unet


def _numpy_group_norm(x, scale, bias, groups, eps):
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape", [(64, 28, 28, 32), (8, 7, 7, 64), (4, 14, 14, 96), (2, 8, 8, 128)])
def test_cpu_group_norm_and_its_gradient_equal_nnx_and_float64(shape):
    c = shape[-1]
    model = unet._group_norm(c, rngs=nnx.Rngs(0))
    assert isinstance(model, nnx.GroupNorm)  # tf_variable_names relies on it
    kx, ks, kb, kg = jax.random.split(jax.random.key(c), 4)
    # An offset mean and a large spread: the two-pass variance matters.
    x = jax.random.normal(kx, shape) * 3 + 5
    model.scale.value = jax.random.normal(ks, (c,))
    model.bias.value = jax.random.normal(kb, (c,))
    reference = nnx.GroupNorm(c, num_groups=unet.NUM_GROUPS, epsilon=unet.GROUP_NORM_EPS,
                              use_fast_variance=False, rngs=nnx.Rngs(0))
    reference.scale.value, reference.bias.value = model.scale.value, model.bias.value

    got = model(x)
    want = _numpy_group_norm(np.asarray(x), np.asarray(model.scale.value),
                             np.asarray(model.bias.value), unet.NUM_GROUPS, unet.GROUP_NORM_EPS)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    g = jax.random.normal(kg, shape)

    def grads(module):
        graphdef, params = nnx.split(module)
        f = lambda x, params: jnp.sum(jax.nn.silu(nnx.merge(graphdef, params)(x)) * g)
        return jax.grad(f, argnums=(0, 1))(x, params)

    (dx, dp), (dx_ref, dp_ref) = grads(model), grads(reference)
    scale = float(jnp.max(jnp.abs(dx_ref)))
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * scale)
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_cpu_group_norm_gradient_under_vmap_and_scan_equals_nnx():
    """The clipping groups vmap the gradient, `steps_per_call` scans it: the custom gradient
    must batch and loop like autodiff's."""
    c, shape = 64, (3, 2, 7, 7, 64)  # 3 vmapped groups of 2 images, 7×7 (odd size)
    model = unet._group_norm(c, rngs=nnx.Rngs(0))
    kx, ks, kb, kg = jax.random.split(jax.random.key(1), 4)
    model.scale.value = jax.random.normal(ks, (c,))
    model.bias.value = jax.random.normal(kb, (c,))
    reference = nnx.GroupNorm(c, num_groups=unet.NUM_GROUPS, epsilon=unet.GROUP_NORM_EPS,
                              use_fast_variance=False, rngs=nnx.Rngs(0))
    reference.scale.value, reference.bias.value = model.scale.value, model.bias.value
    x = jax.random.normal(kx, shape) * 2 - 1
    g = jax.random.normal(kg, shape)

    def grads(module):
        graphdef, params = nnx.split(module)
        loss = lambda x, g, params: jnp.sum(jax.nn.silu(nnx.merge(graphdef, params)(x)) * g)
        per_group = jax.vmap(jax.grad(loss, argnums=(0, 2)), in_axes=(0, 0, None))

        def body(carry, _):  # two scan steps, the second on the first's input gradient
            dx, dp = per_group(carry, g, params)
            return dx, dp
        return jax.lax.scan(body, x, None, length=2)

    (dx, dp), (dx_ref, dp_ref) = grads(model), grads(reference)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(dx_ref))))
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
        assert a.shape == b.shape == (2, 3, c)  # per scan step and per group
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_cpu_group_norm_is_used_on_cpu_only(monkeypatch):
    calls = []
    real = unet.group_norm_cpu
    monkeypatch.setattr(unet, "group_norm_cpu", lambda *a: calls.append(a[0].shape) or real(*a))
    model = unet._group_norm(32, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 4, 32))
    jax.jit(lambda x: model(x)).lower(x)
    assert calls == [(2, 4, 4, 32)]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    jax.jit(lambda x: model(x)).lower(x)
    assert calls == [(2, 4, 4, 32)]
