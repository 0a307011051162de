"""Fast ODE samplers for ε-models: DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023).

Both solve the probability-flow ODE in data-prediction form, with the noise level written as
α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t) and the half log-SNR λ_t = log α_t − log σ_t, exactly
(the "exponential integrator" form of DPM-Solver++, §3):

    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ(x_λ, λ) dλ,   x_θ = (x − σ ε_θ)/α.

The solvers differ in how they approximate x_θ over a step from the previous model outputs.
Every step is a linear combination of the current point and at most four data predictions, so
the coefficients are computed once in float64 NumPy from the ᾱ table (pure functions below,
named after the papers' quantities) and the sampler is one ``lax.scan`` that carries the
multistep history in its state, calling the model once per step like ``chains.ddim_sample``.

Time grid: ``solver_timesteps`` gives the model-evaluation timesteps t_0 > … > t_{S-1}; the
last step goes to ``final_timestep`` (−1 = the data, ᾱ = 1, σ = 0, as ancestral/DDIM sampling).
docs/solvers.md lists the formulas and the diffusers settings that give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ddpm_jax import progress as progress_slots
from ddpm_jax.diffusion import ModelFn

SPACINGS = ("linspace", "leading", "trailing", "logsnr")
SOLVERS = ("dpm_solver", "unipc")
UNIPC_VARIANTS = ("bh1", "bh2")
DPM_THIRD_ORDER = ("taylor", "reference_code")
MAX_ORDER = 3


# --------------------------------------------------------------------------------------
# Noise levels and time grid
# --------------------------------------------------------------------------------------


def _table(alphas_cumprod: ArrayLike) -> np.ndarray:
    table = np.asarray(jax.device_get(alphas_cumprod), dtype=np.float64)
    if table.ndim != 1 or table.shape[0] < 2 or not np.all((table > 0) & (table < 1)):
        raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1)")
    return table


def alpha_sigma(alphas_cumprod: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) at integer timesteps t, with t = −1 meaning the data (1, 0)."""
    t = np.asarray(t)
    alpha_bar = np.where(t >= 0, alphas_cumprod[np.maximum(t, 0)], 1.0)
    return np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)


def log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """λ_t = log α_t − log σ_t (half the log signal-to-noise ratio; +∞ at the data)."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def solver_timesteps(alphas_cumprod: ArrayLike, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The S = ``num_steps`` model-evaluation timesteps t_0 > … > t_{S-1} (int32) of the table.

    Uniform in t (Lin et al. 2024, Table 2, as diffusers' multistep schedulers write them, with S+1
    grid points of which the last is replaced by the final target):
      linspace: round(linspace(0, T−1, S+1)) reversed, without the trailing 0;
      leading:  k·(T // (S+1)) for k = S..1;
      trailing: round(T − k·T/S) − 1 for k = 0..S−1.
    Uniform in log-SNR (the DPM-Solver step schedule): S values of λ evenly spaced from λ_{T−1} to λ_0 (both
    included), each mapped to t by linear interpolation of t in λ over the table and rounded
    (diffusers' ``use_lu_lambdas``). The solvers then use the table's ᾱ at the rounded t, so the
    model and the solver see the same noise level; a grid that would repeat a timestep (log-SNR
    is steep near t = 0: over DDPM's linear 1000 steps, above 38 steps) is refused.
    """
    table = _table(alphas_cumprod)
    T = table.shape[0]
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps < T:
        raise ValueError(f"num_steps must be an integer in [1, {T - 1}], got {num_steps!r}")
    if spacing == "linspace":
        timesteps = np.round(np.linspace(0, T - 1, num_steps + 1))[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(num_steps, 0, -1) * (T // (num_steps + 1))).astype(np.float64)
    elif spacing == "trailing":
        timesteps = np.round(T - np.arange(num_steps) * (T / num_steps)) - 1
    elif spacing == "logsnr":
        lam = log_snr(*alpha_sigma(table, np.arange(T)))  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], num_steps)  # from t = T-1 up to t = 0
        timesteps = np.round(np.interp(-targets, -lam, np.arange(T, dtype=np.float64)))
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    timesteps = timesteps.astype(np.int32)
    if np.any(np.diff(timesteps) >= 0) or timesteps[-1] < 0:
        raise ValueError(f"num_steps={num_steps} with spacing {spacing!r} repeats timesteps of the "
                         f"{T}-step schedule; use fewer steps or another spacing")
    return timesteps


# --------------------------------------------------------------------------------------
# Exponential-integrator coefficients
# --------------------------------------------------------------------------------------


def h_phi(k: int, h: np.ndarray) -> np.ndarray:
    """h^k φ_k(−h), φ_k(z) = ∫_0^1 e^{(1−θ)z} θ^{k−1}/(k−1)! dθ (DPM-Solver++, UniPC),
    i.e. h^k φ_k(−h) = ∫_0^h e^{−(h−u)} u^{k−1}/(k−1)! du: the weight of the (k−1)-th Taylor term of
    x_θ in the data-prediction integral, divided by α_t. By φ_{k+1}(z) = (φ_k(z) − 1/k!)/z:
    h φ_1(−h) = 1 − e^{−h}, h^{k+1} φ_{k+1}(−h) = h^k/k! − h^k φ_k(−h)."""
    value = -np.expm1(-np.asarray(h, dtype=np.float64))
    for j in range(1, k):
        value = np.asarray(h, dtype=np.float64) ** j / math.factorial(j) - value
    return value


def dpm_solver_coefficients(lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, i: int,
                            order: int, third_order: str = "taylor") -> tuple[float, np.ndarray]:
    """Step i (t_i → t_{i+1}) of multistep DPM-Solver++ of ``order`` p as
    x_{i+1} = a x_i + Σ_j c_j m_{i−j}, m = x_θ, returned as (a, [c_0, c_1, c_2]).

    With h = λ_{i+1} − λ_i, r_k = (λ_{i−k+1} − λ_{i−k})/h, a = σ_{i+1}/σ_i, and
    D_1,0 = (m_i − m_{i−1})/r_1, D_1,1 = (m_{i−1} − m_{i−2})/r_2:
      p = 1 (DDIM):   x += α_{i+1} hφ_1 m_i;
      p = 2 (2M, DPM-Solver++ Alg. 2):  x += α_{i+1} hφ_1 (m_i + D_1,0 / 2);
      p = 3 (3M):  x += α_{i+1} [hφ_1 m_i + h²φ_2/h · D_1 + κ h³φ_3/h² · D_2],
        D_1 = D_1,0 + r_1/(r_1+r_2) (D_1,0 − D_1,1) ≈ h x_θ',  D_2 = (D_1,0 − D_1,1)/(r_1+r_2) ≈ h² x_θ''/2.
    κ = 2 ("taylor") is the Taylor weight of x_θ''/2 · u²; the DPM-Solver reference code (and
    diffusers) use κ = 1 ("reference_code"), which leaves an O(h³) local error, i.e. global order 2.
    """
    h = lam[i + 1] - lam[i]
    a = sigma[i + 1] / sigma[i]
    c = np.zeros(MAX_ORDER)
    w1 = alpha[i + 1] * h_phi(1, h)
    if order == 1:
        c[0] = w1
        return a, c
    r1 = (lam[i] - lam[i - 1]) / h
    d10 = np.array([1.0, -1.0, 0.0]) / r1  # D_1,0 as weights on (m_i, m_{i-1}, m_{i-2})
    if order == 2:
        return a, w1 * (np.array([1.0, 0.0, 0.0]) + 0.5 * d10)
    kappa = 2.0 if third_order == "taylor" else 1.0
    r2 = (lam[i - 1] - lam[i - 2]) / h
    d11 = np.array([0.0, 1.0, -1.0]) / r2
    d1 = d10 + r1 / (r1 + r2) * (d10 - d11)
    d2 = (d10 - d11) / (r1 + r2)
    c = (w1 * np.array([1.0, 0.0, 0.0]) + alpha[i + 1] * h_phi(2, h) / h * d1
         + kappa * alpha[i + 1] * h_phi(3, h) / h**2 * d2)
    return a, c


def unipc_b(h: np.ndarray, variant: str) -> np.ndarray:
    """B(h) of UniPC (Zhao et al. 2023, §3) in data-prediction form (argument −h): B_1 = −h, B_2 = e^{−h} − 1."""
    if variant == "bh1":
        return -np.asarray(h, dtype=np.float64)
    if variant == "bh2":
        return np.expm1(-np.asarray(h, dtype=np.float64))
    raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {UNIPC_VARIANTS}")


def unipc_b_vector(h: float, order: int, variant: str) -> np.ndarray:
    """The right-hand side of UniPC's order conditions R_p(h) a_p = g_p(h)/B(h), in
    data-prediction form: b_n = n! (−h) φ_{n+1}(−h) / B(h) = −n! h^{n+1}φ_{n+1}(−h) / (h^n B(h)),
    n = 1..p."""
    return np.array([-math.factorial(n) * h_phi(n + 1, h) / (h**n * unipc_b(h, variant))
                     for n in range(1, order + 1)])


def unipc_rhos(rks: list[float], h: float, variant: str) -> np.ndarray:
    """The weights a of the D_k terms: solve Σ_k a_k r_k^{n−1} = b_n (n = 1..len(rks)), with a
    single ratio giving the reference code's fixed 1/2 (UniC-1 and UniP-2)."""
    if len(rks) == 1:
        return np.array([0.5])
    R = np.stack([np.asarray(rks, dtype=np.float64) ** n for n in range(len(rks))])
    return np.linalg.solve(R, unipc_b_vector(h, len(rks), variant))


def unipc_coefficients(lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, i: int,
                       order: int, variant: str, corrector: bool) -> tuple[float, np.ndarray]:
    """UniP-p (predictor) or UniC-p (``corrector``) over t_i → t_{i+1} (data prediction, B(h)
    variant ``variant``), as x_{i+1} = a x_i + Σ_j c_j n_j with
    n = (m_{i+1}, m_i, m_{i−1}, m_{i−2}) (m_{i+1}, at the predicted x_{i+1}, only for UniC):

      x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} hφ_1 m_i − α_{i+1} B(h) Σ_k a_k D_k,
      r_k = (λ_{i−k} − λ_i)/h, D_k = (m_{i−k} − m_i)/r_k for k = 1..p−1; UniC adds r_p = 1 with
      D_p = m_{i+1} − m_i and solves for all p weights, UniP uses the first p−1 (none for p = 1).
    """
    h = lam[i + 1] - lam[i]
    a = sigma[i + 1] / sigma[i]
    c = np.zeros(MAX_ORDER + 1)
    c[1] = alpha[i + 1] * h_phi(1, h)
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    positions = list(range(2, order + 1))  # where m_{i-k} sits in n
    if corrector:
        rks, positions = rks + [1.0], positions + [0]
    rhos = unipc_rhos(rks, h, variant) if rks else np.zeros(0)
    scale = -alpha[i + 1] * unipc_b(h, variant)
    for rho, rk, position in zip(rhos, rks, positions):
        c[position] += scale * rho / rk
        c[1] -= scale * rho / rk
    return a, c


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


def step_orders(num_steps: int, order: int, lower_order_final: bool, to_data: bool) -> np.ndarray:
    """Order of each step: min(order, i + 1) (the history holds i + 1 outputs), and with
    ``lower_order_final`` also ≤ S − i (the last steps use lower orders). A step to the data
    (σ = 0, λ = ∞) is always order 1: it returns x_θ there, the higher terms having r = 0."""
    if order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"solver order must be 1, 2 or 3, got {order!r}")
    steps = np.arange(num_steps)
    orders = np.minimum(order, steps + 1)
    if lower_order_final:
        orders = np.minimum(orders, num_steps - steps)
    if to_data:
        orders[-1] = 1
    return orders


def _grid(alphas_cumprod: ArrayLike, num_steps: int, spacing: str, final_timestep: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model timesteps [S], λ, α, σ at the S + 1 grid points t_0 > … > t_{S-1} > final)."""
    table = _table(alphas_cumprod)
    timesteps = solver_timesteps(table, num_steps, spacing)
    if not -1 <= final_timestep < timesteps[-1]:
        raise ValueError(f"final_timestep must be in [-1, {timesteps[-1] - 1}] (below the last model "
                         f"timestep {timesteps[-1]}), got {final_timestep}")
    grid = np.append(timesteps, final_timestep)
    alpha, sigma = alpha_sigma(table, grid)
    return timesteps, log_snr(alpha, sigma), alpha, sigma


def _multistep_scan(
    eps_fn: ModelFn,
    x_T: jax.Array,
    timesteps: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    final_timestep: int,
    predictor: np.ndarray,
    corrector: np.ndarray | None,
    clip_denoised: bool,
    xstart_every: int | None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One ``lax.scan`` over the S steps. Step i evaluates m_i = x_θ(x_i, t_i) (clipped to [−1, 1]
    if ``clip_denoised``), optionally corrects x_i with row i of ``corrector`` — weights on
    (x_i as predicted, x_{i−1}, m_i, m_{i−1}, m_{i−2}, m_{i−3}) — and predicts x_{i+1} with row i of
    ``predictor`` — weights on (x_i, m_i, m_{i−1}, m_{i−2}). The last outputs are carried.
    ``after_step(x, t)`` is applied to every new x at its grid timestep t (−1 = the data): to the
    prediction x_{i+1} and, with a corrector, to the corrected x_i (which replaces x_i)."""
    dtype = x_T.dtype
    batch, channels = x_T.shape[0], x_T.shape[-1]
    num_steps = timesteps.shape[0]
    history_len = MAX_ORDER if corrector is not None else MAX_ORDER - 1
    per_step = dict(
        t=jnp.asarray(timesteps, jnp.int32),
        t_next=jnp.asarray(np.append(timesteps[1:], final_timestep), jnp.int32),
        index=jnp.arange(num_steps, dtype=jnp.int32),
        alpha=jnp.asarray(alpha[:-1], dtype),
        sigma=jnp.asarray(sigma[:-1], dtype),
        predictor=jnp.asarray(predictor, dtype),
    )
    if corrector is not None:
        per_step["corrector"] = jnp.asarray(corrector, dtype)

    def combine(weights, terms):
        return sum(weights[k] * term for k, term in enumerate(terms))

    def step(carry, inputs):
        x, x_before, history, progress = carry
        t_batch = jnp.full((batch,), inputs["t"], dtype=jnp.int32)
        eps = eps_fn(x, t_batch)[..., :channels]
        m = (x - inputs["sigma"] * eps) / inputs["alpha"]  # data prediction x_θ
        if clip_denoised:
            m = jnp.clip(m, -1.0, 1.0)
        m = m.astype(dtype)
        outputs = [m] + [history[k] for k in range(history_len)]
        if corrector is not None:
            x = combine(inputs["corrector"], [x, x_before] + outputs)
            if after_step is not None:
                x = after_step(x.astype(dtype), inputs["t"])
        x_next = combine(inputs["predictor"], [x] + outputs[:MAX_ORDER])
        if after_step is not None:
            x_next = after_step(x_next.astype(dtype), inputs["t_next"])
        if progress is not None:
            slot = (num_steps - 1 - inputs["index"]) // xstart_every
            progress = progress_slots.record(progress, m, slot)
        return (x_next.astype(dtype), x, jnp.stack(outputs[:history_len]), progress), None

    history = jnp.zeros_like(x_T, shape=(history_len,) + x_T.shape)
    progress = None
    if xstart_every is not None:
        progress = jnp.zeros_like(x_T, shape=(progress_slots.num_slots(num_steps, xstart_every),) + x_T.shape)
    (samples, _, _, progress), _ = jax.lax.scan(step, (x_T, x_T, history, progress), per_step)
    if xstart_every is None:
        return samples
    return samples, progress


def multistep_sample(
    eps_fn: ModelFn,
    alphas_cumprod: ArrayLike,
    x_T: jax.Array,
    *,
    solver: str,
    num_steps: int,
    order: int = 2,
    spacing: str = "linspace",
    clip_denoised: bool = True,
    lower_order_final: bool = True,
    final_timestep: int = -1,
    third_order: str = "taylor",
    variant: str = "bh2",
    xstart_every: int | None = None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """A multistep ``solver`` ("dpm_solver" or "unipc") from x_T at t_0 to ``final_timestep``
    (−1: the data) in ``num_steps`` model calls, one ``lax.scan``.

    ``eps_fn(x, t) -> ε`` (int32 t [B]; guidance and labels folded in by the caller; extra output
    channels such as a learned variance are ignored). ``alphas_cumprod``: the schedule's ᾱ table,
    concrete (the step coefficients are computed from it on the host). ``clip_denoised`` clips
    x_θ to [−1, 1] at every step (static thresholding). ``third_order`` (DPM-Solver++ only) picks
    the 3M weight of the second difference ("taylor", third order; "reference_code", as the
    DPM-Solver code and diffusers); ``variant`` (UniPC only) is its B(h), "bh1" or "bh2". With
    ``xstart_every = n`` also returns progress [K, B, ...], K = ceil(S / n), slot k = x_θ at the
    model call n·k from the end (slot 0: the last one), as ``ddim_sample``. ``after_step(x, t)``
    maps each new x at grid timestep t (−1 = the data), e.g. to re-impose known pixels for
    inpainting.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if third_order not in DPM_THIRD_ORDER:
        raise ValueError(f"unknown third-order variant {third_order!r}; expected one of {DPM_THIRD_ORDER}")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {UNIPC_VARIANTS}")
    timesteps, lam, alpha, sigma = _grid(alphas_cumprod, num_steps, spacing, final_timestep)
    orders = step_orders(num_steps, order, lower_order_final, final_timestep == -1)
    if solver == "dpm_solver":
        predictor, corrector = _dpm_solver_weights(lam, alpha, sigma, orders, third_order), None
    else:
        predictor, corrector = _unipc_weights(lam, alpha, sigma, orders, variant)
    return _multistep_scan(eps_fn, x_T, timesteps, alpha, sigma, final_timestep, predictor,
                           corrector, clip_denoised, xstart_every, after_step)


def _dpm_solver_weights(lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray,
                        orders: np.ndarray, third_order: str) -> np.ndarray:
    """The predictor rows of ``_multistep_scan`` for DPM-Solver++ (no corrector)."""
    return np.stack([np.append(*dpm_solver_coefficients(lam, alpha, sigma, i, int(p), third_order))
                     for i, p in enumerate(orders)])


def _unipc_weights(lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, orders: np.ndarray,
                   variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(predictor, corrector) rows of ``_multistep_scan`` for UniPC: UniP-p predicts x_{i+1}; at
    the next model call UniC-p corrects it with the new output (which is reused, so still S
    calls); no corrector after the last step."""
    num_steps = len(orders)
    predictor = np.stack([np.append(*unipc_coefficients(lam, alpha, sigma, i, int(p), variant, False))
                          for i, p in enumerate(orders)])
    # UniP's (x_i, m_i, m_{i-1}, m_{i-2}) weights sit in positions 0, 2, 3, 4 of its row.
    predictor = predictor[:, [0, 2, 3, 4]]
    corrector = np.zeros((num_steps, 2 + MAX_ORDER + 1))
    corrector[0, 0] = 1.0  # nothing to correct at t_0
    for i in range(1, num_steps):
        a, c = unipc_coefficients(lam, alpha, sigma, i - 1, int(orders[i - 1]), variant, True)
        corrector[i, 1], corrector[i, 2:] = a, c
    return predictor, corrector


def dpm_solver_sample(eps_fn: ModelFn, alphas_cumprod: ArrayLike, x_T: jax.Array,
                      **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multistep DPM-Solver++ (Lu et al. 2022; order 1 is DDIM, 2 is DPM-Solver++(2M)):
    ``multistep_sample`` with solver "dpm_solver", the same keyword ``options``."""
    return multistep_sample(eps_fn, alphas_cumprod, x_T, solver="dpm_solver", **options)


def unipc_sample(eps_fn: ModelFn, alphas_cumprod: ArrayLike, x_T: jax.Array,
                 **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multistep UniPC (Zhao et al. 2023; orders 1–3, B(h) ``variant`` "bh1" or "bh2", data
    prediction): ``multistep_sample`` with solver "unipc", the same keyword ``options``."""
    return multistep_sample(eps_fn, alphas_cumprod, x_T, solver="unipc", **options)
