"""benchmarks/quality_digits.py: the Fréchet distance in a digit classifier's feature space."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import quality_digits  # noqa: E402


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    """Same covariance, means apart by v: the distance is |v|² exactly."""
    features = np.random.default_rng(0).normal(size=(500, 8))
    shift = np.arange(8) / 4.0
    assert quality_digits.frechet_distance(features, features + shift) == pytest.approx(
        float(shift @ shift), rel=1e-6)
    assert quality_digits.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_real_digits_score_the_real_value_and_noise_scores_far_worse():
    x_train, _, _, _ = quality_digits.split_digits()
    real = np.round(x_train * 255).astype(np.uint8).reshape(-1, 8, 8, 1)
    report = quality_digits.frechet_report(real)
    # The very digits the real-vs-real value is computed from (all 898), quantised to uint8.
    assert report["frechet_real_count"] == len(x_train)
    # Rounding to uint8 moves pixels by ≤ 0.5/255: 0.2 % of the distance here.
    assert report["frechet_distance"] == pytest.approx(report["frechet_distance_real"], rel=1e-2)
    noise = np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
    assert quality_digits.frechet_report(noise)["frechet_distance"] > 10 * report["frechet_distance_real"]
