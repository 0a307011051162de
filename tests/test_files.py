"""`files.atomic_write`: results get open()'s usual permissions, and a failed write leaves the
old file as it was with no temporary file behind."""

import os
import stat

import pytest

from ddpm_jax import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_have_the_mode_open_gives(tmp_path):
    reference = tmp_path / "by_open.txt"
    with open(reference, "w") as f:
        f.write("x")
    target = tmp_path / "grid.png"
    files.atomic_write(target, lambda tmp: open(tmp, "w").write("y"))
    assert target.read_text() == "y"
    # mkstemp's temporary files are 0600: a grid others on the machine cannot open.
    assert _mode(target) == _mode(reference), (oct(_mode(target)), oct(_mode(reference)))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, write)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["results.json"]
