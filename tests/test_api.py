"""The notebook API (ddpm_jax.api.Pipeline) on a freshly initialised tiny conditional model:
`denoise` refuses inputs that would give plausible but wrong outputs, and `sample` draws the
same images, hence the same labels, as `--mode=sample` for the same seed and batch."""

import os

import jax
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import checkpointing, model_fns, parallel, sample_mode, train_step
from helpers import tiny_config


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    config = tiny_config()
    config.model.num_classes = 10
    config.sample.guidance_scale = 2.0
    workdir = str(tmp_path_factory.mktemp("api") / "run")
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    _, state = train_step.create_train_state(config, mesh)
    # The initial conv_out is ~1e-10 (predicts ~0 whatever the class): perturb it, so labels show.
    rng = np.random.default_rng(0)
    state = state._replace(ema_params=jax.tree.map(
        lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(p.dtype), state.ema_params))
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, 1, state, config)
    manager.wait_until_finished()
    return config, workdir, ddpm_jax.load(workdir)


def test_denoise_takes_floats_and_timesteps_in_range(conditional):
    config, _, pipe = conditional
    T = config.diffusion.num_timesteps
    x = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    t = np.arange(8, dtype=np.int32) + T - 8
    expected = model_fns.model_fn(pipe.graphdef, pipe.params)(x, t)
    np.testing.assert_allclose(np.asarray(pipe.denoise(x, t)), np.asarray(expected), atol=1e-5)

    for bad_t, message in ((-1, "timestep -1 is outside the model's 0..19"),
                           (T, "timestep 20 is outside the model's 0..19"),
                           (np.array([0, 3, 20, 1, 0, 0, 0, 0]), "timestep 20 is outside"),
                           (np.arange(3), r"one integer or 8 integers"),
                           (2.0, "integer timesteps")):
        with pytest.raises(ValueError, match=message):
            pipe.denoise(x, bad_t)
    pixels = np.round((x + 1) * 127.5).astype(np.uint8)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got dtype uint8"):
        pipe.denoise(pixels, t)
    with pytest.raises(ValueError, match="x has 3 channels, the model takes 1"):
        pipe.denoise(np.repeat(x, 3, axis=3), t)
    with pytest.raises(ValueError, match=r"shape \[batch, 8, 8, 1\]"):
        pipe.denoise(x[:, :4], t)


def test_sample_draws_the_labels_and_images_of_the_cli(conditional, tmp_path):
    config, workdir, pipe = conditional
    # 20 samples in calls of 16: the CLI gives classes 0..9 twice each over the whole 20.
    config = config.copy_and_resolve_references()
    config.sample.num_samples, config.sample.batch_size = 20, 16
    config.sample.progress_every = 0
    out_dir = sample_mode.write_samples(config, workdir)  # what --mode=sample runs
    saved = np.load(os.path.join(out_dir, "samples.npz"))
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 2))
    images = pipe.sample(20, config.sample.seed, batch_size=16)
    np.testing.assert_array_equal(images, saved["images"])
    # The labels show in the images: the CLI's last four (classes 8, 9) are not those of 0, 1.
    assert np.abs(saved["images"][16:].astype(int) - saved["images"][:4]).max() > 20
