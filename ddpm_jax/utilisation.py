"""How well a run uses its hardware: XLA's FLOP count of a step over its time, against the peak.

`step_flops(compiled)` reads XLA's cost analysis of the compiled train step (per device: the
program is partitioned over the mesh). XLA counts the body of a `lax.scan` once, so for a call
of K scanned steps this is the FLOP count of one step. `peak_flops(device)` is the dense peak
of one JAX device for the compute dtype the step uses (bf16 matrix units on TPU, where f32
matmuls run as bf16 passes by default; TF32/FP32 or BF16 tensor cores on NVIDIA GPUs), or, on
a CPU, a float32 matmul measured once on this machine and cached, shared by its CPU devices.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

TERA = 1e12

# Dense peak FLOP/s of ONE JAX device, by `device_kind` prefix (vendor data sheets).
# TPU v3: 123 TFLOP/s per chip = 2 TensorCores, each its own device. TPU v4: a megacore chip
# is one device (275). v5e: 197 per chip; v6e (Trillium): 918 per chip.
# GPUs: (float32 via TF32 tensor cores, bfloat16), dense, SXM parts.
_TPU_PEAKS = {"TPU v3": 61.5 * TERA, "TPU v4": 275 * TERA, "TPU v5 lite": 197 * TERA,
              "TPU v5e": 197 * TERA, "TPU v6 lite": 918 * TERA, "TPU v6e": 918 * TERA}
_GPU_PEAKS = {"A100": (156 * TERA, 312 * TERA), "H100": (494.5 * TERA, 989 * TERA),
              "H200": (494.5 * TERA, 989 * TERA)}

CPU_PEAK_CACHE = "~/.cache/ddpm_jax/cpu_peak.json"


def step_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of one device's program, or None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_flops(device: jax.Device, dtype: str = "float32") -> float | None:
    """Dense peak FLOP/s of `device` for matmuls in `dtype`; None where it is not known."""
    kind = getattr(device, "device_kind", "")
    if device.platform == "tpu":
        return next((peak for name, peak in _TPU_PEAKS.items() if kind.startswith(name)), None)
    if device.platform == "gpu":
        for name, (f32, bf16) in _GPU_PEAKS.items():
            if name in kind:
                return bf16 if dtype == "bfloat16" else f32
        return None
    if device.platform == "cpu":  # the machine's cores are shared by its CPU devices
        return measured_cpu_peak() / max(jax.local_device_count(), 1)
    return None


# The CPU peak: the best of `CPU_PEAK_REPEATS` float32 matmuls of this size.
CPU_PEAK_MATMUL = 2048
CPU_PEAK_REPEATS = 10


def measured_cpu_peak(cache_path: str = CPU_PEAK_CACHE) -> float:
    """The float32 FLOP/s of a large matmul on one CPU device, measured once and cached.

    The best of several runs, not their mean: a peak measured while the machine is busy would
    otherwise stay too low in the cache and every later run would report a fraction of it far
    above the truth (a 1024² mean of 5 cached 175 GFLOP/s on a machine whose matmul peak is
    ~500). The cache is keyed by the CPU count and the measurement, so a copied home directory
    on another machine, or an entry made the old way, measures again.
    """
    path = os.path.expanduser(cache_path)
    n = CPU_PEAK_MATMUL
    key = f"{os.cpu_count()}-cpus/best-of-{CPU_PEAK_REPEATS}-matmul-{n}"
    try:
        with open(path) as f:
            cached = json.load(f)
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(CPU_PEAK_REPEATS):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    peak = 2 * n ** 3 / best
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({**cached, key: peak}, f)
    except OSError:
        pass
    return peak


def utilisation(flops_per_step: float | None, steps_per_sec: float,
                peak: float | None) -> dict[str, float]:
    """TFLOP/s per device and, where the peak is known, the fraction of it."""
    if not flops_per_step or steps_per_sec <= 0:
        return {}
    achieved = flops_per_step * steps_per_sec
    out = {"tflops_per_device": achieved / TERA}
    if peak:
        out["fraction_of_peak"] = achieved / peak
    return out


def describe(figures: dict[str, float]) -> str:
    """` | 0.15 TFLOP/s per device (31% of peak)` for the console, or "" without figures."""
    if "tflops_per_device" not in figures:
        return ""
    fraction = figures.get("fraction_of_peak")
    return (f" | {figures['tflops_per_device']:.3g} TFLOP/s per device"
            + (f" ({100 * fraction:.0f}% of peak)" if fraction is not None else ""))


def format_seconds(seconds: float) -> str:
    """A duration for an ETA on the console: `7m05s` under an hour, `2h03m` from one hour on
    (whole seconds, rounded down; negative as 0)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
