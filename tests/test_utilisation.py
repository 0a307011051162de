"""Utilisation figures: XLA's FLOP count against a closed form, peaks and the fraction."""

import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax import utilisation


def test_step_flops_of_a_matmul_is_2mnk():
    m, n, k = 64, 48, 32
    compiled = jax.jit(lambda a, b: a @ b).lower(
        jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    ).compile()
    assert utilisation.step_flops(compiled) == pytest.approx(2 * m * n * k, rel=0.01)


def test_utilisation_is_flops_times_steps_over_time_and_peak():
    got = utilisation.utilisation(2e12, steps_per_sec=2.5, peak=10e12)
    assert got == {"tflops_per_device": pytest.approx(5.0), "fraction_of_peak": pytest.approx(0.5)}
    assert utilisation.describe(got) == " | 5 TFLOP/s per device (50% of peak)"
    assert utilisation.utilisation(None, 2.5, 1e12) == {} and utilisation.describe({}) == ""
    assert "fraction_of_peak" not in utilisation.utilisation(1e12, 1.0, None)


class _Device:
    def __init__(self, platform, kind):
        self.platform, self.device_kind = platform, kind


@pytest.mark.parametrize("platform, kind, dtype, peak", [
    ("tpu", "TPU v3", "float32", 61.5e12),  # 123 TFLOP/s per chip of two cores
    ("tpu", "TPU v4", "bfloat16", 275e12),
    ("tpu", "TPU v5 lite", "float32", 197e12),
    ("tpu", "TPU v6 lite", "float32", 918e12),
    ("gpu", "NVIDIA H200", "bfloat16", 989e12),
    ("gpu", "NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("gpu", "Some Future GPU", "float32", None),
])
def test_known_peaks(platform, kind, dtype, peak):
    assert utilisation.peak_flops(_Device(platform, kind), dtype) == peak


def test_cpu_peak_is_measured_once_and_cached(tmp_path):
    cache = tmp_path / "peak.json"
    first = utilisation.measured_cpu_peak(str(cache))
    assert 1e8 < first < 1e13  # between 0.1 GFLOP/s and 10 TFLOP/s on any CPU
    stored = json.loads(cache.read_text())
    (key,) = stored
    stored[key] = 123.0
    cache.write_text(json.dumps(stored))
    assert utilisation.measured_cpu_peak(str(cache)) == 123.0


def test_cpu_peak_is_the_best_matmul_rate_and_old_entries_are_measured_again(tmp_path):
    # An entry of the one-shot measurement (a 1024² mean, keyed by the CPU count alone) could
    # hold a rate taken under load; it must not be reused.
    cache = tmp_path / "peak.json"
    cache.write_text(json.dumps({f"{os.cpu_count()}-cpus": 1.0}))
    peak = utilisation.measured_cpu_peak(str(cache))
    assert peak > 1e8
    # Independent of the code: the best of five 2048² float32 matmuls timed here.
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    best = 2 * n ** 3 / min(times)
    assert peak >= 0.8 * best, (peak, best)
