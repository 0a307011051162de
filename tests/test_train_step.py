"""The sharded train step against explicit single-device references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel, train_step
from helpers import tiny_config


def _batch(config, steps, seed=0):
    rng = np.random.default_rng(seed)
    size, channels, batch = config.data.image_size, config.data.channels, config.training.batch_size
    images = rng.integers(0, 256, (steps, batch, size, size, channels), dtype=np.uint8)
    labels = np.zeros((steps, batch), np.int32)
    return images, labels


def _run(config, mesh, images, labels, state=None):
    graphdef, fresh = train_step.create_train_state(config, mesh)
    state = fresh if state is None else state
    step = train_step.make_train_step(graphdef, config, mesh)
    state, metrics = step(state, parallel.to_global_array(images, mesh, 1),
                          parallel.to_global_array(labels, mesh, 1), jax.random.key(config.seed))
    return graphdef, jax.device_get(state), jax.device_get(metrics)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def clipping_config():
    config = tiny_config()
    config.training.grad_clip = 0.05  # small enough that every shard's gradient is clipped
    config.training.lr = 1e-2
    return config


def test_global_clipping_on_8_devices_equals_1_device(clipping_config):
    config = clipping_config.copy_and_resolve_references()
    config.training.clip_mode = "global"
    images, labels = _batch(config, 1)
    assert jax.device_count() == 8
    _, state8, metrics8 = _run(config, parallel.make_mesh(), images, labels)
    _, state1, metrics1 = _run(config, parallel.make_mesh(jax.devices()[:1]), images, labels)
    assert _max_diff(state8.params, state1.params) <= 1e-5
    assert _max_diff(state8.ema_params, state1.ema_params) <= 1e-5
    assert float(metrics8["loss"][0]) == pytest.approx(float(metrics1["loss"][0]), rel=1e-5)


def test_per_device_clipping_equals_clipping_each_shard_then_averaging(clipping_config):
    config = clipping_config.copy_and_resolve_references()
    config.training.clip_mode = "per_device"
    mesh = parallel.make_mesh()
    images, labels = _batch(config, 1)
    graphdef, state, _ = _run(config, mesh, images, labels)

    # Reference, written out here rather than taken from train_step/optim: 8 shards of 2 examples.
    # Each example's (t, ε, flip) comes from fold_in(fold_in(key(seed), step 0), its global index)
    # (train_step's key rule); its loss is L_simple, the mean over pixels of (ε − ε_θ(x_t, t))² with
    # x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε and ᾱ from the float64 linear schedule. Each shard's gradient is
    # clipped to norm 0.05, the 8 are averaged, and one TF1 Adam step follows (docs/original.md
    # §3.4): m = (1 − β1) g, v = (1 − β2) g², θ − lr·√(1 − β2)/(1 − β1)·m/(√v + ε̂).
    from ddpm_jax import model_fns

    _, initial = train_step.create_train_state(config, parallel.make_mesh(jax.devices()[:1]))
    initial = jax.device_get(initial)
    dc, tc = config.diffusion, config.training
    alphas_cumprod = np.cumprod(1.0 - np.linspace(dc.beta_start, dc.beta_end, dc.num_timesteps))
    step_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    per_shard, shards = 2, 8
    clipped = []
    for shard in range(shards):
        ts, noises, xs = [], [], []
        for index in range(shard * per_shard, (shard + 1) * per_shard):
            t_key, noise_key, flip_key = jax.random.split(jax.random.fold_in(step_key, index), 3)
            ts.append(int(jax.random.randint(t_key, [], 0, dc.num_timesteps)))
            noises.append(np.asarray(jax.random.normal(noise_key, images.shape[2:])))
            x = images[0, index].astype(np.float32) / 127.5 - 1.0
            xs.append(x[:, ::-1] if bool(jax.random.bernoulli(flip_key, 0.5)) else x)
        t, noise = jnp.asarray(ts, jnp.int32), np.stack(noises)
        root = np.sqrt(alphas_cumprod[ts])[:, None, None, None]
        x_t = jnp.asarray(root * np.stack(xs) + np.sqrt(1 - root**2) * noise, jnp.float32)

        def loss(params):
            return jnp.mean((noise - model_fns.model_fn(graphdef, params)(x_t, t)) ** 2)

        grads = jax.grad(loss)(initial.params)
        norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                                 for g in jax.tree.leaves(grads))))
        assert norm > 0.05  # the clip is active for every shard
        clipped.append(jax.tree.map(lambda g: np.asarray(g, np.float64) * 0.05 / norm, grads))
    mean_grad = jax.tree.map(lambda *g: sum(g) / shards, *clipped)
    b1, b2 = tc.adam_b1, tc.adam_b2
    expected = jax.tree.map(
        lambda p, g: p - tc.lr * np.sqrt(1 - b2) / (1 - b1) * (1 - b1) * g
        / (np.sqrt((1 - b2) * g * g) + tc.adam_eps), initial.params, mean_grad)
    assert tc.warmup_steps == 0 and tc.adam_eps_style == "tf"  # the recipe written out above
    assert _max_diff(state.params, expected) <= 1e-5

    # And it is not what clipping the averaged gradient gives.
    config.training.clip_mode = "global"
    _, global_state, _ = _run(config, mesh, images, labels)
    assert _max_diff(state.params, global_state.params) > 1e-4


def test_steps_per_call_scan_equals_separate_calls():
    config = tiny_config()
    config.model.dropout = 0.1  # its keys follow the step too, inside the scan as outside
    mesh = parallel.make_mesh()
    images, labels = _batch(config, 3, seed=1)
    _, scanned, metrics = _run(config, mesh, images, labels)  # one call scanning 3 steps
    assert metrics["loss"].shape == (3,)
    graphdef, state = train_step.create_train_state(config, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)
    for k in range(3):
        state, _ = step(state, parallel.to_global_array(images[k:k + 1], mesh, 1),
                        parallel.to_global_array(labels[k:k + 1], mesh, 1),
                        jax.random.key(config.seed))
    assert int(scanned.step) == 3 == int(state.step)
    assert _max_diff(scanned.params, jax.device_get(state.params)) <= 1e-6


def test_ema_starts_at_initial_weights_and_follows_updates():
    config = tiny_config()
    mesh = parallel.make_mesh()
    _, initial = train_step.create_train_state(config, mesh)
    initial = jax.device_get(initial)
    assert _max_diff(initial.ema_params, initial.params) == 0.0
    images, labels = _batch(config, 1)
    _, state, _ = _run(config, mesh, images, labels)
    decay = config.training.ema_decay
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            initial.ema_params, state.params)
    assert _max_diff(state.ema_params, expected) <= 1e-6
