"""`training.ema_warmup`: decay_t = min(decay, (1 + t) / (10 + t)) for short runs; the paper's
configs keep the constant decay."""

import importlib
import math

import jax
import numpy as np
import pytest

from ddpm_jax import parallel, train_step
from helpers import tiny_config

SMALL_CONFIGS = ("digits", "digits_cond", "mnist", "mnist_cond", "fashion_mnist", "imagefolder")
PAPER_CONFIGS = ("cifar10", "celebahq256", "lsun_bedroom", "lsun_cat", "lsun_church")


def _batch(config, steps):
    rng = np.random.default_rng(0)
    size, channels, batch = config.data.image_size, config.data.channels, config.training.batch_size
    images = rng.integers(0, 256, (steps, batch, size, size, channels), dtype=np.uint8)
    return images, np.zeros((steps, batch), np.int32)


def _train(config, calls):
    """Runs `calls` calls of the train step; the initial state and the state after each call."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    graphdef, state = train_step.create_train_state(config, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)
    k = config.training.steps_per_call
    images, labels = _batch(config, k * calls)
    states = [jax.device_get(state)]
    for c in range(calls):
        state, _ = step(state, parallel.to_global_array(images[c * k:(c + 1) * k], mesh, 1),
                        parallel.to_global_array(labels[c * k:(c + 1) * k], mesh, 1),
                        jax.random.key(config.seed))
        states.append(jax.device_get(state))
    return states


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_warmup_ema_follows_the_warmup_recursion():
    """The shadow, replayed in float64 from the raw weights after each step with
    decay_t = min(0.995, (1 + t) / (10 + t)), t = updates done before step t's update."""
    config = tiny_config()
    config.training.ema_decay = 0.995
    config.training.ema_warmup = True
    states = _train(config, calls=6)
    shadow = _leaves(states[0].params)
    for t, state in enumerate(states[1:]):
        decay = min(0.995, (1 + t) / (10 + t))
        shadow = [e - (1 - decay) * (e - p) for e, p in zip(shadow, _leaves(state.params))]
        got = _leaves(state.ema_params)
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, shadow)) <= 1e-6, t


def test_warmup_decay_caps_at_the_configured_decay():
    # (1 + t) / (10 + t) passes 0.9 at t = 80: from there on the configured decay holds.
    for t, want in [(0, 0.1), (8, 0.5), (79, 0.89887640), (80, 0.9), (81, 0.9), (10_000, 0.9)]:
        assert float(train_step.ema_decay_at(t, 0.9, True)) == pytest.approx(want, rel=1e-6)
    assert train_step.ema_decay_at(5, 0.9, False) == 0.9


def test_after_150_steps_the_warmup_ema_has_forgotten_the_initial_weights():
    """The issue's case: decay 0.995, 150 steps. Without warm-up the shadow still holds
    0.995^150 = 47 % of the initial weights; with it prod_t (1+t)/(10+t) = 9! 150!/159!
    ≈ 2e-14, so the shadow is an average of recent raw weights and close to them."""
    config = tiny_config()
    config.training.ema_decay = 0.995
    config.training.steps_per_call = 50
    distances = {}
    for warmup in (False, True):
        config.training.ema_warmup = warmup
        states = _train(config, calls=3)
        initial, final = _leaves(states[0].params), states[-1]
        raw = _leaves(final.params)
        moved = math.sqrt(sum(float(np.sum((p - i) ** 2)) for p, i in zip(raw, initial)))
        lag = math.sqrt(sum(float(np.sum((e - p) ** 2))
                            for e, p in zip(_leaves(final.ema_params), raw)))
        distances[warmup] = lag / moved
    # Without warm-up ema − raw contains 0.995^150 (initial − raw): ~0.47 of the distance moved
    # or more. With it the weights w_t ∝ prod_{s>t} d_s put the shadow's mean age at ~N/10 steps,
    # so it lags the raw weights by about a tenth of their path (0.11 measured here).
    assert distances[False] > 0.9 * 0.995 ** 150
    assert distances[True] < 0.2


@pytest.mark.parametrize("name", SMALL_CONFIGS + PAPER_CONFIGS)
def test_warmup_on_for_small_configs_off_for_the_paper(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.training.ema_warmup is (name in SMALL_CONFIGS)
    if name in PAPER_CONFIGS:
        assert config.training.ema_decay == 0.9999


def test_paper_config_ema_is_the_constant_decay():
    """With the paper's setting (warm-up off) one step is shadow ← d·shadow + (1 − d)·params."""
    config = tiny_config()
    assert config.training.ema_warmup is False
    config.training.ema_decay = 0.9999
    before, after = _train(config, calls=1)
    d = 0.9999
    for e0, p, e in zip(_leaves(before.ema_params), _leaves(after.params),
                        _leaves(after.ema_params)):
        np.testing.assert_allclose(e, d * e0 + (1 - d) * p, rtol=0, atol=1e-7)
