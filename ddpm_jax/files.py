"""Writing result files so that nothing is ever half-written: a crash or a full disk leaves
either the old file or the new one. Local paths are written to a temporary name and renamed;
remote ones (gs://, through etils.epath like Orbax and TFDS) are uploaded in one object write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` and then moves the finished file to `path`."""
    path = str(path)
    remote = "://" in path
    if remote:
        from etils import epath

        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = os.path.join(tempfile.mkdtemp(), os.path.basename(path))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=os.path.basename(path), suffix=".tmp")
        os.close(fd)
    try:
        write(tmp)
        if not remote:  # mkstemp makes 0600 files; give the result open()'s usual mode
            os.chmod(tmp, 0o666 & ~_UMASK)
        if remote:
            with open(tmp, "rb") as f:
                target.write_bytes(f.read())
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)
