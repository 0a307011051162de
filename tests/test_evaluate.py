"""`--mode=eval` (ddpm_jax.evaluate) on 8 simulated devices.

References: the bound of the exact denoiser of a point mass, in closed form (float64 NumPy, from
the formulas of docs/original.md §2.6); single-device `calc_bpd_loop` calls with the documented keys;
an unsharded Inception and NumPy IS/FID formulas on the stored parts; an uninterrupted run, for
the resumed one. Data are `tfds.testing.mock_data` CIFAR10 (offline); Inception has seeded random
weights (no download).
"""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import tensorflow_datasets as tfds

from configs import default
from ddpm_jax import (checkpointing, diffusion, evaluate, generate, images, inception, modes,
                      parallel, train_step, validate)

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
    """He-initialised random FID Inception (BN identity): O(1), image-dependent outputs."""
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in inception.expected_state_dict_shapes().items():
        if name.endswith("conv.weight"):
            state[name] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = np.ones(shape)
        elif name == "fc.weight":  # peaky class predictions, so IS is well above 1
            state[name] = rng.normal(size=shape) * (100.0 / np.sqrt(shape[1]))
        elif name == "fc.bias":
            state[name] = rng.normal(size=shape)
        else:
            state[name] = np.zeros(shape)
    path = tmp_path_factory.mktemp("inception") / "random_inception.npz"
    np.savez(path, **{name: value.astype(np.float32) for name, value in state.items()})
    return str(path)


# ------------------------------------------------------------------------------ bits/dim


def _tanh_normal_cdf(x):
    """The original's approximate standard normal CDF (docs/original.md §2.6)."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _point_mass_bound(betas: np.ndarray, x0: np.ndarray, var_type: str) -> dict[str, np.ndarray]:
    """Bound (bits/dim) of the exact model of the data distribution δ(x0), from docs/original.md §2.6.

    The exact ε gives x̂0 = x0, so every model mean equals the posterior mean and the KL terms
    only see the variances; the decoder is the discretised Gaussian around x0.
    """
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    model_log_variance = {
        "fixedlarge": np.log(np.append(posterior_variance[1], betas[1:])),
        "fixedsmall": posterior_log_variance,
    }[var_type]
    kl = 0.5 * (-1.0 + model_log_variance - posterior_log_variance
                + np.exp(posterior_log_variance - model_log_variance)) / LN2
    inv_stdv = np.exp(-0.5 * model_log_variance[0])
    cdf_plus, cdf_min = _tanh_normal_cdf(inv_stdv / 255.0), _tanh_normal_cdf(-inv_stdv / 255.0)
    log_p = np.where(x0 < -0.999, np.log(cdf_plus),
                     np.where(x0 > 0.999, np.log(1.0 - cdf_min), np.log(cdf_plus - cdf_min)))
    decoder = -np.mean(log_p) / LN2
    last = alphas_cumprod[-1]
    prior = np.mean(0.5 * (-1.0 - np.log(1.0 - last) + (1.0 - last) + last * x0**2)) / LN2
    terms = np.concatenate([[decoder], kl[1:]])
    return {"terms": terms, "prior": prior, "decoder": decoder, "total": prior + terms.sum()}


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_bpd_of_exact_point_mass_model_matches_closed_form(mesh, var_type):
    num_timesteps = 100
    betas = np.linspace(1e-4, 0.02, num_timesteps)
    schedule = diffusion.make_schedule(betas)
    # One 4x4x3 image with both edge bins and interior levels; 20 copies, so drop_remainder
    # with batches of 8 keeps 16.
    levels = np.array([0, 255, 1, 254, 17, 128, 127, 200, 3, 90, 255, 0, 64, 33, 250, 5])
    image = np.stack([levels, levels[::-1], np.roll(levels, 3)], axis=-1).reshape(4, 4, 3)
    dataset = np.repeat(image[None].astype(np.uint8), 20, axis=0)
    x0 = image / 127.5 - 1.0

    def exact_eps(params, x_t, t):
        alpha_bar = params["alphas_cumprod"][t][:, None, None, None]
        return (x_t - jnp.sqrt(alpha_bar) * params["x0"]) / jnp.sqrt(1.0 - alpha_bar)

    params = {"alphas_cumprod": jnp.asarray(np.cumprod(1.0 - betas), jnp.float32),
              "x0": jnp.asarray(x0, jnp.float32)}
    bpd_fn = evaluate.make_bpd_fn(exact_eps, schedule, mesh, mean_type="eps", var_type=var_type)
    result = evaluate.evaluate_bpd(bpd_fn, params, dataset, 8, jax.random.key(0), mesh)

    expected = _point_mass_bound(betas, x0, var_type)
    assert result["total_bpd"].shape == (16,)
    np.testing.assert_allclose(result["terms_bpd"], expected["terms"], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(result["prior_bpd"], expected["prior"], rtol=1e-4)
    np.testing.assert_allclose(result["decoder_bpd"], expected["decoder"], rtol=1e-4)
    np.testing.assert_allclose(result["total_bpd"], expected["total"], rtol=1e-4)
    summary = evaluate.summarize_bpd(result)
    assert summary["total"] == pytest.approx(expected["total"], rel=1e-4)
    assert summary["kl_sum"] == pytest.approx(expected["terms"][1:].sum(), rel=1e-4, abs=1e-5)


def test_sharded_bpd_equals_per_device_calc_bpd_loop_and_resumes(mesh, tmp_path):
    """Device d of batch b evaluates its rows with key fold_in(fold_in(key, b), d)."""
    schedule = diffusion.make_schedule(np.linspace(1e-3, 0.2, 12))

    def scaled_identity(params, x_t, t):  # an inexact ε-model: the terms depend on the noise
        return params["w"] * x_t

    params = {"w": jnp.float32(0.7)}
    data = np.random.default_rng(1).integers(0, 256, size=(35, 4, 4, 1), dtype=np.uint8)
    key = jax.random.key(3)
    options = dict(mean_type="eps", var_type="fixedlarge", clip_denoised=True)
    bpd_fn = evaluate.make_bpd_fn(scaled_identity, schedule, mesh, **options)
    result = evaluate.evaluate_bpd(bpd_fn, params, data, 16, key, mesh, str(tmp_path), "test")

    single = jax.jit(lambda x, k: diffusion.calc_bpd_loop(
        lambda x_t, t: scaled_identity(params, x_t, t), schedule, x, k, **options))
    totals, terms = [], []
    for batch in range(2):  # 35 images → two batches of 16; 3 dropped
        for device in range(8):
            rows = data[batch * 16 + 2 * device: batch * 16 + 2 * device + 2]
            out = single(jnp.asarray(rows / 127.5 - 1.0, jnp.float32),
                         jax.random.fold_in(jax.random.fold_in(key, batch), device))
            totals.append(np.asarray(out["total_bpd"]))
            terms.append(np.asarray(out["terms_bpd"]))
    totals, terms = np.concatenate(totals), np.concatenate(terms)
    np.testing.assert_allclose(result["total_bpd"], totals, rtol=2e-5)
    np.testing.assert_allclose(result["terms_bpd"], terms.mean(axis=0), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(result["decoder_bpd"], terms[:, 0], rtol=2e-5)
    np.testing.assert_allclose(result["total_bpd"].mean(),
                               result["prior_bpd"].mean() + result["terms_bpd"].sum(), rtol=1e-6)

    def must_not_run(*args):
        raise AssertionError("a finished bpd batch was recomputed")

    again = evaluate.evaluate_bpd(must_not_run, params, data, 16, key, mesh, str(tmp_path), "test")
    for name, value in result.items():
        np.testing.assert_array_equal(again[name], value)


# ------------------------------------------------------------------------------ host helpers


def test_inception_input_scaling_quantisation_and_grey():
    samples = np.random.default_rng(2).uniform(-1.1, 1.1, size=(3, 4, 4, 1)).astype(np.float32)
    quantised = evaluate.inception_input(samples, quantize=True)
    assert quantised.shape == (3, 4, 4, 3) and quantised.dtype == np.float32
    # Rounded to the nearest of the 256 levels (x + 1)·127.5, clipped to 0..255, grey to RGB.
    levels = np.clip(np.round((samples.astype(np.float64) + 1.0) * 127.5), 0, 255)
    np.testing.assert_array_equal(quantised, np.repeat(levels, 3, -1))
    unquantised = evaluate.inception_input(samples, quantize=False)
    expected = np.repeat((np.clip(samples, -1, 1) + 1.0) * 127.5, 3, -1)
    np.testing.assert_allclose(unquantised, expected, rtol=1e-6)
    assert not np.array_equal(unquantised, quantised)
    as_uint8 = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)
    np.testing.assert_array_equal(evaluate.inception_input(as_uint8), as_uint8.astype(np.float32))


def test_parts_bookkeeping(tmp_path):
    assert evaluate.part_sizes(20, 8) == [8, 8, 4]
    assert evaluate.part_sizes(16, 8) == [8, 8]
    sizes = [8, 8, 4]
    outputs = {"pool": np.zeros((8, 2048)), "logits_unbiased": np.zeros((8, 1008))}
    evaluate.save_part(str(tmp_path), 0, np.zeros((8, 2, 2, 3), np.uint8), outputs)
    with open(evaluate.part_path(str(tmp_path), 1), "wb") as f:
        f.write(b"PK\x03\x04 truncated")  # a part cut short by a kill
    evaluate.save_part(str(tmp_path), 2, np.zeros((8, 2, 2, 3), np.uint8), outputs)
    assert evaluate.finished_parts(str(tmp_path), sizes) == 1
    evaluate.save_part(str(tmp_path), 1, np.zeros((4, 2, 2, 3), np.uint8),
                       {k: v[:4] for k, v in outputs.items()})
    assert evaluate.finished_parts(str(tmp_path), sizes) == 1  # too few samples for part 1
    evaluate.save_part(str(tmp_path), 1, np.zeros((8, 2, 2, 3), np.uint8), outputs)
    assert evaluate.finished_parts(str(tmp_path), sizes) == 3  # part 2 holds ≥ its 4
    assert [len(o["pool"]) for o in evaluate.load_part_outputs(str(tmp_path), sizes)] == sizes


def test_meta_mismatch_is_a_one_line_error(tmp_path):
    meta = {"batch_size": 8, "seed": 0, "num_devices": 8}
    evaluate.check_meta(str(tmp_path), meta)
    evaluate.check_meta(str(tmp_path), dict(meta))
    with pytest.raises(ValueError, match=r"batch_size: 8 then, 16 now.*delete that folder") as e:
        evaluate.check_meta(str(tmp_path), {**meta, "batch_size": 16})
    assert "\n" not in str(e.value)


def test_precomputed_reference_stats_are_read_not_computed(tmp_path):
    from ddpm_jax import metrics

    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    metrics.save_stats(tmp_path / "train.npz", mu, sigma, {"num_images": 50000})
    config = default.get_config()
    config.data.name = "no_such_dataset"  # loading it would fail
    got_mu, got_sigma, meta = evaluate.reference_stats(
        config, "train", str(tmp_path / "train.npz"), None, "unused", None)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert meta["num_images"] == 50000
    with pytest.raises(FileNotFoundError, match="eval"):
        evaluate.reference_stats(config, "train", str(tmp_path / "missing.npz"), None, "", None)


def test_nothing_to_evaluate_and_indivisible_batch_are_config_errors(mesh):
    config = default.get_config()
    config.eval.num_samples = 0
    with pytest.raises(ValueError, match="nothing to evaluate"):
        validate.validate(config, "eval", mesh)
    config.eval.num_samples, config.eval.batch_size = 100, 12
    with pytest.raises(ValueError, match="eval.batch_size=12"):
        validate.validate(config, "eval", mesh)


# ------------------------------------------------------------------------------ end to end

NUM_MOCK_EXAMPLES = 8


def _tiny_cifar10_config(inception_npz: str, stats_dir: str):
    config = default.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 10
    config.diffusion.beta_end = 0.2
    config.eval.num_samples = 12  # parts of 8 and 4
    config.eval.batch_size = 8
    config.eval.is_splits = 2
    config.eval.inception_weights = inception_npz
    config.eval.stats_dir = stats_dir
    config.eval.bpd = True
    config.eval.bpd_train = True
    config.eval.bpd_batch_size = 8
    return config


def _write_checkpoint(config, workdir: str, mesh):
    """A tiny random model whose EMA weights are perturbed, so its samples are not all alike."""
    graphdef, state = train_step.create_train_state(config, mesh)

    def perturb(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        return jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(k, leaf.shape)
                                            for leaf, k in zip(leaves, keys)])

    state = state._replace(ema_params=jax.jit(perturb)(state.ema_params))
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, 5, state, config)
    manager.wait_until_finished()
    return graphdef, state.ema_params


def _mock_split_images(split: str) -> np.ndarray:
    builder = tfds.builder("cifar10")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return np.stack([example["image"] for example in tfds.as_numpy(ds)])


def _fid_numpy(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """|m_a - m_b|² + Tr Σa + Tr Σb − 2 Tr (Σa Σb)^½ for few samples (n ≪ d).

    With centred features A, B: Σa Σb = Aᵀ (A Bᵀ B) / ((na-1)(nb-1)) has the non-zero
    eigenvalues of the small PSD matrix (A Bᵀ)(A Bᵀ)ᵀ / ((na-1)(nb-1)).
    """
    a = features_a - features_a.mean(0)
    b = features_b - features_b.mean(0)
    cross = a @ b.T
    small = cross @ cross.T / ((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    mean_term = ((features_a.mean(0) - features_b.mean(0)) ** 2).sum()
    traces = (a**2).sum() / (len(a) - 1) + (b**2).sum() / (len(b) - 1)
    return float(mean_term + traces - 2 * trace_sqrt)


def _inception_score_numpy(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """OpenAI's inception_score.py: contiguous parts [i N // splits, (i + 1) N // splits)."""
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(splits):
        p = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _scalar_tags(workdir: str) -> set[str]:
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_eval_end_to_end_on_mock_cifar10_resumes_after_a_kill(mesh, inception_npz, tmp_path,
                                                              monkeypatch):
    config = _tiny_cifar10_config(inception_npz, str(tmp_path / "fid_stats"))
    workdir = str(tmp_path / "workdir")
    parts_dir = os.path.join(workdir, "eval", "5")
    graphdef, ema_params = _write_checkpoint(config, workdir, mesh)
    save_part, batches = evaluate.save_part, generate.batches
    first_calls = []

    def dies_at_part_1(out_dir, part, *args):
        if part == 1:
            raise KeyboardInterrupt("killed while writing part 1")
        save_part(out_dir, part, *args)

    def recording_generate(*args, **kwargs):
        first_calls.append(kwargs.get("first_call", 0))
        return batches(*args, **kwargs)

    monkeypatch.setattr(generate, "batches", recording_generate)
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        # An eval killed while writing its second part ...
        monkeypatch.setattr(evaluate, "save_part", dies_at_part_1)
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_checkpoint(config, workdir)
        monkeypatch.setattr(evaluate, "save_part", save_part)
        assert not os.path.exists(evaluate.part_path(parts_dir, 1))
        before = os.stat(evaluate.part_path(parts_dir, 0))

        # ... restarted with the command-line entry point: it makes part 1 only.
        modes.run_mode("eval", config, workdir)
        with open(os.path.join(workdir, "eval", "5.json")) as f:
            results = json.load(f)

        # The reference stats are now cached: no Inception (params=None) is needed for them.
        stats_files = sorted(glob.glob(str(tmp_path / "fid_stats" / "*.npz")))
        fingerprint = results["reference"]["train"]["inception"]
        mu, _, meta = evaluate.reference_stats(config, "train", "", None, fingerprint, mesh)
        assert meta["source"] in stats_files and meta["num_images"] == NUM_MOCK_EXAMPLES
        train_images = _mock_split_images("train")

    assert first_calls == [0, 1]
    after = os.stat(evaluate.part_path(parts_dir, 0))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # The parts hold what an uninterrupted generation with the eval key makes.
    parts = [np.load(evaluate.part_path(parts_dir, p)) for p in range(2)]
    samples = np.concatenate([p["images"] for p in parts])
    key = jax.random.fold_in(jax.random.key(config.eval.seed), evaluate.SAMPLE_KEY_TAG)
    uninterrupted = np.concatenate([s for s, _ in batches(
        graphdef, ema_params, config, mesh, 12, key, batch_size=8)])
    np.testing.assert_array_equal(samples, images.to_uint8(uninterrupted))
    assert samples.shape == (12, 32, 32, 3) and len({s.tobytes() for s in samples}) == 12

    # Every metric is there; the reference stats are keyed by what they cover.
    assert results["step"] == 5 and results["num_samples"] == 12
    assert {"inception_score", "inception_score_std", "inception_score_monitor", "fid_train",
            "fid_test", "bpd", "protocol"} <= set(results)
    names = [os.path.basename(p) for p in stats_files]
    assert len(names) == 2 and all(n.startswith("cifar10-") and "-8-32px-3ch-" in n for n in names)
    assert {"eval/inception_score", "eval/fid_train", "eval/fid_test",
            "eval/bpd_test", "eval/bpd_train"} <= _scalar_tags(workdir)

    # Scores against an unsharded Inception and NumPy formulas on the stored samples and the data.
    params = inception.load_inception_params(inception_npz)
    batch = np.concatenate([samples, train_images]).astype(np.float32)
    out = jax.jit(inception.inception_apply)(params, batch)
    pool, logits = np.asarray(out["pool"], np.float64), np.asarray(out["logits_unbiased"])
    stored_pool = np.concatenate([p["pool"] for p in parts])
    np.testing.assert_allclose(stored_pool, pool[:12], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mu, pool[12:].mean(0), rtol=1e-4, atol=1e-5)
    assert results["fid_train"] == pytest.approx(_fid_numpy(pool[:12], pool[12:]), rel=1e-3)
    is_mean, is_std = _inception_score_numpy(logits[:12], 2)
    assert results["inception_score"] == pytest.approx(is_mean, rel=1e-3)
    assert results["inception_score_std"] == pytest.approx(is_std, rel=1e-2, abs=1e-4)
    assert results["inception_score"] > 1.2  # far from the trivial 1

    # Bits/dim on the tiny model: finite, and the terms sum to the total.
    for split in ("test", "train"):
        summary = results["bpd"][split]
        assert summary["num_images"] == NUM_MOCK_EXAMPLES
        assert all(math.isfinite(summary[k]) for k in ("total", "prior", "decoder", "kl_sum"))
        with np.load(os.path.join(workdir, "eval", f"5_bpd_{split}.npz")) as saved:
            terms = saved["terms_bpd"]
            assert terms.shape == (10,)
            assert summary["decoder"] == pytest.approx(terms[0], rel=1e-6)
            assert summary["total"] == pytest.approx(
                summary["prior"] + summary["decoder"] + summary["kl_sum"], rel=1e-6)
            assert np.mean(saved["total_bpd"]) == pytest.approx(
                np.mean(saved["prior_bpd"]) + terms.sum(), rel=1e-6)
