"""The FID Inception network (TF graph of 2015-12-05) as pure JAX functions over a params pytree.

This is the network behind TTUR's FID, OpenAI's Inception Score and TF-GAN's `run_inception`
(docs/original.md §5), in the PyTorch port used by pytorch-fid and torch-fidelity
(`FeatureExtractorInceptionV3`). It differs from torchvision's Inception-v3 in ways that matter:

* TF1 bilinear resize of the input to 299x299 (`align_corners=False`, no half-pixel centres);
* input scaling `(x - 128) / 128`;
* BatchNorm eps 1e-3 (inference statistics only; folded here into a per-channel scale and shift);
* the 3x3 average pools in the A, C and first E blocks exclude the padding from the count;
* the second E block (`Mixed_7c`) pools with max instead of average;
* 1008 output classes; `logits_unbiased` is `pool @ W` without the bias, as OpenAI's IS code
  computes it (`softmax/logits/MatMul`), and `logits` adds the bias (the graph's `logits:0`).

Design choice: no Flax module. `inception_apply(params, images)` is a pure function over a nested
dict of arrays, so it can be jitted or sharded like any function. The parameter names are
torch-fidelity's state-dict prefixes (e.g. `params["Mixed_5b"]["branch5x5_2"]["kernel"]`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import files, torch_file

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPS = 1e-3

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256_PREFIX = "6726825d"
DEFAULT_CACHE_DIR = Path("~/.cache/ddpm_jax")
WEIGHTS_CONFIG_HINT = (
    "--config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth "
    "(or --inception_weights for python -m ddpm_jax.fid_stats)"
)
_DOWNLOAD_TIMEOUT_SECONDS = 60

_PRECISION = jax.lax.Precision.HIGHEST
_BN_SUFFIXES = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Architecture table (shared by the forward pass and the state-dict validation)
# --------------------------------------------------------------------------------------------


class ConvSpec(NamedTuple):
    """A bias-free convolution followed by BatchNorm and ReLU (`BasicConv2d`)."""

    in_ch: int
    out_ch: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (rows, cols) zero padding


def _same(in_ch: int, out_ch: int, kh: int, kw: int) -> ConvSpec:
    """Stride-1 convolution padded to keep the spatial size (odd kernels)."""
    return ConvSpec(in_ch, out_ch, (kh, kw), 1, (kh // 2, kw // 2))


def _block_a(in_ch: int, pool_features: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(in_ch, 64, 1, 1),
        "branch5x5_1": _same(in_ch, 48, 1, 1),
        "branch5x5_2": _same(48, 64, 5, 5),
        "branch3x3dbl_1": _same(in_ch, 64, 1, 1),
        "branch3x3dbl_2": _same(64, 96, 3, 3),
        "branch3x3dbl_3": _same(96, 96, 3, 3),
        "branch_pool": _same(in_ch, pool_features, 1, 1),
    }


def _block_b(in_ch: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3": ConvSpec(in_ch, 384, (3, 3), 2),
        "branch3x3dbl_1": _same(in_ch, 64, 1, 1),
        "branch3x3dbl_2": _same(64, 96, 3, 3),
        "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), 2),
    }


def _block_c(in_ch: int, c7: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(in_ch, 192, 1, 1),
        "branch7x7_1": _same(in_ch, c7, 1, 1),
        "branch7x7_2": _same(c7, c7, 1, 7),
        "branch7x7_3": _same(c7, 192, 7, 1),
        "branch7x7dbl_1": _same(in_ch, c7, 1, 1),
        "branch7x7dbl_2": _same(c7, c7, 7, 1),
        "branch7x7dbl_3": _same(c7, c7, 1, 7),
        "branch7x7dbl_4": _same(c7, c7, 7, 1),
        "branch7x7dbl_5": _same(c7, 192, 1, 7),
        "branch_pool": _same(in_ch, 192, 1, 1),
    }


def _block_d(in_ch: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3_1": _same(in_ch, 192, 1, 1),
        "branch3x3_2": ConvSpec(192, 320, (3, 3), 2),
        "branch7x7x3_1": _same(in_ch, 192, 1, 1),
        "branch7x7x3_2": _same(192, 192, 1, 7),
        "branch7x7x3_3": _same(192, 192, 7, 1),
        "branch7x7x3_4": ConvSpec(192, 192, (3, 3), 2),
    }


def _block_e(in_ch: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(in_ch, 320, 1, 1),
        "branch3x3_1": _same(in_ch, 384, 1, 1),
        "branch3x3_2a": _same(384, 384, 1, 3),
        "branch3x3_2b": _same(384, 384, 3, 1),
        "branch3x3dbl_1": _same(in_ch, 448, 1, 1),
        "branch3x3dbl_2": _same(448, 384, 3, 3),
        "branch3x3dbl_3a": _same(384, 384, 1, 3),
        "branch3x3dbl_3b": _same(384, 384, 3, 1),
        "branch_pool": _same(in_ch, 192, 1, 1),
    }


STEM: dict[str, ConvSpec] = {
    "Conv2d_1a_3x3": ConvSpec(3, 32, (3, 3), 2),
    "Conv2d_2a_3x3": ConvSpec(32, 32, (3, 3)),
    "Conv2d_2b_3x3": _same(32, 64, 3, 3),
    "Conv2d_3b_1x1": _same(64, 80, 1, 1),
    "Conv2d_4a_3x3": ConvSpec(80, 192, (3, 3)),
}

# (name, block kind, conv specs); kinds "E_avg" / "E_max" name the pooling of the E blocks.
MIXED_BLOCKS: tuple[tuple[str, str, dict[str, ConvSpec]], ...] = (
    ("Mixed_5b", "A", _block_a(192, 32)),
    ("Mixed_5c", "A", _block_a(256, 64)),
    ("Mixed_5d", "A", _block_a(288, 64)),
    ("Mixed_6a", "B", _block_b(288)),
    ("Mixed_6b", "C", _block_c(768, 128)),
    ("Mixed_6c", "C", _block_c(768, 160)),
    ("Mixed_6d", "C", _block_c(768, 160)),
    ("Mixed_6e", "C", _block_c(768, 192)),
    ("Mixed_7a", "D", _block_d(768)),
    ("Mixed_7b", "E_avg", _block_e(1280)),
    ("Mixed_7c", "E_max", _block_e(2048)),
)


def conv_specs() -> dict[str, ConvSpec]:
    """All convolutions keyed by their dotted torch-fidelity prefix, e.g. `Mixed_5b.branch1x1`."""
    specs = dict(STEM)
    for block_name, _, block in MIXED_BLOCKS:
        specs.update({f"{block_name}.{name}": spec for name, spec in block.items()})
    return specs


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the torch state dict must hold (torch-fidelity names)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, spec in conv_specs().items():
        shapes[f"{prefix}.conv.weight"] = (spec.out_ch, spec.in_ch, *spec.kernel)
        for suffix in _BN_SUFFIXES:
            shapes[f"{prefix}.{suffix}"] = (spec.out_ch,)
    shapes["fc.weight"] = (NUM_CLASSES, NUM_FEATURES)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def _tf1_source_coordinates(
    in_size: int, out_size: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source indices and lerp weights of TF1 `resize_bilinear(align_corners=False)`.

    TF1 maps output pixel i to source coordinate `i * scale` with `scale = in / out` computed in
    float32 (not the half-pixel `(i + 0.5) * scale - 0.5` of TF2 / PyTorch).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    coords = np.arange(out_size, dtype=dtype) * np.asarray(scale, dtype=dtype)
    lower = np.floor(coords).astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1)
    lerp = coords - lower.astype(dtype)
    return lower, upper, lerp


def resize_bilinear_tf1(images: jax.Array, height: int, width: int) -> jax.Array:
    """TF1 bilinear resize, NHWC, `align_corners=False`, no half-pixel centres.

    out[i, j] = top + (bottom - top) * dy, with top/bottom the x-lerps of the two source rows,
    in the same operation order as TF1's `compute_lerp`. Computed in the dtype of `images`.
    """
    dtype = np.dtype(images.dtype)
    y_lo, y_hi, y_lerp = _tf1_source_coordinates(images.shape[1], height, dtype)
    x_lo, x_hi, x_lerp = _tf1_source_coordinates(images.shape[2], width, dtype)
    rows_top = images[:, y_lo]
    rows_bottom = images[:, y_hi]
    x_lerp = x_lerp[None, None, :, None]
    top = rows_top[:, :, x_lo] + (rows_top[:, :, x_hi] - rows_top[:, :, x_lo]) * x_lerp
    bottom = rows_bottom[:, :, x_lo] + (rows_bottom[:, :, x_hi] - rows_bottom[:, :, x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp[None, :, None, None]


def preprocess(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8-valued NHWC images (0..255, any size) -> 299x299 network input `(x - 128) / 128`."""
    x = jnp.asarray(images).astype(dtype)
    x = resize_bilinear_tf1(x, INPUT_SIZE, INPUT_SIZE)
    return (x - 128) / 128


# --------------------------------------------------------------------------------------------
# Layers and blocks
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(params: Mapping[str, jax.Array], spec: ConvSpec, x: jax.Array) -> jax.Array:
    """relu(BN(conv(x))) with BN folded: relu(conv(x) * scale + shift)."""
    pad_rows, pad_cols = spec.padding
    y = jax.lax.conv_general_dilated(
        x,
        params["kernel"],
        window_strides=(spec.stride, spec.stride),
        padding=((pad_rows, pad_rows), (pad_cols, pad_cols)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_PRECISION,
    )
    return jax.nn.relu(y * params["scale"] + params["shift"])


def _chain(params: Params, specs: Mapping[str, ConvSpec], names: tuple[str, ...], x: jax.Array):
    for name in names:
        x = _conv_bn_relu(params[name], specs[name], x)
    return x


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
    """3x3 max pool; padded positions are -inf so they never win (as in PyTorch / TF)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad
    )


def _avg_pool_exclude_padding(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, dividing by the number of real pixels in the window.

    This is TF's AvgPool ('SAME') and PyTorch's `count_include_pad=False`.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    zero = jnp.array(0, x.dtype)
    sums = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, zero, jax.lax.add, window, strides, pad)
    return sums / counts


def _block_a_apply(params: Params, specs: Mapping[str, ConvSpec], x: jax.Array) -> jax.Array:
    branches = [
        _chain(params, specs, ("branch1x1",), x),
        _chain(params, specs, ("branch5x5_1", "branch5x5_2"), x),
        _chain(params, specs, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), x),
        _chain(params, specs, ("branch_pool",), _avg_pool_exclude_padding(x)),
    ]
    return jnp.concatenate(branches, axis=-1)


def _block_b_apply(params: Params, specs: Mapping[str, ConvSpec], x: jax.Array) -> jax.Array:
    branches = [
        _chain(params, specs, ("branch3x3",), x),
        _chain(params, specs, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), x),
        _max_pool(x, stride=2, padding=0),
    ]
    return jnp.concatenate(branches, axis=-1)


def _block_c_apply(params: Params, specs: Mapping[str, ConvSpec], x: jax.Array) -> jax.Array:
    double = tuple(f"branch7x7dbl_{i}" for i in range(1, 6))
    branches = [
        _chain(params, specs, ("branch1x1",), x),
        _chain(params, specs, ("branch7x7_1", "branch7x7_2", "branch7x7_3"), x),
        _chain(params, specs, double, x),
        _chain(params, specs, ("branch_pool",), _avg_pool_exclude_padding(x)),
    ]
    return jnp.concatenate(branches, axis=-1)


def _block_d_apply(params: Params, specs: Mapping[str, ConvSpec], x: jax.Array) -> jax.Array:
    seven = tuple(f"branch7x7x3_{i}" for i in range(1, 5))
    branches = [
        _chain(params, specs, ("branch3x3_1", "branch3x3_2"), x),
        _chain(params, specs, seven, x),
        _max_pool(x, stride=2, padding=0),
    ]
    return jnp.concatenate(branches, axis=-1)


def _block_e_apply(
    params: Params, specs: Mapping[str, ConvSpec], x: jax.Array, max_pool_branch: bool
) -> jax.Array:
    branch3x3 = _chain(params, specs, ("branch3x3_1",), x)
    branch3x3dbl = _chain(params, specs, ("branch3x3dbl_1", "branch3x3dbl_2"), x)
    # The TF graph's last block max-pools here (a quirk of the 2015 graph, kept by pytorch-fid).
    pooled = _max_pool(x, stride=1, padding=1) if max_pool_branch else _avg_pool_exclude_padding(x)
    branches = [
        _chain(params, specs, ("branch1x1",), x),
        _chain(params, specs, ("branch3x3_2a",), branch3x3),
        _chain(params, specs, ("branch3x3_2b",), branch3x3),
        _chain(params, specs, ("branch3x3dbl_3a",), branch3x3dbl),
        _chain(params, specs, ("branch3x3dbl_3b",), branch3x3dbl),
        _chain(params, specs, ("branch_pool",), pooled),
    ]
    return jnp.concatenate(branches, axis=-1)


def _mixed_block_apply(kind: str, params: Params, specs: Mapping[str, ConvSpec], x: jax.Array):
    if kind == "A":
        return _block_a_apply(params, specs, x)
    if kind == "B":
        return _block_b_apply(params, specs, x)
    if kind == "C":
        return _block_c_apply(params, specs, x)
    if kind == "D":
        return _block_d_apply(params, specs, x)
    return _block_e_apply(params, specs, x, max_pool_branch=(kind == "E_max"))


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------


def inception_apply(params: Params, images: jax.Array, dtype: Any = None) -> dict[str, jax.Array]:
    """Run the FID Inception on uint8-valued NHWC RGB images (uint8 or float in [0, 255], any size).

    Args:
      params: pytree from `load_inception_params` / `state_dict_to_params`.
      images: [N, H, W, 3]; values are NOT quantised, so float samples `(x + 1) * 127.5` work
        as in the original repo's monitor (docs/original.md §5.1).
      dtype: compute dtype; defaults to the params' dtype. float64 needs `jax_enable_x64`.
        Static under `jax.jit` (use `static_argnames="dtype"`).

    Returns:
      dict with `pool` [N, 2048] (the graph's `pool_3`, used for FID), `logits_unbiased`
      [N, 1008] = pool @ W (OpenAI's IS), and `logits` [N, 1008] = pool @ W + b (`logits:0`).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {images.shape}")
    if dtype is None:
        dtype = params["fc"]["kernel"].dtype
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)

    x = preprocess(images, dtype)
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv_bn_relu(params[name], STEM[name], x)
    x = _max_pool(x, stride=2, padding=0)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        x = _conv_bn_relu(params[name], STEM[name], x)
    x = _max_pool(x, stride=2, padding=0)
    for block_name, kind, specs in MIXED_BLOCKS:
        x = _mixed_block_apply(kind, params[block_name], specs, x)

    pool = jnp.mean(x, axis=(1, 2))
    logits_unbiased = jnp.dot(pool, params["fc"]["kernel"], precision=_PRECISION)
    logits = logits_unbiased + params["fc"]["bias"]
    return {"pool": pool, "logits_unbiased": logits_unbiased, "logits": logits}


# --------------------------------------------------------------------------------------------
# Weights: torch state dict (torch-fidelity / pytorch-fid names) -> params pytree
# --------------------------------------------------------------------------------------------


def validate_state_dict(state_dict: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing, misshapen or unexpected tensor."""
    expected = expected_state_dict_shapes()
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"Inception state dict is missing tensor '{name}' (shape {shape})")
        actual = tuple(np.shape(state_dict[name]))
        if actual != shape:
            raise ValueError(f"Inception tensor '{name}' has shape {actual}, expected {shape}")
    for name in state_dict:
        if name not in expected and not name.endswith(".num_batches_tracked"):
            raise ValueError(f"Inception state dict has unexpected tensor '{name}'")


def _check_dtype_available(dtype: Any) -> None:
    if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError("float64 Inception params need jax_enable_x64 (e.g. `with jax.enable_x64(True):`)")


def state_dict_to_params(state_dict: Mapping[str, Any], dtype: Any = jnp.float32) -> Params:
    """Validate a torch-named state dict of arrays and convert it to the params pytree.

    Conv kernels OIHW -> HWIO. BatchNorm (inference) is folded in float64:
    scale = gamma / sqrt(running_var + 1e-3), shift = beta - running_mean * scale.
    The fc weight [1008, 2048] becomes kernel [2048, 1008].
    """
    validate_state_dict(state_dict)
    _check_dtype_available(dtype)

    def array(name: str) -> np.ndarray:
        return np.asarray(state_dict[name], dtype=np.float64)

    params: Params = {}
    for prefix in conv_specs():
        gamma, beta = array(f"{prefix}.bn.weight"), array(f"{prefix}.bn.bias")
        mean, var = array(f"{prefix}.bn.running_mean"), array(f"{prefix}.bn.running_var")
        scale = gamma / np.sqrt(var + BATCH_NORM_EPS)
        layer = {
            "kernel": jnp.asarray(array(f"{prefix}.conv.weight").transpose(2, 3, 1, 0), dtype),
            "scale": jnp.asarray(scale, dtype),
            "shift": jnp.asarray(beta - mean * scale, dtype),
        }
        node = params
        *parents, leaf = prefix.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = layer
    params["fc"] = {
        "kernel": jnp.asarray(array("fc.weight").T, dtype),
        "bias": jnp.asarray(array("fc.bias"), dtype),
    }
    return params


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_torch_weights(pth_path: str | os.PathLike, npz_path: str | os.PathLike) -> None:
    """Convert a torch state-dict file to an npz of the same tensors (read without torch)."""
    arrays = torch_file.read_state_dict(pth_path)
    validate_state_dict(arrays)
    files.save_npz(npz_path, **arrays)


def _download_weights(destination: Path) -> None:
    """Download the standard weights to `destination`, checking the sha256 prefix."""
    tmp = destination.with_name(destination.name + ".download")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(WEIGHTS_URL, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
        digest = _sha256(tmp)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise ValueError(f"sha256 {digest[:16]}... does not start with {WEIGHTS_SHA256_PREFIX}")
        os.replace(tmp, destination)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"Could not download the FID Inception weights from {WEIGHTS_URL} ({error}). "
            f"Download the file yourself and pass {WEIGHTS_CONFIG_HINT}"
        ) from error


def load_inception_params(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: Any = jnp.float32,
) -> Params:
    """Load the FID Inception weights as a params pytree.

    Args:
      path: None (use the cache, downloading the standard file on first use), a `.npz` of the
        torch-named tensors (loaded directly), or a torch state-dict file (`.pth`, read without
        torch by `torch_file`), converted once to `<cache_dir>/<stem>-<sha256[:12]>.npz` so
        later runs skip the conversion.
      cache_dir: defaults to `~/.cache/ddpm_jax`.
      dtype: params dtype (float64 needs `jax_enable_x64`).

    Raises:
      ValueError: the tensors do not match the FID Inception (message names the tensor).
      RuntimeError: the download failed (message says which config flag to pass instead).
    """
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    if path is None:
        npz_path = cache / Path(WEIGHTS_FILENAME).with_suffix(".npz").name
        if not npz_path.exists():
            pth_path = cache / WEIGHTS_FILENAME
            if not pth_path.exists():
                _download_weights(pth_path)
            convert_torch_weights(pth_path, npz_path)
            pth_path.unlink()
    else:
        source = Path(path).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {source}")
        if source.suffix == ".npz":
            npz_path = source
        else:
            npz_path = cache / f"{source.stem}-{_sha256(source)[:12]}.npz"
            if not npz_path.exists():
                convert_torch_weights(source, npz_path)
    if not zipfile.is_zipfile(npz_path):  # np.load would try it as a pickle and say so
        raise ValueError(f"{npz_path} is not an npz file (np.savez's zip of the Inception "
                         "tensors); pass the .pth or the .npz made from it")
    with np.load(npz_path, allow_pickle=False) as arrays:
        state_dict = {name: arrays[name] for name in arrays.files}
    return state_dict_to_params(state_dict, dtype)
