"""Composed guidance (ddpm_jax.composed): visual anagrams and hybrid images.

References: NumPy-written flips and Gaussian kernels, scipy.ndimage's 1-D correlation for the
blur, closed forms of the composed output for toy models, and ordinary conditional sampling of
the project's UNet (random weights) from the same x_T and key for the identical-class cases.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from ddpm_jax import (chains, checkpointing, composed, diffusion, generate, model_fns, modes,
                      parallel, train_step)
from helpers import tiny_config


def _images(seed: int, shape=(3, 8, 8, 2)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("kind, numpy_flip", [
    ("vertical", lambda x: x[:, ::-1]),
    ("horizontal", lambda x: x[:, :, ::-1]),
    ("rotate180", lambda x: np.rot90(x, 2, axes=(1, 2))),
])
def test_flips_are_the_numpy_flips_and_involutions(kind, numpy_flip):
    x = _images(0, (2, 6, 8, 3))  # not square, so H and W cannot be mixed up
    flipped = np.asarray(composed.flip(jnp.asarray(x), kind))
    np.testing.assert_array_equal(flipped, numpy_flip(x))
    np.testing.assert_array_equal(np.asarray(composed.flip(composed.flip(x, kind), kind)), x)
    assert not np.array_equal(flipped, x)


def test_unknown_flip_is_refused():
    with pytest.raises(ValueError, match="flip 'diagonal' is unknown"):
        composed.flip(jnp.zeros((1, 2, 2, 1)), "diagonal")


@pytest.mark.parametrize("size, sigma", [(1, 0.7), (3, 0.5), (5, 1.0), (7, 2.5)])
def test_gaussian_kernel_is_the_normal_density_normalised(size, sigma):
    expected = [np.exp(-0.5 * ((i - size // 2) / sigma) ** 2) for i in range(size)]
    expected = np.asarray(expected) / np.sum(expected)
    kernel = composed.gaussian_kernel(size, sigma)
    np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=1e-8)
    assert abs(float(np.sum(kernel, dtype=np.float64)) - 1.0) < 1e-6
    np.testing.assert_array_equal(kernel, kernel[::-1])


@pytest.mark.parametrize("size, sigma", [(4, 1.0), (0, 1.0), (3, 0.0)])
def test_gaussian_kernel_needs_odd_size_and_positive_sigma(size, sigma):
    with pytest.raises(ValueError, match="odd size"):
        composed.gaussian_kernel(size, sigma)


@pytest.mark.parametrize("size, sigma", [(3, 0.8), (5, 1.0), (7, 2.0)])
def test_lowpass_is_scipy_separable_correlation_and_lowpass_plus_highpass_is_identity(size,
                                                                                      sigma):
    x = _images(1)
    expected = [np.exp(-0.5 * ((i - size // 2) / sigma) ** 2) for i in range(size)]
    weights = np.asarray(expected) / np.sum(expected)
    # scipy's "mirror" is numpy's "reflect": d c b | a b c d | c b a.
    reference = scipy.ndimage.correlate1d(x.astype(np.float64), weights, axis=1, mode="mirror")
    reference = scipy.ndimage.correlate1d(reference, weights, axis=2, mode="mirror")
    low = np.asarray(composed.lowpass(jnp.asarray(x), size, sigma))
    high = np.asarray(composed.highpass(jnp.asarray(x), size, sigma))
    np.testing.assert_allclose(low, reference, atol=2e-6)
    np.testing.assert_allclose(low + high, x, atol=1e-6)
    # A constant image is its own low-pass part; the high-pass part of it is zero.
    constant = np.full((1, 8, 8, 1), 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(composed.lowpass(constant, size, sigma)), constant,
                               atol=1e-6)
    assert float(np.abs(high).max()) > 0.1  # the noise does have fine detail


def test_kernel_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="too large for 4x4 images"):
        composed.lowpass(jnp.zeros((1, 4, 4, 1)), 9, 1.0)


def _toy_model(seed: int, num_classes: int = 3):
    """ε(x, t, c) = a_c tanh(x) + b_c + 0.01 t: pixelwise in x, so it commutes with every flip
    apart from its class image b_c, which is not flip-symmetric."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    b = rng.normal(size=(num_classes, 8, 8, 2)).astype(np.float32)

    def model(x, t, labels):
        t = jnp.broadcast_to(t, (x.shape[0],)).astype(jnp.float32)[:, None, None, None]
        return a[labels][:, None, None, None] * jnp.tanh(x) + b[labels] + 0.01 * t

    return model, a, b


@pytest.mark.parametrize("kind, axes", [("vertical", (1,)), ("horizontal", (2,)),
                                        ("rotate180", (1, 2))])
def test_anagram_output_of_a_flip_equivariant_model_is_the_closed_form(kind, axes):
    model, a, b = _toy_model(2)
    x, t = _images(3), jnp.asarray([7, 7, 7])
    c1, c2 = np.asarray([0, 1, 2]), np.asarray([2, 2, 0])
    out = np.asarray(composed.anagram_output(model, jnp.asarray(x), t, c1, c2, kind))
    # ½[a₁ tanh x + b₁ + F(a₂ tanh(F x) + b₂)] + 0.01 t = ½(a₁ + a₂) tanh x + ½(b₁ + F b₂) + 0.07
    a_sum = (a[c1] + a[c2])[:, None, None, None]
    expected = 0.5 * a_sum * np.tanh(x) + 0.5 * (b[c1] + np.flip(b[c2], axis=axes)) + 0.07
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_hybrid_output_is_lowpass_of_class_1_plus_highpass_of_class_2():
    model, a, b = _toy_model(4)
    x, t = _images(5), jnp.asarray(3)
    c1, c2 = np.asarray([0, 1, 2]), np.asarray([1, 1, 2])
    size, sigma = 5, 1.2
    out = np.asarray(composed.hybrid_output(model, jnp.asarray(x), t, c1, c2, size, sigma))
    weights = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    weights /= weights.sum()

    def blur(image):
        image = scipy.ndimage.correlate1d(image.astype(np.float64), weights, axis=1, mode="mirror")
        return scipy.ndimage.correlate1d(image, weights, axis=2, mode="mirror")

    eps1 = a[c1][:, None, None, None] * np.tanh(x) + b[c1] + 0.03
    eps2 = a[c2][:, None, None, None] * np.tanh(x) + b[c2] + 0.03
    np.testing.assert_allclose(out, blur(eps1) + eps2 - blur(eps2), atol=1e-5)
    # Identical classes: L + H = id gives the class's own output.
    same = np.asarray(composed.hybrid_output(model, jnp.asarray(x), t, c2, c2, size, sigma))
    np.testing.assert_allclose(same, eps2, atol=1e-5)


# ------------------------------------------------------------------ the project's UNet


def _conditional_config(task: str, method: str, guidance: float = 2.0):
    config = tiny_config()
    config.model.num_classes = 4
    config.sample.guidance_scale = guidance
    config.sample.task = task
    config.sample.compose_labels = "2,2"
    config.sample.method = method
    config.sample.num_steps = 0 if method == "ancestral" else 6
    config.sample.timestep_spacing = "linspace"
    return config


@pytest.fixture(scope="module")
def unet_params():
    graphdef, params = model_fns.init_params(_conditional_config("hybrid", "ddim"), seed=3)

    def perturb(tree):  # random, non-zero output layers, so that classes differ
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.key(11), len(leaves))
        return jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(k, leaf.shape)
                                            for leaf, k in zip(leaves, keys)])

    return graphdef, jax.jit(perturb)(params)


def _ordinary_sample(config, graphdef, params, num, key, model_of):
    """Ordinary conditional sampling of class 2, sample i keyed as `generate` keys it."""
    dc = config.diffusion
    noise_keys, loop_key = generate.example_keys(key, jnp.arange(num))
    x_T = generate.initial_noise(noise_keys, (8, 8, 1))
    labels = jnp.full((num,), 2, jnp.int32)
    guided = generate.sampling_model_fn(graphdef, params, config, labels)
    schedule = diffusion.schedule_from_config(dc)
    return np.asarray(jax.jit(lambda x: chains.run_chain(
        generate.chain_method(config.sample), model_of(guided), schedule, x, loop_key,
        mean_type=dc.mean_type, var_type=dc.var_type,
        clip_denoised=config.sample.clip_denoised))(x_T))


@pytest.mark.parametrize("method", ["ancestral", "ddim", "dpm_solver", "unipc"])
def test_identical_classes_reduce_to_ordinary_guided_sampling(unet_params, method):
    graphdef, params = unet_params
    key = jax.random.key(5)
    config = _conditional_config("hybrid", method)
    hybrid = composed.sample(config, graphdef, params, 4, key)
    plain = _ordinary_sample(config, graphdef, params, 4, key, lambda guided: guided)
    np.testing.assert_allclose(hybrid, plain, atol=2e-5)
    # ... and the images `--mode=sample` draws for that seed, on whatever devices and batches.
    mesh = parallel.make_mesh(jax.devices()[:2])
    drawn = np.concatenate([s for s, _ in generate.batches(
        graphdef, params, config, mesh, 4, key, batch_size=2, labels=np.full(4, 2))])
    np.testing.assert_allclose(hybrid, drawn, atol=2e-5)
    # The anagram of one class is ordinary sampling of the flip-averaged guided model.
    config = _conditional_config("anagram", method)
    anagram = composed.sample(config, graphdef, params, 4, key)
    averaged = _ordinary_sample(config, graphdef, params, 4, key, lambda guided: (
        lambda x, t: 0.5 * (guided(x, t) + guided(x[:, ::-1], t)[:, ::-1])))
    np.testing.assert_allclose(anagram, averaged, atol=2e-5)
    # ... which is not the plain model's (the UNet is not flip-equivariant): the test can fail.
    assert float(np.abs(anagram - plain).max()) > 1e-3
    # Two different classes make a different image.
    config.sample.compose_labels = "2,0"
    assert float(np.abs(composed.sample(config, graphdef, params, 4, key) - anagram).max()) > 1e-3


def test_guidance_is_applied_to_each_class_before_composing(unet_params):
    graphdef, params = unet_params
    config = _conditional_config("hybrid", "ddim", guidance=3.0)
    config.sample.compose_labels = "1,3"
    x = jnp.asarray(_images(6, (2, 8, 8, 1)))
    t = jnp.asarray([9, 9])

    def labelled(x, t, labels):
        return generate.sampling_model_fn(graphdef, params, config, labels)(x, t)

    ones, threes = jnp.asarray([1, 1]), jnp.asarray([3, 3])
    out = composed.composed_denoise_fn(config, labelled, ones, threes)(x, t)
    model = model_fns.model_fn(graphdef, params, None)
    uncond = np.asarray(model(x, t))
    eps1 = uncond + 3.0 * (np.asarray(model_fns.model_fn(graphdef, params, ones)(x, t)) - uncond)
    eps3 = uncond + 3.0 * (np.asarray(model_fns.model_fn(graphdef, params, threes)(x, t)) - uncond)
    low = lambda e: np.asarray(composed.lowpass(jnp.asarray(e), 5, 1.0))
    np.testing.assert_allclose(np.asarray(out), low(eps1) + eps3 - low(eps3), atol=1e-4)


def test_sample_task_writes_the_image_and_its_views(unet_params, tmp_path, capsys):
    """`--mode=sample` with sample.task=anagram / hybrid on a saved conditional checkpoint."""
    config = _conditional_config("anagram", "dpm_solver")
    config.sample.compose_labels = "1,3"
    config.sample.num_samples = 3
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    _, state = train_step.create_train_state(config, mesh)
    state = state._replace(ema_params=unet_params[1])
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, 2, state, config)
    manager.wait_until_finished()

    modes.run_mode("sample", config, workdir)
    config.sample.task = "hybrid"
    modes.run_mode("sample", config, workdir)
    assert "wrote 3 anagram samples of classes 1,3 (step 2)" in capsys.readouterr().out
    for task, views in (("anagram", ["flipped"]), ("hybrid", ["lowpass", "highpass"])):
        (folder,) = glob.glob(os.path.join(workdir, "samples", f"{task}_step00000002_seed0_c1-3_*"))
        with np.load(os.path.join(folder, "samples.npz")) as saved:
            images = saved["images"].astype(np.float32) / 127.5 - 1
            assert images.shape == (3, 8, 8, 1)
            np.testing.assert_array_equal(saved["labels"], [1, 3])
            if task == "anagram":
                np.testing.assert_array_equal(saved["flipped"], saved["images"][:, ::-1])
            else:
                restored = (saved["lowpass"].astype(np.float32) + saved["highpass"]) / 127.5 - 2
                unclipped = (saved["highpass"] > 0) & (saved["highpass"] < 255)
                assert unclipped.mean() > 0.5
                np.testing.assert_allclose(restored[unclipped], images[unclipped],
                                           atol=2.5 / 127.5)
        picture = np.asarray(Image.open(os.path.join(folder, "composed.png")))
        # One row of three samples, each with its views: 3 · (1 + views) panels of 8 + 2 padding.
        panels = 3 * (1 + len(views))
        assert picture.shape[1] % (panels * 10 + 2) == 0
