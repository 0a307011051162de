"""FID / IS against closed forms and scipy; stats files; the fid_stats CLI end to end."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from ddpm_jax import fid_stats, inception, metrics


def _random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(dim, rank or 2 * dim))
    return factor @ factor.T / factor.shape[1]


# ------------------------------------------------------------------------------ sqrtm / FID


def test_sqrtm_psd_matches_scipy():
    matrix = _random_spd(np.random.default_rng(0), 50)
    ours = metrics.sqrtm_psd(matrix)
    np.testing.assert_allclose(ours, scipy.linalg.sqrtm(matrix).real, atol=1e-10)
    assert np.all(np.linalg.eigvalsh(ours) > 0)


def test_sqrtm_psd_of_singular_matrix_is_real_symmetric_root():
    matrix = _random_spd(np.random.default_rng(1), 40, rank=10)  # eigenvalues ~ 0 and -1e-17
    root = metrics.sqrtm_psd(matrix)
    assert root.dtype == np.float64
    np.testing.assert_allclose(root, root.T, atol=1e-14)
    np.testing.assert_allclose(root @ root, matrix, atol=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    for n, dim in ((500, 64), (100, 300)):  # full rank and rank-deficient (n < d) covariance
        features = np.abs(rng.normal(size=(n, dim)))
        mu, sigma = metrics.stats_from_features(features)
        assert abs(metrics.fid_from_stats(mu, sigma, mu, sigma)) <= 1e-6


def test_fid_closed_form_diagonal_covariances():
    """Diagonal S1, S2: FID = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.fid_from_stats(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_closed_form_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so the same closed form holds."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    a, b = rng.uniform(0.1, 3, 30), rng.uniform(0.1, 3, 30)
    m1, m2 = rng.normal(size=30), rng.normal(size=30)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = metrics.fid_from_stats(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-10)


def test_fid_general_case_matches_scipy_sqrtm_of_product():
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(rng, 60), _random_spd(rng, 60)
    m1, m2 = rng.normal(size=60), 0.5 * rng.normal(size=60)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert metrics.fid_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.fid_from_stats(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-9)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_from_features_and_streaming_accumulator_match_numpy():
    rng = np.random.default_rng(6)
    features = rng.normal(loc=3.0, size=(103, 12)).astype(np.float32)
    mu, sigma = metrics.stats_from_features(features)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False, ddof=1), rtol=1e-12)
    accumulator = metrics.FeatureStatsAccumulator(12)
    for start, stop in ((0, 1), (1, 40), (40, 40), (40, 97), (97, 103)):
        accumulator.update(features[start:stop])
    stream_mu, stream_sigma = accumulator.stats()
    assert accumulator.count == 103
    np.testing.assert_allclose(stream_mu, mu, rtol=1e-13)
    np.testing.assert_allclose(stream_sigma, sigma, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------ Inception Score


def test_inception_score_of_uniform_one_hot_predictions_is_number_of_classes():
    labels = np.arange(1000) % 10  # every split of 100 holds each class 10 times
    probs = np.eye(10)[labels]
    assert metrics.inception_score(probs, num_splits=10, from_logits=False) == pytest.approx((10.0, 0.0), abs=1e-12)
    logits = np.where(probs > 0, 0.0, -1e4)  # softmax is one-hot to within exp(-1e4)
    assert metrics.inception_score(logits, num_splits=10) == pytest.approx((10.0, 0.0), abs=1e-9)


def test_inception_score_of_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(7).normal(size=(1, 1008)), (50, 1))
    assert metrics.inception_score(logits, num_splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_two_class_closed_form():
    """Half the samples predict (a, 1-a), half (1-a, a): p(y) uniform, IS = 2 a^a (1-a)^(1-a)."""
    a = 0.8
    probs = np.array([[a, 1 - a], [1 - a, a]] * 50)
    expected = 2 * a**a * (1 - a) ** (1 - a)
    mean, std = metrics.inception_score(np.log(probs), num_splits=1)
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0.0


def test_inception_score_splits_are_contiguous_and_std_is_population_std():
    diverse = np.eye(10)[np.arange(100) % 10]  # split score 10
    collapsed = np.tile(np.eye(10)[:1], (100, 1))  # split score 1
    mean, std = metrics.inception_score(np.concatenate([diverse, collapsed]), num_splits=2, from_logits=False)
    assert mean == pytest.approx(5.5) and std == pytest.approx(4.5)


def test_inception_score_logits_path_matches_explicit_softmax():
    logits = np.random.default_rng(8).normal(scale=3, size=(60, 1008))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in np.split(probs, 3):
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean(np.sum(part * np.log(part / marginal), axis=1))))
    ours = metrics.inception_score(logits, num_splits=3)
    assert ours == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)


# ------------------------------------------------------------------------------ stats files


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
    path = tmp_path / "sub" / "stats"  # no .npz suffix: must be used verbatim
    metrics.save_stats(path, mu, sigma, {"num_images": 7, "source": "x"})
    loaded_mu, loaded_sigma, meta = metrics.load_stats(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert meta == {"num_images": 7, "source": "x"}
    assert int(np.load(path)["num_images"]) == 7


def test_load_stats_accepts_ttur_style_files(tmp_path):
    path = tmp_path / "fid_stats_cifar10_train.npz"
    np.savez(path, mu=np.ones(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    mu, sigma, meta = metrics.load_stats(path)
    assert mu.dtype == np.float64 and np.array_equal(sigma, np.eye(3)) and meta == {}
    np.savez(tmp_path / "bad.npz", m=np.ones(3))
    with pytest.raises(ValueError, match="mu"):
        metrics.load_stats(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------ fid_stats CLI


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A random-weight npz in the torch-fidelity layout (He-normal convs, identity BN)."""
    rng = np.random.default_rng(10)
    state = {}
    for name, shape in inception.expected_state_dict_shapes().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[name] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif name.endswith(("bn.weight", "bn.running_var")):
            state[name] = np.ones(shape, np.float32)
        else:
            state[name] = np.zeros(shape, np.float32)
    path = tmp_path_factory.mktemp("weights") / "random_inception.npz"
    np.savez(path, **state)
    return path


def _write_pngs(folder, images):
    for index, image in enumerate(images):
        subfolder = folder / ("a" if index % 2 else "b")
        subfolder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(subfolder / f"{index:03d}.png")


def _fails(argv):
    """fid_stats.main(argv) stops with exit status 2 (its one `error:` line is on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        fid_stats.main(argv)
    assert exit_info.value.code == 2


def test_fid_stats_cli(random_weights, tmp_path, capsys):
    images = np.random.default_rng(11).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    _write_pngs(folder, images)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "stats.npz"
    common = ["--inception_weights", str(random_weights), "--batch_size", "3", "--log_every", "1"]

    assert fid_stats.main(["--images", str(folder), "--out", str(out), *common]) == 0
    assert "3/5 images" in capsys.readouterr().err  # progress line after the first batch
    mu, sigma, meta = metrics.load_stats(out)
    assert meta["num_images"] == 5

    # Independent path: all five images in one unpadded batch, then numpy statistics.
    order = sorted(range(5), key=lambda i: ("a" if i % 2 else "b", i))  # files are read sorted
    params = inception.load_inception_params(random_weights)
    pool = np.asarray(jax.jit(inception.inception_apply)(params, images[order])["pool"], np.float64)
    np.testing.assert_allclose(mu, pool.mean(0), rtol=1e-5, atol=1e-6 * np.abs(pool).max())
    expected_sigma = np.cov(pool, rowvar=False)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=0, atol=1e-4 * np.abs(expected_sigma).max())

    # Existing output: refused without --overwrite, untouched.
    before = out.read_bytes()
    _fails(["--images", str(folder), "--out", str(out), *common])
    error = capsys.readouterr().err.strip()
    assert "exists" in error and "--overwrite" in error and "\n" not in error
    assert out.read_bytes() == before

    # npz input (same images, same order) with --overwrite gives the same statistics.
    npz = tmp_path / "images.npz"
    np.savez(npz, images=images[order])
    assert fid_stats.main(["--images", str(npz), "--out", str(out), "--overwrite", *common]) == 0
    npz_mu, npz_sigma, npz_meta = metrics.load_stats(out)
    assert npz_meta["num_images"] == 5 and npz_meta["source"] == str(npz)
    np.testing.assert_allclose(npz_mu, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(npz_sigma, sigma, rtol=0, atol=1e-6 * np.abs(sigma).max())


def test_fid_stats_cli_input_errors(random_weights, tmp_path, capsys):
    common = ["--inception_weights", str(random_weights), "--out", str(tmp_path / "out.npz")]

    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    _fails(["--images", str(empty), *common])
    error = capsys.readouterr().err.strip()
    assert "no .png/.jpg/.jpeg/.bmp/.webp/.tif/.tiff images found under" in error
    assert str(empty) in error and "\n" not in error

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000.png").write_bytes(b"definitely not a png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "001.png")
    _fails(["--images", str(broken), *common])
    error = capsys.readouterr().err.strip()
    assert "cannot read image" in error and "000.png" in error

    float_npz = tmp_path / "floats.npz"
    np.savez(float_npz, images=np.zeros((4, 8, 8, 3), np.float32))
    _fails(["--images", str(float_npz), *common])
    assert "expected uint8" in capsys.readouterr().err

    _fails(["--images", str(tmp_path / "missing"), *common])
    assert "missing does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()
