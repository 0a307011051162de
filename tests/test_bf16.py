"""`model.dtype = "bfloat16"`: bf16 convolutions/dense layers, float32 parameters and optimizer state.

Compares the bf16 and float32 models on the same parameters, batch, timesteps and noise. The
tolerances follow from bfloat16's 8-bit significand: each rounding is off by at most 2^-9 ≈ 0.2%
relative, and about two dozen layers in sequence compound that to ~1-2% relative error in the
network output (measured: 1.5% RMS here). The loss averages the squared error of the output
against unit-variance noise over all pixels and examples, so those rounding errors largely
cancel in it: we require 0.5% on the batch mean and 2% per example (measured: 0.02% and 0.5%).
The output must also differ from float32 by more than 0.1% RMS, or bf16 would not be in effect
(an all-float32 computation differs by ~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import model_fns, train_step

BATCH = 16


def tiny_config(dtype: str):
    config = digits.get_config()
    config.model.ch = 32  # 8x8x1 images, levels of 32 and 64 channels
    config.model.dtype = dtype
    return config


@pytest.fixture(scope="module")
def inputs():
    """Parameters moved off their init (whose zero-initialised output layers make the model
    output ~0 and the loss ~E[ε²] whatever the precision), and one batch."""
    _, params = model_fns.init_params(tiny_config("float32"), seed=0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    image_key, t_key, noise_key = jax.random.split(jax.random.key(2), 3)
    x_start = jax.random.uniform(image_key, (BATCH, 8, 8, 1), minval=-1.0, maxval=1.0)
    t = jax.random.randint(t_key, (BATCH,), 0, 1000)
    noise = jax.random.normal(noise_key, x_start.shape)
    return params, x_start, t, noise


@pytest.fixture(scope="module")
def results(inputs):
    params, x_start, t, noise = inputs
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(dtype)
        graphdef, _ = model_fns.abstract_params(config)
        loss_fn = train_step.make_loss_fn(graphdef, config)

        @jax.jit
        def evaluate(params):
            (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, x_start, None, t, noise, None)
            output = model_fns.merge(graphdef, params)(x_start, t)
            return loss, losses, grads, output

        out[dtype] = jax.device_get(evaluate(params))
    return out


def test_bf16_loss_agrees_with_float32(results):
    loss32, losses32, _, _ = results["float32"]
    loss16, losses16, _, _ = results["bfloat16"]
    assert loss32 > 1.1  # the perturbed model's output is far from 0 (else the loss is ~1)
    np.testing.assert_allclose(loss16, loss32, rtol=5e-3)
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)


def test_bf16_is_really_computed_in_bf16(results):
    output32 = results["float32"][3]
    output16 = results["bfloat16"][3]
    assert output16.dtype == np.float32  # the UNet returns float32 whatever its compute dtype
    relative_rms = np.sqrt(np.mean((output16 - output32) ** 2) / np.mean(output32 ** 2))
    assert 1e-3 < relative_rms < 5e-2


def test_bf16_gradients_point_the_same_way(results):
    grads32 = np.concatenate([g.ravel() for g in jax.tree.leaves(results["float32"][2])])
    grads16 = np.concatenate([g.ravel() for g in jax.tree.leaves(results["bfloat16"][2])])
    cosine = grads32 @ grads16 / np.linalg.norm(grads32) / np.linalg.norm(grads16)
    assert cosine > 0.999
    np.testing.assert_allclose(np.linalg.norm(grads16), np.linalg.norm(grads32), rtol=1e-2)
    # Gradients reach the float32 parameters as float32.
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(results["bfloat16"][2]))


def test_bf16_train_state_is_float32():
    """Parameters, EMA and both Adam moments stay float32 under bf16 compute."""
    _, state = train_step.abstract_train_state(tiny_config("bfloat16"))
    float_leaves = [x for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(float_leaves) >= 4 * len(jax.tree.leaves(state.params))
    assert {x.dtype for x in float_leaves} == {jnp.dtype(jnp.float32)}
