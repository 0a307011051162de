"""The original's optimiser pieces against direct computations (docs/original.md §3.4)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar10
from ddpm_jax import optim


def test_warmup_learning_rate_matches_get_warmed_up_lr():
    schedule = optim.warmup_learning_rate(2e-4, 5000)
    for k in (0, 1, 2500, 4999, 5000, 5001, 800_000):
        expected = 2e-4 * min(k / 5000, 1.0)  # utils.get_warmed_up_lr, k = global_step
        assert float(schedule(k)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def _tf1_adam_reference(grads_sequence, lr_sequence, b1=0.9, b2=0.999, eps=1e-8):
    """tf.train.AdamOptimizer written out in float64 NumPy."""
    theta = np.zeros_like(grads_sequence[0], np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for step, (g, lr) in enumerate(zip(grads_sequence, lr_sequence), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        theta = theta - lr_t * m / (np.sqrt(v) + eps)
    return theta


def test_optimizer_is_tf1_adam_with_warmup():
    config = cifar10.get_config()
    config.training.warmup_steps = 3
    config.training.lr = 0.1
    optimizer = optim.make_optimizer(config.training)
    rng = np.random.default_rng(0)
    # Tiny gradients make the epsilon-hat form matter.
    grads = [rng.normal(size=(5,)) * scale for scale in (1e-9, 1e-8, 1.0, 1e-7, 3.0, 1e-9)]
    params = jnp.zeros(5)
    state = optimizer.init(params)
    for g in grads:
        updates, state = optimizer.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
    lrs = [0.1 * min(k / 3, 1.0) for k in range(len(grads))]
    expected = _tf1_adam_reference(grads, lrs)
    np.testing.assert_allclose(np.asarray(params), expected, rtol=2e-5, atol=1e-9)
    # optax's Adam places epsilon differently; with gradients ~1e-9 the two must differ,
    # which shows the reference above can tell them apart.
    config.training.adam_eps_style = "optax"
    optax_adam = optim.make_optimizer(config.training)
    other, other_state = jnp.zeros(5), optax_adam.init(jnp.zeros(5))
    for g in grads:
        updates, other_state = optax_adam.update(jnp.asarray(g, jnp.float32), other_state, other)
        other = optax.apply_updates(other, updates)
    assert np.max(np.abs(np.asarray(other) - expected)) > 1e-3 * np.max(np.abs(expected))


def test_first_update_has_zero_learning_rate_but_moves_moments():
    config = cifar10.get_config()
    optimizer = optim.make_optimizer(config.training)
    params = jnp.ones(3)
    state = optimizer.init(params)
    updates, state = optimizer.update(jnp.array([1.0, -2.0, 3.0]), state, params)
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
    np.testing.assert_allclose(np.asarray(state[0].mu), [0.1, -0.2, 0.3], rtol=1e-6)


def test_clip_by_global_norm_matches_tf_formula():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # norm 13
    clipped, norm = optim.clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(13.0)
    np.testing.assert_allclose(np.asarray(clipped["a"]), [3 / 13, 4 / 13], rtol=1e-6)
    same, _ = optim.clip_by_global_norm(grads, 100.0)
    np.testing.assert_array_equal(np.asarray(same["b"]), [[12.0]])


def test_ema_update_is_tf_exponential_moving_average():
    shadow = {"w": jnp.array([1.0, 2.0])}
    var = {"w": jnp.array([3.0, -2.0])}
    decay = 0.9999
    out = optim.ema_update(shadow, var, decay)
    # shadow ← decay·shadow + (1 − decay)·var
    np.testing.assert_allclose(np.asarray(out["w"]),
                               [decay * 1 + (1 - decay) * 3, decay * 2 + (1 - decay) * -2],
                               rtol=1e-7)


def test_unknown_eps_style_is_a_clear_error():
    config = cifar10.get_config()
    config.training.adam_eps_style = "keras"
    with pytest.raises(ValueError, match="adam_eps_style"):
        optim.make_optimizer(config.training)
