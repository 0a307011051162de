"""Tests for ddpm_jax.chains.

References: the exact (analytic) denoiser for Gaussian data, for which the sampled distribution can be
propagated in closed form (float64 NumPy); plain Python loops over the single-step functions; and
diffusers' DDPMScheduler / DDIMScheduler steps.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm_jax import diffusion as D
from ddpm_jax import chains as S

T = 1000
# The scan body and the separately compiled single step are fused differently by XLA, so results agree to
# float32 rounding (observed ≤ 3e-6 after 20 steps on values of magnitude ~2), not bit for bit.
LOOP_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
DATA_MEAN, DATA_STD = 0.3, 0.2


@pytest.fixture(scope="module")
def linear_betas():
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


@pytest.fixture(scope="module")
def linear_schedule(linear_betas):
    return D.make_schedule(linear_betas)


@pytest.fixture(scope="module")
def small_schedule():
    """T = 20 schedule for loop-vs-scan comparisons."""
    return D.make_schedule(np.linspace(1e-3, 0.3, 20))


def gaussian_data_eps(schedule):
    """ε*(x_t, t) = E[ε | x_t] for data N(μ, s²): (x_t - √ᾱ_t μ) √(1-ᾱ_t) / (ᾱ_t s² + 1 - ᾱ_t)."""

    def model_fn(x, t):
        alpha_bar = D.extract(schedule.alphas_cumprod, t, x.ndim)
        return (x - jnp.sqrt(alpha_bar) * DATA_MEAN) * jnp.sqrt(1 - alpha_bar) / (alpha_bar * DATA_STD**2 + 1 - alpha_bar)

    return model_fn


class ExactGaussianChain:
    """Float64 closed-form propagation of N(m, v) through affine reverse steps x' = A x + B + σ z."""

    def __init__(self, betas):
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)

    def alpha_bar(self, t):
        return self.alphas_cumprod[t] if t >= 0 else 1.0

    def eps(self, x, t):
        ab = self.alpha_bar(t)
        return (x - math.sqrt(ab) * DATA_MEAN) * math.sqrt(1 - ab) / (ab * DATA_STD**2 + 1 - ab)

    def xstart(self, x, t):
        ab = self.alpha_bar(t)
        return (x - math.sqrt(1 - ab) * self.eps(x, t)) / math.sqrt(ab)

    def ddpm_mean(self, x, t):
        """Posterior mean μ̃_t(x̂_0, x_t) written out (Eq. 7)."""
        ab, ab_prev, beta = self.alpha_bar(t), self.alpha_bar(t - 1), self.betas[t]
        return (beta * math.sqrt(ab_prev) * self.xstart(x, t) + (1 - ab_prev) * math.sqrt(1 - beta) * x) / (1 - ab)

    def ddim_map(self, x, t, t_prev):
        ab_prev = self.alpha_bar(t_prev)
        return math.sqrt(ab_prev) * self.xstart(x, t) + math.sqrt(1 - ab_prev) * self.eps(x, t)

    @staticmethod
    def propagate(mean, var, affine, noise_var):
        offset = affine(0.0)
        slope = affine(1.0) - offset
        return slope * mean + offset, slope**2 * var + noise_var

    def ancestral(self, var_type):
        mean, var = 0.0, 1.0
        for t in range(len(self.betas) - 1, -1, -1):
            if t == 0:
                noise_var = 0.0
            elif var_type == "fixedlarge":
                noise_var = self.betas[t]
            else:
                noise_var = self.betas[t] * (1 - self.alpha_bar(t - 1)) / (1 - self.alpha_bar(t))
            mean, var = self.propagate(mean, var, lambda x: self.ddpm_mean(x, t), noise_var)
        return mean, math.sqrt(var)

    def ddim(self, timesteps):
        mean, var = 0.0, 1.0
        for i in range(len(timesteps) - 1, -1, -1):
            t, t_prev = int(timesteps[i]), int(timesteps[i - 1]) if i > 0 else -1
            mean, var = self.propagate(mean, var, lambda x: self.ddim_map(x, t, t_prev), 0.0)
        return mean, math.sqrt(var)


def nonlinear_denoiser(x, t):
    """A made-up, t-dependent, nonlinear 'network' for loop-vs-scan comparisons."""
    scale = 1.0 + t.astype(jnp.float32)[:, None, None, None] / 7.0
    return jnp.tanh(1.3 * x) * scale + 0.1 * jnp.sin(3 * x)


def assert_moments(samples, mean, std, n_se=5.0):
    samples = np.asarray(samples, np.float64).ravel()
    n = samples.size
    assert abs(samples.mean() - mean) < n_se * std / math.sqrt(n), (samples.mean(), mean)
    assert abs(samples.std() - std) < n_se * std / math.sqrt(2 * n), (samples.std(), std)


def assert_data_law(samples, std_ratio_range):
    """The samples' mean within 1e-3 of the data's and their std / DATA_STD inside
    `std_ratio_range`, each widened by 5 standard errors."""
    samples = np.asarray(samples, np.float64)
    standard_error = DATA_STD / math.sqrt(samples.size)
    assert abs(samples.mean() - DATA_MEAN) < 1e-3 + 5 * standard_error
    std_error = 5 * standard_error / math.sqrt(2) / DATA_STD
    low, high = std_ratio_range
    assert low - std_error < samples.std() / DATA_STD < high + std_error, samples.std() / DATA_STD


# ----------------------------------------------------------------------------- distribution tests


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_ancestral_sampling_recovers_gaussian_data(linear_betas, linear_schedule, var_type):
    model_fn = gaussian_data_eps(linear_schedule)
    sample = jax.jit(
        lambda x, key: S.ancestral_sample(
            model_fn, linear_schedule, x, key, mean_type="eps", var_type=var_type, clip_denoised=False
        )
    )
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2048, 8, 8, 1))
    samples = sample(x_T, jax.random.PRNGKey(1))
    exact_mean, exact_std = ExactGaussianChain(linear_betas).ancestral(var_type)
    # Exact law of the discrete chain (5 standard errors on 131k draws) ...
    assert_moments(samples, exact_mean, exact_std)
    # ... and the data's law, to which T = 1000 steps bring the chain within 1e-3 in the mean and 2% in
    # the std (fixedlarge is slightly too wide, fixedsmall too narrow), plus 5 standard errors.
    assert_data_law(samples, (0.98, 1.02))


@pytest.mark.parametrize("num_steps", [50, 1000])
def test_ddim_sampling_on_gaussian_data(linear_betas, linear_schedule, num_steps):
    model_fn = gaussian_data_eps(linear_schedule)
    timesteps = S.ddim_timesteps(T, num_steps)
    sample = jax.jit(
        lambda x, key: S.ddim_sample(
            model_fn, linear_schedule, x, key, timesteps=timesteps, eta=0.0, clip_denoised=False
        )
    )
    x_T = jax.random.normal(jax.random.PRNGKey(2), (2048, 8, 8, 1))
    samples = sample(x_T, jax.random.PRNGKey(3))
    exact_mean, exact_std = ExactGaussianChain(linear_betas).ddim(timesteps)
    # eta = 0 is a deterministic affine map here, so the output law is exactly N(exact_mean, exact_std²)
    # given x_T ~ N(0, 1); float32 rounding is far below the sampling error.
    assert_moments(samples, exact_mean, exact_std)
    # Against the data's law (plus 5 standard errors): the mean within 1e-3; DDIM contracts the spread of a
    # narrow Gaussian when steps are coarse (Cauchy-Schwarz), and with all 1000 steps it is within 1% of
    # the data std.
    assert_data_law(samples, (0.99, 1.01) if num_steps == T else (0.8, 0.95))


# ----------------------------------------------------------------------------- determinism


def test_same_key_same_samples_and_key_matters(small_schedule):
    run = jax.jit(
        lambda x, key: S.ancestral_sample(
            nonlinear_denoiser, small_schedule, x, key, mean_type="eps", var_type="fixedlarge"
        )
    )
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    first = np.asarray(run(x_T, jax.random.PRNGKey(5)))
    np.testing.assert_array_equal(first, np.asarray(run(x_T, jax.random.PRNGKey(5))))
    assert np.abs(first - np.asarray(run(x_T, jax.random.PRNGKey(6)))).max() > 1e-2


def test_ddim_eta0_is_deterministic_and_key_independent(small_schedule):
    timesteps = S.ddim_timesteps(20, 5)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    with_python_zero = jax.jit(
        lambda k: S.ddim_sample(nonlinear_denoiser, small_schedule, x_T, k, timesteps=timesteps, eta=0.0)
    )
    with_traced_eta = jax.jit(
        lambda k, e: S.ddim_sample(nonlinear_denoiser, small_schedule, x_T, k, timesteps=timesteps, eta=e)
    )
    keys = [jax.random.PRNGKey(i) for i in range(4)]
    reference = np.asarray(with_python_zero(keys[0]))
    np.testing.assert_array_equal(reference, np.asarray(with_python_zero(keys[1])))
    # A traced eta = 0 draws noise but multiplies it by σ = 0: still key independent.
    traced = [np.asarray(with_traced_eta(k, 0.0)) for k in keys[2:]]
    np.testing.assert_array_equal(traced[0], traced[1])
    np.testing.assert_allclose(traced[0], reference, atol=1e-6)
    # With eta > 0 the key matters.
    assert np.abs(np.asarray(with_traced_eta(keys[2], 1.0)) - np.asarray(with_traced_eta(keys[3], 1.0))).max() > 1e-3


def test_samplers_trace_the_model_once(small_schedule):
    """One scan body, not a Python loop unrolled over steps: the model is traced exactly once."""
    calls = []

    def counting_denoiser(x, t):
        calls.append(1)
        return nonlinear_denoiser(x, t)

    x_T = jnp.zeros((1, 2, 2, 3))
    jaxpr = jax.make_jaxpr(
        lambda x: S.ancestral_sample(
            counting_denoiser, small_schedule, x, jax.random.PRNGKey(0), mean_type="eps", var_type="fixedlarge",
            xstart_every=5,
        )
    )(x_T)
    assert len(calls) == 1 and "scan" in str(jaxpr)
    calls.clear()
    jax.make_jaxpr(
        lambda x: S.ddim_sample(counting_denoiser, small_schedule, x, jax.random.PRNGKey(0), timesteps=np.arange(0, 20, 4))
    )(x_T)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- scan vs Python loop


@pytest.mark.parametrize("mean_type, var_type, clip", [("eps", "fixedlarge", True), ("xstart", "fixedsmall", False)])
def test_ancestral_scan_equals_python_loop(small_schedule, mean_type, var_type, clip):
    key = jax.random.PRNGKey(42)
    x_T = jax.random.normal(jax.random.PRNGKey(7), (3, 4, 4, 2))
    samples, progress = jax.jit(
        lambda x: S.ancestral_sample(
            nonlinear_denoiser, small_schedule, x, key, mean_type=mean_type, var_type=var_type,
            clip_denoised=clip, xstart_every=5,
        )
    )(x_T)

    step = jax.jit(
        lambda x, t: S.p_sample(
            small_schedule, nonlinear_denoiser(x, t), x, t, jax.random.normal(jax.random.fold_in(key, t[0]), x.shape),
            mean_type=mean_type, var_type=var_type, clip_denoised=clip,
        )
    )
    x = x_T
    pred_xstarts = {}
    for t in range(19, -1, -1):
        x, pred_xstarts[t] = step(x, jnp.full((3,), t, jnp.int32))
    np.testing.assert_allclose(samples, x, **LOOP_TOLERANCE)
    assert progress.shape == (4, 3, 4, 4, 2)
    for k in range(4):
        np.testing.assert_allclose(progress[k], pred_xstarts[5 * k], **LOOP_TOLERANCE)
        assert not np.allclose(progress[k], pred_xstarts[5 * k + 1])
    if clip:
        # At t = 0 the posterior mean is x̂_0 (coef1 = 1, coef2 = 0), so slot 0 is the final sample.
        np.testing.assert_allclose(progress[0], samples, atol=1e-6)
        assert np.abs(np.asarray(samples)).max() <= 1.0


def test_progress_with_uneven_slots(small_schedule):
    key = jax.random.PRNGKey(0)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 3))
    samples, progress = S.ancestral_sample(
        nonlinear_denoiser, small_schedule, x_T, key, mean_type="eps", var_type="fixedlarge", xstart_every=6
    )
    assert progress.shape[0] == 4  # t = 0, 6, 12, 18
    step = jax.jit(
        lambda x, tb: S.p_sample(
            small_schedule, nonlinear_denoiser(x, tb), x, tb, jax.random.normal(jax.random.fold_in(key, tb[0]), x.shape),
            mean_type="eps", var_type="fixedlarge",
        )
    )
    x = x_T
    for t in range(19, -1, -1):
        x, pred = step(x, jnp.full((2,), t, jnp.int32))
        if t % 6 == 0:
            np.testing.assert_allclose(progress[t // 6], pred, **LOOP_TOLERANCE)


@pytest.mark.parametrize("mean_type, eta, clip", [("eps", 0.0, True), ("eps", 0.7, False), ("xstart", 1.0, True)])
def test_ddim_scan_equals_python_loop(small_schedule, mean_type, eta, clip):
    key = jax.random.PRNGKey(3)
    timesteps = np.array([0, 3, 8, 14, 19])
    x_T = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3))
    samples, progress = jax.jit(
        lambda x: S.ddim_sample(
            nonlinear_denoiser, small_schedule, x, key, timesteps=timesteps, eta=eta, mean_type=mean_type,
            clip_denoised=clip, xstart_every=2,
        )
    )(x_T)
    step = jax.jit(
        lambda x, tb, t_prev_b: S.ddim_step(
            small_schedule, nonlinear_denoiser(x, tb), x, tb, t_prev_b,
            jax.random.normal(jax.random.fold_in(key, tb[0]), x.shape), eta=eta, mean_type=mean_type, clip_denoised=clip,
        )
    )
    x = x_T
    preds = {}
    for i in range(4, -1, -1):
        t, t_prev = int(timesteps[i]), int(timesteps[i - 1]) if i > 0 else -1
        x, preds[i] = step(x, jnp.full((2,), t, jnp.int32), jnp.full((2,), t_prev, jnp.int32))
    np.testing.assert_allclose(samples, x, **LOOP_TOLERANCE)
    assert progress.shape == (3, 2, 4, 4, 3)
    for k in range(3):
        np.testing.assert_allclose(progress[k], preds[2 * k], **LOOP_TOLERANCE)
    # The last DDIM step goes to ᾱ = 1, i.e. returns x̂_0.
    np.testing.assert_allclose(progress[0], samples, atol=1e-6)


def test_ddim_with_eta_one_on_all_steps_is_ddpm_fixedsmall(small_schedule):
    """DDIM Eq. 16 with η = 1 and t_prev = t - 1 gives σ² = β̃_t and the DDPM posterior mean."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    for t in [0, 1, 7, 19]:
        tb = jnp.full((2,), t, jnp.int32)
        out = nonlinear_denoiser(x, tb)
        ddim, ddim_x0 = S.ddim_step(small_schedule, out, x, tb, tb - 1, noise, eta=1.0)
        ddpm, ddpm_x0 = S.p_sample(small_schedule, out, x, tb, noise, mean_type="eps", var_type="fixedsmall")
        np.testing.assert_allclose(ddim, ddpm, atol=2e-5)
        np.testing.assert_allclose(ddim_x0, ddpm_x0, atol=1e-6)


def test_ddim_ignores_learned_variance_channels(small_schedule):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    tb = jnp.full((2,), 9, jnp.int32)
    out = nonlinear_denoiser(x, tb)
    with_var = jnp.concatenate([out, 5 + out], axis=-1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    a = S.ddim_step(small_schedule, out, x, tb, tb - 4, noise, eta=0.5)[0]
    b = S.ddim_step(small_schedule, with_var, x, tb, tb - 4, noise, eta=0.5)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="DDIM supports mean_type 'eps' or 'xstart', got 'xprev'"):
        S.ddim_step(small_schedule, out, x, tb, tb - 4, noise, mean_type="xprev")


# ----------------------------------------------------------------------------- timesteps


def test_ddim_timesteps():
    np.testing.assert_array_equal(S.ddim_timesteps(1000, 50), np.arange(0, 1000, 20))
    np.testing.assert_array_equal(S.ddim_timesteps(1000, 3), [0, 333, 666])
    ref = DDIMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(S.ddim_timesteps(1000, 50), np.sort(ref.timesteps.numpy()))
    quad = S.ddim_timesteps(1000, 10, "quad")
    # (i·√800/9)² = 800·i²/81 exactly; the DDIM code's float √800 can leave the last one at 799.
    expected = [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]  # ⌊800·i²/81⌋
    np.testing.assert_array_equal(quad[:-1], expected[:-1])
    assert quad[-1] in (799, 800)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 10\], got 11"):
        S.ddim_timesteps(10, 11)
    with pytest.raises(ValueError, match="unknown DDIM timestep kind 'cubic'"):
        S.ddim_timesteps(10, 5, "cubic")


# ----------------------------------------------------------------------------- diffusers
#
# diffusers is run in float64 with the float64 ᾱ injected: this makes it a high-precision reference for the
# step formulas. (Stock diffusers works in float32 and forms 1 - ᾱ_t by cancellation, which alone differs from
# the float64-derived constants of the original code by up to ~5e-5.)


def _float64_scheduler(scheduler, linear_betas):
    scheduler.alphas_cumprod = torch.tensor(np.cumprod(1.0 - linear_betas), dtype=torch.float64)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def _ddpm_inputs(schedule, t, seed):
    """x_t from a real q_sample and an imperfect ε prediction, so that clipping is partly active at large t."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-0.9, 0.9, size=(2, 3, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x_t = np.asarray(D.q_sample(schedule, jnp.asarray(x0), jnp.full((2,), t), jnp.asarray(eps)))
    model_output = (eps + 0.02 * rng.standard_normal(x0.shape)).astype(np.float32)
    return x_t, model_output


def _pred_xstart_tolerance(linear_betas, t, x_t, model_output):
    """x̂_0 = (x_t - √(1-ᾱ) ε)/√ᾱ has float32 rounding ≈ 2⁻²³(|x_t| + |ε|)/√ᾱ_t (≈7e-5 at t = 999);
    unclipped entries can differ from a float64 reference by that much whatever the formula."""
    alpha_bar = np.prod(1.0 - linear_betas[: t + 1])
    return 1e-5 + 2.0**-23 * (np.abs(x_t) + np.abs(model_output)).max() / math.sqrt(alpha_bar)


def _f64(a):
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("t", [0, 1, 10, 500, 998, 999])
def test_p_sample_matches_diffusers_ddpm_step(linear_betas, linear_schedule, t):
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        variance_type="fixed_large", clip_sample=True, prediction_type="epsilon",
    )
    _float64_scheduler(scheduler, linear_betas)
    x_t, model_output = _ddpm_inputs(linear_schedule, t, seed=t)
    ref = scheduler.step(_f64(model_output), t, _f64(x_t), generator=torch.Generator().manual_seed(1234 + t))
    # diffusers draws its noise with randn_tensor(shape, generator, dtype): replay the same draw.
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1234 + t), dtype=torch.float64).numpy()

    # Elementwise maths, so the NCHW layout used for diffusers does not matter for our function.
    ours, pred_xstart = S.p_sample(
        linear_schedule, jnp.asarray(model_output), jnp.asarray(x_t), jnp.full((2,), t),
        jnp.asarray(noise, jnp.float32), mean_type="eps", var_type="fixedlarge", clip_denoised=True,
    )
    np.testing.assert_allclose(ours, ref.prev_sample.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        pred_xstart, ref.pred_original_sample.numpy(), atol=_pred_xstart_tolerance(linear_betas, t, x_t, model_output)
    )
    if t == 0:  # no noise at the last step: the sample is the clipped x̂_0
        np.testing.assert_array_equal(ours, pred_xstart)
    else:
        assert np.abs(np.asarray(ours) - np.asarray(ref.prev_sample.numpy() - math.sqrt(linear_betas[t]) * noise)).max() > 1e-3


@pytest.mark.parametrize("t", [1, 100, 500, 999])
def test_learned_range_matches_diffusers(linear_betas, linear_schedule, t):
    """Improved-DDPM interpolated variance; diffusers splits channels on axis 1 (NCHW), we on the last."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=True
    )
    _float64_scheduler(scheduler, linear_betas)
    x_t, eps_out = _ddpm_inputs(linear_schedule, t, seed=100 + t)
    v = np.random.default_rng(t).uniform(-1, 1, size=x_t.shape).astype(np.float32)
    output_nchw = np.concatenate([eps_out, v], axis=1)
    ref = scheduler.step(_f64(output_nchw), t, _f64(x_t), generator=torch.Generator().manual_seed(t))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64).numpy()

    def nhwc(a):
        return jnp.asarray(np.transpose(a, (0, 2, 3, 1)), jnp.float32)

    ours, _ = S.p_sample(
        linear_schedule, nhwc(output_nchw), nhwc(x_t), jnp.full((2,), t), nhwc(noise),
        mean_type="eps", var_type="learned_range",
    )
    np.testing.assert_allclose(ours, np.transpose(ref.prev_sample.numpy(), (0, 2, 3, 1)), atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("t", [0, 20, 480, 980])
def test_ddim_step_matches_diffusers(linear_betas, linear_schedule, t, eta):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    )
    _float64_scheduler(scheduler, linear_betas)
    scheduler.set_timesteps(50)
    x_t, model_output = _ddpm_inputs(linear_schedule, t, seed=200 + t)
    noise = np.random.default_rng(t).standard_normal(x_t.shape).astype(np.float32)
    ref = scheduler.step(
        _f64(model_output), t, _f64(x_t), eta=eta, use_clipped_model_output=True, variance_noise=_f64(noise)
    )
    ours, pred_xstart = S.ddim_step(
        linear_schedule, jnp.asarray(model_output), jnp.asarray(x_t), jnp.full((2,), t), jnp.full((2,), t - 20),
        jnp.asarray(noise), eta=eta, mean_type="eps", clip_denoised=True,
    )
    np.testing.assert_allclose(ours, ref.prev_sample.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        pred_xstart, ref.pred_original_sample.numpy(), atol=_pred_xstart_tolerance(linear_betas, t, x_t, model_output)
    )
