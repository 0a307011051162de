"""Clipping by example group: the same step on any device count, against a per-group loop.

The reference below is written from the documented recipe, not from the train step's code:
per-example randomness `fold_in(fold_in(key(seed), step), example index)` split into (t, ε, flip),
x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with ᾱ from float64 linear betas, the L_simple loss, each group's
gradient clipped to `grad_clip`, the mean of the clipped gradients, and one step of TF1's Adam
and of the EMA written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import gradients, model_fns, parallel, train_step
from helpers import tiny_config

BATCH = 32


@pytest.fixture(scope="module")
def config():
    config = tiny_config()
    config.training.batch_size = BATCH
    config.training.clip_mode = "group"
    config.training.clip_group_size = 16
    config.training.grad_clip = 0.05  # small: every group's gradient is clipped
    config.training.lr = 1e-2
    config.training.warmup_steps = 0
    return config


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (1, BATCH, 8, 8, 1), dtype=np.uint8)


def _step(config, images, num_devices):
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    graphdef, state = train_step.create_train_state(config, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)
    labels = np.zeros(images.shape[:2], np.int32)
    state, metrics = step(state, parallel.to_global_array(images, mesh, 1),
                          parallel.to_global_array(labels, mesh, 1), jax.random.key(config.seed))
    return jax.device_get(state), jax.device_get(metrics)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _reference_step(config, images):
    """One step of the recipe, group by group, in plain code."""
    tc = config.training
    graphdef, params = model_fns.init_params(config)
    params = jax.device_get(params)
    betas = np.linspace(config.diffusion.beta_start, config.diffusion.beta_end,
                        config.diffusion.num_timesteps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas).astype(np.float32)
    step_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    x0, ts, eps = [], [], []
    for i in range(BATCH):
        t_key, noise_key, flip_key = jax.random.split(jax.random.fold_in(step_key, i), 3)
        t = int(jax.random.randint(t_key, [], 0, config.diffusion.num_timesteps))
        noise = np.asarray(jax.random.normal(noise_key, (8, 8, 1), jnp.float32))
        x = images[0, i].astype(np.float32) / 127.5 - 1.0
        if config.data.random_flip and bool(jax.random.bernoulli(flip_key, 0.5)):
            x = x[:, ::-1]
        x0.append(x), ts.append(t), eps.append(noise)
    x0, ts, eps = np.stack(x0), np.asarray(ts, np.int32), np.stack(eps)
    x_t = np.sqrt(abar[ts])[:, None, None, None] * x0 + np.sqrt(1 - abar[ts])[:, None, None, None] * eps

    def group_loss(p, rows):
        out = model_fns.merge(graphdef, p)(jnp.asarray(x_t[rows]), jnp.asarray(ts[rows]), None)
        return jnp.mean((jnp.asarray(eps[rows]) - out) ** 2)

    size = tc.clip_group_size
    clipped = []
    for start in range(0, BATCH, size):
        g = jax.grad(group_loss)(params, slice(start, start + size))
        norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                 for x in jax.tree.leaves(g))))
        assert norm > tc.grad_clip  # the clip is active for every group
        clipped.append(jax.tree.map(lambda x: np.asarray(x, np.float64) * tc.grad_clip / norm, g))
    grad = jax.tree.map(lambda *g: sum(g) / len(g), *clipped)
    # TF1 Adam, first update: m = (1−β1) g, v = (1−β2) g², Δ = lr √(1−β2)/(1−β1) m/(√v + ε).
    b1, b2 = tc.adam_b1, tc.adam_b2
    mu = jax.tree.map(lambda g: (1 - b1) * g, grad)
    nu = jax.tree.map(lambda g: (1 - b2) * g * g, grad)
    new = jax.tree.map(
        lambda p, m, v: np.asarray(p, np.float64)
        - tc.lr * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + tc.adam_eps), params, mu, nu)
    ema = jax.tree.map(lambda e, p: e - (1 - tc.ema_decay) * (e - p), params, new)
    return new, ema, mu, nu


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_group_clipping_is_the_same_step_on_any_device_count(config, images, num_devices):
    # 1 device: two groups vmapped; 2: one group per device; 4 and 8: a group spans 2 or 4.
    state, metrics = _step(config, images, num_devices)
    params, ema, mu, nu = _reference_step(config, images)
    assert _max_diff(state.params, params) <= 1e-5
    assert _max_diff(state.ema_params, ema) <= 1e-5
    assert _max_diff(state.opt_state[0].mu, mu) <= 1e-7
    assert _max_diff(state.opt_state[0].nu, nu) <= 1e-9
    assert np.isfinite(metrics["grad_norm"]).all() and float(metrics["grad_norm"][0]) > 0.05


def test_group_clipping_differs_from_clipping_the_mean(config, images):
    grouped, _ = _step(config, images, 8)
    other = config.copy_and_resolve_references()
    other.training.clip_mode = "global"
    averaged, _ = _step(other, images, 8)
    assert _max_diff(grouped.params, averaged.params) > 1e-4


@pytest.mark.parametrize("mode, group, devices, micro", [
    ("group", 16, 1, 8),  # two groups scanned, each accumulated over two chunks before clipping
    ("group", 16, 4, 4),  # a group spanning two devices, in chunks
    ("group", 8, 1, 16),  # four groups: two chunks scanned, each two groups (in parts on CPU)
    ("per_device", 0, 2, 8),
    ("global", 0, 4, 2),
])
def test_microbatches_equal_the_unsplit_step(config, images, mode, group, devices, micro):
    config = config.copy_and_resolve_references()
    config.training.clip_mode = mode
    config.training.clip_group_size = group or 16
    whole, _ = _step(config, images, devices)
    config.training.microbatch_size = micro
    split, metrics = _step(config, images, devices)
    assert _max_diff(whole.params, split.params) <= 1e-5
    assert _max_diff(whole.opt_state, split.opt_state) <= 1e-6
    assert np.isfinite(metrics["loss"]).all()


@pytest.mark.parametrize("change, devices, message", [
    (dict(clip_group_size=12), 8, "training.clip_group_size=12 must divide training.batch_size=32"),
    (dict(clip_group_size=0), 8, "training.clip_group_size=0 must divide"),
    (dict(clip_group_size=2, batch_size=24), 8, "neither fits a whole number of times in the 3"),
    (dict(clip_group_size=12, batch_size=24), 6, "spans 3 devices, which must be a power of two"),
    (dict(microbatch_size=3), 2, "training.microbatch_size=3 must divide the 16 examples"),
])
def test_impossible_layouts_are_one_line_errors(config, change, devices, message):
    tc = config.training.copy_and_resolve_references()
    for key, value in change.items():
        tc[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gradients.group_layout(tc, tc.batch_size, devices)


@pytest.mark.parametrize("group, parts", [
    (16, 1),  # the two groups vmapped in one model call (TPU/GPU)
    (16, 2),  # each group its own part (the CPU default)
    (8, 2),  # four groups in two parts of two vmapped groups
    (8, 3),  # 3 does not divide 4 groups: two parts
])
def test_groups_split_into_parallel_parts_give_the_same_step(config, images, monkeypatch, group,
                                                             parts):
    config = config.copy_and_resolve_references()
    config.training.clip_group_size = group
    monkeypatch.setattr(gradients, "PARALLEL_PARTS", parts)
    state, metrics = _step(config, images, 1)
    params, ema, mu, nu = _reference_step(config, images)
    assert _max_diff(state.params, params) <= 1e-5
    assert _max_diff(state.opt_state[0].mu, mu) <= 1e-7
    # Per-example losses stay with their timesteps: the quartile sums equal the unsplit step's.
    monkeypatch.setattr(gradients, "PARALLEL_PARTS", 1)
    _, whole = _step(config, images, 1)
    np.testing.assert_allclose(metrics["quartile_loss_sum"], whole["quartile_loss_sum"],
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], whole["grad_norm"], rtol=1e-6)


@pytest.mark.parametrize("backend, group, devices, expected", [
    ("cpu", 16, 1, 2),  # two groups on the device: one part each
    ("cpu", 2, 1, gradients.MAX_AUTO_PARTS),  # 16 groups: capped
    ("cpu", 16, 4, 1),  # a group spans two devices: nothing to split
    ("tpu", 16, 1, 1),  # accelerators keep the vmapped groups
    ("gpu", 16, 1, 1),
])
def test_automatic_parallel_parts(config, monkeypatch, backend, group, devices, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    tc = config.training.copy_and_resolve_references()
    tc.clip_group_size = group
    assert gradients.parallel_parts(gradients.group_layout(tc, BATCH, devices)) == expected
