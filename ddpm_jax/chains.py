"""Compiled samplers: DDPM ancestral sampling (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021).

Each sampler is one ``lax.scan`` over the reverse steps (no Python loop per step, no host
round-trip), so ``jax.jit(lambda x, k: ancestral_sample(model_fn, schedule, x, k, ...))``
compiles the whole chain into a single program. ``model_fn(x, t) -> model_output`` takes
x [B, H, W, C] and int32 t [B]. The per-step functions ``p_sample`` and ``ddim_step`` are pure
in (model output, noise) so they can be tested against other implementations.

Randomness: the noise used at timestep t is ``jax.random.normal(jax.random.fold_in(key, t), x.shape)``,
so the same key always gives the same samples. ``key`` may also be one key per example ([B] keys):
example b's noise at t is then ``normal(fold_in(key[b], t), x.shape[1:])``, a function of its own
key alone, whatever batch it is drawn in (how ``generate`` keys every sample by its index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import progress as progress_slots
from ddpm_jax import solvers
from ddpm_jax.diffusion import (
    ModelFn,
    Schedule,
    extract,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
)


def _step_noise(key: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """N(0, I) noise for timestep t: a pure function of (key, t), or with a key per example of
    (key[b], t) for each example b."""
    if not _is_key_per_example(key):
        return jax.random.normal(jax.random.fold_in(key, t), x.shape, dtype=x.dtype)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x.shape[1:],
                                                dtype=x.dtype))(key)


def _is_key_per_example(key: jax.Array) -> bool:
    """Whether ``key`` is a batch of keys ([B] typed keys, or [B, 2] raw uint32 ones)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def _broadcast_batch(values: jax.Array, ndim: int) -> jax.Array:
    """Reshape per-example values [B] (or a scalar) to [B, 1, ..., 1] with ``ndim`` axes."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


# --------------------------------------------------------------------------------------
# DDPM ancestral sampling
# --------------------------------------------------------------------------------------


def p_sample(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One reverse step x_{t-1} = μ_θ(x_t, t) + 1[t > 0] · exp(½ log σ_t²) · z (Alg. 2, line 4).

    Returns (x_{t-1}, x̂_0). No noise is added at t = 0 (code index), as in the original.
    """
    out = p_mean_variance(
        schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised
    )
    nonzero_mask = _broadcast_batch(jnp.asarray(t) != 0, x_t.ndim).astype(x_t.dtype)
    x_prev = out.mean + nonzero_mask * jnp.exp(0.5 * out.log_variance) * noise
    return x_prev.astype(x_t.dtype), out.pred_xstart


def ancestral_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    xstart_every: int | None = None,
    num_steps: int | None = None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run the reverse chain x_T -> x_0 with ``p_sample`` for t = T-1..0 (Alg. 2) in one ``lax.scan``.

    With ``xstart_every = n`` also returns pred_xstart_progress [K, B, H, W, C], K = ceil(S / n),
    where slot k holds x̂_0 predicted at t = n·k (the original keeps n = 50; slot 0 is the final
    sample when clipping is on, since μ at t = 0 is x̂_0).

    For editing: ``num_steps = S`` (static, 0..T) starts the chain at code index S-1, i.e.
    ``x_T`` is then the latent at paper step S (default S = T); ``after_step(x_prev, t)`` is
    applied to each new x_{t-1} (code index t-1), e.g. to re-impose known pixels.
    """
    num_timesteps = schedule.num_timesteps if num_steps is None else int(num_steps)
    if not 0 <= num_timesteps <= schedule.num_timesteps:
        raise ValueError(f"num_steps must be in [0, {schedule.num_timesteps}], got {num_steps}")
    batch = x_T.shape[0]

    def step(carry, t):
        x, progress = carry
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)
        model_output = model_fn(x, t_batch)
        x_prev, pred_xstart = p_sample(
            schedule,
            model_output,
            x,
            t_batch,
            _step_noise(key, t, x),
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        if after_step is not None:
            x_prev = after_step(x_prev, t)
        if progress is not None:
            # t descends, so the last write to slot t // n happens at t = n·(t // n).
            progress = progress_slots.record(progress, pred_xstart, t // xstart_every)
        return (x_prev, progress), None

    progress = None
    if xstart_every is not None:
        num_slots = progress_slots.num_slots(num_timesteps, xstart_every)
        progress = jnp.zeros_like(x_T, shape=(num_slots,) + x_T.shape)  # same device-variance as x_T
    timesteps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (samples, progress), _ = jax.lax.scan(step, (x_T, progress), timesteps)
    if xstart_every is None:
        return samples
    return samples, progress


# --------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------


DDIM_SKIPS = ("uniform", "quad")  # `sample.ddim_skip`: the DDIM code's two timestep rules


def ddim_timesteps(num_timesteps: int, num_steps: int, kind: str = "uniform") -> np.ndarray:
    """Increasing sub-sequence τ of {0..T-1} with exactly S distinct entries, used by DDIM
    (Song et al. 2021, App. D.2 / their code); the chain starts from x_T at τ_{S-1}.

    uniform: τ_i = ⌊i·T / S⌋, i = 0..S-1: the DDIM code's ``range(0, T, T // S)`` when S divides
    T (and when T mod S = 1), and for every other S the same rule with the fractional stride T / S,
    so τ_{S-1} = T - ⌈T / S⌉ always lies within one stride of T-1 (a truncated integer stride
    started S = 600 at t = 599).
    quad: τ_i = int((i·√(0.8 T)/(S-1))²) as in the DDIM code, where small i repeat a value once S is
    large relative to √(0.8 T); each repeat is raised to one past its predecessor
    (τ_i = max(q_i, τ_{i-1} + 1)), which leaves sequences without repeats unchanged and keeps the
    start int(0.8 T) while S ≤ that + 1 (beyond, the start is S - 1).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if kind == "uniform":
        timesteps = np.arange(num_steps, dtype=np.int64) * num_timesteps // num_steps
    elif kind == "quad":
        quad = (np.linspace(0.0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
        # max(q_i, τ_{i-1} + 1) for all i at once: τ_i - i is the running maximum of q_i - i.
        index = np.arange(num_steps)
        timesteps = np.maximum.accumulate(quad - index) + index
    else:
        raise ValueError(f"unknown DDIM timestep kind {kind!r}")
    return timesteps.astype(np.int32)


def _alphas_cumprod_or_one(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
    """ᾱ_t gathered at t, with ᾱ_{-1} = 1 (the step after the last one lands on x_0)."""
    t = jnp.asarray(t)
    values = extract(schedule.alphas_cumprod, jnp.maximum(t, 0), ndim)
    return jnp.where(_broadcast_batch(t >= 0, ndim), values, 1.0)


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    *,
    eta: float | jax.Array = 0.0,
    mean_type: str = "eps",
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One generalized step x_t -> x_{t_prev} (DDIM Eq. 12), t_prev = -1 meaning "to x_0":

    x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
    σ = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)   (Eq. 16).

    x̂_0 comes from the eps or xstart output (only the first C channels are used, so a learned-variance
    output is fine) and is clipped if ``clip_denoised``; ε̂ is then re-derived from the clipped x̂_0
    (as in Improved DDPM / guided-diffusion). η = 1 with t_prev = t - 1 is DDPM with σ² = β̃_t.
    Returns (x_prev, x̂_0).
    """
    if mean_type not in ("eps", "xstart"):
        raise ValueError(f"DDIM supports mean_type 'eps' or 'xstart', got {mean_type!r}")
    ndim = x_t.ndim
    mean_part = model_output[..., : x_t.shape[-1]]
    if mean_type == "eps":
        pred_xstart = predict_xstart_from_eps(schedule, x_t, t, mean_part)
    else:
        pred_xstart = mean_part
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    eps = predict_eps_from_xstart(schedule, x_t, t, pred_xstart)

    alpha_bar = extract(schedule.alphas_cumprod, t, ndim)
    alpha_bar_prev = _alphas_cumprod_or_one(schedule, t_prev, ndim)
    sigma = eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(alpha_bar_prev) * pred_xstart + direction + sigma * noise
    return x_prev.astype(x_t.dtype), pred_xstart


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    timesteps: np.ndarray | jax.Array,
    eta: float | jax.Array = 0.0,
    mean_type: str = "eps",
    clip_denoised: bool = True,
    xstart_every: int | None = None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDIM sampling over the increasing sub-sequence ``timesteps`` (e.g. from ``ddim_timesteps``) in one
    ``lax.scan``: steps τ_{S-1} -> τ_{S-2} -> ... -> τ_0 -> x_0 with ``ddim_step``.
    ``after_step(x_prev, t_prev)`` is applied to each new x at timestep t_prev (−1 = the data).

    The noise at step τ_i is drawn from ``fold_in(key, τ_i)``; with a Python ``eta == 0`` no noise is
    drawn at all and the result depends only on x_T. With ``xstart_every = n`` also returns
    progress [K, B, H, W, C], K = ceil(S / n), slot k = x̂_0 predicted at timesteps[n·k]
    (slot 0 is the final sample when clipping is on and timesteps[0] = 0 is the last step).
    """
    timesteps = jnp.asarray(timesteps, dtype=jnp.int32)
    num_steps = timesteps.shape[0]
    batch = x_T.shape[0]
    deterministic = isinstance(eta, (int, float)) and eta == 0
    step_indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    previous_timesteps = jnp.concatenate([jnp.array([-1], dtype=jnp.int32), timesteps[:-1]])

    def step(carry, index):
        x, progress = carry
        t = timesteps[index]
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)
        t_prev_batch = jnp.full((batch,), previous_timesteps[index], dtype=jnp.int32)
        model_output = model_fn(x, t_batch)
        noise = jnp.zeros_like(x) if deterministic else _step_noise(key, t, x)
        x_prev, pred_xstart = ddim_step(
            schedule,
            model_output,
            x,
            t_batch,
            t_prev_batch,
            noise,
            eta=eta,
            mean_type=mean_type,
            clip_denoised=clip_denoised,
        )
        if after_step is not None:
            x_prev = after_step(x_prev, previous_timesteps[index])
        if progress is not None:
            progress = progress_slots.record(progress, pred_xstart, index // xstart_every)
        return (x_prev, progress), None

    progress = None
    if xstart_every is not None:
        progress = jnp.zeros_like(x_T, shape=(progress_slots.num_slots(num_steps, xstart_every),) + x_T.shape)
    (samples, progress), _ = jax.lax.scan(step, (x_T, progress), step_indices)
    if xstart_every is None:
        return samples
    return samples, progress


# --------------------------------------------------------------------------------------
# Any method from a start step
# --------------------------------------------------------------------------------------

METHODS = ("ancestral", "ddim", "dpm_solver", "unipc")
SOLVER_METHODS = solvers.SOLVERS


class Method(NamedTuple):
    """A reverse-chain method and its settings (``sample.*``); ``num_steps`` is the number of
    model calls of ddim / dpm_solver / unipc (the ancestral chain always takes every step)."""

    name: str = "ancestral"
    num_steps: int = 0
    order: int = 2
    spacing: str = "logsnr"
    ddim_eta: float = 0.0
    ddim_skip: str = "uniform"


def check_start(method: Method, start: int) -> None:
    """A ddim / solver chain from paper step `start` ≥ 1 takes 1..start model calls (a solver
    1..start − 1: its grid ends below its first timestep)."""
    if method.name == "ancestral" or start == 0:
        return
    limit = start - (method.name in SOLVER_METHODS)
    if not 1 <= method.num_steps <= limit:
        raise ValueError(
            f"sample.num_steps={method.num_steps} does not fit sample.method={method.name} from "
            f"paper step {start}: it takes 1..{limit} model calls; lower "
            "--config.sample.num_steps or start later (sample.t0).")


def check_mean_type(method: Method, mean_type: str) -> None:
    """The ODE solvers take ε-models only (DDIM also x_0-models, ancestral every kind)."""
    if method.name in SOLVER_METHODS and mean_type != "eps":
        raise ValueError(f"sample.method={method.name} needs an eps model, this one has "
                         f"diffusion.mean_type={mean_type!r}; use --config.sample.method=ancestral "
                         "or ddim.")


def model_calls(method: Method, start: int) -> int:
    """How many model calls `run_chain` makes from paper step `start`."""
    return start if method.name == "ancestral" or start == 0 else method.num_steps


def run_chain(
    method: Method,
    model_fn: ModelFn,
    schedule: Schedule,
    x_t: jax.Array,
    key: jax.Array,
    *,
    start: int | None = None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    xstart_every: int | None = None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``x_t`` (the latent at paper step ``start``, default T) → x_0 with ``method``.

    ancestral: ``start`` steps of Alg. 2. ddim: the DDIM sub-sequence of a ``start``-step
    schedule. dpm_solver / unipc: the probability-flow ODE from code index start − 1 down to
    the data, the solver's time grid laid over the first ``start`` entries of the ᾱ table (so
    linspace, trailing and logsnr grids begin at start − 1). ``after_step(x, s)`` is applied to
    each new x at code index s (−1 = the data). Returns as ``ancestral_sample``.
    """
    start = schedule.num_timesteps if start is None else int(start)
    check_start(method, start)
    if method.name == "ancestral" or start == 0:  # start 0: no step, x_t is returned
        hook = None if after_step is None else (lambda x_prev, t: after_step(x_prev, t - 1))
        return ancestral_sample(model_fn, schedule, x_t, key, mean_type=mean_type,
                                var_type=var_type, clip_denoised=clip_denoised,
                                xstart_every=xstart_every, num_steps=start, after_step=hook)
    if method.name == "ddim":
        return ddim_sample(model_fn, schedule, x_t, key,
                           timesteps=ddim_timesteps(start, method.num_steps, method.ddim_skip),
                           eta=method.ddim_eta, mean_type=mean_type, clip_denoised=clip_denoised,
                           xstart_every=xstart_every, after_step=after_step)
    if method.name not in SOLVER_METHODS:
        raise ValueError(f"sample.method={method.name!r} is unknown; use one of "
                         f"{', '.join(METHODS)}.")
    check_mean_type(method, mean_type)
    solve = solvers.dpm_solver_sample if method.name == "dpm_solver" else solvers.unipc_sample
    table = np.asarray(schedule.alphas_cumprod)[:start]
    return solve(model_fn, table, x_t, num_steps=method.num_steps, order=method.order,
                 spacing=method.spacing, clip_denoised=clip_denoised, xstart_every=xstart_every,
                 after_step=after_step)
