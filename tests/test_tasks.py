"""Editing tasks (ddpm_jax.tasks): img2img, inpaint, interpolate, denoise, their inputs and the
`--mode=sample` driver. The pure functions are checked with closed-form denoisers against float64
NumPy; the driver with a freshly initialised conditional checkpoint."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpointing, diffusion, edit_mode, modes, parallel, tasks, train_step
from helpers import tiny_config

T = 50
BETAS = np.linspace(1e-3, 0.2, T)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)  # float64 reference


@pytest.fixture(scope="module")
def schedule():
    return diffusion.make_schedule(BETAS)


def smooth_eps(schedule):
    """A fixed, non-trivial ε-model: any function of (x_t, t) will do for these properties."""

    def model_fn(x, t):
        return 0.5 * jnp.tanh(x) + 0.01 * t.astype(jnp.float32)[:, None, None, None]

    return model_fn


def oracle_eps(schedule, x_start):
    """ε(x_t, t) = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t): a model that knows x_0, so x̂_0 = x_0."""

    def model_fn(x, t):
        alpha_bar = diffusion.extract(schedule.alphas_cumprod, t, x.ndim)
        return (x - jnp.sqrt(alpha_bar) * x_start) / jnp.sqrt(1.0 - alpha_bar)

    return model_fn


def images(seed, shape=(4, 8, 8, 1)):
    return jnp.asarray(np.random.default_rng(seed).uniform(-0.9, 0.9, shape), jnp.float32)


def test_img2img_from_step_0_returns_the_input(schedule):
    x = images(0)
    result = tasks.img2img(smooth_eps(schedule), schedule, x, jax.random.key(0), t0=0)
    np.testing.assert_array_equal(result.output, x)
    moved = tasks.img2img(smooth_eps(schedule), schedule, x, jax.random.key(0), t0=5)
    assert float(jnp.abs(moved.output - x).max()) > 0.05  # a real chain does change it


def test_img2img_noises_to_paper_step_t0_and_undoes_it(schedule):
    t0 = 20
    zeros = jnp.zeros((64, 8, 8, 1), jnp.float32)
    start = tasks.img2img(smooth_eps(schedule), schedule, zeros, jax.random.key(1), t0=t0).start
    # x_{t0} of x_0 = 0 is N(0, 1 − ᾱ at paper step t0 = code index t0 − 1).
    expected = 1.0 - ALPHAS_CUMPROD[t0 - 1]
    assert abs(float(jnp.var(start)) - expected) < 0.05 * expected
    # With a model that knows x_0, t0 reverse steps end exactly at x_0 (x̂_0 at t = 0 is x_0).
    x = images(2)
    result = tasks.img2img(oracle_eps(schedule, x), schedule, x, jax.random.key(2), t0=t0,
                           xstart_every=1)
    np.testing.assert_allclose(result.output, x, atol=1e-4)
    assert result.progress.shape == (t0,) + x.shape  # one x̂_0 per reverse step


def test_inpaint_keeps_the_known_pixels_exactly(schedule):
    x_known = images(3)
    mask = np.zeros((1, 8, 8, 1), bool)
    mask[:, 2:6, 1:5] = True
    for t0 in (None, 10, 0):
        result = jax.jit(lambda x, k, t0=t0: tasks.inpaint(
            smooth_eps(schedule), schedule, x, mask, k, t0=t0))(x_known, jax.random.key(4))
        keep = np.broadcast_to(~mask, x_known.shape)
        np.testing.assert_array_equal(np.asarray(result.output)[keep], np.asarray(x_known)[keep])
        if t0 != 0:
            assert float(jnp.abs(result.output - x_known)[np.broadcast_to(mask, x_known.shape)]
                         .max()) > 0.05
    # At T the masked region starts from fresh noise, the rest from q(x_T | x_known). A schedule
    # that keeps ᾱ_T ≈ 0.97 tells the two apart: (x_T − √ᾱ_T x) / √(1 − ᾱ_T) is N(0, 1) outside the
    # mask, and x_T itself is N(0, 1) inside it (5 standard errors on ≥ 16k pixels).
    betas = np.linspace(1e-4, 2e-3, T)
    alpha_bar = np.prod(1.0 - betas)
    x_many = images(3, (512, 8, 8, 1))
    start = np.asarray(tasks.inpaint(smooth_eps(schedule), diffusion.make_schedule(betas), x_many,
                                     mask, jax.random.key(4)).start, np.float64)
    inside = np.broadcast_to(mask, x_many.shape)
    scaled = (start - np.sqrt(alpha_bar) * np.asarray(x_many)) / np.sqrt(1.0 - alpha_bar)
    for values in (scaled[~inside], start[inside]):
        assert abs(values.mean()) < 5 / np.sqrt(values.size)
        assert abs(values.std() - 1) < 5 / np.sqrt(2 * values.size)


def test_interpolate_from_step_0_returns_the_endpoints_and_mixes_latents(schedule):
    x1, x2 = images(5), images(6)
    weights = np.array([0.0, 0.25, 1.0])
    result = tasks.interpolate(smooth_eps(schedule), schedule, x1, x2, jax.random.key(0), t0=0,
                               mix_weights=weights)
    assert result.output.shape == (3,) + x1.shape
    np.testing.assert_array_equal(result.output[0], x1)
    np.testing.assert_array_equal(result.output[2], x2)
    np.testing.assert_allclose(result.output[1], 0.75 * x1 + 0.25 * x2, atol=1e-6)
    # From t0 > 0 the latents are mixed linearly before the chain: (1 − λ) x_t + λ x'_t.
    noisy = tasks.interpolate(smooth_eps(schedule), schedule, x1, x2, jax.random.key(0), t0=30,
                              mix_weights=weights)
    np.testing.assert_allclose(noisy.start[1], 0.75 * noisy.start[0] + 0.25 * noisy.start[2],
                               atol=1e-5)
    assert float(jnp.abs(noisy.start[0] - x1).max()) > 0.1


def test_denoise_is_the_one_step_x0_prediction(schedule):
    x = images(7, (64, 8, 8, 1))
    steps = [0, 10, 49]
    model = smooth_eps(schedule)
    x_t, pred = tasks.one_step_denoise(model, schedule, x, jax.random.key(0), timesteps=steps,
                              clip_denoised=False)
    assert x_t.shape == pred.shape == (3,) + x.shape
    for i, t in enumerate(steps):
        t_batch = jnp.full((64,), t, jnp.int32)
        eps = np.asarray(model(x_t[i], t_batch), np.float64)
        alpha_bar = ALPHAS_CUMPROD[t]
        expected = (np.asarray(x_t[i], np.float64) - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)
        np.testing.assert_allclose(pred[i], expected, rtol=1e-4, atol=1e-4)
        # x_t is a draw of q(x_t | x_0): its noise is N(0, 1) (5 standard errors on 4096 pixels).
        noise = (np.asarray(x_t[i], np.float64) - np.sqrt(alpha_bar) * np.asarray(x)) / np.sqrt(1 - alpha_bar)
        assert abs(noise.mean()) < 5 / np.sqrt(noise.size)
        assert abs(noise.std() - 1) < 5 / np.sqrt(2 * noise.size)
    with pytest.raises(ValueError, match="outside"):
        tasks.one_step_denoise(model, schedule, x, jax.random.key(0), timesteps=[T])


# ----------------------------------------------------------------------------------------------
# Inputs and the --mode=sample driver


def _write_png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def test_input_and_mask_size_errors(tmp_path):
    good = _write_png(tmp_path / "digit.png", np.full((8, 8), 200))
    small = _write_png(tmp_path / "small.png", np.full((6, 6), 255))
    assert edit_mode.load_images(good, 8, 1).shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="6x6, the model takes 8x8"):
        edit_mode.load_images(small, 8, 1)
    with pytest.raises(ValueError, match="mask must be the same size"):
        edit_mode.load_mask(small, 8)
    np.savez(tmp_path / "batch.npz", images=np.zeros((3, 8, 8, 1), np.uint8))
    assert edit_mode.load_images(str(tmp_path / "batch.npz"), 8, 1).shape == (3, 8, 8, 1)

    config = tiny_config()
    config.sample.task = "inpaint"
    config.sample.input = good
    config.sample.mask = small
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(ValueError, match="mask must be the same size") as error:
        modes.run_mode("sample", config, str(workdir))
    assert "\n" not in str(error.value) and os.listdir(workdir) == []


@pytest.fixture(scope="module")
def conditional_workdir(tmp_path_factory):
    """A checkpoint of a freshly initialised tiny conditional model (no training needed)."""
    config = tiny_config()
    config.model.num_classes = 10
    config.sample.guidance_scale = 2.0
    workdir = str(tmp_path_factory.mktemp("cond"))
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    _, state = train_step.create_train_state(config, mesh)
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, 1, state, config)
    manager.wait_until_finished()
    return config, workdir


def _task_pictures(task, saved, digit):
    """(file name, its tiles as [rows, columns, 8, 8]) that `task` promises, from its saved
    arrays: input.png the input(s); output.png a row per image (columns: the mixing weights of
    interpolate, the steps of denoise); strip.png a row per image of x̂_0 from t0 (left) to the
    end, or of x_t per step for denoise, or start | output when t0 = 0 takes no step."""
    by_image = lambda a: a[..., 0].swapaxes(0, 1)  # [columns, images, ...] -> [images, columns, ...]
    if task == "interpolate":
        yield "input.png", np.stack([digit, digit.T])[:, None]
    else:
        yield "input.png", digit[None, None]
    if task in ("interpolate", "denoise"):
        yield "output.png", by_image(saved["output"])
    else:
        yield "output.png", saved["output"][:, None, ..., 0]
    if task == "denoise":
        yield "strip.png", by_image(saved["noised"])
    elif "progress" in saved:
        yield "strip.png", by_image(saved["progress"][::-1])
    else:
        tiles = lambda a: a.reshape((-1, 8, 8))
        yield "strip.png", np.stack([tiles(saved["start"]), tiles(saved["output"])], axis=1)


def test_each_task_writes_input_output_and_strip(conditional_workdir, tmp_path):
    from helpers import read_grid

    config, workdir = conditional_workdir
    digit = np.zeros((8, 8), np.uint8)
    digit[1:7, 3:5] = 255
    first = _write_png(tmp_path / "one.png", digit)
    second = _write_png(tmp_path / "bar.png", digit.T)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    config.sample.input, config.sample.input2 = first, second
    config.sample.mask = _write_png(tmp_path / "mask.png", mask)
    config.sample.labels = "1,7"
    config.sample.denoise_steps = "0,10,19"
    config.sample.num_mix = 3

    outputs = {}
    for task, t0, suffix in (("img2img", 0, "_t0"), ("img2img", 10, "_t10"),
                             ("inpaint", -1, "_t20"), ("interpolate", 0, "_t0"),
                             ("denoise", -1, "")):
        config.sample.task, config.sample.t0 = task, t0
        modes.run_mode("sample", config, workdir)
        (out_dir,) = glob.glob(os.path.join(workdir, "samples",
                                            f"{task}_step00000001_seed0{suffix}_*"))
        outputs[task, t0] = saved = dict(np.load(os.path.join(out_dir, "outputs.npz")))
        # The pictures: 8 x 8 tiles, one row per image (the 2 labels of the one input), in the
        # layout each file promises, showing the saved arrays.
        for name, expected in _task_pictures(task, saved, digit):
            rows, columns = expected.shape[:2]
            got = read_grid(os.path.join(out_dir, name), rows, columns, 8)
            np.testing.assert_array_equal(got[..., 0], expected.reshape(-1, 8, 8), err_msg=name)

    # Each input once per requested label (2), class-major.
    np.testing.assert_array_equal(outputs["img2img", 0]["labels"], [1, 7])
    np.testing.assert_array_equal(outputs["img2img", 0]["output"][..., 0], [digit, digit])
    assert not np.array_equal(outputs["img2img", 10]["output"][0, ..., 0], digit)
    inpainted = outputs["inpaint", -1]["output"][..., 0]
    np.testing.assert_array_equal(inpainted[:, :, :4], np.stack([digit, digit])[:, :, :4])
    mixes = outputs["interpolate", 0]["output"][..., 0]  # [num_mix, pairs, H, W]
    np.testing.assert_array_equal(mixes[0], [digit, digit])
    np.testing.assert_array_equal(mixes[-1], [digit.T, digit.T])
    assert outputs["denoise", -1]["output"].shape == (3, 2, 8, 8, 1)


def test_inputs_are_repeated_per_label_only_with_guidance(tmp_path):
    config = tiny_config()
    config.model.num_classes = 10
    config.sample.task = "img2img"
    config.sample.input = _write_png(tmp_path / "digit.png", np.full((8, 8), 100))
    config.sample.labels = "2,5,9"
    config.sample.guidance_scale = 3.0
    inputs = edit_mode.prepare_inputs(config)
    np.testing.assert_array_equal(inputs.labels, [2, 5, 9])
    assert inputs.x.shape == (3, 8, 8, 1) and inputs.t0 == config.diffusion.num_timesteps // 2
    config.sample.guidance_scale = 0.0  # unconditional: the labels change nothing, edit once
    inputs = edit_mode.prepare_inputs(config)
    assert inputs.labels is None and inputs.x.shape == (1, 8, 8, 1)
    config.sample.strength = 0.25
    assert edit_mode.prepare_inputs(config).t0 == 5
