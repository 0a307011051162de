"""Tests for ddpm_jax.diffusion against independent references.

References used: numbers quoted in docs/original.md (the authors' code read line by line), closed-form Gaussian
algebra written out here in float64 NumPy (Bayes' rule, KL), exact normal CDFs / quadrature from
SciPy, Monte Carlo, and diffusers' schedule implementations.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch  # noqa: F401  (diffusers needs it; fail loudly if missing)
from diffusers import DDPMScheduler
from scipy import integrate
from scipy.special import ndtr

from ddpm_jax import diffusion as D

T = 1000
LN2 = math.log(2.0)

# The functions under test, jitted once each (string options static) so that the tests do not pay an
# eager-mode compilation for every primitive.
J = SimpleNamespace(
    q_sample=jax.jit(D.q_sample),
    q_mean_variance=jax.jit(D.q_mean_variance),
    q_posterior=jax.jit(D.q_posterior),
    predict_xstart_from_eps=jax.jit(D.predict_xstart_from_eps),
    predict_eps_from_xstart=jax.jit(D.predict_eps_from_xstart),
    predict_xstart_from_xprev=jax.jit(D.predict_xstart_from_xprev),
    p_mean_variance=jax.jit(D.p_mean_variance, static_argnames=("mean_type", "var_type", "clip_denoised")),
    normal_kl=jax.jit(D.normal_kl),
    approx_standard_normal_cdf=jax.jit(D.approx_standard_normal_cdf),
    discretized_gaussian_log_likelihood=jax.jit(D.discretized_gaussian_log_likelihood),
    prior_bpd=jax.jit(D.prior_bpd),
    vb_terms_bpd=jax.jit(D.vb_terms_bpd, static_argnames=("mean_type", "var_type", "clip_denoised")),
    training_losses=jax.jit(D.training_losses, static_argnames=("mean_type", "var_type", "loss_type")),
)


# ----------------------------------------------------------------------------- helpers


def linear_betas_by_formula(beta_start=1e-4, beta_end=0.02, num_timesteps=T):
    """β_i = β_start + i (β_end - β_start)/(T - 1), written elementwise (not via np.linspace)."""
    step = (beta_end - beta_start) / (num_timesteps - 1)
    return np.array([beta_start + i * step for i in range(num_timesteps)], dtype=np.float64)


def alpha_bar_by_product(betas, t):
    """ᾱ_t = Π_{s=0..t}(1 - β_s) with ᾱ_{-1} = 1, as an explicit product."""
    return float(np.prod(1.0 - betas[: t + 1])) if t >= 0 else 1.0


def bayes_posterior(betas, x0, xt, t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0) as a product of Gaussians (float64).

    q(x_{t-1}|x_0) = N(√ᾱ_{t-1} x_0, 1-ᾱ_{t-1}); q(x_t|x_{t-1}) = N(√α_t x_{t-1}, β_t).
    At t = 0 (code index) x_{t-1} is x_0 itself: mean x_0, variance 0.
    """
    if t == 0:
        return np.asarray(x0, np.float64), 0.0
    alpha_t = 1.0 - betas[t]
    ab_prev = alpha_bar_by_product(betas, t - 1)
    precision = 1.0 / (1.0 - ab_prev) + alpha_t / betas[t]
    variance = 1.0 / precision
    mean = variance * (np.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + np.sqrt(alpha_t) * xt / betas[t])
    return mean, variance


def gaussian_kl_closed_form(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) = log(σ2/σ1) + (v1 + (m1 - m2)²)/(2 v2) - ½."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2.0 * v2) - 0.5


def tanh_cdf_error_bounds():
    """(sup_z |e(z)|, sup_z |e'(z)|) for e = Φ_tanh - Φ, on a fine grid (≈1.8e-4 and ≈4.3e-4)."""
    z = np.linspace(-12, 12, 400001)
    approx = 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))
    error = approx - ndtr(z)
    return float(np.max(np.abs(error))), float(np.max(np.abs(np.gradient(error, z))))


def bin_probability_by_quadrature(lo, hi, mean, scale):
    """∫_lo^hi N(u; mean, scale²) du by adaptive quadrature; infinite ends are cut at mean ∓ 40·scale
    (the discarded tail mass is < 1e-300)."""
    lo = max(lo, mean - 40 * scale)
    hi = min(hi, mean + 40 * scale)
    if hi <= lo:
        return 0.0

    def pdf(u):
        return math.exp(-0.5 * ((u - mean) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))

    points = [mean] if lo < mean < hi else None
    return integrate.quad(pdf, lo, hi, points=points, epsabs=1e-14, epsrel=1e-12, limit=200)[0]


@pytest.fixture(scope="module")
def linear_schedule():
    return D.make_schedule(D.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T))


def random_images(seed, shape=(4, 4, 4, 3)):
    """Images on the 8-bit grid k/127.5 - 1, including both edge values."""
    k = np.random.default_rng(seed).integers(0, 256, size=shape)
    k[0, 0, 0, 0], k[0, 0, 0, 1] = 0, 255
    return jnp.asarray(k / 127.5 - 1.0, dtype=jnp.float32)


def normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype=jnp.float32)


def uniform(rng, shape, low=-1.0, high=1.0):
    return jnp.asarray(rng.uniform(low, high, size=shape), dtype=jnp.float32)


# ----------------------------------------------------------------------------- schedules


def test_reference_numbers(linear_schedule):
    s = linear_schedule
    # Values quoted in docs/original.md (§2.1, §2.2, §4).
    np.testing.assert_allclose(s.betas[1], 1.1991992e-4, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod[999], 4.0358e-5, rtol=1e-4)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod[999], 6.353e-3, rtol=1e-3)
    np.testing.assert_allclose(s.posterior_variance[1], 5.4532e-5, rtol=1e-4)
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1], -9.81673, atol=1e-5)
    np.testing.assert_allclose(s.posterior_log_variance_clipped[0], -9.81673, atol=1e-5)
    np.testing.assert_allclose(s.fixedlarge_log_variance[0], -9.81673, atol=1e-5)
    np.testing.assert_allclose(s.fixedlarge_log_variance[1:], np.log(linear_betas_by_formula()[1:]), rtol=1e-6)
    np.testing.assert_allclose(s.posterior_variance[999], 0.0199999835, rtol=1e-7)
    assert float(s.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(s.posterior_mean_coef1[0], 1.0, rtol=0, atol=0)
    np.testing.assert_allclose(s.posterior_mean_coef2[0], 0.0, rtol=0, atol=0)
    for field in s:
        assert field.dtype == jnp.float32 and field.shape == (T,)


def test_schedule_constants_against_products():
    betas = linear_betas_by_formula()
    s = D.make_schedule(D.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T))
    for t in [0, 1, 2, 10, 250, 500, 998, 999]:
        ab = alpha_bar_by_product(betas, t)
        ab_prev = alpha_bar_by_product(betas, t - 1)
        np.testing.assert_allclose(s.alphas_cumprod[t], ab, rtol=2e-6)
        np.testing.assert_allclose(s.alphas_cumprod_prev[t], ab_prev, rtol=2e-6)
        np.testing.assert_allclose(s.sqrt_alphas_cumprod[t], math.sqrt(ab), rtol=2e-6)
        np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod[t], math.sqrt(1 - ab), rtol=2e-6)
        np.testing.assert_allclose(s.log_one_minus_alphas_cumprod[t], math.log(1 - ab), rtol=2e-6)
        np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod[t], 1 / math.sqrt(ab), rtol=2e-6)
        np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod[t], math.sqrt(1 / ab - 1), rtol=2e-6)


def test_linear_schedule_definition():
    betas = D.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, linear_betas_by_formula(), rtol=1e-13)


def test_quad_schedule_definition_and_diffusers():
    betas = D.get_beta_schedule("quad", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
    root_step = (math.sqrt(0.02) - math.sqrt(1e-4)) / (T - 1)
    expected = np.array([(math.sqrt(1e-4) + i * root_step) ** 2 for i in range(T)])
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    # diffusers' "scaled_linear" is the same definition (computed in float32).
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-5)


def test_const_and_jsd_schedules():
    const = D.get_beta_schedule("const", beta_start=1e-4, beta_end=0.02, num_timesteps=50)
    np.testing.assert_array_equal(const, np.full(50, 0.02))
    jsd = D.get_beta_schedule("jsd", beta_start=1e-4, beta_end=0.02, num_timesteps=50)
    np.testing.assert_allclose(jsd, [1.0 / (50 - i) for i in range(50)], rtol=1e-14)
    assert jsd[0] == pytest.approx(1 / 50) and jsd[-1] == 1.0


@pytest.mark.parametrize("name, frac", [("warmup10", 0.1), ("warmup50", 0.5)])
@pytest.mark.parametrize("num_timesteps", [1000, 37])
def test_warmup_schedules(name, frac, num_timesteps):
    betas = D.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=num_timesteps)
    warmup = int(num_timesteps * frac)
    expected = [1e-4 + i * (0.02 - 1e-4) / (warmup - 1) for i in range(warmup)]
    expected += [0.02] * (num_timesteps - warmup)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)


def test_cosine_schedule():
    betas = D.get_beta_schedule("cosine", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
    s = 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # ᾱ_t = f((t+1)/T) / f(0) wherever β is not clipped (Improved DDPM Eq. 17).
    alphas_cumprod = np.cumprod(1.0 - betas)
    unclipped = np.flatnonzero(betas < 0.999)
    assert unclipped[-1] >= T - 3
    for t in unclipped[:: 97]:
        np.testing.assert_allclose(alphas_cumprod[t], f((t + 1) / T) / f(0), rtol=1e-9)
    assert betas.max() == 0.999 and betas[-1] == 0.999
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-6)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        D.get_beta_schedule("sigmoid", beta_start=1e-4, beta_end=0.02, num_timesteps=10)


def test_schedule_from_config():
    cfg = ml_collections.ConfigDict(
        dict(num_timesteps=100, beta_schedule="quad", beta_start=1e-4, beta_end=0.02, mean_type="eps")
    )
    s = D.schedule_from_config(cfg)
    root_step = (math.sqrt(0.02) - math.sqrt(1e-4)) / 99
    np.testing.assert_allclose(s.betas, [(0.01 + i * root_step) ** 2 for i in range(100)], rtol=1e-6)
    assert s.num_timesteps == 100


def test_schedule_is_a_pytree(linear_schedule):
    leaves = jax.tree_util.tree_leaves(linear_schedule)
    assert len(leaves) == 13
    doubled = jax.jit(lambda sch: jax.tree_util.tree_map(lambda a: 2 * a, sch))(linear_schedule)
    assert isinstance(doubled, D.Schedule)
    np.testing.assert_allclose(doubled.betas, 2 * np.asarray(linear_schedule.betas))


# ----------------------------------------------------------------------------- forward process


def test_extract_broadcasts():
    coefficients = jnp.arange(10.0) * 3
    out = D.extract(coefficients, jnp.array([1, 7]), 4)
    assert out.shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [3.0, 21.0])


def test_q_sample_matches_step_by_step_forward_chain(linear_schedule):
    """Eq. 4's marginal vs iterating x_s = √(1-β_s) x_{s-1} + √β_s z (Monte Carlo, float64)."""
    betas = linear_betas_by_formula()
    t, n = 300, 200_000
    rng = np.random.default_rng(0)
    x0 = 0.7
    x = np.full(n, x0)
    for s in range(t + 1):
        x = np.sqrt(1 - betas[s]) * x + np.sqrt(betas[s]) * rng.standard_normal(n)
    noise = normal(rng, (n, 1, 1, 1))
    xt = np.asarray(J.q_sample(linear_schedule, jnp.full((n, 1, 1, 1), x0), jnp.full((n,), t), noise)).ravel()
    mean, var, logvar = J.q_mean_variance(linear_schedule, jnp.full((1, 1, 1, 1), x0), jnp.array([t]))
    ab = alpha_bar_by_product(betas, t)
    np.testing.assert_allclose(float(mean.squeeze()), math.sqrt(ab) * x0, rtol=1e-5)
    np.testing.assert_allclose(float(var.squeeze()), 1 - ab, rtol=1e-5)
    np.testing.assert_allclose(float(logvar.squeeze()), math.log(1 - ab), rtol=1e-5)
    # Both Monte Carlo estimates agree with the closed form within 5 standard errors.
    sd = math.sqrt(1 - ab)
    for sample in (x, xt):
        assert abs(sample.mean() - math.sqrt(ab) * x0) < 5 * sd / math.sqrt(n)
        assert abs(sample.std() - sd) < 5 * sd / math.sqrt(2 * n)


@pytest.mark.parametrize("t", [0, 1, 2, 57, 500, 999])
def test_q_posterior_matches_bayes_rule(linear_schedule, t):
    betas = linear_betas_by_formula()
    rng = np.random.default_rng(t)
    x0 = uniform(rng, (3, 2, 2, 3))
    xt = normal(rng, (3, 2, 2, 3))
    mean, var, logvar = J.q_posterior(linear_schedule, x0, xt, jnp.full((3,), t))
    ref_mean, ref_var = bayes_posterior(betas, np.asarray(x0, np.float64), np.asarray(xt, np.float64), t)
    np.testing.assert_allclose(mean, ref_mean, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(var.squeeze(), ref_var, rtol=1e-5, atol=1e-12)
    # Log-variance is clipped at t = 0 to log β̃_1.
    expected_log = math.log(ref_var) if t > 0 else math.log(bayes_posterior(betas, 0.0, 0.0, 1)[1])
    np.testing.assert_allclose(logvar.squeeze(), expected_log, rtol=1e-6)


def test_xstart_eps_conversions_invert_q_sample(linear_schedule):
    rng = np.random.default_rng(3)
    x0 = uniform(rng, (4, 3, 3, 3))
    eps = normal(rng, x0.shape)
    t = jnp.array([0, 10, 300, 700])
    xt = J.q_sample(linear_schedule, x0, t, eps)
    np.testing.assert_allclose(J.predict_xstart_from_eps(linear_schedule, xt, t, eps), x0, atol=3e-4)
    np.testing.assert_allclose(J.predict_eps_from_xstart(linear_schedule, xt, t, x0), eps, atol=1e-3)
    mean, _, _ = J.q_posterior(linear_schedule, x0, xt, t)
    np.testing.assert_allclose(J.predict_xstart_from_xprev(linear_schedule, xt, t, mean), x0, atol=3e-4)


# ----------------------------------------------------------------------------- reverse process


@pytest.mark.parametrize("t", [0, 1, 100, 999])
def test_eps_mean_is_eq11_without_clipping(linear_schedule, t):
    """μ_θ = (x_t - β_t/√(1-ᾱ_t) ε_θ)/√α_t (Eq. 11), float64 reference."""
    betas = linear_betas_by_formula()
    rng = np.random.default_rng(10 + t)
    xt = normal(rng, (2, 4, 4, 3), 1.5)
    eps = normal(rng, xt.shape)
    out = J.p_mean_variance(
        linear_schedule, eps, xt, jnp.full((2,), t), mean_type="eps", var_type="fixedlarge", clip_denoised=False
    )
    ab = alpha_bar_by_product(betas, t)
    xt64, eps64 = np.asarray(xt, np.float64), np.asarray(eps, np.float64)
    eq11 = (xt64 - betas[t] / math.sqrt(1 - ab) * eps64) / math.sqrt(1 - betas[t])
    np.testing.assert_allclose(out.mean, eq11, atol=2e-5)
    np.testing.assert_allclose(out.pred_xstart, (xt64 - math.sqrt(1 - ab) * eps64) / math.sqrt(ab), rtol=1e-4, atol=1e-4)


def test_eps_mean_with_clipping_uses_clipped_xstart(linear_schedule):
    betas = linear_betas_by_formula()
    t = 600
    rng = np.random.default_rng(5)
    xt = normal(rng, (2, 4, 4, 3))
    eps = normal(rng, xt.shape)
    out = J.p_mean_variance(linear_schedule, eps, xt, jnp.full((2,), t), mean_type="eps", var_type="fixedsmall")
    ab = alpha_bar_by_product(betas, t)
    x0 = np.clip((np.asarray(xt, np.float64) - math.sqrt(1 - ab) * np.asarray(eps, np.float64)) / math.sqrt(ab), -1, 1)
    assert np.mean(np.abs(x0) == 1) > 0.2  # the clip is actually exercised
    ref_mean, ref_var = bayes_posterior(betas, x0, np.asarray(xt, np.float64), t)
    np.testing.assert_allclose(out.pred_xstart, x0, atol=1e-5)
    np.testing.assert_allclose(out.mean, ref_mean, atol=1e-5)
    np.testing.assert_allclose(out.variance, np.full(xt.shape, ref_var), rtol=1e-5)


@pytest.mark.parametrize("t", [0, 5, 800])
def test_xstart_and_xprev_mean_types(linear_schedule, t):
    betas = linear_betas_by_formula()
    rng = np.random.default_rng(20 + t)
    xt = normal(rng, (2, 3, 3, 3))
    output = normal(rng, xt.shape, 1.3)
    tb = jnp.full((2,), t)
    xstart = J.p_mean_variance(linear_schedule, output, xt, tb, mean_type="xstart", var_type="fixedlarge")
    clipped = np.clip(np.asarray(output, np.float64), -1, 1)
    np.testing.assert_allclose(xstart.pred_xstart, clipped, atol=0)
    np.testing.assert_allclose(xstart.mean, bayes_posterior(betas, clipped, np.asarray(xt, np.float64), t)[0], atol=1e-5)

    xprev = J.p_mean_variance(
        linear_schedule, output, xt, tb, mean_type="xprev", var_type="fixedlarge", clip_denoised=False
    )
    np.testing.assert_array_equal(xprev.mean, output)  # the mean is the raw output, never clipped
    # The reported x̂_0 is the x_0 whose Bayes posterior mean is the output.
    back, _ = bayes_posterior(betas, np.asarray(xprev.pred_xstart, np.float64), np.asarray(xt, np.float64), t)
    np.testing.assert_allclose(back, output, atol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 400, 999])
def test_variance_types(linear_schedule, t):
    betas = linear_betas_by_formula()
    beta_tilde_1 = bayes_posterior(betas, 0.0, 0.0, 1)[1]
    beta_tilde_t = bayes_posterior(betas, 0.0, 0.0, t)[1]
    clipped_log_beta_tilde = math.log(beta_tilde_t if t > 0 else beta_tilde_1)
    xt = jnp.zeros((2, 2, 2, 3))
    tb = jnp.full((2,), t)
    v = jnp.linspace(-1, 1, 24).reshape(2, 2, 2, 3)
    eps = jnp.zeros_like(xt)

    large = J.p_mean_variance(linear_schedule, eps, xt, tb, mean_type="eps", var_type="fixedlarge")
    np.testing.assert_allclose(large.variance, np.full(xt.shape, betas[t]), rtol=1e-6)
    np.testing.assert_allclose(large.log_variance, math.log(betas[t]) if t > 0 else math.log(beta_tilde_1), rtol=1e-6)

    small = J.p_mean_variance(linear_schedule, eps, xt, tb, mean_type="eps", var_type="fixedsmall")
    np.testing.assert_allclose(small.variance, np.full(xt.shape, beta_tilde_t), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(small.log_variance, np.full(xt.shape, clipped_log_beta_tilde), rtol=1e-6)

    output = jnp.concatenate([eps, v], axis=-1)
    learned = J.p_mean_variance(linear_schedule, output, xt, tb, mean_type="eps", var_type="learned")
    np.testing.assert_array_equal(learned.log_variance, v)
    np.testing.assert_allclose(learned.variance, np.exp(np.asarray(v, np.float64)), rtol=1e-6)

    ranged = J.p_mean_variance(linear_schedule, output, xt, tb, mean_type="eps", var_type="learned_range")
    frac = (np.asarray(v, np.float64) + 1) / 2
    expected = frac * math.log(betas[t]) + (1 - frac) * clipped_log_beta_tilde
    np.testing.assert_allclose(ranged.log_variance, expected, rtol=1e-5)
    np.testing.assert_allclose(ranged.variance, np.exp(expected), rtol=1e-5)
    # The variance channels must not leak into the mean.
    np.testing.assert_allclose(ranged.mean, large.mean, atol=0)


def test_channel_count_validation(linear_schedule):
    xt = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="'fixedlarge' needs 3 output channels, got 6"):
        J.p_mean_variance(linear_schedule, jnp.zeros((1, 2, 2, 6)), xt, jnp.zeros(1, jnp.int32), mean_type="eps", var_type="fixedlarge")
    with pytest.raises(ValueError, match="'learned' needs 6 output channels, got 3"):
        J.p_mean_variance(linear_schedule, xt, xt, jnp.zeros(1, jnp.int32), mean_type="eps", var_type="learned")
    with pytest.raises(ValueError, match="unknown mean_type 'v'"):
        J.p_mean_variance(linear_schedule, xt, xt, jnp.zeros(1, jnp.int32), mean_type="v", var_type="fixedlarge")


# ----------------------------------------------------------------------------- likelihood terms


def test_normal_kl_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50), rng.normal(size=50)
    kl = np.asarray(J.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m2), jnp.asarray(lv2)), np.float64)
    np.testing.assert_allclose(kl, gaussian_kl_closed_form(m1, np.exp(lv1), m2, np.exp(lv2)), rtol=1e-5, atol=1e-6)
    assert np.all(kl >= 0)
    np.testing.assert_allclose(J.normal_kl(0.3, -1.2, 0.3, -1.2), 0.0, atol=1e-7)

    # Monte Carlo: E_{x~p}[log p(x) - log q(x)].
    n = 400_000
    mu1, s1, mu2, s2 = 0.4, 0.7, -0.2, 1.3
    x = rng.normal(mu1, s1, size=n)
    log_ratio = -np.log(s1) - 0.5 * ((x - mu1) / s1) ** 2 + np.log(s2) + 0.5 * ((x - mu2) / s2) ** 2
    estimate, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    ours = float(J.normal_kl(mu1, 2 * math.log(s1), mu2, 2 * math.log(s2)))
    assert abs(ours - estimate) < 5 * stderr


def test_approx_standard_normal_cdf_is_the_tanh_formula():
    z = np.linspace(-6, 6, 1001)
    ours = np.asarray(J.approx_standard_normal_cdf(jnp.asarray(z, jnp.float32)), np.float64)
    # It is close to the exact CDF but is the tanh approximation, not erf.
    assert np.max(np.abs(ours - ndtr(z))) < 2e-4
    assert np.max(np.abs(ours - ndtr(z))) > 1e-4
    # The same approximation is torch's tanh-GELU: gelu(z) = z·Φ̃(z).
    nonzero = z != 0
    reference = torch.nn.functional.gelu(torch.from_numpy(z[nonzero]), approximate="tanh").numpy() / z[nonzero]
    np.testing.assert_allclose(ours[nonzero], reference, atol=2e-7)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.1), (0.3, 0.01), (0.9, 1.0), (-0.5, 1e-3), (-0.97, 0.05), (0.0, 5.0)])
def test_discretized_likelihood_sums_to_one(mean, scale):
    """Σ over the 256 bins is exactly 1 in exact arithmetic for *any* monotone CDF (the bins tile ℝ and the
    sum telescopes), so the tanh approximation plays no role. The residual is float32 rounding of the
    2·256 CDF evaluations and subtractions: bounded by ~512·2⁻²⁴ ≈ 3e-5 (observed ≲ 2e-6); the 1e-12
    floor adds at most 256e-12."""
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    log_probs = J.discretized_gaussian_log_likelihood(x, jnp.float32(mean), jnp.float32(math.log(scale)))
    total = np.exp(np.asarray(log_probs, np.float64)).sum()
    assert abs(total - 1.0) < 3e-5


def test_discretized_likelihood_matches_quadrature():
    """Bits/dim of 8-bit data under a known Gaussian vs ∫_bin N(u; μ, σ²) du by scipy quadrature
    (checked against the exact erf CDF).

    Tolerance from the tanh approximation e = Φ_tanh - Φ: an edge bin is off by at most sup|e| ≈ 1.8e-4;
    an interior bin [a, b] is off by |e(b) - e(a)| ≤ (b - a)/σ · sup|e'| (≈4.3e-4 per unit z). Add 1e-6 for
    float32 rounding. Then |Δ log p| ≤ 1.1·bound/p to first order (bound/p < 5% here)."""
    rng = np.random.default_rng(0)
    x = random_images(0, (2, 3, 3, 3))
    log_scales = uniform(rng, x.shape, math.log(0.005), math.log(0.3))
    # Offsets of up to 1.5σ keep every bin probability well away from the 1e-12 floor.
    means = x + jnp.exp(log_scales) * uniform(rng, x.shape, -1.5, 1.5)
    ours = np.asarray(J.discretized_gaussian_log_likelihood(x, means, log_scales), np.float64).ravel()

    x64, m64, s64 = (np.asarray(a, np.float64).ravel() for a in (x, means, np.exp(np.asarray(log_scales, np.float64))))
    exact = []
    for xi, mi, si in zip(x64, m64, s64):
        lo = -np.inf if xi < -0.999 else xi - 1 / 255
        hi = np.inf if xi > 0.999 else xi + 1 / 255
        value = bin_probability_by_quadrature(lo, hi, mi, si)
        erf_value = ndtr((hi - mi) / si) - ndtr((lo - mi) / si)
        assert abs(value - erf_value) < 1e-8
        exact.append(value)
    exact = np.array(exact)

    sup_error, sup_slope = tanh_cdf_error_bounds()
    edge = np.abs(x64) > 0.999
    assert edge.any() and (~edge).any()
    bound = np.where(edge, sup_error, np.minimum(2 * sup_error, (2 / 255) / s64 * sup_slope)) + 1e-6
    assert np.all(np.abs(np.exp(ours) - exact) <= bound)
    log_bound = 1.1 * bound / exact
    assert log_bound.max() < 0.05
    assert np.all(np.abs(ours - np.log(exact)) <= log_bound)
    bpd_ours = -ours.mean() / LN2
    bpd_exact = -np.log(exact).mean() / LN2
    assert abs(bpd_ours - bpd_exact) <= log_bound.mean() / LN2


def test_discretized_likelihood_edge_bins_and_floor():
    x = jnp.array([-1.0, 1.0, 0.0])
    # Far-away means: edge bins take the whole tail; an interior bin underflows to the 1e-12 floor.
    lp = J.discretized_gaussian_log_likelihood(x, jnp.array([-3.0, 3.0, 1.0]), jnp.log(jnp.array([0.5, 0.5, 1e-3])))
    np.testing.assert_allclose(lp[0], math.log(1 - ndtr(-(2 - 1 / 255) / 0.5)), atol=2e-4)
    np.testing.assert_allclose(lp[1], math.log(1 - ndtr(-(2 - 1 / 255) / 0.5)), atol=2e-4)
    np.testing.assert_allclose(lp[2], math.log(1e-12), rtol=1e-6)


def test_prior_bpd(linear_schedule):
    x0 = jnp.stack([jnp.full((4, 4, 3), 1.0), jnp.full((4, 4, 3), -1.0), jnp.zeros((4, 4, 3))])
    prior = np.asarray(J.prior_bpd(linear_schedule, x0))
    ab = alpha_bar_by_product(linear_betas_by_formula(), T - 1)
    for value, x in zip(prior, [1.0, -1.0, 0.0]):
        expected = gaussian_kl_closed_form(math.sqrt(ab) * x, 1 - ab, 0.0, 1.0) / LN2
        # float32 evaluation of -1 + exp(lv) + ... loses ~1e-7 absolute on a ~3e-5 quantity
        # (and rounds the ~6e-10 nats of x_0 = 0 to zero).
        np.testing.assert_allclose(value, expected, rtol=1e-2, atol=3e-7)
    np.testing.assert_allclose(prior[0], 2.9e-5, rtol=2e-2)  # docs/original.md §2.6
    assert prior[2] < 1e-6 < prior[0] < 1e-4


def test_vb_terms_bpd_kl_and_decoder(linear_schedule):
    betas = linear_betas_by_formula()
    rng = np.random.default_rng(7)
    x0 = random_images(7, (3, 4, 4, 3))
    noise = normal(rng, x0.shape)
    output = noise + normal(rng, x0.shape, 0.3)
    t = jnp.array([0, 10, 700])
    xt = J.q_sample(linear_schedule, x0, t, noise)
    bpd, _ = J.vb_terms_bpd(
        linear_schedule, output, x0, xt, t, mean_type="eps", var_type="fixedsmall", clip_denoised=False
    )
    x0_64, xt64, out64 = (np.asarray(a, np.float64) for a in (x0, xt, output))
    for i, ti in enumerate([0, 10, 700]):
        ab = alpha_bar_by_product(betas, ti)
        x0_hat = (xt64[i] - math.sqrt(1 - ab) * out64[i]) / math.sqrt(ab)
        if ti > 0:
            true_mean, true_var = bayes_posterior(betas, x0_64[i], xt64[i], ti)
            model_mean, model_var = bayes_posterior(betas, x0_hat, xt64[i], ti)
            expected = gaussian_kl_closed_form(true_mean, true_var, model_mean, model_var).mean() / LN2
            np.testing.assert_allclose(bpd[i], expected, rtol=1e-3)
        else:
            # Decoder: discretised Gaussian with μ = x̂_0 (coef1 = 1 at t = 0) and σ² = β̃_1 (clipped log).
            sigma = math.sqrt(bayes_posterior(betas, 0.0, 0.0, 1)[1])
            lo = np.where(x0_64[i] < -0.999, -np.inf, x0_64[i] - 1 / 255)
            hi = np.where(x0_64[i] > 0.999, np.inf, x0_64[i] + 1 / 255)
            probs = ndtr((hi - x0_hat) / sigma) - ndtr((lo - x0_hat) / sigma)
            expected = -np.log(np.maximum(probs, 1e-12)).mean() / LN2
            # Tolerance: tanh-CDF error (≤3.6e-4 absolute per bin) on probabilities that here are ≳0.05.
            np.testing.assert_allclose(bpd[i], expected, rtol=2e-2)


# ----------------------------------------------------------------------------- training losses


def _loss_inputs(schedule, channels_out=3):
    rng = np.random.default_rng(11)
    x0 = random_images(11, (4, 4, 4, 3))
    noise = normal(rng, x0.shape)
    t = jnp.array([0, 3, 450, 999])
    xt = J.q_sample(schedule, x0, t, noise)
    output = normal(rng, x0.shape[:-1] + (channels_out,))
    return x0, noise, t, xt, output


def test_mse_and_l1_losses_are_per_example_means(linear_schedule):
    betas = linear_betas_by_formula()
    x0, noise, t, xt, output = _loss_inputs(linear_schedule)
    out64 = np.asarray(output, np.float64)
    xprev_target = np.stack(
        [bayes_posterior(betas, np.asarray(x0[i], np.float64), np.asarray(xt[i], np.float64), int(t[i]))[0] for i in range(4)]
    )
    targets = {"eps": np.asarray(noise, np.float64), "xstart": np.asarray(x0, np.float64), "xprev": xprev_target}
    for mean_type, target in targets.items():
        for loss_type, fn in [("mse", np.square), ("l1", np.abs)]:
            losses = J.training_losses(
                linear_schedule, output, x0, xt, t, noise, mean_type=mean_type, var_type="fixedlarge", loss_type=loss_type
            )
            assert losses.shape == (4,)
            np.testing.assert_allclose(losses, fn(target - out64).mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_kl_loss_is_vb_term_without_clipping(linear_schedule):
    x0, noise, t, xt, output = _loss_inputs(linear_schedule)
    output = output * 3  # large enough that clipping x̂_0 would change the result
    losses = J.training_losses(
        linear_schedule, output, x0, xt, t, noise, mean_type="xstart", var_type="fixedlarge", loss_type="kl"
    )
    unclipped, _ = J.vb_terms_bpd(
        linear_schedule, output, x0, xt, t, mean_type="xstart", var_type="fixedlarge", clip_denoised=False
    )
    clipped, _ = J.vb_terms_bpd(
        linear_schedule, output, x0, xt, t, mean_type="xstart", var_type="fixedlarge", clip_denoised=True
    )
    np.testing.assert_allclose(losses, unclipped, rtol=1e-6)
    assert not np.allclose(losses, clipped)
    # At t = 999 with fixedlarge: KL between N(μ̃, β̃) and N(μ(x̂_0), β), closed form in float64.
    betas = linear_betas_by_formula()
    i = 3
    true_mean, true_var = bayes_posterior(betas, np.asarray(x0[i], np.float64), np.asarray(xt[i], np.float64), 999)
    model_mean, _ = bayes_posterior(betas, np.asarray(output[i], np.float64), np.asarray(xt[i], np.float64), 999)
    expected = gaussian_kl_closed_form(true_mean, true_var, model_mean, betas[999]).mean() / LN2
    np.testing.assert_allclose(losses[i], expected, rtol=1e-4)


def test_invalid_loss_combinations_raise(linear_schedule):
    x0, noise, t, xt, output6 = _loss_inputs(linear_schedule, channels_out=6)
    for loss_type in ["mse", "l1"]:
        with pytest.raises(ValueError, match="learned"):
            J.training_losses(
                linear_schedule, output6, x0, xt, t, noise, mean_type="eps", var_type="learned", loss_type=loss_type
            )
    with pytest.raises(ValueError, match="unknown loss_type 'huber'"):
        J.training_losses(linear_schedule, output6, x0, xt, t, noise, mean_type="eps", var_type="learned", loss_type="huber")
    # kl with learned variance is allowed (Table 2, "L, learned diagonal Σ").
    losses = J.training_losses(
        linear_schedule, output6, x0, xt, t, noise, mean_type="eps", var_type="learned", loss_type="kl"
    )
    assert losses.shape == (4,) and np.all(np.isfinite(losses))


def test_hybrid_loss_learned_range(linear_schedule):
    """mse + learned_range = L_simple + (T/1000)·L_vb, with the vb part blind to the mean channels."""
    x0, noise, t, xt, output6 = _loss_inputs(linear_schedule, channels_out=6)
    output6 = output6.at[..., 3:].set(jnp.tanh(output6[..., 3:]))

    def loss(out):
        return J.training_losses(
            linear_schedule, out, x0, xt, t, noise, mean_type="eps", var_type="learned_range", loss_type="mse"
        )

    simple = np.mean((np.asarray(noise, np.float64) - np.asarray(output6[..., :3], np.float64)) ** 2, axis=(1, 2, 3))
    vb, _ = J.vb_terms_bpd(
        linear_schedule, output6, x0, xt, t, mean_type="eps", var_type="learned_range", clip_denoised=False
    )
    np.testing.assert_allclose(loss(output6), simple + np.asarray(vb), rtol=1e-5)
    grad = jax.grad(lambda o: loss(o).sum())(output6)
    expected_mean_grad = -2 * (np.asarray(noise) - np.asarray(output6[..., :3])) / (4 * 4 * 3)
    np.testing.assert_allclose(grad[..., :3], expected_mean_grad, rtol=1e-4, atol=1e-7)
    assert np.any(np.abs(grad[..., 3:]) > 0)


# ----------------------------------------------------------------------------- full bound


def test_calc_bpd_loop_with_perfect_xstart_model():
    """A model that outputs the true x_0 has zero KL terms; the bound is decoder NLL + prior."""
    num_timesteps = 100
    betas = linear_betas_by_formula(1e-4, 0.1, num_timesteps)
    schedule = D.make_schedule(D.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.1, num_timesteps=num_timesteps))
    x0 = random_images(0, (3, 4, 4, 3))

    def model_fn(x, t):
        assert x.shape == x0.shape and t.shape == (3,) and t.dtype == jnp.int32
        return x0

    run = jax.jit(lambda x, key: D.calc_bpd_loop(model_fn, schedule, x, key, mean_type="xstart", var_type="fixedsmall"))
    out = jax.tree_util.tree_map(np.asarray, run(x0, jax.random.PRNGKey(1)))
    assert out["terms_bpd"].shape == (3, num_timesteps) and out["mse"].shape == (3, num_timesteps)
    np.testing.assert_allclose(out["terms_bpd"][:, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["mse"], 0.0, atol=0)

    sigma = math.sqrt(bayes_posterior(betas, 0.0, 0.0, 1)[1])
    x64 = np.asarray(x0, np.float64)
    lo = np.where(x64 < -0.999, -np.inf, x64 - 1 / 255)
    hi = np.where(x64 > 0.999, np.inf, x64 + 1 / 255)
    probs = ndtr((hi - x64) / sigma) - ndtr((lo - x64) / sigma)
    decoder = -np.log(probs).mean(axis=(1, 2, 3)) / LN2
    # tanh-CDF error ≤ 3.6e-4 on bin probabilities ≥ 0.2 -> < 0.2% in log.
    np.testing.assert_allclose(out["terms_bpd"][:, 0], decoder, rtol=3e-3)

    ab = alpha_bar_by_product(betas, num_timesteps - 1)
    prior = gaussian_kl_closed_form(math.sqrt(ab) * x64, 1 - ab, 0.0, 1.0).mean(axis=(1, 2, 3)) / LN2
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(out["total_bpd"], np.asarray(out["terms_bpd"]).sum(1) + np.asarray(out["prior_bpd"]), rtol=1e-6)


def test_calc_bpd_loop_uses_fresh_noise_per_timestep():
    """Column t must be the vb term at x_t = q_sample(x_0, t, N(0,I) from fold_in(key, t))."""
    num_timesteps = 30
    schedule = D.make_schedule(D.get_beta_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=num_timesteps))
    x0 = random_images(2, (2, 4, 4, 3))
    key = jax.random.PRNGKey(9)

    def model_fn(x, t):
        return jnp.tanh(x) * (1.0 + t[:, None, None, None] / 50.0)

    run = jax.jit(
        lambda x: D.calc_bpd_loop(model_fn, schedule, x, key, mean_type="eps", var_type="fixedlarge", clip_denoised=True)
    )
    out = jax.tree_util.tree_map(np.asarray, run(x0))

    @jax.jit
    def one_term(t):
        tb = jnp.full((2,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape)
        xt = D.q_sample(schedule, x0, tb, noise)
        return D.vb_terms_bpd(
            schedule, model_fn(xt, tb), x0, xt, tb, mean_type="eps", var_type="fixedlarge", clip_denoised=True
        )

    for t in [0, 1, 17, 29]:
        terms, pred_xstart = one_term(t)
        np.testing.assert_allclose(out["terms_bpd"][:, t], terms, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["mse"][:, t], np.mean((np.asarray(pred_xstart) - np.asarray(x0)) ** 2, axis=(1, 2, 3)), rtol=1e-5)
    # Different timesteps saw different noise, so no two KL columns coincide.
    assert len(np.unique(np.round(np.asarray(out["terms_bpd"][0, 1:]), 6))) == num_timesteps - 1


@pytest.mark.parametrize("config_name, expected_t0", [
    ("cifar10", math.log(5.4532e-5)),  # GaussianDiffusion2: log β̃_1 (reference numbers)
    ("celebahq256", math.log(1e-20)),  # GaussianDiffusion: log max(β̃_0, 1e-20)
    ("lsun_church", math.log(1e-20)),
])
def test_posterior_log_variance_at_t0_follows_each_models_original(config_name, expected_t0):
    import importlib

    config = importlib.import_module(f"configs.{config_name}").get_config()
    schedule = D.schedule_from_config(config.diffusion)
    got = np.asarray(schedule.posterior_log_variance_clipped, np.float64)
    # β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) in float64, written out here independently.
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    beta_tilde = betas[1:] * (1.0 - abar[:-1]) / (1.0 - abar[1:])
    np.testing.assert_allclose(got[0], expected_t0, rtol=2e-5)
    np.testing.assert_allclose(got[1:], np.log(beta_tilde), rtol=1e-6)
