"""Issue #16, items 1-3: DPM-Solver++ and UniPC wired into `--mode=sample`, the API, guidance,
the editing tasks and the training grids.

What `--mode=sample` and `Pipeline.sample` make is compared with the solvers and samplers
called directly on the x_T of each sample (`generate`'s keying: sample i draws x_T and its
chain's noise from split(fold_in(key, i)), whatever its call or device), and the editing tasks
with the closed-form probability-flow ODE map of Gaussian data."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import (api, chains, checkpointing, diffusion, generate, images, model_fns,
                      parallel, results, sample_mode, solvers, tasks, train_step)
from helpers import tiny_config

NUM_DEVICES = 8


def _perturbed(config):
    """Fresh parameters plus noise, so that the output depends on x, t and the label."""
    graphdef, params = model_fns.init_params(config)
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(
        lambda p: jnp.asarray(p + 0.05 * rng.standard_normal(p.shape), jnp.float32), params)


def _solver_config(method="dpm_solver", steps=5, spacing="linspace", order=2):
    config = tiny_config()
    config.sample.method = method
    config.sample.num_steps = steps
    config.sample.timestep_spacing = spacing
    config.sample.solver_order = order
    return config


@pytest.fixture(scope="module")
def unconditional():
    config = tiny_config()
    graphdef, params = _perturbed(config)
    mesh = parallel.make_mesh()
    return config, graphdef, params, api.Pipeline(config, graphdef, params, 1, mesh)


def _sample_keys(key, num_samples=16):
    """(x_T key, chain key) of each sample i: split(fold_in(key, i)), whatever its batch."""
    return [jax.random.split(jax.random.fold_in(key, i)) for i in range(num_samples)]


def _x_T(key, num_samples=16):
    return np.stack([np.asarray(jax.random.normal(noise_key, (8, 8, 1), jnp.float32))
                     for noise_key, _ in _sample_keys(key, num_samples)])


def _device_chain_keys(key, num_samples=16):
    """Each device's chain keys [per device], one per sample of its rows."""
    keys = jnp.stack([chain_key for _, chain_key in _sample_keys(key, num_samples)])
    return jnp.split(keys, NUM_DEVICES)


def _direct(config, denoise, x_T, loop_keys=None):
    """The chain of `config.sample` on x_T, calling samplers/solvers directly, per device."""
    sc, dc = config.sample, config.diffusion
    schedule = diffusion.schedule_from_config(dc)
    per_device = x_T.shape[0] // NUM_DEVICES
    outs = []
    for d in range(NUM_DEVICES):
        x = jnp.asarray(x_T[d * per_device:(d + 1) * per_device])
        if sc.method == "dpm_solver":
            out = solvers.dpm_solver_sample(denoise, schedule.alphas_cumprod, x,
                                            num_steps=sc.num_steps, order=sc.solver_order,
                                            spacing=sc.timestep_spacing)
        elif sc.method == "unipc":
            out = solvers.unipc_sample(denoise, schedule.alphas_cumprod, x, num_steps=sc.num_steps,
                                       order=sc.solver_order, spacing=sc.timestep_spacing)
        elif sc.method == "ddim":
            out = chains.ddim_sample(
                denoise, schedule, x, jax.random.key(99),  # η = 0: the key is not used
                timesteps=chains.ddim_timesteps(dc.num_timesteps, sc.num_steps))
        else:
            out = chains.ancestral_sample(denoise, schedule, x, loop_keys[d],
                                            mean_type="eps", var_type=dc.var_type)
        outs.append(np.asarray(out))
    return np.concatenate(outs)


@pytest.mark.parametrize("method,order,spacing", [("dpm_solver", 2, "linspace"),
                                                  ("unipc", 3, "trailing")])
def test_mode_sample_writes_the_solver_on_each_device_x_T(tmp_path, method, order, spacing):
    config = _solver_config(method, steps=6, spacing=spacing, order=order)
    graphdef, params = _perturbed(config)
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    _, state = train_step.create_train_state(config, mesh)
    state = state._replace(ema_params=params)
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, 1, state, config)
    manager.wait_until_finished()

    out_dir = sample_mode.write_samples(config, workdir)
    assert os.path.basename(out_dir).startswith(f"{method}_step00000001_seed0_")
    saved = np.load(os.path.join(out_dir, "samples.npz"))["images"]
    x_T = _x_T(jax.random.key(config.sample.seed))
    expected = _direct(config, model_fns.model_fn(graphdef, params), x_T)
    # uint8 rounding: batch-2 calls here vs the mesh's may round a pixel across a .5 boundary.
    assert np.abs(saved.astype(int) - images.to_uint8(expected).astype(int)).max() <= 1
    assert np.mean(saved == images.to_uint8(expected)) > 0.99
    settings = json.load(open(os.path.join(out_dir, "settings.json")))["sample"]
    assert (settings["method"], settings["num_steps"], settings["solver_order"],
            settings["timestep_spacing"]) == (method, 6, order, spacing)


@pytest.mark.parametrize("method", ["ancestral", "ddim", "dpm_solver", "unipc"])
def test_api_noise_starts_every_method_from_the_given_x_T(unconditional, method):
    config, graphdef, params, pipe = unconditional
    steps = {"ancestral": 0, "ddim": 5, "dpm_solver": 5, "unipc": 4}[method]
    x_T = np.random.default_rng(1).standard_normal((16, 8, 8, 1)).astype(np.float32)
    out = pipe.sample(16, 3, method=method, num_steps=steps, noise=x_T, output="float")
    run_config = config.copy_and_resolve_references()
    run_config.sample.method, run_config.sample.num_steps = method, steps or 20
    run_config.sample.timestep_spacing = "logsnr"
    expected = _direct(run_config, model_fns.model_fn(graphdef, params), x_T,
                       _device_chain_keys(jax.random.key(3)))
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)
    other_key = pipe.sample(16, 4, method=method, num_steps=steps, noise=x_T, output="float")
    if method == "ancestral":  # the step noise still comes from the key
        assert np.abs(other_key - out).max() > 1e-2
    else:  # deterministic given x_T
        np.testing.assert_array_equal(other_key, out)
    assert np.abs(pipe.sample(16, 3, method=method, num_steps=steps, output="float")
                  - out).max() > 1e-2  # without noise=, x_T comes from the key


def test_api_noise_of_the_wrong_shape_is_a_clear_error(unconditional):
    *_, pipe = unconditional
    for bad in (np.zeros((8, 8, 8, 1)), np.zeros((16, 8, 8, 3)), np.zeros((16, 8, 8))):
        with pytest.raises(ValueError, match=r"noise must be x_T of shape \(16, 8, 8, 1\)"):
            pipe.sample(16, 0, method="dpm_solver", num_steps=5, noise=bad)
    with pytest.raises(ValueError, match="noise holds NaN"):
        pipe.sample(16, 0, method="dpm_solver", num_steps=5, noise=np.full((16, 8, 8, 1), np.nan))


def test_api_noise_with_a_partial_last_call(unconditional):
    """20 samples in calls of 16: the second call's x_T are rows 16..19 of `noise`."""
    *_, pipe = unconditional
    x_T = np.random.default_rng(2).standard_normal((20, 8, 8, 1)).astype(np.float32)
    both = pipe.sample(20, 0, method="dpm_solver", num_steps=5, noise=x_T, batch_size=16,
                       output="float")
    tail = pipe.sample(16, 0, method="dpm_solver", num_steps=5,
                       noise=np.concatenate([x_T[16:], x_T[:12]]), output="float")
    np.testing.assert_allclose(both[16:], tail[:4], atol=2e-5, rtol=0)


@pytest.mark.parametrize("solver", [solvers.dpm_solver_sample, solvers.unipc_sample])
def test_solvers_take_the_guided_model(solver):
    """w = 0 is the unconditional and w = 1 the conditional model (to float32 rounding of the
    batch-2B call); w = 3 leaves both."""
    config = tiny_config()
    config.model.num_classes = 10
    graphdef, params = _perturbed(config)
    schedule = diffusion.schedule_from_config(config.diffusion)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8, 8, 1)), jnp.float32)
    y = jnp.asarray([0, 3, 7, 9], jnp.int32)

    def run(denoise):
        return np.asarray(solver(denoise, schedule.alphas_cumprod, x, num_steps=6))

    plain_cond = run(model_fns.model_fn(graphdef, params, y))
    plain_uncond = run(model_fns.model_fn(graphdef, params, None))
    assert np.abs(plain_cond - plain_uncond).max() > 1e-2
    np.testing.assert_allclose(run(model_fns.guided_model_fn(graphdef, params, y, 1.0)),
                               plain_cond, atol=1e-4, rtol=0)
    np.testing.assert_allclose(run(model_fns.guided_model_fn(graphdef, params, y, 0.0)),
                               plain_uncond, atol=1e-4, rtol=0)
    guided = run(model_fns.guided_model_fn(graphdef, params, y, 3.0))
    assert min(np.abs(guided - plain_cond).max(), np.abs(guided - plain_uncond).max()) > 1e-2


def test_guided_solver_sampling_on_the_mesh_uses_each_samples_label():
    """`generate` with guidance w = 3 and one row per class equals the guided solver called on
    each device's x_T with that device's labels."""
    config = _solver_config("dpm_solver", steps=5)
    config.model.num_classes = 10
    config.sample.guidance_scale = 3.0
    graphdef, params = _perturbed(config)
    pipe = api.Pipeline(config, graphdef, params, 1, parallel.make_mesh())
    x_T = np.random.default_rng(4).standard_normal((16, 8, 8, 1)).astype(np.float32)
    out = pipe.sample(16, 0, noise=x_T, output="float")
    labels, _ = generate.labels_per_sample(list(range(10)), 16)
    expected = np.concatenate([
        _direct_one(config, model_fns.guided_model_fn(graphdef, params, labels[2 * d:2 * d + 2],
                                                     3.0), x_T[2 * d:2 * d + 2])
        for d in range(NUM_DEVICES)])
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


def _direct_one(config, denoise, x):
    schedule = diffusion.schedule_from_config(config.diffusion)
    return np.asarray(solvers.dpm_solver_sample(
        denoise, schedule.alphas_cumprod, jnp.asarray(x), num_steps=config.sample.num_steps,
        spacing=config.sample.timestep_spacing))


# --------------------------------------------------------------------------------------
# Editing tasks from t0
# --------------------------------------------------------------------------------------

MEAN, STD = 0.3, 0.5  # Gaussian data per pixel: the exact ε and ODE map are closed-form
T = 1000


@pytest.fixture(scope="module")
def linear_schedule():
    return diffusion.make_schedule(np.linspace(1e-4, 0.02, T))


def gaussian_eps(schedule):
    def eps(x, t):
        ab = diffusion.extract(schedule.alphas_cumprod, t, x.ndim)
        return (x - jnp.sqrt(ab) * MEAN) * jnp.sqrt(1 - ab) / (ab * STD**2 + 1 - ab)
    return eps


def ode_map(x, ab_from, ab_to):
    """The probability-flow ODE of Gaussian data from ᾱ_from to ᾱ_to (float64)."""
    scale = lambda ab: np.sqrt(ab * STD**2 + 1.0 - ab)
    x = np.asarray(x, np.float64)
    return np.sqrt(ab_to) * MEAN + (x - np.sqrt(ab_from) * MEAN) * scale(ab_to) / scale(ab_from)


@pytest.mark.parametrize("name", ["dpm_solver", "unipc"])
def test_img2img_with_a_solver_solves_the_ode_from_t0(linear_schedule, name):
    """The output is the exact ODE map of x_{t0} from ᾱ at code index t0 − 1 to the data: the
    error falls with the step count, and is far below the gap to a chain started elsewhere."""
    t0 = 400
    x = jnp.asarray(np.random.default_rng(5).uniform(-0.9, 0.9, (4, 8, 8, 1)), jnp.float32)
    table = np.asarray(linear_schedule.alphas_cumprod, np.float64)
    errors = {}
    for steps in (5, 20):
        result = tasks.img2img(gaussian_eps(linear_schedule), linear_schedule, x,
                               jax.random.key(0), t0=t0, clip_denoised=False,
                               method=chains.Method(name, steps, order=2,
                                                      spacing="linspace"))
        exact = ode_map(result.start, table[t0 - 1], 1.0)
        errors[steps] = np.abs(np.asarray(result.output) - exact).max()
    assert errors[20] < errors[5] / 16  # converges to this map (measured: 230x DPM, 33x UniPC)
    for wrong_start in (t0 - 41, T - 1):
        assert np.abs(ode_map(result.start, table[wrong_start], 1.0) - exact).max() > \
            5 * errors[20]


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "unipc"])
def test_inpaint_with_any_method_keeps_the_known_pixels(linear_schedule, name):
    x_known = jnp.asarray(np.random.default_rng(6).uniform(-0.9, 0.9, (2, 8, 8, 1)),
                          jnp.float32)
    mask = np.zeros((1, 8, 8, 1), bool)
    mask[:, 2:6, 2:6] = True
    method = chains.Method(name, num_steps=8, spacing="linspace")
    result = tasks.inpaint(gaussian_eps(linear_schedule), linear_schedule, x_known, mask,
                           jax.random.key(1), t0=600, method=method)
    out = np.asarray(result.output)
    keep = np.broadcast_to(~mask, out.shape)
    np.testing.assert_array_equal(out[keep], np.asarray(x_known)[keep])
    # The masked region was generated: it is neither the input nor the start latent.
    assert np.abs(out[~keep] - np.asarray(x_known)[~keep]).max() > 0.1


def test_inpaint_with_a_solver_reimposes_the_known_pixels_at_each_step(linear_schedule):
    """With a mask that keeps everything, every step re-imposes q(x_s | x_known): the solver's
    own update never reaches the output, which is x_known exactly; with a mask that keeps
    nothing, inpaint is the plain solver from t0."""
    x_known = jnp.asarray(np.random.default_rng(7).uniform(-0.9, 0.9, (2, 8, 8, 1)),
                          jnp.float32)
    method = chains.Method("unipc", num_steps=6, spacing="linspace")
    eps = gaussian_eps(linear_schedule)
    nothing = tasks.inpaint(eps, linear_schedule, x_known, np.ones((1, 8, 8, 1), bool),
                            jax.random.key(2), t0=500, method=method, clip_denoised=False)
    plain = solvers.unipc_sample(eps, np.asarray(linear_schedule.alphas_cumprod)[:500],
                                 nothing.start, num_steps=6, spacing="linspace",
                                 clip_denoised=False)
    np.testing.assert_allclose(nothing.output, plain, atol=1e-5, rtol=0)


def test_editing_start_too_close_for_the_steps_is_one_error(linear_schedule):
    with pytest.raises(ValueError, match=r"sample.num_steps=20 does not fit "
                                         r"sample.method=dpm_solver from paper step 10: it takes "
                                         r"1\.\.9 model calls"):
        tasks.img2img(gaussian_eps(linear_schedule), linear_schedule, jnp.zeros((1, 8, 8, 1)),
                      jax.random.key(0), t0=10, method=chains.Method("dpm_solver", 20))


def test_interpolate_with_a_solver_maps_the_mixed_latents_by_the_ode(linear_schedule):
    rng = np.random.default_rng(8)
    x1, x2 = (jnp.asarray(rng.uniform(-0.9, 0.9, (2, 8, 8, 1)), jnp.float32) for _ in range(2))
    result = tasks.interpolate(gaussian_eps(linear_schedule), linear_schedule, x1, x2,
                               jax.random.key(3), t0=300, mix_weights=[0.0, 0.5, 1.0],
                               clip_denoised=False,
                               method=chains.Method("dpm_solver", 20, spacing="linspace"))
    table = np.asarray(linear_schedule.alphas_cumprod, np.float64)
    exact = ode_map(result.start, table[299], 1.0)
    error = np.abs(np.asarray(result.output) - exact).max()
    # λ = 0 and 1 are img2img of x1 and x2 from the same latents; the mix lands on its own map,
    # far closer to it than to a chain from another start.
    assert np.abs(ode_map(result.start, table[269], 1.0) - exact).max() > 10 * error


# --------------------------------------------------------------------------------------
# Settings, aliases and training grids
# --------------------------------------------------------------------------------------


def test_settings_of_other_solver_settings_differ_and_ddim_alias_matches():
    def settings(**sample):
        config = tiny_config()
        config.sample.update(sample)
        return results.generate_settings(config, 1)

    base = settings(method="dpm_solver", num_steps=5)
    for change in (dict(solver_order=3), dict(timestep_spacing="trailing"), dict(num_steps=6),
                   dict(method="unipc")):
        assert settings(**{**dict(method="dpm_solver", num_steps=5), **change}) != base, change
    # The older name of the DDIM step count gives the same results folder as the new one.
    assert settings(method="ddim", ddim_steps=4) == settings(method="ddim", num_steps=4)
    # Ancestral settings do not carry the solver fields (its folders stay as they were).
    assert not {"num_steps", "solver_order", "timestep_spacing"} & set(
        settings(method="ancestral")["sample"])


SMALL_CONFIGS = ("digits", "digits_cond", "mnist", "mnist_cond", "fashion_mnist", "imagefolder")
PAPER_CONFIGS = ("cifar10", "cifar10_cond", "celebahq256", "lsun_bedroom", "lsun_cat",
                 "lsun_church")


@pytest.mark.parametrize("name", SMALL_CONFIGS + PAPER_CONFIGS)
def test_training_grids_use_dpm_solver_in_small_configs_and_ancestral_in_paper_configs(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    grid = generate.chain_method(generate.grid_config(config).sample)
    if name in SMALL_CONFIGS:
        assert (grid.name, grid.num_steps, grid.order) == ("dpm_solver", 25, 2)
    else:
        assert grid.name == "ancestral"
    assert config.sample.method == "ancestral"  # --mode=sample keeps its own default


def test_training_grid_is_the_solver_on_each_device_x_T(unconditional):
    config, graphdef, params, _ = unconditional
    config = config.copy_and_resolve_references()
    config.training.grid_method, config.training.grid_steps = "dpm_solver", 6
    config.sample.timestep_spacing = "linspace"
    key = jax.random.key(5)
    samples, progress = next(generate.grid_batches(
        graphdef, params, config, parallel.make_mesh(), 16, key, batch_size=16,
        progress_every=5))
    solver_config = _solver_config("dpm_solver", steps=6, spacing="linspace")
    expected = _direct(solver_config, model_fns.model_fn(graphdef, params),
                       _x_T(key))
    np.testing.assert_allclose(samples, expected, atol=2e-5, rtol=0)
    # progress_every = 5 of T = 20 ancestral steps is every ⌈5·6/20⌉ = 2 of the 6 model calls.
    assert progress.shape == (3, 16, 8, 8, 1)


def test_training_grid_of_a_short_schedule_takes_the_steps_it_allows():
    config = tiny_config()  # T = 20: a 25-call grid cannot fit
    config.training.grid_method = "dpm_solver"
    method = generate.check_method(generate.grid_config(config))
    table = diffusion.schedule_from_config(config.diffusion).alphas_cumprod
    assert method.num_steps < 20
    with pytest.raises(ValueError, match="repeats timesteps of the 20-step schedule"):  # one more does not fit the logsnr grid
        solvers.solver_timesteps(table, method.num_steps + 1, "logsnr")


def test_editing_default_steps_take_the_share_of_the_chain_they_run():
    config = _solver_config("dpm_solver", steps=0, spacing="logsnr")
    config.diffusion.num_timesteps = 1000
    # The full chain's default 25 calls do not fit logsnr from t0 = 500 (at most 23 there).
    method = generate.check_method(config, start=500)
    assert method.num_steps == 13  # ⌈25 · 500 / 1000⌉
    config.sample.num_steps = 25
    with pytest.raises(ValueError, match="from paper step 500: num_steps=25 with spacing "
                                         "'logsnr' repeats timesteps of the 500-step schedule"):
        generate.check_method(config, start=500)


def test_a_grid_sampler_the_model_cannot_take_stops_training_before_it_starts(tmp_path):
    from ddpm_jax import modes

    config = tiny_config()
    config.diffusion.mean_type = "xstart"
    config.training.sample_every = 2
    config.training.grid_method, config.training.grid_steps = "dpm_solver", 5
    with pytest.raises(ValueError, match="sample.method=dpm_solver needs an eps model"):
        modes.run_mode("train", config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_eval_parts_record_the_solver_settings_they_were_drawn_with():
    """Eval resumes from parts only when their metadata matches: other solver settings or a
    num_steps that overrides ddim_steps must not match the parts drawn before."""
    from ddpm_jax import evaluate
    from helpers import tiny_config

    def meta(**sample):
        config = tiny_config()
        for key, value in sample.items():
            config.sample[key] = value
        return evaluate.sample_meta(config, 2, 8, "inception")

    solver = meta(method="dpm_solver", num_steps=10)
    assert solver != meta(method="dpm_solver", num_steps=10, solver_order=3)
    assert solver != meta(method="dpm_solver", num_steps=10, timestep_spacing="trailing")
    assert solver != meta(method="dpm_solver", num_steps=12)
    assert solver != meta(method="unipc", num_steps=10)
    assert meta(method="ddim", ddim_steps=5) == meta(method="ddim", num_steps=5, ddim_steps=9)
    assert meta(method="ddim", ddim_steps=5) != meta(method="ddim", num_steps=4, ddim_steps=5)
