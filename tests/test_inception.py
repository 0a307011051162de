"""Parity of ddpm_jax.inception with torch-fidelity's FeatureExtractorInceptionV3 (offline).

torch-fidelity is a test-only extra: `pip install torch-fidelity --no-deps`. Its package
`__init__` imports torchvision (for its CLIP/VGG extractors); the Inception module itself does
not need it, so without torchvision we load that module without running the package `__init__`.

No pretrained weights are downloaded: torch-fidelity's network gets seeded random weights whose
BatchNorm statistics are calibrated on image-like inputs (so activations stay O(1) through all
layers), its state dict goes through our loader, and both networks see the same images.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import inception


def _torch_fidelity_inception_module() -> types.ModuleType:
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity missing: pip install torch-fidelity --no-deps"
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    previous = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module(name)
    finally:
        if previous is None:
            del sys.modules["torch_fidelity"]
        else:
            sys.modules["torch_fidelity"] = previous


TF_INCEPTION = _torch_fidelity_inception_module()
tf1_resize_reference = importlib.import_module(
    "torch_fidelity.interpolate_compat_tensorflow"
).interpolate_bilinear_2d_like_tensorflow1x


class _RandomInitInception(TF_INCEPTION.FeatureExtractorInceptionV3):
    """torch-fidelity's network, constructible from a placeholder file holding `None`."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if state_dict is None:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _image_like(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """uint8 NHWC: smooth colour gradients + blobs + pixel noise."""
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    slope = rng.uniform(-120, 120, size=(n, 1, 1, 3, 2))
    base = rng.uniform(60, 200, size=(n, 1, 1, 3))
    blobs = 60 * np.sin(rng.uniform(2, 9, (n, 1, 1, 3)) * x + rng.uniform(0, 6, (n, 1, 1, 3))) * np.cos(
        rng.uniform(2, 9, (n, 1, 1, 3)) * y
    )
    images = base + slope[..., 0] * (y - 0.5) + slope[..., 1] * (x - 0.5) + blobs
    images = images + rng.normal(0, 12, size=(n, height, width, 3))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class Reference(types.SimpleNamespace):
    model: torch.nn.Module  # float32, eval mode, random calibrated weights
    pth_path: object
    cache_dir: object
    square_batch: np.ndarray  # 4 x 32 x 32 x 3
    odd_batch: np.ndarray  # 1 x 64 x 48 x 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("inception")
    placeholder = root / "placeholder.pth"
    torch.save(None, placeholder)
    torch.manual_seed(0)
    model = _RandomInitInception(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=str(placeholder)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
                module.momentum = None  # cumulative average: running stats = calibration stats
                module.reset_running_stats()
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=generator))
        calibration = _image_like(np.random.default_rng(2), 6, 32, 32)
        model.train()
        model(_nchw(calibration))
        model.eval()
    pth_path = root / "random_inception.pth"
    torch.save(model.state_dict(), pth_path)
    rng = np.random.default_rng(3)
    return Reference(
        model=model,
        pth_path=pth_path,
        cache_dir=root / "cache",
        square_batch=_image_like(rng, 4, 32, 32),
        odd_batch=_image_like(rng, 1, 64, 48),
    )


def _torch_float64_outputs(model: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """float64 outputs of torch-fidelity, captured before its final cast to float32."""
    model64 = copy.deepcopy(model).double()
    # torch-fidelity's text_to_dtype maps "float64" to float32, so set the dtype directly.
    model64.feature_extractor_internal_dtype = torch.float64
    model64.features_list = ["2048", "logits"]  # makes forward call the fc module (hooked)
    captured = {}
    model64.AvgPool.register_forward_hook(lambda m, i, o: captured.update(pool=o.flatten(1)))
    model64.fc.register_forward_hook(lambda m, i, o: captured.update(fc_in=i[0], logits=o))
    with torch.no_grad():
        model64(_nchw(images))
        logits_unbiased = captured["fc_in"].mm(model64.fc.weight.T)
    assert captured["pool"].dtype == captured["logits"].dtype == torch.float64
    return {
        "pool": captured["pool"].numpy(),
        "logits": captured["logits"].numpy(),
        "logits_unbiased": logits_unbiased.numpy(),
    }


def _assert_close_relative_to_max(ours, theirs, tolerance: float, what: str) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, what
    scale = np.max(np.abs(theirs))
    error = np.max(np.abs(ours - theirs))
    assert error <= tolerance * scale, f"{what}: max error {error:.3e} vs max abs {scale:.3e}"


def test_activations_are_informative(reference):
    """Guards the parity tests: the random net must give O(1), image-dependent outputs."""
    with torch.no_grad():
        pool, _, logits = reference.model(_nchw(reference.square_batch))
    assert 0.05 < pool.abs().max() < 100 and (pool > 0).float().mean() > 0.2
    assert pool.std(dim=0).mean() > 1e-3 * pool.abs().mean()  # images differ
    assert logits.std(dim=0).mean() > 1e-3


def test_float64_parity_with_torch_fidelity(reference):
    with jax.enable_x64(True):
        params = inception.load_inception_params(reference.pth_path, reference.cache_dir, dtype=jnp.float64)
        apply = jax.jit(inception.inception_apply)
        for images in (reference.square_batch, reference.odd_batch):
            ours = {k: np.asarray(v) for k, v in apply(params, images).items()}
            assert ours["pool"].dtype == np.float64
            theirs = _torch_float64_outputs(reference.model, images)
            for key in ("pool", "logits", "logits_unbiased"):
                _assert_close_relative_to_max(ours[key], theirs[key], 1e-9, f"{key} {images.shape}")


def test_float32_parity_with_torch_fidelity(reference):
    params = inception.load_inception_params(reference.pth_path, reference.cache_dir)
    assert params["fc"]["kernel"].dtype == jnp.float32
    ours = jax.jit(inception.inception_apply)(params, reference.square_batch)
    with torch.no_grad():
        pool, logits_unbiased, logits = reference.model(_nchw(reference.square_batch))
    _assert_close_relative_to_max(ours["pool"], pool.numpy(), 1e-3, "pool")
    _assert_close_relative_to_max(ours["logits_unbiased"], logits_unbiased.numpy(), 1e-3, "logits_unbiased")
    _assert_close_relative_to_max(ours["logits"], logits.numpy(), 1e-3, "logits")
    # The bias must actually matter for the two logits to be distinguishable.
    assert np.max(np.abs(np.asarray(ours["logits"] - ours["logits_unbiased"]))) > 0.1


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (299, 299), (7, 300), (517, 401)])
def test_resize_matches_torch_fidelity_tf1_resize(size):
    images = np.random.default_rng(4).uniform(0, 255, size=(2, *size, 3))
    with jax.enable_x64(True):
        ours = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(images), 299, 299))
    theirs = tf1_resize_reference(
        torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(299, 299), align_corners=False
    ).numpy().transpose(0, 2, 3, 1)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


def test_resize_is_tf1_not_half_pixel():
    """On a linear ramp, TF1 samples source coordinate i * in/out, clamped at the last pixel."""
    height, width = 32, 20
    rows = np.arange(height, dtype=np.float64)[:, None]
    cols = np.arange(width, dtype=np.float64)[None, :]
    ramp = (3.0 * rows + 0.5 * cols)[None, :, :, None]
    with jax.enable_x64(True):
        out = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(ramp), 299, 299))[0, :, :, 0]
    i = np.arange(299, dtype=np.float64)
    expected = 3.0 * np.minimum(i * height / 299, height - 1)[:, None] + 0.5 * np.minimum(
        i * width / 299, width - 1
    )[None, :]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)  # scale is float32 in TF1
    assert out[0, 0] == 0.0 and abs(out[1, 0] - 3.0 * height / 299) < 1e-5  # no half-pixel offset


def test_weights_are_cached_as_npz(reference, tmp_path):
    cache = tmp_path / "cache"
    from_pth = inception.load_inception_params(reference.pth_path, cache)
    (npz,) = cache.glob("random_inception-*.npz")
    from_npz = inception.load_inception_params(npz, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(from_npz)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Kernel layout: torch OIHW -> HWIO; fc weight [1008, 2048] -> kernel [2048, 1008].
    state = reference.model.state_dict()
    np.testing.assert_array_equal(
        np.asarray(from_pth["Mixed_6b"]["branch7x7_2"]["kernel"]),
        state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(np.asarray(from_pth["fc"]["kernel"]), state["fc.weight"].numpy().T)


def _reference_state_dict(reference) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reference.model.state_dict().items()}


def test_state_dict_errors_name_the_tensor(reference, tmp_path):
    state = _reference_state_dict(reference)
    missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.bn\.running_var"):
        inception.state_dict_to_params(missing)
    misshapen = dict(state, **{"Mixed_6e.branch7x7dbl_3.conv.weight": np.zeros((192, 192, 7, 1), np.float32)})
    with pytest.raises(ValueError, match=r"Mixed_6e\.branch7x7dbl_3\.conv\.weight.*\(192, 192, 7, 1\)"):
        inception.state_dict_to_params(misshapen)
    extra = dict(state, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match=r"AuxLogits\.fc\.weight"):
        inception.state_dict_to_params(extra)
    # Through the torch-file path too; nothing may be cached for a bad file.
    bad_pth = tmp_path / "bad.pth"
    torch.save({k: torch.from_numpy(v) for k, v in missing.items()}, bad_pth)
    with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.bn\.running_var"):
        inception.load_inception_params(bad_pth, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_float64_params_need_x64(reference):
    with pytest.raises(ValueError, match="jax_enable_x64"):
        inception.state_dict_to_params(_reference_state_dict(reference), dtype=np.float64)


def test_download_failure_says_which_flag_to_pass(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "WEIGHTS_URL", (tmp_path / "does_not_exist.pth").as_uri())
    with pytest.raises(FileNotFoundError, match=r"--config\.eval\.inception_weights=/path/to/pt_inception"):
        inception.load_inception_params(None, tmp_path / "cache")
    wrong_file = tmp_path / "wrong.pth"
    wrong_file.write_bytes(b"not the inception weights")
    monkeypatch.setattr(inception, "WEIGHTS_URL", wrong_file.as_uri())
    with pytest.raises(FileNotFoundError, match=r"sha256.*--config\.eval\.inception_weights="):
        inception.load_inception_params(None, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_download_converts_and_caches(reference, monkeypatch, tmp_path):
    digest = hashlib.sha256(reference.pth_path.read_bytes()).hexdigest()
    monkeypatch.setattr(inception, "WEIGHTS_URL", reference.pth_path.as_uri())
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", digest[:8])
    cache = tmp_path / "cache"
    params = inception.load_inception_params(None, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["pt_inception-2015-12-05-6726825d.npz"]
    bias = reference.model.state_dict()["fc.bias"].numpy()
    np.testing.assert_array_equal(np.asarray(params["fc"]["bias"]), bias)
    # Second call: served from the cache, no download.
    monkeypatch.setattr(inception, "WEIGHTS_URL", (tmp_path / "gone.pth").as_uri())
    again = inception.load_inception_params(None, cache)
    np.testing.assert_array_equal(np.asarray(again["fc"]["bias"]), bias)
