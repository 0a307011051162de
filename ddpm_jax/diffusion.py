"""Gaussian diffusion math of DDPM (Ho, Jain & Abbeel 2020) as pure functions over arrays.

Follows the authors' ``diffusion_tf/diffusion_utils_2.py`` (``GaussianDiffusion2``):

* timesteps ``t`` are 0-indexed (code ``t`` = paper ``t - 1``);
* every schedule constant is computed in float64 NumPy and cast to float32 once;
* images are NHWC float32 in [-1, 1].

Nothing here calls a network: functions that need the model take its *output*
(``model_output``), so they stay pure and jit-able. Equation numbers refer to the DDPM
paper (arXiv 2006.11239) unless stated otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "xstart", "xprev")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "l1", "kl")
BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")
LEARNED_VAR_TYPES = ("learned", "learned_range")
# What log β̃_0 (β̃_0 = 0) is replaced by: "beta_tilde_1", log β̃_1 as `GaussianDiffusion2`
# (CIFAR10); "1e-20", log max(β̃_t, 1e-20) as `GaussianDiffusion` (the 256×256 models).
T0_LOG_VARIANCES = ("beta_tilde_1", "1e-20")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------------------
# Noise schedules
# --------------------------------------------------------------------------------------


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int, warmup_frac: float) -> np.ndarray:
    """beta_end everywhere except a linear ramp beta_start -> beta_end over the first warmup_frac of steps."""
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    warmup_time = int(num_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM (Nichol & Dhariwal 2021) Eq. 17: alpha_bar(u) = cos²((u + s)/(1 + s) · π/2),
    beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)."""

    def alpha_bar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = 1.0 - alpha_bar((steps + 1.0) / num_timesteps) / alpha_bar(steps / num_timesteps)
    return np.minimum(betas, max_beta)


def get_beta_schedule(name: str, *, beta_start: float, beta_end: float, num_timesteps: int) -> np.ndarray:
    """β_0..β_{T-1} (float64) for schedule ``name``, as in the original ``get_beta_schedule``.

    linear: linspace(β_start, β_end); quad: linspace(√β_start, √β_end)²; const: β_end;
    jsd: 1/T, 1/(T-1), ..., 1; warmup10/warmup50: linear over the first 10%/50% then β_end;
    cosine: Improved DDPM (s = 0.008, clipped at 0.999; ignores β_start/β_end).
    """
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
    elif name == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
    elif name == "cosine":
        betas = _cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown beta schedule {name!r}")
    assert betas.shape == (num_timesteps,)
    return betas


class Schedule(NamedTuple):
    """Per-timestep constants of the forward/posterior processes (float32 arrays of length T).

    A NamedTuple, hence a pytree: it can be passed through ``jax.jit`` as an argument.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixedlarge_log_variance: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(betas: np.ndarray, t0_log_variance: str = "beta_tilde_1") -> Schedule:
    """All schedule constants from β (Eqs. 4, 6, 7), computed in float64 then cast to float32.

    ᾱ_t = Π_{s≤t}(1-β_s); β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t);
    μ̃_t = [β_t √ᾱ_{t-1}/(1-ᾱ_t)] x_0 + [(1-ᾱ_{t-1}) √α_t/(1-ᾱ_t)] x_t.
    β̃_0 = 0, so the clipped posterior log-variance replaces its log: by log β̃_1 for
    ``t0_log_variance="beta_tilde_1"`` (`GaussianDiffusion2`, CIFAR10), by log 1e-20 for
    ``"1e-20"`` (`GaussianDiffusion`, the 256×256 models: log max(β̃_t, 1e-20)). The fixedlarge
    log-variance uses log β̃_1 at t = 0 "to get a better decoder log likelihood".
    """
    _check_choice(t0_log_variance, T0_LOG_VARIANCES, "t0_log_variance")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with values in (0, 1]")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # For T = 1 there is no β̃_1; fall back to β_0 so the log stays finite.
    posterior_variance_1 = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
    constants = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=(
            np.log(np.append(posterior_variance_1, posterior_variance[1:]))
            if t0_log_variance == "beta_tilde_1" else np.log(np.maximum(posterior_variance, 1e-20))),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixedlarge_log_variance=np.log(np.append(posterior_variance_1, betas[1:])),
    )
    return Schedule(**{name: jnp.asarray(value, dtype=jnp.float32) for name, value in constants.items()})


def schedule_from_config(diffusion_config: Any) -> Schedule:
    """Schedule from the ``diffusion`` config section (num_timesteps, beta_schedule, beta_start,
    beta_end, t0_log_variance)."""
    betas = get_beta_schedule(
        diffusion_config.beta_schedule,
        beta_start=diffusion_config.beta_start,
        beta_end=diffusion_config.beta_end,
        num_timesteps=diffusion_config.num_timesteps,
    )
    return make_schedule(betas, diffusion_config.get("t0_log_variance", "beta_tilde_1"))


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def extract(coefficients: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """coefficients[t] reshaped to [B, 1, ..., 1] (``ndim`` axes) so it broadcasts against x."""
    values = jnp.take(coefficients, jnp.asarray(t), axis=0)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")


def _split_model_output(model_output: jax.Array, channels: int, var_type: str) -> tuple[jax.Array, jax.Array | None]:
    """Split a 2C-channel output into (mean part, variance part) for learned variances."""
    if var_type in LEARNED_VAR_TYPES:
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(f"var_type {var_type!r} needs {2 * channels} output channels, got {model_output.shape[-1]}")
        return model_output[..., :channels], model_output[..., channels:]
    if model_output.shape[-1] != channels:
        raise ValueError(f"var_type {var_type!r} needs {channels} output channels, got {model_output.shape[-1]}")
    return model_output, None


# --------------------------------------------------------------------------------------
# Forward process q
# --------------------------------------------------------------------------------------


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (Eq. 4): returns (mean, variance, log_variance)."""
    ndim = x_start.ndim
    mean = extract(schedule.sqrt_alphas_cumprod, t, ndim) * x_start
    variance = extract(1.0 - schedule.alphas_cumprod, t, ndim)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, ndim)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Eq. 4 reparameterised)."""
    ndim = x_start.ndim
    return (
        extract(schedule.sqrt_alphas_cumprod, t, ndim) * x_start
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, ndim) * noise
    )


def q_posterior(
    schedule: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Eqs. 6-7): returns (mean, variance, log_variance_clipped)."""
    ndim = x_t.ndim
    mean = (
        extract(schedule.posterior_mean_coef1, t, ndim) * x_start
        + extract(schedule.posterior_mean_coef2, t, ndim) * x_t
    )
    variance = extract(schedule.posterior_variance, t, ndim)
    log_variance_clipped = extract(schedule.posterior_log_variance_clipped, t, ndim)
    return mean, variance, log_variance_clipped


# --------------------------------------------------------------------------------------
# Conversions between parameterisations
# --------------------------------------------------------------------------------------


def predict_xstart_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x̂_0 = √(1/ᾱ_t) x_t - √(1/ᾱ_t - 1) ε (Eq. 4 solved for x_0; Eq. 15)."""
    ndim = x_t.ndim
    return extract(schedule.sqrt_recip_alphas_cumprod, t, ndim) * x_t - extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, ndim
    ) * eps


def predict_xstart_from_xprev(schedule: Schedule, x_t: jax.Array, t: jax.Array, xprev: jax.Array) -> jax.Array:
    """x̂_0 = (μ - coef2_t x_t) / coef1_t, i.e. Eq. 7's posterior mean solved for x_0."""
    ndim = x_t.ndim
    coef1 = extract(schedule.posterior_mean_coef1, t, ndim)
    coef2 = extract(schedule.posterior_mean_coef2, t, ndim)
    return (1.0 / coef1) * xprev - (coef2 / coef1) * x_t


def predict_eps_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
    """ε̂ = (√(1/ᾱ_t) x_t - x̂_0) / √(1/ᾱ_t - 1) (Eq. 4 solved for ε)."""
    ndim = x_t.ndim
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, ndim) * x_t - pred_xstart) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, ndim
    )


# --------------------------------------------------------------------------------------
# Reverse process p
# --------------------------------------------------------------------------------------


class PMeanVariance(NamedTuple):
    """Parameters of p_θ(x_{t-1} | x_t) = N(mean, variance) plus the implied x̂_0."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def model_log_variance(
    schedule: Schedule, var_part: jax.Array | None, t: jax.Array, shape: tuple[int, ...], var_type: str
) -> tuple[jax.Array, jax.Array]:
    """(variance, log_variance) of p_θ(x_{t-1}|x_t), broadcast to ``shape``.

    fixedlarge: σ² = β_t, log σ² = log(append(β̃_1, β_{1:})); fixedsmall: σ² = β̃_t (log clipped at t = 0);
    learned: log σ² = model output; learned_range (Improved DDPM Eq. 15):
    log σ² = frac·log β_t + (1-frac)·log β̃_t (clipped), frac = (v + 1)/2.
    """
    _check_choice(var_type, VAR_TYPES, "var_type")
    ndim = len(shape)
    if var_type == "learned":
        log_variance = var_part
        variance = jnp.exp(log_variance)
    elif var_type == "learned_range":
        min_log = extract(schedule.posterior_log_variance_clipped, t, ndim)
        max_log = extract(jnp.log(schedule.betas), t, ndim)
        frac = (var_part + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    elif var_type == "fixedlarge":
        variance = extract(schedule.betas, t, ndim)
        log_variance = extract(schedule.fixedlarge_log_variance, t, ndim)
    else:  # fixedsmall
        variance = extract(schedule.posterior_variance, t, ndim)
        log_variance = extract(schedule.posterior_log_variance_clipped, t, ndim)
    return jnp.broadcast_to(variance, shape), jnp.broadcast_to(log_variance, shape)


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t²) from the network output (Eqs. 1, 11 via the posterior of Eq. 7).

    As in the original code, for eps/xstart the mean is μ̃_t(x̂_0, x_t) with x̂_0 clipped to [-1, 1] when
    ``clip_denoised``; without clipping, the eps case equals Eq. 11. For xprev the mean is the raw
    output and x̂_0 is only reported. Learned variances split the 2C output channels [mean, variance].
    """
    _check_choice(mean_type, MEAN_TYPES, "mean_type")
    mean_part, var_part = _split_model_output(model_output, x_t.shape[-1], var_type)
    variance, log_variance = model_log_variance(schedule, var_part, t, x_t.shape, var_type)

    def maybe_clip(x: jax.Array) -> jax.Array:
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if mean_type == "xprev":
        pred_xstart = maybe_clip(predict_xstart_from_xprev(schedule, x_t, t, mean_part))
        mean = mean_part
    else:
        if mean_type == "xstart":
            pred_xstart = maybe_clip(mean_part)
        else:
            pred_xstart = maybe_clip(predict_xstart_from_eps(schedule, x_t, t, mean_part))
        mean, _, _ = q_posterior(schedule, pred_xstart, x_t, t)
    return PMeanVariance(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


# --------------------------------------------------------------------------------------
# Likelihood terms (bits/dim)
# --------------------------------------------------------------------------------------


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(m1, e^{lv1}) || N(m2, e^{lv2})) in nats, elementwise:
    ½(-1 + lv2 - lv1 + e^{lv1-lv2} + (m1-m2)² e^{-lv2})."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))) — the tanh approximation used by the original code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log P(x) for 8-bit data scaled to [-1, 1] under N(means, e^{2 log_scales}) discretised into bins
    [x - 1/255, x + 1/255] (Eq. 13); the edge bins extend to ∓∞ (detected as x < -0.999 / x > 0.999).
    Probabilities are floored at 1e-12 before the log. Elementwise, in nats."""
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(
    schedule: Schedule,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool,
) -> tuple[jax.Array, jax.Array]:
    """One term of the variational bound (Eq. 5) in bits/dim, per example: (bpd [B], pred_xstart).

    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_θ(x_{t-1}|x_t)) for t > 0 (code index) and the decoder
    L_0 = -log p_θ(x_0|x_1) (Eq. 13, discretised Gaussian with log-scale ½ log σ²) at t = 0.
    """
    true_mean, _, true_log_variance = q_posterior(schedule, x_start, x_t, t)
    out = p_mean_variance(
        schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x_start, means=out.mean, log_scales=0.5 * out.log_variance)
    ) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl), out.pred_xstart


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T|x_0) || N(0, I)) in bits/dim, per example (independent of θ; ≈ 1e-5 for DDPM)."""
    batch = x_start.shape[0]
    t = jnp.full((batch,), schedule.num_timesteps - 1, dtype=jnp.int32)
    q_mean, _, q_log_variance = q_mean_variance(schedule, x_start, t)
    return mean_flat(normal_kl(q_mean, q_log_variance, 0.0, 0.0)) / math.log(2.0)


def calc_bpd_loop(
    model_fn: ModelFn,
    schedule: Schedule,
    x_start: jax.Array,
    key: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """Full variational bound L = L_T + Σ_t L_{t-1} (Eq. 5) in bits/dim, one Monte Carlo x_t per (image, t).

    A single ``lax.scan`` over t = T-1..0; x_t = q_sample(x_0, t, ε) with fresh
    ε = N(0, I) from ``jax.random.fold_in(key, t)``. Returns total_bpd [B], terms_bpd [B, T]
    (column t = L_{t-1} in code indexing), prior_bpd [B] and mse [B, T] = mean((x̂_0 - x_0)²).
    Wrap in ``jax.jit`` (with ``model_fn`` closed over) for repeated use.
    """
    num_timesteps = schedule.num_timesteps
    batch = x_start.shape[0]

    def step(carry: None, t: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x_start.shape, dtype=x_start.dtype)
        x_t = q_sample(schedule, x_start, t_batch, noise)
        model_output = model_fn(x_t, t_batch)
        terms, pred_xstart = vb_terms_bpd(
            schedule,
            model_output,
            x_start,
            x_t,
            t_batch,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        return carry, (terms, mean_flat((pred_xstart - x_start) ** 2))

    timesteps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms_reversed, mse_reversed) = jax.lax.scan(step, None, timesteps)
    # The scan ran t = T-1..0; flip so that column t holds timestep t.
    terms_bpd = jnp.flip(terms_reversed, axis=0).T
    mse = jnp.flip(mse_reversed, axis=0).T
    prior = prior_bpd(schedule, x_start)
    return dict(total_bpd=jnp.sum(terms_bpd, axis=1) + prior, terms_bpd=terms_bpd, prior_bpd=prior, mse=mse)


# --------------------------------------------------------------------------------------
# Training losses
# --------------------------------------------------------------------------------------


def training_losses(
    schedule: Schedule,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    loss_type: str,
) -> jax.Array:
    """Per-example training loss [B] for a model output at x_t = q_sample(x_0, t, noise).

    mse: mean over pixels of (target - output)² — with mean_type eps this is L_simple (Eq. 14);
    the target is ε (eps), x_0 (xstart) or μ̃_t(x_0, x_t) (xprev). l1: same with |·|.
    kl: the bound term L_{t-1} in bits/dim from ``vb_terms_bpd`` with clip_denoised=False.

    The original asserts mse is not combined with a directly learned log-variance (``learned``),
    so mse/l1 + learned raises. mse/l1 + learned_range gives Improved DDPM's L_hybrid =
    L_simple + λ L_vlb with λ = 1e-3: the vb term (per t, so L_vlb ≈ T·term) gets weight T/1000
    and sees the mean part through ``stop_gradient`` so it trains only the variance.
    """
    _check_choice(mean_type, MEAN_TYPES, "mean_type")
    _check_choice(var_type, VAR_TYPES, "var_type")
    _check_choice(loss_type, LOSS_TYPES, "loss_type")

    if loss_type == "kl":
        losses, _ = vb_terms_bpd(
            schedule, model_output, x_start, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False
        )
        return losses

    if var_type == "learned":
        raise ValueError(
            f"loss_type {loss_type!r} cannot train var_type 'learned' (the original asserts this); "
            "use loss_type 'kl' or var_type 'learned_range' (hybrid loss)"
        )
    mean_part, var_part = _split_model_output(model_output, x_t.shape[-1], var_type)
    if mean_type == "eps":
        target = noise
    elif mean_type == "xstart":
        target = x_start
    else:
        target, _, _ = q_posterior(schedule, x_start, x_t, t)
    error = target - mean_part
    losses = mean_flat(error**2) if loss_type == "mse" else mean_flat(jnp.abs(error))

    if var_type == "learned_range":
        frozen_output = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], axis=-1)
        vb, _ = vb_terms_bpd(
            schedule, frozen_output, x_start, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False
        )
        losses = losses + vb * (schedule.num_timesteps / 1000.0)
    return losses
