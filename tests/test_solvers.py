"""Tests for ddpm_jax.solvers (DPM-Solver++ and UniPC).

References: diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler (an independent
implementation) driven step by step with the same ε-model — the project's UNet with random
weights — and, for the order of accuracy, the closed-form probability-flow ODE map of Gaussian
data (float64).
"""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion as D
from ddpm_jax import model_fns, parallel
from ddpm_jax import solvers as S
from helpers import tiny_config

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
# Agreement with diffusers, relative to the largest |value| of its output (the acceptance criterion).
PARITY = 1e-4


@pytest.fixture(scope="module")
def alphas_cumprod():
    return D.make_schedule(BETAS).alphas_cumprod


# --------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------


def diffusers_timesteps(scheduler_class, num_steps, **config):
    scheduler = scheduler_class(num_train_timesteps=T, trained_betas=BETAS, **config)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.numpy()


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 333, 999])
def test_uniform_spacings_match_diffusers(alphas_cumprod, spacing, num_steps):
    ours = S.solver_timesteps(alphas_cumprod, num_steps, spacing)
    for scheduler_class in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        np.testing.assert_array_equal(
            ours, diffusers_timesteps(scheduler_class, num_steps, timestep_spacing=spacing))


@pytest.mark.parametrize("num_steps", [1, 2, 10, 25, 38])
def test_logsnr_spacing_matches_diffusers_lu_lambdas(alphas_cumprod, num_steps):
    ours = S.solver_timesteps(alphas_cumprod, num_steps, "logsnr")
    np.testing.assert_array_equal(
        ours, diffusers_timesteps(DPMSolverMultistepScheduler, num_steps, use_lu_lambdas=True))
    # Closed form: λ = ½ log(ᾱ/(1-ᾱ)) is within one table step of the evenly spaced targets.
    alpha_bar = np.cumprod(1.0 - BETAS)
    lam = 0.5 * np.log(alpha_bar / (1.0 - alpha_bar))
    targets = np.linspace(lam[-1], lam[0], num_steps)
    largest_table_step = np.max(np.abs(np.diff(lam)))
    assert np.all(np.abs(lam[ours] - targets) <= 0.5 * largest_table_step + 1e-9)


def test_spacing_that_repeats_timesteps_is_rejected(alphas_cumprod):
    with pytest.raises(ValueError, match="repeats timesteps"):
        S.solver_timesteps(alphas_cumprod, 39, "logsnr")
    with pytest.raises(ValueError, match="num_steps must be an integer in"):
        S.solver_timesteps(alphas_cumprod, T, "linspace")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        S.solver_timesteps(alphas_cumprod, 10, "karras")


def test_orders_warm_up_and_lower_at_the_end():
    np.testing.assert_array_equal(S.step_orders(6, 3, False, False), [1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(S.step_orders(6, 3, True, False), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(S.step_orders(6, 2, False, True), [1, 2, 2, 2, 2, 1])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        S.step_orders(6, 4, False, False)


def test_h_phi_is_the_integral_it_names():
    """h^k φ_k(−h) = ∫_0^h e^{−(h−u)} u^{k−1}/(k−1)! du, by Gauss–Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    for h in (1e-2, 0.3, 2.0):
        u = 0.5 * h * (nodes + 1.0)
        for k in (1, 2, 3, 4):
            integral = 0.5 * h * np.sum(weights * np.exp(-(h - u)) * u ** (k - 1) / math.factorial(k - 1))
            assert S.h_phi(k, h) == pytest.approx(integral, rel=1e-9)


# --------------------------------------------------------------------------------------
# Same numbers as diffusers, for the project's UNet
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_eps():
    """(ε-function for our solvers, numpy ε(x, t) for diffusers): the tiny-config UNet with every
    parameter perturbed by N(0, 0.05²) so that no zero-initialised layer hides a path."""
    config = tiny_config()
    config.diffusion.num_timesteps = T
    graphdef, params = model_fns.init_params(config, seed=0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(p + 0.05 * rng.standard_normal(p.shape), jnp.float32),
                          params)
    eps_fn = model_fns.model_fn(graphdef, params)
    apply = jax.jit(eps_fn)

    def numpy_eps(x: np.ndarray, t: int) -> np.ndarray:
        return np.asarray(apply(jnp.asarray(x), jnp.full((x.shape[0],), t, jnp.int32)))

    return eps_fn, numpy_eps


@pytest.fixture(scope="module")
def x_T():
    return np.random.default_rng(1).standard_normal((2, 8, 8, 1)).astype(np.float32)


def run_diffusers(scheduler, numpy_eps, x_T, num_steps):
    """The diffusers loop: ε from our model (through numpy), then scheduler.step."""
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T.copy())
    for t in scheduler.timesteps:
        eps = torch.from_numpy(numpy_eps(x.numpy(), int(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x.numpy()


def dpm_reference(order, clip, lower_order_final=True, final_sigmas_type="zero", **config):
    """diffusers' DPM-Solver++ with the settings ours follows: data prediction, midpoint 2M, the
    last step to σ = 0, clipping = thresholding with s clamped to [1, sample_max_value = 1]."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, solver_order=order, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=clip, sample_max_value=1.0,
        lower_order_final=lower_order_final, euler_at_final=False, final_sigmas_type=final_sigmas_type,
        **config)


def unipc_reference(order, clip, **config):
    return UniPCMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, solver_order=order, prediction_type="epsilon",
        predict_x0=True, solver_type=config.pop("solver_type", "bh2"), lower_order_final=True,
        disable_corrector=[], thresholding=clip, sample_max_value=1.0,
        final_sigmas_type=config.pop("final_sigmas_type", "zero"), **config)


def assert_parity(ours, reference):
    ours = np.asarray(ours)
    scale = np.abs(reference).max()
    assert scale > 0.5  # not a comparison of near-zero outputs
    assert np.abs(ours - reference).max() <= PARITY * scale


def matched_solver(name, num_steps, order, clip):
    """(diffusers scheduler, our sampler with the settings that match it)."""
    if name == "dpm_solver":
        # diffusers lowers the order of the last two steps only below 15 steps.
        return dpm_reference(order, clip), functools.partial(
            S.dpm_solver_sample, lower_order_final=num_steps < 15, third_order="reference_code")
    return unipc_reference(order, clip), functools.partial(
        S.unipc_sample, lower_order_final=True, variant="bh2")


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["dpm_solver", "unipc"])
def test_solver_matches_diffusers(alphas_cumprod, unet_eps, x_T, name, order, clip, num_steps):
    eps_fn, numpy_eps = unet_eps
    scheduler, solver = matched_solver(name, num_steps, order, clip)
    reference = run_diffusers(scheduler, numpy_eps, x_T, num_steps)
    ours = jax.jit(lambda x: solver(eps_fn, alphas_cumprod, x, num_steps=num_steps, order=order,
                                    spacing="linspace", clip_denoised=clip))(x_T)
    assert_parity(ours, reference)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_other_uniform_spacings_match_diffusers(alphas_cumprod, unet_eps, x_T, spacing):
    eps_fn, numpy_eps = unet_eps
    reference = run_diffusers(dpm_reference(2, True, timestep_spacing=spacing), numpy_eps, x_T, 10)
    ours = S.dpm_solver_sample(eps_fn, alphas_cumprod, jnp.asarray(x_T), num_steps=10, order=2,
                               spacing=spacing, clip_denoised=True)
    assert_parity(ours, reference)
    reference = run_diffusers(unipc_reference(2, True, timestep_spacing=spacing), numpy_eps, x_T, 10)
    ours = S.unipc_sample(eps_fn, alphas_cumprod, jnp.asarray(x_T), num_steps=10, order=2,
                          spacing=spacing, clip_denoised=True)
    assert_parity(ours, reference)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_matches_diffusers(alphas_cumprod, unet_eps, x_T, order):
    """Compared when stopping at ᾱ_0: diffusers' bh1 step to σ = 0 computes B(h)·0 = (−∞)·0 = NaN."""
    eps_fn, numpy_eps = unet_eps
    reference = run_diffusers(unipc_reference(order, True, solver_type="bh1",
                                              final_sigmas_type="sigma_min"), numpy_eps, x_T, 10)
    ours = S.unipc_sample(eps_fn, alphas_cumprod, jnp.asarray(x_T), num_steps=10, order=order,
                          clip_denoised=True, final_timestep=0, variant="bh1")
    assert_parity(ours, reference)
    to_data = S.unipc_sample(eps_fn, alphas_cumprod, jnp.asarray(x_T), num_steps=10, order=order,
                             clip_denoised=True, variant="bh1")
    assert np.all(np.isfinite(np.asarray(to_data)))
    assert np.isnan(run_diffusers(unipc_reference(order, True, solver_type="bh1"), numpy_eps, x_T,
                                  10)).all()


def test_logsnr_grid_matches_diffusers(alphas_cumprod, unet_eps, x_T):
    """diffusers' use_lu_lambdas steps at unrounded σ (the model seeing the rounded t), so our
    grid, which uses the table at the rounded t, is given to it as explicit timesteps."""
    eps_fn, numpy_eps = unet_eps
    scheduler = dpm_reference(3, True, lower_order_final=False)
    scheduler.set_timesteps(timesteps=S.solver_timesteps(alphas_cumprod, 10, "logsnr").tolist())
    x = torch.from_numpy(x_T.copy())
    for t in scheduler.timesteps:
        x = scheduler.step(torch.from_numpy(numpy_eps(x.numpy(), int(t))), t, x).prev_sample
    ours = S.dpm_solver_sample(eps_fn, alphas_cumprod, jnp.asarray(x_T), num_steps=10, order=3,
                               spacing="logsnr", clip_denoised=True, lower_order_final=False,
                               third_order="reference_code")
    assert_parity(ours, x.numpy())


def test_final_timestep_0_is_diffusers_sigma_min(alphas_cumprod, unet_eps, x_T):
    """Stopping at ᾱ_0 (no jump to σ = 0) is final_sigmas_type="sigma_min"; the last step is then a
    full-order step."""
    eps_fn, numpy_eps = unet_eps
    x = jnp.asarray(x_T)
    reference = run_diffusers(dpm_reference(3, False, lower_order_final=False,
                                            final_sigmas_type="sigma_min"), numpy_eps, x_T, 25)
    ours = S.dpm_solver_sample(eps_fn, alphas_cumprod, x, num_steps=25, order=3, clip_denoised=False,
                               lower_order_final=False, final_timestep=0, third_order="reference_code")
    assert_parity(ours, reference)
    reference = run_diffusers(unipc_reference(3, False, final_sigmas_type="sigma_min"), numpy_eps,
                              x_T, 25)
    ours = S.unipc_sample(eps_fn, alphas_cumprod, x, num_steps=25, order=3, clip_denoised=False,
                          final_timestep=0)
    assert_parity(ours, reference)


def test_parity_discriminates(alphas_cumprod, unet_eps, x_T):
    """Negative controls: the choices that differ from diffusers' settings above are visible at
    the parity tolerance, so agreement is not an accident of a flat model."""
    eps_fn, numpy_eps = unet_eps
    x = jnp.asarray(x_T)
    dpm3 = run_diffusers(dpm_reference(3, False), numpy_eps, x_T, 25)
    taylor = S.dpm_solver_sample(eps_fn, alphas_cumprod, x, num_steps=25, order=3, clip_denoised=False,
                                 lower_order_final=False, third_order="taylor")
    unipc = run_diffusers(unipc_reference(2, False), numpy_eps, x_T, 10)
    bh1 = S.unipc_sample(eps_fn, alphas_cumprod, x, num_steps=10, order=2, clip_denoised=False,
                         variant="bh1")
    for ours, reference in ((taylor, dpm3), (bh1, unipc)):
        assert np.abs(np.asarray(ours) - reference).max() > 30 * PARITY * np.abs(reference).max()


# --------------------------------------------------------------------------------------
# Order of accuracy on Gaussian data (float64, in a subprocess with x64 enabled)
# --------------------------------------------------------------------------------------

CONVERGENCE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ddpm_jax import solvers as S

    MEAN, STD = 0.3, 0.5          # data x_0 ~ N(MEAN, STD^2) per dimension
    STEPS = (40, 80, 160, 320)
    # A table with λ linear in t over DDPM's range, so linspace steps are nested and uniform in λ.
    lam = np.linspace(4.6, -5.06, 1601)
    table = jnp.asarray(1.0 / (1.0 + np.exp(-2.0 * lam)))

    def eps(x, t):  # E[ε | x_t] for Gaussian data
        a, s = jnp.sqrt(table[t])[:, None], jnp.sqrt(1.0 - table[t])[:, None]
        return s * (x - a * MEAN) / (a**2 * STD**2 + s**2)

    def ode_map(x, ab_from, ab_to):
        # Probability-flow ODE for Gaussian data: x_t - α_t μ scales with √(α_t² s² + σ_t²).
        scale = lambda ab: np.sqrt(ab * STD**2 + 1.0 - ab)
        return np.sqrt(ab_to) * MEAN + (x - np.sqrt(ab_from) * MEAN) * scale(ab_to) / scale(ab_from)

    x_T = np.random.default_rng(0).standard_normal((4, 6))
    exact = ode_map(x_T, float(table[-1]), float(table[0]))
    runs = dict(dpm=(S.dpm_solver_sample, {}),
                dpm_reference_code=(S.dpm_solver_sample, dict(third_order="reference_code")),
                unipc=(S.unipc_sample, {}))
    slopes = {}
    for name, (solver, extra) in runs.items():
        for order in (1, 2, 3):
            errors = [float(np.abs(np.asarray(solver(
                eps, table, jnp.asarray(x_T), num_steps=n, order=order, clip_denoised=False,
                lower_order_final=False, final_timestep=0, **extra)) - exact).max()) for n in STEPS]
            slopes[f"{name}{order}"] = -float(np.polyfit(np.log(STEPS), np.log(errors), 1)[0])
    print(json.dumps(slopes))
""")


@pytest.fixture(scope="module")
def convergence_slopes():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CONVERGENCE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_converges_at_its_order(convergence_slopes, order):
    assert order - 0.5 <= convergence_slopes[f"dpm{order}"] <= order + 0.7


def test_dpm_solver_third_order(convergence_slopes):
    """3M with the Taylor weight is at least third order (on Gaussian data the h³ term nearly
    cancels and the measured slope is ≈ 4); the reference code's half weight is second order."""
    assert 2.5 <= convergence_slopes["dpm3"] <= 4.7
    assert 1.5 <= convergence_slopes["dpm_reference_code3"] <= 2.5


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_converges_one_order_above_its_predictor(convergence_slopes, order):
    """UniC-p raises UniP-p's order p to p + 1 (the UniPC paper's claim)."""
    assert order + 0.5 <= convergence_slopes[f"unipc{order}"] <= order + 1.7


# --------------------------------------------------------------------------------------
# Sampler plumbing
# --------------------------------------------------------------------------------------


def gaussian_eps(alphas_cumprod, mean=0.3, std=0.2):
    def eps(x, t):
        ab = D.extract(jnp.asarray(alphas_cumprod), t, x.ndim)
        return (x - jnp.sqrt(ab) * mean) * jnp.sqrt(1 - ab) / (ab * std**2 + 1 - ab)
    return eps


@pytest.mark.parametrize("solver", [S.dpm_solver_sample, S.unipc_sample])
def test_runs_per_device_under_shard_map(alphas_cumprod, solver):
    """Inside shard_map over the 8-device mesh, each device's share equals the unsharded result."""
    mesh = parallel.make_mesh()
    eps = gaussian_eps(alphas_cumprod)
    x_T = jax.random.normal(jax.random.key(0), (mesh.devices.size * 2, 4, 4, 1))
    run = lambda x: solver(eps, alphas_cumprod, x, num_steps=12, order=3, clip_denoised=True)
    sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P(parallel.DATA_AXIS),
                                    out_specs=P(parallel.DATA_AXIS)))(x_T)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(jax.jit(run)(x_T)), rtol=1e-5, atol=1e-6)


def test_progress_holds_the_data_predictions(alphas_cumprod):
    """Slot k = x_θ at the model call n·k from the end; slot 0 is the sample (the last step to the
    data returns x_θ). Checked against the Gaussian x_θ at the first step, x_θ(x_T, t_0)."""
    eps = gaussian_eps(alphas_cumprod)
    x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    samples, progress = S.dpm_solver_sample(eps, alphas_cumprod, x_T, num_steps=10, order=2,
                                            clip_denoised=False, xstart_every=9)
    assert progress.shape == (2,) + x_T.shape
    np.testing.assert_array_equal(np.asarray(progress[0]), np.asarray(samples))
    t0 = int(S.solver_timesteps(alphas_cumprod, 10)[0])
    ab = float(alphas_cumprod[t0])
    expected = 0.3 + math.sqrt(ab) * 0.2**2 / (ab * 0.2**2 + 1 - ab) * (np.asarray(x_T) - math.sqrt(ab) * 0.3)
    np.testing.assert_allclose(np.asarray(progress[1]), expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_rejected(alphas_cumprod):
    eps = gaussian_eps(alphas_cumprod)
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="final_timestep must be in"):
        S.dpm_solver_sample(eps, alphas_cumprod, x, num_steps=10, spacing="logsnr", final_timestep=0)
    with pytest.raises(ValueError, match="unknown UniPC variant"):
        S.unipc_sample(eps, alphas_cumprod, x, num_steps=10, variant="bh3")
    with pytest.raises(ValueError, match="unknown third-order variant"):
        S.dpm_solver_sample(eps, alphas_cumprod, x, num_steps=10, third_order="fast")
    with pytest.raises(ValueError, match="alphas_cumprod must be"):
        S.unipc_sample(eps, np.ones(10), x, num_steps=5)


@pytest.mark.parametrize("solver", [S.dpm_solver_sample, S.unipc_sample])
def test_extra_output_channels_are_ignored(alphas_cumprod, solver):
    """A learned-variance model outputs [ε, v]; only the first C channels are ε."""
    eps = gaussian_eps(alphas_cumprod)
    with_variance = lambda x, t: jnp.concatenate([eps(x, t), 5.0 + x], axis=-1)
    x_T = jax.random.normal(jax.random.key(2), (2, 4, 4, 1))
    run = lambda fn: np.asarray(solver(fn, alphas_cumprod, x_T, num_steps=8, order=2))
    np.testing.assert_array_equal(run(with_variance), run(eps))
