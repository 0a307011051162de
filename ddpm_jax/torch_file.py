"""Reading a `torch.save` state dict of tensors into numpy arrays, without PyTorch.

A `.pth` file is a pickle whose tensors point at raw storages ("persistent ids"). Two layouts:

* zip (torch >= 1.6): `<name>/data.pkl` plus one member `<name>/data/<key>` per storage, and
  `<name>/byteorder` (absent in early files, which are little-endian);
* legacy (`_use_new_zipfile_serialization=False`, and every file before torch 1.6): pickles of
  the magic number, protocol version and system info, then the object, then the list of storage
  keys, then per storage an int64 element count and the raw elements.

The pickle is never executed as such: `find_class` resolves only the few names a state dict of
tensors uses and refuses every other global, so a hostile file cannot run code; tensors are
rebuilt from storage, offset, shape and stride here.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import IO, Any

import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells the layouts apart


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a JAX dependency

    return np.dtype(ml_dtypes.bfloat16)


# torch.<name>Storage -> element dtype (native byte order; see _storage_array for big-endian files)
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": None,  # resolved lazily by _bfloat16
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class TorchFileError(ValueError):
    """The file is not a readable state dict of tensors; the message names file and cause."""


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        self.dtype = _bfloat16() if dtype is None else dtype


class _Storage:
    __slots__ = ("key", "dtype", "numel", "array")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


class _Tensor:
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TorchFileError(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    """torch._utils._rebuild_tensor(_v2): the extra arguments (requires_grad, hooks, metadata)
    do not change the values."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor is built from {type(storage).__name__}, not a storage")
    (offset,) = _int_tuple((storage_offset,), "offset")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchFileError(f"tensor size {shape} and stride {strides} differ in length")
    return _Tensor(storage, offset, shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor here."""
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals of a tensor state dict; storages come from `storages`."""

    def __init__(self, file: IO[bytes], path: str, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"{self._path} refers to {module}.{name}, which a state dict of tensors does not "
            "use; refusing to unpickle it (only torch.save'd dicts of tensors are read)")

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds view metadata (None).
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage",
                                                                                   b"storage"):
            raise TorchFileError(f"{self._path} holds an unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileError(f"{self._path} uses storage views (torch < 0.4); re-save it "
                                 "with a current torch")
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise TorchFileError(f"{self._path} holds a malformed storage id {pid!r:.80}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype:
            raise TorchFileError(f"{self._path}: storage {key} is read as two dtypes")
        return storage


def _storage_array(data: bytes, storage: _Storage, little_endian: bool, path: str) -> np.ndarray:
    """The storage's elements as a 1-D array of native byte order."""
    itemsize = storage.dtype.itemsize
    if len(data) != storage.numel * itemsize:
        raise TorchFileError(f"{path}: storage {storage.key} has {len(data)} bytes, expected "
                             f"{storage.numel} x {itemsize}; the file is truncated or damaged")
    raw = np.frombuffer(data, dtype=np.dtype(f"u{itemsize}"))
    if little_endian != np.little_endian and itemsize > 1:
        raw = raw.byteswap()
    return raw.view(storage.dtype)


def _tensor_array(tensor: _Tensor, name: str, path: str) -> np.ndarray:
    storage = tensor.storage
    assert storage.array is not None
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, storage.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
    if last >= storage.numel:
        raise TorchFileError(f"{path}: tensor {name!r} (size {tensor.shape}, stride "
                             f"{tensor.stride}, offset {tensor.offset}) reaches beyond its "
                             f"storage of {storage.numel} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.array[tensor.offset:], shape=tensor.shape,
        strides=tuple(s * itemsize for s in tensor.stride), writeable=False)
    return np.array(view, order="C")  # a contiguous copy that owns its memory


def _unpickle(file: IO[bytes], path: str, storages: dict[str, _Storage]) -> Any:
    return _StateDictUnpickler(file, path, storages).load()


def _read_zip(path: str) -> tuple[Any, dict[str, _Storage]]:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(f"{path} is a zip archive but not a torch.save file (it has "
                                 f"{len(pickles)} '<name>/data.pkl' members, expected 1)")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            result = _unpickle(f, path, storages)
        names = set(archive.namelist())
        byteorder = b"little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").strip()
        if byteorder not in (b"little", b"big"):
            raise TorchFileError(f"{path} has byte order {byteorder!r}")
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise TorchFileError(f"{path} lacks {member}; the file is truncated or damaged")
            storage.array = _storage_array(archive.read(member), storage,
                                           byteorder == b"little", path)
    return result, storages


def _read_legacy(path: str) -> tuple[Any, dict[str, _Storage]]:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        if _unpickle(f, path, {}) != _LEGACY_MAGIC_NUMBER:
            raise TorchFileError(f"{path} is neither a zip archive nor a legacy torch.save file "
                                 "(wrong magic number)")
        if _unpickle(f, path, {}) != _LEGACY_PROTOCOL_VERSION:
            raise TorchFileError(f"{path} has an unknown torch.save protocol version")
        sys_info = _unpickle(f, path, {})
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) \
            else True
        result = _unpickle(f, path, storages)
        keys = _unpickle(f, path, {})
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise TorchFileError(f"{path}: the storage list does not match the tensors")
        for key in map(str, keys):
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise TorchFileError(f"{path} ends before storage {key}; it is truncated")
            (numel,) = struct.unpack("<q" if little_endian else ">q", header)
            if numel != storage.numel:
                raise TorchFileError(f"{path}: storage {key} holds {numel} elements, the tensors "
                                     f"expect {storage.numel}; the file is damaged")
            storage.array = _storage_array(f.read(numel * storage.dtype.itemsize), storage,
                                           little_endian, path)
    return result, storages


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict (name -> tensor), as numpy arrays.

    Dtypes are kept (bfloat16 via ml_dtypes); every array is a contiguous copy, whatever the
    tensor's strides and offset. Raises TorchFileError (a ValueError) naming the file for
    anything else: another pickled object, a damaged or truncated file, a non-tensor value.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        result, _ = (_read_zip if is_zip else _read_legacy)(path)
        if not isinstance(result, dict):
            raise TorchFileError(f"{path} holds a {type(result).__name__}, not a state dict")
        arrays = {}
        for name, value in result.items():
            if not isinstance(name, str) or not isinstance(value, _Tensor):
                raise TorchFileError(f"{path} is not a state dict of tensors: entry {name!r} "
                                     f"holds {type(value).__name__}, not a tensor")
            arrays[name] = _tensor_array(value, name, path)
        return arrays
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, struct.error, UnicodeDecodeError) as e:
        # Whatever a damaged or crafted pickle makes the stdlib or numpy raise.
        raise TorchFileError(f"cannot read {path} as a torch.save'd state dict "
                             f"({type(e).__name__}: {e}); it is truncated or not such a file") from e
