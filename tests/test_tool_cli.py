"""`python -m ddpm_jax.convert` and `python -m ddpm_jax.fid_stats` follow main's conventions:
each mistake is exit status 2 and exactly one `error:` line on stderr (no traceback, no usage
text), nothing is created or changed, and `--help` exits 0. Every row is also in the README's
"When something goes wrong" table."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from test_bad_input import _readme_table_rows, _snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits.py")
UNWRITABLE = "/sys/ddpm_jax_test_dir/run"  # sysfs refuses new directories, even to root


def _inputs(tmp):
    """The files the rows point at, below `tmp/inputs`."""
    inputs = tmp / "inputs"
    inputs.mkdir()
    (inputs / "broken_config.py").write_text("def get_config(:\n")
    (inputs / "not_a_model").mkdir()
    (inputs / "not_a_model" / "notes.txt").write_text("no config.json, no weights")
    (inputs / "a_file").write_text("not a directory")
    np.savez(inputs / "images.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(inputs / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))  # an npz without images
    np.savez(inputs / "no_arrays.npz")
    (inputs / "notes.npz").write_text("not an npz")
    (inputs / "notes.pth").write_text("not a torch file")
    (inputs / "existing_stats.npz").write_bytes(b"the earlier result")
    held = tmp / "held" / "checkpoints" / "2"
    held.mkdir(parents=True)
    (held / "state").write_text("a checkpoint")
    return inputs


# (id, arguments with {inputs}/{tmp} placeholders, watched output, expected part of the error)
CONVERT_ROWS = [
    ("missing_config_file", ["--from", "tf", "x", "--config", "configs/nope.py",
                             "--workdir", "{tmp}/run"], "{tmp}/run",
     "--config=configs/nope.py cannot be loaded ([Errno 2] No such file or directory"),
    ("unloadable_config_file", ["--from", "tf", "x", "--config", "{inputs}/broken_config.py",
                                "--workdir", "{tmp}/run"], "{tmp}/run",
     "broken_config.py cannot be loaded (SyntaxError: invalid syntax"),
    ("unknown_flag", ["--frm", "tf", "x", "--config", DIGITS, "--workdir", "{tmp}/run"],
     "{tmp}/run", "unknown flag --frm (did you mean --from?); see --help for the flags."),
    ("missing_required_flag", ["--from", "tf", "x", "--config", DIGITS], None,
     "--workdir is required, e.g. python -m ddpm_jax.convert --from tf"),
    ("no_source", ["--from", "tf", "--config", DIGITS, "--workdir", "{tmp}/run"], "{tmp}/run",
     "pass exactly one source, a TF checkpoint prefix or a diffusers folder (got none)"),
    ("unknown_source_format", ["--from", "onnx", "x", "--config", DIGITS,
                               "--workdir", "{tmp}/run"], "{tmp}/run",
     "flag --from=onnx: value should be one of <tf|diffusers>"),
    ("nonexistent_tf_checkpoint", ["--from", "tf", "{tmp}/typo/model.ckpt-790000", "--config",
                                   DIGITS, "--workdir", "{tmp}/run"], "{tmp}/run",
     "model.ckpt-790000.index does not exist); pass the prefix shared by its .index and"),
    ("diffusers_folder_without_model", ["--from", "diffusers", "{inputs}/not_a_model",
                                        "--config", DIGITS, "--workdir", "{tmp}/run"],
     "{tmp}/run", "lacks config.json plus one of diffusion_pytorch_model.safetensors"),
    ("workdir_with_checkpoints", ["--from", "tf", "x", "--config", DIGITS,
                                  "--workdir", "{tmp}/held"], "{tmp}/held",
     "already holds checkpoints; convert into a new --workdir (nothing was written)"),
    ("workdir_below_a_file", ["--from", "tf", "x", "--config", DIGITS,
                              "--workdir", "{inputs}/a_file/run"], "{inputs}/a_file",
     " is a file, not a directory; pass a path in a directory"),
    ("unwritable_workdir", ["--from", "tf", "x", "--config", DIGITS, "--workdir", UNWRITABLE],
     UNWRITABLE, "is not writable (Operation not permitted); pass a path you can write to"),
]

FID_STATS_ROWS = [
    ("unknown_flag", ["--imges", "{inputs}/images.npz", "--out", "{tmp}/out.npz"],
     "{tmp}/out.npz", "unknown flag --imges (did you mean --images?); see --help for the flags."),
    ("missing_required_flag", ["--images", "{inputs}/images.npz"], None,
     "--out is required, e.g. python -m ddpm_jax.fid_stats --images DIR_OR_NPZ --out stats.npz"),
    ("nonexistent_images", ["--images", "{tmp}/typo", "--out", "{tmp}/out.npz"],
     "{tmp}/out.npz", "typo does not exist; pass a folder of images or an npz"),
    ("npz_without_images", ["--images", "{inputs}/stats.npz", "--out", "{tmp}/out.npz"],
     "{tmp}/out.npz", "stats.npz['mu'] has dtype float64, expected uint8 images"),
    ("npz_without_arrays", ["--images", "{inputs}/no_arrays.npz", "--out", "{tmp}/out.npz"],
     "{tmp}/out.npz", "no_arrays.npz holds no arrays"),
    ("images_not_an_npz", ["--images", "{inputs}/notes.npz", "--out", "{tmp}/out.npz"],
     "{tmp}/out.npz", "is neither a folder nor an npz file (np.savez's zip of arrays)"),
    ("existing_output", ["--images", "{inputs}/images.npz", "--out",
                         "{inputs}/existing_stats.npz"], "{inputs}/existing_stats.npz",
     "existing_stats.npz exists; pass --overwrite to replace it"),
    ("output_is_a_directory", ["--images", "{inputs}/images.npz", "--out", "{inputs}"],
     "{inputs}", "is a directory; pass a file name such as"),
    ("unwritable_output", ["--images", "{inputs}/images.npz", "--out", UNWRITABLE + ".npz"],
     UNWRITABLE + ".npz", "is not writable (Operation not permitted); pass a path you can"),
    ("nonexistent_inception_weights", ["--images", "{inputs}/images.npz", "--out",
                                       "{tmp}/out.npz", "--inception_weights", "{tmp}/w.pth"],
     "{tmp}/out.npz", "w.pth does not exist; pass pt_inception-2015-12-05-6726825d.pth"),
    ("inception_weights_not_torch", ["--images", "{inputs}/images.npz", "--out",
                                     "{tmp}/out.npz", "--inception_weights",
                                     "{inputs}/notes.pth"], "{tmp}/out.npz",
     "as a torch.save'd state dict (UnpicklingError"),
    ("inception_weights_not_an_npz", ["--images", "{inputs}/images.npz", "--out",
                                      "{tmp}/out.npz", "--inception_weights",
                                      "{inputs}/notes.npz"], "{tmp}/out.npz",
     "notes.npz is not an npz file (np.savez's zip of the Inception tensors); pass the .pth"),
]


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


def _check_row(module, row, tmp_path):
    _, args, watched, expected = row
    if UNWRITABLE in " ".join(args) and not os.path.isdir("/sys"):
        pytest.skip("needs /sys")
    inputs = _inputs(tmp_path)
    fill = {"inputs": str(inputs), "tmp": str(tmp_path)}
    args = [arg.format(**fill) for arg in args]
    if "--cache_dir" not in args and module.endswith("fid_stats"):
        args += ["--cache_dir", str(tmp_path / "cache")]
    before = _snapshot(tmp_path)

    result = _run(module, args)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    assert result.stdout == ""
    assert _snapshot(tmp_path) == before  # nothing in the tree created, changed or removed
    if watched is not None and not watched.format(**fill).startswith(str(tmp_path)):
        assert not os.path.exists(watched.format(**fill))


@pytest.mark.parametrize("row", CONVERT_ROWS, ids=[row[0] for row in CONVERT_ROWS])
def test_convert_mistakes(row, tmp_path):
    _check_row("ddpm_jax.convert", row, tmp_path)


@pytest.mark.parametrize("row", FID_STATS_ROWS, ids=[row[0] for row in FID_STATS_ROWS])
def test_fid_stats_mistakes(row, tmp_path):
    _check_row("ddpm_jax.fid_stats", row, tmp_path)


@pytest.mark.parametrize("module, flag", [("ddpm_jax.convert", "--workdir"),
                                          ("ddpm_jax.fid_stats", "--inception_weights")])
def test_help_prints_the_flags_and_exits_0(module, flag):
    result = _run(module, ["--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert f"python -m {module}" in result.stdout and flag in result.stdout


def test_readme_table_lists_every_tool_row():
    table = "\n".join(_readme_table_rows()).replace("\\|", "|")
    for tool, rows in (("convert", CONVERT_ROWS), ("fid_stats", FID_STATS_ROWS)):
        for name, _, _, expected in rows:
            assert expected in table, f"{tool}: {name}"
