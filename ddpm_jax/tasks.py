"""Editing with a trained DDPM: img2img (SDEdit), inpainting, interpolation and one-step denoising.

The four tasks (img2img, inpaint, interpolate, one_step_denoise) are pure functions over
arrays, like `chains.py`: a `model_fn(x, t)`, the `Schedule`, images in [-1, 1] (NHWC) and a
key. Timesteps follow the package's convention
(code index t = 0..T-1 is the paper's step t+1); a task's start `t0` counts *paper* steps:
x_{t0} = q_sample(x_0, code index t0 - 1), then `t0` reverse steps (code t0-1..0) bring it back to
x_0, and t0 = 0 is the image itself with no step at all.

The `--mode=sample` driver around them (inputs, outputs, folders) is `edit_mode.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chains, diffusion
from ddpm_jax.diffusion import ModelFn, Schedule

TASKS = ("generate", "img2img", "inpaint", "interpolate", "denoise", "anagram", "hybrid")


class EditResult(NamedTuple):
    output: jax.Array  # the edited images x_0
    start: jax.Array  # the latent the reverse chain started from, x_{t0}
    progress: jax.Array | None  # x̂_0 predictions [K, B, H, W, C] (slot k at code index n·k)


def _code_index(t0: int, batch: int) -> jax.Array:
    """Code index of the paper's step t0 ≥ 1, for every example."""
    return jnp.full((batch,), t0 - 1, jnp.int32)


def _check_t0(schedule: Schedule, t0: int) -> None:
    if not 0 <= t0 <= schedule.num_timesteps:
        raise ValueError(f"t0={t0} must be in [0, {schedule.num_timesteps}] (paper steps; 0 = "
                         "the input itself).")


def noise_to_step(schedule: Schedule, x_start: jax.Array, t0: int, noise: jax.Array) -> jax.Array:
    """x_{t0} = √ᾱ_{t0} x_0 + √(1 − ᾱ_{t0}) ε (Eq. 4) for paper step t0 ≥ 1; x_0 itself for t0 = 0."""
    if t0 == 0:
        return x_start
    return diffusion.q_sample(schedule, x_start, _code_index(t0, x_start.shape[0]), noise)


def _reverse_chain(model_fn, schedule, x_t, key, t0, *, method, mean_type, var_type,
                   clip_denoised, xstart_every, after_step=None
                   ) -> tuple[jax.Array, jax.Array | None]:
    out = chains.run_chain(
        method, model_fn, schedule, x_t, key, start=t0, mean_type=mean_type,
        var_type=var_type, clip_denoised=clip_denoised, xstart_every=xstart_every,
        after_step=after_step)
    return out if xstart_every else (out, None)


def img2img(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, key: jax.Array, *,
            t0: int, mean_type: str = "eps", var_type: str = "fixedlarge",
            clip_denoised: bool = True, xstart_every: int | None = None,
            method: chains.Method = chains.Method()) -> EditResult:
    """SDEdit (Meng et al. 2022): noise the input to x_{t0} with q(x_{t0} | x_0), then run the
    ancestral sampler (Alg. 2) for code indices t0-1..0, or `method` from t0 (`run_chain`).
    t0 = 0 returns `x_start` unchanged; t0 = T forgets the input entirely (up to √ᾱ_T ≈ 0.006
    of it)."""
    _check_t0(schedule, t0)
    noise_key, loop_key = jax.random.split(key)
    x_t = noise_to_step(schedule, x_start, t0, jax.random.normal(noise_key, x_start.shape))
    output, progress = _reverse_chain(
        model_fn, schedule, x_t, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, method=method)
    return EditResult(output, x_t, progress)


def inpaint(model_fn: ModelFn, schedule: Schedule, x_known: jax.Array, mask: jax.Array,
            key: jax.Array, *, t0: int | None = None, mean_type: str = "eps",
            var_type: str = "fixedlarge", clip_denoised: bool = True,
            xstart_every: int | None = None,
            method: chains.Method = chains.Method()) -> EditResult:
    """Inpainting by replacement: where `mask` is true the image is generated, elsewhere the
    known pixels are re-imposed at every step as a sample of q(x_{t-1} | x_known), so that

      x_{t-1} = mask · p_sample(x_t) + (1 − mask) · q_sample(x_known, t − 1),   and at the last
      step x_0 = mask · p_sample(x_1) + (1 − mask) · x_known  (the known pixels exactly).

    The chain starts at paper step t0 (default T) from q_sample(x_known, t0) outside the mask
    and pure noise N(0, I) inside it when t0 = T (else the noised input there too).
    `mask` broadcasts against x_known (e.g. [1, H, W, 1]); True / 1 = regenerate.
    With another `method` the same holds at each of its steps: every new x at code index s is
    re-imposed with a sample of q(x_s | x_known) (x_known itself at the data).
    """
    t0 = schedule.num_timesteps if t0 is None else t0
    _check_t0(schedule, t0)
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x_known.shape)
    start_key, known_key, loop_key = jax.random.split(key, 3)
    x_t = noise_to_step(schedule, x_known, t0, jax.random.normal(start_key, x_known.shape))
    if t0 == schedule.num_timesteps:
        fresh = jax.random.normal(jax.random.fold_in(start_key, 1), x_known.shape)
        x_t = jnp.where(mask, fresh, x_t)

    def reimpose_known(x, s):
        # x is at code index s; at s = -1 it is x_0 and the known pixels are exact.
        noise = jax.random.normal(jax.random.fold_in(known_key, s + 1), x_known.shape)
        known_s = diffusion.q_sample(
            schedule, x_known, jnp.full((x_known.shape[0],), jnp.maximum(s, 0)), noise)
        known = jnp.where(s < 0, x_known, known_s)
        return jnp.where(mask, x, known)

    output, progress = _reverse_chain(
        model_fn, schedule, x_t, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, after_step=reimpose_known,
        method=method)
    if t0 == 0:
        output = jnp.where(mask, output, x_known)
    return EditResult(output, x_t, progress)


def interpolate(model_fn: ModelFn, schedule: Schedule, x1: jax.Array, x2: jax.Array,
                key: jax.Array, *, t0: int, mix_weights: jax.Array | np.ndarray,
                mean_type: str = "eps", var_type: str = "fixedlarge", clip_denoised: bool = True,
                xstart_every: int | None = None,
                method: chains.Method = chains.Method()) -> EditResult:
    """The original's `GaussianDiffusion.interpolate`: diffuse both images to step t0 with
    independent noise, mix the latents linearly x̄_{t0} = (1 − λ) x_{t0} + λ x'_{t0}, and run the
    reverse chain from t0 (paper Fig. 8), with `method` (ancestral by default; a deterministic
    one, e.g. dpm_solver, maps the mixed latent along the probability-flow ODE).

    Returns outputs of shape [M, B, H, W, C] for the M weights λ (so row m is λ_m for every pair).
    At t0 = 0 the mix of the images themselves is returned; λ = 0 and λ = 1 give x1 and x2
    exactly. (The original q_samples at code index t and runs p_sample from t down to 0:
    t + 1 noise steps undone by t + 1 reverse steps, as here with t0 = t + 1 paper steps;
    docs/deviations.md D19.)
    """
    _check_t0(schedule, t0)
    weights = jnp.asarray(mix_weights, jnp.float32)
    key1, key2, loop_key = jax.random.split(key, 3)
    x1_t = noise_to_step(schedule, x1, t0, jax.random.normal(key1, x1.shape))
    x2_t = noise_to_step(schedule, x2, t0, jax.random.normal(key2, x2.shape))
    lam = weights.reshape((-1,) + (1,) * x1.ndim)
    mixed = (1.0 - lam) * x1_t[None] + lam * x2_t[None]  # [M, B, H, W, C]
    num_mix, batch = mixed.shape[:2]
    flat = mixed.reshape((num_mix * batch,) + mixed.shape[2:])
    output, progress = _reverse_chain(
        model_fn, schedule, flat, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, method=method)
    return EditResult(output.reshape(mixed.shape), mixed, progress)


def one_step_denoise(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array,
                     key: jax.Array, *, timesteps: np.ndarray | list[int],
                     mean_type: str = "eps", var_type: str = "fixedlarge",
                     clip_denoised: bool = True) -> tuple[jax.Array, jax.Array]:
    """What the model sees and predicts: for each code index t in `timesteps`, x_t = q_sample(
    x_0, t, ε) and the one-step prediction x̂_0(x_t, t), for eps models
    x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t (Eq. 15), clipped to [−1, 1] if `clip_denoised`.

    Returns (x_t, x̂_0), each [S, B, H, W, C].
    """
    timesteps = np.asarray(timesteps, np.int32)
    if timesteps.ndim != 1 or not len(timesteps):
        raise ValueError("denoise needs a non-empty list of timesteps")
    bad = timesteps[(timesteps < 0) | (timesteps >= schedule.num_timesteps)]
    if len(bad):
        raise ValueError(f"denoise step {int(bad[0])} is outside 0..{schedule.num_timesteps - 1}.")
    batch = x_start.shape[0]

    def one(t):
        t_batch = jnp.full((batch,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x_start.shape)
        x_t = diffusion.q_sample(schedule, x_start, t_batch, noise)
        out = diffusion.p_mean_variance(
            schedule, model_fn(x_t, t_batch), x_t, t_batch, mean_type=mean_type,
            var_type=var_type, clip_denoised=clip_denoised)
        return x_t, out.pred_xstart

    return jax.lax.map(one, jnp.asarray(timesteps))
