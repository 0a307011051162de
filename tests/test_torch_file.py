"""`ddpm_jax.torch_file` against torch itself, and the Inception weights loading without torch.

torch is a test-only reference here: it writes the files (both of its layouts) and its own
`torch.load` gives the expected tensors, which the torch-free reader must match bit for bit.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from ddpm_jax import inception, torch_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def _save(obj, path, layout: str) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=LAYOUTS[layout])


def _awkward_state_dict() -> dict[str, torch.Tensor]:
    """Every dtype a state dict may hold, with strides, offsets and shared storages."""
    generator = torch.Generator().manual_seed(0)
    base64 = torch.randn(3, 4, 5, dtype=torch.float64, generator=generator)
    ints = torch.randint(-2**40, 2**40, (10,), dtype=torch.int64, generator=generator)
    state = collections.OrderedDict()
    state.update(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict())
    state.update({
        "float32": torch.randn(2, 3, generator=generator),
        "float32_transposed": torch.randn(4, 3, generator=generator).t(),
        "float64_permuted_offset": base64.permute(2, 0, 1)[1:, :, 2:],
        "float64_same_storage_whole": base64,
        "int64_offset": ints[3:7],
        "int64_step": ints[::3],
        "int64_scalar": torch.tensor(-7, dtype=torch.int64),
        "float16_offset": torch.randn(9, dtype=torch.float16, generator=generator)[4:],
        "bfloat16_transposed": torch.randn(3, 2, generator=generator).to(torch.bfloat16).t(),
        "int32": torch.randint(-2**31, 2**31 - 1, (5,), dtype=torch.int32, generator=generator),
        "int16": torch.randint(-2**15, 2**15 - 1, (5,), dtype=torch.int16, generator=generator),
        "int8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=generator),
        "uint8": torch.randint(0, 255, (2, 2), dtype=torch.uint8, generator=generator),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "expanded": torch.randn(3, 1, generator=generator).expand(3, 4),  # stride 0
        "parameter": torch.nn.Parameter(torch.randn(2, generator=generator)),
    })
    return state


def _bits(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return str(array.dtype), array.shape, array.tobytes(order="C")


def _torch_bits(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    tensor = tensor.detach().contiguous()
    flat = tensor.reshape(-1)
    raw = flat.to(torch.uint8) if tensor.dtype == torch.bool else flat.view(torch.uint8)
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), raw.numpy().tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_matches_torch_load_bit_for_bit(layout, tmp_path):
    path = tmp_path / "awkward.pth"
    _save(_awkward_state_dict(), path, layout)
    expected = torch.load(path, map_location="cpu", weights_only=True)

    ours = torch_file.read_state_dict(path)

    assert list(ours) == list(expected)
    for name, tensor in expected.items():
        assert _bits(ours[name]) == _torch_bits(tensor), name
        assert ours[name].flags.c_contiguous and ours[name].flags.owndata, name


def test_reader_refuses_other_pickles_without_running_them(tmp_path):
    marker = tmp_path / "created_by_the_pickle"

    class Hostile:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for layout in LAYOUTS:
        path = tmp_path / f"hostile_{layout}.pth"
        _save({"weight": torch.ones(2), "payload": Hostile()}, path, layout)
        with pytest.raises(torch_file.TorchFileError, match=r"refers to (posix|os)\.mkdir"):
            torch_file.read_state_dict(path)
        assert not marker.exists()


def test_reader_refuses_what_is_not_a_state_dict_of_tensors(tmp_path):
    cases = {
        "list": ([torch.ones(2)], "holds a list, not a state dict"),
        "nested": ({"model": {"w": torch.ones(2)}}, "entry 'model' holds dict, not a tensor"),
        "number": ({"w": torch.ones(2), "epoch": 3}, "entry 'epoch' holds int, not a tensor"),
    }
    for name, (obj, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        _save(obj, path, "zip")
        with pytest.raises(torch_file.TorchFileError, match=message):
            torch_file.read_state_dict(path)

    good = tmp_path / "good.pth"
    _save({"w": torch.arange(1000.0)}, good, "zip")
    with zipfile.ZipFile(good) as archive:  # drop the storage member
        members = {n: archive.read(n) for n in archive.namelist() if "/data/" not in n}
    missing = tmp_path / "missing_storage.pth"
    with zipfile.ZipFile(missing, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    with pytest.raises(torch_file.TorchFileError, match=r"lacks .*data/0"):
        torch_file.read_state_dict(missing)

    for layout in LAYOUTS:
        path = tmp_path / f"truncated_{layout}.pth"
        _save({"w": torch.arange(1000.0)}, path, layout)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        with pytest.raises(torch_file.TorchFileError, match="truncated"):
            torch_file.read_state_dict(path)

    not_torch = tmp_path / "notes.pth"
    not_torch.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(torch_file.TorchFileError, match="wrong magic number"):
        torch_file.read_state_dict(not_torch)


# ---------------------------------------------------------------------- Inception weights


def _fake_inception_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors with the FID Inception's names and shapes, as `model.state_dict()` has
    them (plus BatchNorm's int64 `num_batches_tracked`); BN variances kept positive."""
    generator = torch.Generator().manual_seed(5)
    state = collections.OrderedDict()
    for name, shape in inception.expected_state_dict_shapes().items():
        value = torch.randn(shape, generator=generator)
        state[name] = value.abs() + 0.1 if name.endswith("running_var") else value
        if name.endswith("bn.running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(
                3, dtype=torch.int64)
    state["fc.weight"] = torch.randn(2048, 1008, generator=generator).t()  # non-contiguous
    return state


# Prepended to a script: `import torch` fails as if torch were not installed (a meta path
# finder, so "torch" never appears in sys.modules, which libraries such as scipy inspect).
_NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, _NoTorch())
""")

_WITHOUT_TORCH = _NO_TORCH + textwrap.dedent("""
    import hashlib, pathlib
    import jax, numpy as np
    from ddpm_jax import inception
    try:
        import torch
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("torch is still importable")

    explicit, downloaded, cache, out = map(pathlib.Path, sys.argv[1:])
    # --config.eval.inception_weights=<.pth> (what the offline error advises) ...
    from_path = inception.load_inception_params(str(explicit), cache)
    # ... and the default: download the standard file, convert it, cache the npz.
    inception.WEIGHTS_URL = downloaded.as_uri()
    inception.WEIGHTS_SHA256_PREFIX = hashlib.sha256(downloaded.read_bytes()).hexdigest()[:8]
    from_download = inception.load_inception_params(None, cache)
    leaves = {}
    for tag, params in (("path", from_path), ("download", from_download)):
        for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            leaves[tag + jax.tree_util.keystr(key)] = np.asarray(leaf)
    np.savez(out, **leaves)
""")


def test_eval_loads_inception_pth_without_torch(tmp_path):
    """What `--mode=eval` does with `eval.inception_weights` (a .pth, or '' for the download),
    in a Python where torch cannot be imported; the parameters equal torch's reading of the files.
    The explicit file uses torch's zip layout, the download its legacy one (older releases)."""
    state = _fake_inception_state_dict()
    explicit = tmp_path / "pt_inception-fake.pth"
    downloaded = tmp_path / "served" / inception.WEIGHTS_FILENAME
    downloaded.parent.mkdir()
    _save(state, explicit, "zip")
    _save(state, downloaded, "legacy")
    cache, out = tmp_path / "cache", tmp_path / "params.npz"

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(explicit), str(downloaded), str(cache), str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    digest = hashlib.sha256(explicit.read_bytes()).hexdigest()[:12]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"pt_inception-fake-{digest}.npz", "pt_inception-2015-12-05-6726825d.npz"])
    import jax

    for path in (explicit, downloaded):
        by_torch = torch.load(path, map_location="cpu", weights_only=True)
        expected = inception.state_dict_to_params({k: v.numpy() for k, v in by_torch.items()})
        flat = jax.tree_util.tree_flatten_with_path(expected)[0]
        with np.load(out) as got:
            tag = "path" if path == explicit else "download"
            assert len([k for k in got.files if k.startswith(tag + "[")]) == len(flat)
            for key, leaf in flat:
                np.testing.assert_array_equal(got[tag + jax.tree_util.keystr(key)],
                                              np.asarray(leaf), err_msg=str(key))


_READ_DIFFUSERS_WITHOUT_TORCH = _NO_TORCH + textwrap.dedent("""
    import hashlib, json, sys
    from ddpm_jax import convert

    _, state_dict, file = convert.read_diffusers_folder(sys.argv[1])
    print(json.dumps({key: [str(value.dtype), list(value.shape),
                            hashlib.sha256(value.tobytes()).hexdigest()]
                      for key, value in state_dict.items()}))
""")


def test_diffusers_bin_folder_is_read_without_torch(tmp_path):
    """A diffusers folder saved without safetensors (`diffusion_pytorch_model.bin`), read in a
    Python without torch: same tensors, bit for bit, as torch.load gives."""
    folder = tmp_path / "ddpm-bin"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    generator = torch.Generator().manual_seed(7)
    state = {
        "conv_in.weight": torch.randn(8, 3, 3, 3, generator=generator),
        "conv_in.bias": torch.randn(8, generator=generator).to(torch.float16),
        "time_embedding.linear_1.weight": torch.randn(4, 8, generator=generator).to(
            torch.bfloat16).t(),
    }
    torch.save(state, folder / "diffusion_pytorch_model.bin")

    result = subprocess.run(
        [sys.executable, "-c", _READ_DIFFUSERS_WITHOUT_TORCH, str(folder)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    import json

    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        dtype, shape, raw = _torch_bits(tensor)
        assert got[key] == [dtype, list(shape), hashlib.sha256(raw).hexdigest()], key
