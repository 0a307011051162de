"""Host input: sources, step-indexed order, per-process split, and on-device flips."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default
from ddpm_jax import images, input_pipeline, train_step


def test_digits_are_the_bundled_scikit_learn_digits():
    from sklearn.datasets import load_digits

    data = input_pipeline.load_digits(8, 1)
    raw = load_digits()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[..., 0], np.round(raw.images * 255 / 16))
    np.testing.assert_array_equal(data.labels, raw.target)


def test_image_folder_crops_resizes_and_labels_by_subfolder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, size in (("cats", (40, 60)), ("dogs", (50, 50))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    data = input_pipeline.load_image_folder(str(tmp_path), 16, 3)
    assert data.images.shape == (6, 16, 16, 3)
    assert data.num_classes == 2
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])

    # A plain square image of the target size passes through untouched.
    square = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(input_pipeline.center_crop_resize(square, 16), square)
    # Centre crop of a wide image keeps its middle columns.
    wide = np.zeros((4, 8, 1), np.uint8)
    wide[:, 2:6] = 200
    np.testing.assert_array_equal(input_pipeline.center_crop_resize(wide, 4), 200)


def test_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no images"):
        input_pipeline.load_image_folder(str(tmp_path), 16, 3)


def test_tfds_cifar10_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        data = input_pipeline.load_tfds("cifar10", "train", 32, 3)
    assert data.images.shape == (20, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.num_classes == 10


def test_step_indexed_order_is_a_function_of_the_step():
    n, batch, seed = 50, 8, 3
    steps_per_epoch = n // batch
    # Each epoch is a permutation: batches of one epoch are disjoint, remainder dropped.
    epoch = np.concatenate([input_pipeline.global_batch_indices(n, batch, s, seed)
                            for s in range(steps_per_epoch)])
    assert len(set(epoch.tolist())) == steps_per_epoch * batch
    # Different epochs are shuffled differently.
    next_epoch = np.concatenate([input_pipeline.global_batch_indices(n, batch, s, seed)
                                 for s in range(steps_per_epoch, 2 * steps_per_epoch)])
    assert not np.array_equal(epoch, next_epoch)
    # Starting the iterator at step 5 gives what an iterator from step 0 gives at step 5.
    data = input_pipeline.Dataset(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1),
                                  np.arange(n, dtype=np.int32), 1)
    from_zero = input_pipeline.in_memory_batches(data, global_batch=batch, steps_per_call=2,
                                                 start_step=0, seed=seed)
    batches = list(itertools.islice(from_zero, 4))  # steps 0..7
    resumed = next(input_pipeline.in_memory_batches(data, global_batch=batch, steps_per_call=2,
                                                    start_step=4, seed=seed))
    np.testing.assert_array_equal(resumed.labels, batches[2].labels)


def test_process_parts_are_disjoint_and_cover_each_global_batch():
    n, batch, processes = 64, 16, 4
    data = input_pipeline.Dataset(np.zeros((n, 1, 1, 1), np.uint8),
                                  np.arange(n, dtype=np.int32), 1)
    for step in (0, 3, 11):
        parts = [next(input_pipeline.in_memory_batches(
            data, global_batch=batch, steps_per_call=1, start_step=step, seed=0,
            process_index=p, process_count=processes)).labels[0] for p in range(processes)]
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == batch  # disjoint
        np.testing.assert_array_equal(np.sort(union),
                                      np.sort(input_pipeline.global_batch_indices(n, batch, step, 0)))


def test_flips_mirror_about_half_of_the_images():
    key = jax.random.key(0)
    _, _, flip = train_step.per_example_randomness(key, jnp.int32(0), 4000, (2, 2, 1), 1000)
    fraction = float(jnp.mean(flip))
    assert abs(fraction - 0.5) < 4 * np.sqrt(0.25 / 4000)
    images = jax.random.normal(jax.random.key(1), (6, 4, 5, 3))
    bits = jnp.array([True, False, True, False, False, True])
    out = np.asarray(train_step.random_flip(images, bits))
    for i, b in enumerate(np.asarray(bits)):
        expected = np.asarray(images[i])[:, ::-1] if b else np.asarray(images[i])
        np.testing.assert_array_equal(out[i], expected)


def test_timesteps_are_uniform_over_all_steps():
    t, noise, _ = train_step.per_example_randomness(jax.random.key(2), jnp.int32(0), 20000,
                                                    (1, 1, 1), 10)
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000 and np.asarray(t).max() == 9
    assert abs(float(jnp.std(noise)) - 1.0) < 0.03


def test_default_config_feeds_uint8_and_scales_like_the_original():
    x = jnp.array([0, 127, 255], jnp.uint8)
    np.testing.assert_allclose(np.asarray(images.to_model_range(x)),
                               [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-7)
    assert default.get_config().data.random_flip
