"""The one uint8 ↔ [−1, 1] conversion (`images.to_model_range`, `to_pixel_values`, `to_uint8`)
against the closed forms: x/127.5 − 1 (docs/original.md §3.2) and round((x+1)·127.5) clipped."""

import jax.numpy as jnp
import numpy as np

from ddpm_jax import images

LEVELS = np.arange(256, dtype=np.uint8)


def test_to_model_range_is_x_over_127_5_minus_1_for_every_level():
    got = images.to_model_range(LEVELS)
    assert got.dtype == np.float32
    assert got[0] == -1.0 and got[255] == 1.0  # both ends exactly
    # 2k/255 − 1 in float64, to within one float32 rounding of the result.
    np.testing.assert_allclose(got, 2 * np.arange(256) / 255 - 1, rtol=0, atol=2 ** -24)
    assert np.all(np.diff(got) > 0)
    on_device = images.to_model_range(jnp.asarray(LEVELS))  # the train step's jax arrays
    assert isinstance(on_device, type(jnp.zeros(1))) and on_device.dtype == jnp.float32
    # XLA divides as a multiply by the reciprocal (two roundings): two float32 ulps of 1 at most,
    # against 2/255 between levels.
    np.testing.assert_allclose(np.asarray(on_device), 2 * np.arange(256) / 255 - 1, rtol=0,
                               atol=2 ** -22)


def test_to_uint8_inverts_to_model_range_and_rounds_half_to_even():
    np.testing.assert_array_equal(images.to_uint8(images.to_model_range(LEVELS)), LEVELS)
    x = np.array([-1.0, 1.0, 0.0, 127 / 127.5 - 1, 128 / 127.5 - 1,
                  # 0.4 and 0.6 of a level above 127: round down and up
                  127.4 / 127.5 - 1, 127.6 / 127.5 - 1], np.float32)
    # (x+1)·127.5 = 127.5 exactly at x = 0: half to even gives 128, as tf.round would.
    np.testing.assert_array_equal(images.to_uint8(x), [0, 255, 128, 127, 128, 127, 128])


def test_out_of_range_values_clip_to_0_and_255():
    x = np.array([-5.0, -1.0001, 1.0001, 7.0, -np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 255, 255, 0, 255])
    np.testing.assert_array_equal(images.to_pixel_values(x, quantize=False),
                                  [0.0, 0.0, 255.0, 255.0, 0.0, 255.0])


def test_pixel_values_unquantised_keep_the_fraction():
    x = np.array([0.3, -0.7, 0.0], np.float32)
    expected = (np.float64(x) + 1) * 127.5  # 165.75.., 38.25.., 127.5
    got = images.to_pixel_values(x, quantize=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_array_equal(images.to_pixel_values(x), np.round(expected).astype(np.float32))
    np.testing.assert_array_equal(images.to_pixel_values(x), images.to_uint8(x))
