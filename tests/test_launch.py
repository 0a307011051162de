"""launch/: the TPU VM script (syntax, shellcheck, the gcloud commands of --dry-run, the remote
shell commands they carry) and the Colab notebook (valid nbformat, its CPU cells run).

The expected gcloud command lines are the documented `gcloud compute tpus tpu-vm` syntax, not
output of the script; remote commands are executed here in a fake home directory.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "tpu_vm.sh"
NOTEBOOK = REPO / "launch" / "colab.ipynb"
SKIPPED_TAGS = {"colab-only", "network-only", "tpu-only"}
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture(scope="module")
def path_without_gcloud(tmp_path_factory) -> str:
    """A PATH with every executable of the current one except gcloud (it may be installed here)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            source = os.path.join(directory, name)
            target = bin_dir / name
            if name != "gcloud" and not target.exists() and os.access(source, os.X_OK):
                target.symlink_to(source)
    assert shutil.which("gcloud", path=str(bin_dir)) is None
    return str(bin_dir)


def launch(*args: str, path: str | None = None, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    run_env = {key: value for key, value in os.environ.items()
               if key not in ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "BUCKET", "WORKDIR",
                              "REPO_URL", "PROJECT", "CONFIG", "WORKER", "CHECKPOINT")}
    if path is not None:
        run_env["PATH"] = path
    run_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=run_env, timeout=60)


def dry_run(*args: str, path: str) -> list[list[str]]:
    """The commands `--dry-run` prints (comment lines dropped), split like a shell would."""
    result = launch("--dry-run", *args, path=path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def option(argv: list[str], name: str) -> str:
    """The value of `name VALUE` or `name=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def remote_command(argv: list[str]) -> str:
    assert argv[:5] == GCLOUD_TPU + ["ssh"], argv
    return option(argv, "--command")


# --- the script -----------------------------------------------------------------------------

def test_script_has_valid_bash_syntax():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_passes_shellcheck():
    from helpers import shellcheck_findings

    assert shellcheck_findings(SCRIPT) == ""


@pytest.mark.parametrize("command", ["create", "install", "train", "logs", "eval", "sample",
                                     "stop", "status", "ssh", "delete"])
def test_dry_run_prints_only_gcloud_tpu_commands_without_gcloud(command, path_without_gcloud):
    commands = dry_run("--bucket", "gs://b", command, path=path_without_gcloud)
    assert commands
    for argv in commands:
        assert argv[:4] == GCLOUD_TPU, argv
        assert option(argv, "--zone") == "europe-west4-a"
        assert "ddpm" in argv or "ddpm:ddpm_jax_src.tar.gz" in argv  # the default VM name


@pytest.mark.parametrize("flags, accelerator_type, version, zone, extra", [
    ([], "v3-8", "tpu-ubuntu2204-base", "europe-west4-a", None),
    (["--accelerator", "v4-8"], "v4-8", "tpu-ubuntu2204-base", "us-central2-b", None),
    (["--accelerator", "v5e-8"], "v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a", None),
    (["--accelerator", "v3-32", "--spot"], "v3-32", "tpu-ubuntu2204-base", "europe-west4-a",
     "--spot"),
    (["--accelerator", "v4-32", "--preemptible", "--zone", "us-central2-b", "--version",
      "tpu-vm-v4-base"], "v4-32", "tpu-vm-v4-base", "us-central2-b", "--preemptible"),
])
def test_create(flags, accelerator_type, version, zone, extra, path_without_gcloud):
    [argv] = dry_run("--name", "my-tpu", *flags, "create", path=path_without_gcloud)
    expected = GCLOUD_TPU + ["create", "my-tpu", "--accelerator-type", accelerator_type,
                             "--version", version]
    expected += [extra] if extra else []
    assert sorted(argv) == sorted(expected + ["--zone", zone])
    assert argv[:6] == GCLOUD_TPU + ["create", "my-tpu"]
    assert option(argv, "--accelerator-type") == accelerator_type
    assert option(argv, "--version") == version
    assert option(argv, "--zone") == zone


def test_project_and_delete(path_without_gcloud):
    [argv] = dry_run("--name", "n", "--zone", "z", "--project", "p", "delete",
                     path=path_without_gcloud)
    assert argv[:6] == GCLOUD_TPU + ["delete", "n"]
    assert "--quiet" in argv
    assert option(argv, "--zone") == "z" and option(argv, "--project") == "p"


def test_every_host_of_a_pod_slice_runs_the_same_command(path_without_gcloud):
    flags = ["--accelerator", "v4-32", "--bucket", "gs://b"]
    for command in ("install", "train", "eval", "sample", "stop"):
        for argv in dry_run(*flags, command, path=path_without_gcloud):
            if argv[4] in ("ssh", "scp"):
                assert "--worker=all" in argv, (command, argv)
    [logs] = dry_run(*flags, "logs", path=path_without_gcloud)
    assert "--worker=0" in logs
    [logs] = dry_run(*flags, "--worker", "3", "logs", "eval", path=path_without_gcloud)
    assert "--worker=3" in logs and remote_command(logs) == "tail -n 200 -F ~/eval.log"


def test_workdir_needs_a_gcs_bucket(path_without_gcloud):
    result = launch("--dry-run", "train", path=path_without_gcloud)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error:") and "--bucket" in result.stderr
    result = launch("--dry-run", "--bucket", "my-bucket", "train", path=path_without_gcloud)
    assert result.returncode == 2 and "gs://" in result.stderr
    result = launch("--dry-run", "--bucket", "gs://b", "frobnicate", path=path_without_gcloud)
    assert result.returncode == 2 and "frobnicate" in result.stderr


def test_install_copies_the_checkout_then_installs_jax_tpu(path_without_gcloud):
    scp, ssh = dry_run("--name", "n", "install", path=path_without_gcloud)
    assert scp[:5] == GCLOUD_TPU + ["scp"] and "--worker=all" in scp
    local_tarball, destination = [a for a in scp[5:] if not a.startswith("-")][:2]
    assert destination.startswith("n:")
    command = remote_command(ssh)
    assert f"tar -xzf ~/{destination[2:]}" in command
    assert "jax[tpu]" in shlex.split(command)
    assert "-e" in shlex.split(command)
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def test_install_from_repo_url(path_without_gcloud):
    commands = dry_run("--repo-url", "https://example.com/x/ddpm_jax.git", "--repo-ref", "v1",
                       "install", path=path_without_gcloud)
    assert len(commands) == 1  # nothing copied
    command = remote_command(commands[0])
    assert "git clone --depth 1 --branch v1 https://example.com/x/ddpm_jax.git ~/ddpm_jax" in command
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def fake_home(tmp_path: Path) -> Path:
    """A home with ~/ddpm_jax and a stub ~/ddpm_venv/bin/python that records how it was run."""
    home = tmp_path / "home"
    (home / "ddpm_jax").mkdir(parents=True)
    python = home / "ddpm_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > "$HOME/args"
        echo "$$" > "$HOME/python.pid"
        pwd > "$HOME/cwd"
        echo "training output"
        """))
    python.chmod(0o755)
    return home


def run_remote(command: str, home: Path) -> None:
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def wait_for(path: Path) -> str:
    for _ in range(100):
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_remote_command_starts_ddpm_jax_main_detached(mode, tmp_path, path_without_gcloud):
    extra = ["--config.training.num_steps=10", "--config.data.folder=my images/it's"]
    [ssh] = dry_run("--bucket", "gs://bkt/", "--config", "configs/cifar10.py", "--checkpoint",
                    "790000", mode, "--", *extra, path=path_without_gcloud)
    home = fake_home(tmp_path)
    run_remote(remote_command(ssh), home)

    args = wait_for(home / "args").splitlines()
    expected = ["-m", "ddpm_jax.main", f"--mode={mode}", "--config", "configs/cifar10.py",
                "--workdir", "gs://bkt/runs/cifar10"]
    expected += ["--checkpoint", "790000"] if mode == "eval" else []
    assert args == expected + extra
    assert wait_for(home / "cwd").strip() == str(home / "ddpm_jax")
    assert wait_for(home / f"{mode}.log").strip() == "training output"
    # The pid kept for `stop` is Python's own, not that of a subshell around it.
    assert wait_for(home / f"{mode}.pid").strip() == wait_for(home / "python.pid").strip()


def test_train_refuses_to_start_twice(tmp_path, path_without_gcloud):
    [ssh] = dry_run("--bucket", "gs://b", "train", path=path_without_gcloud)
    home = fake_home(tmp_path)
    running = subprocess.Popen(["sleep", "60"])
    try:
        (home / "train.pid").write_text(f"{running.pid}\n")
        result = subprocess.run(["bash", "-c", remote_command(ssh)], capture_output=True,
                                text=True, env={"HOME": str(home), "PATH": os.environ["PATH"]})
        assert result.returncode == 1 and "already running" in result.stderr
        time.sleep(0.3)
        assert not (home / "args").exists()
        assert (home / "train.pid").read_text().strip() == str(running.pid)
    finally:
        running.kill()
        running.wait()


def test_stop_sends_sigterm_to_the_training_process(tmp_path, path_without_gcloud):
    [ssh] = dry_run("stop", path=path_without_gcloud)
    home = tmp_path / "home"
    home.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (home / "train.pid").write_text(f"{sleeper.pid}\n")
        run_remote(remote_command(ssh), home)
        assert sleeper.wait(timeout=10) == -15  # SIGTERM: training checkpoints and exits
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_package_holds_the_checkout_without_git_or_ignored_files(tmp_path):
    output = tmp_path / "src.tar.gz"
    result = launch("package", "--output", str(output))
    assert result.returncode == 0, result.stderr
    with tarfile.open(output) as tar:
        names = {os.path.normpath(name) for name in tar.getnames()}
    for required in ("pyproject.toml", "ddpm_jax/__init__.py", "ddpm_jax/main.py",
                     "configs/cifar10.py", "configs/digits.py", "launch/tpu_vm.sh"):
        assert required in names
    assert not any(name.split("/")[0] in (".git", "runs") for name in names)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


# --- the notebook ---------------------------------------------------------------------------

def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_is_valid_and_its_code_compiles():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert json.loads(NOTEBOOK.read_text())["nbformat"] == 4
    for cell in code_cells(notebook):
        compile(cell.source, "<cell>", "exec")  # plain Python, no IPython magics
        assert not cell.outputs, "commit the notebook without outputs"


def test_notebook_marks_every_install_download_and_slow_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    markers = ("pip", "git clone", "snapshot_download", "ddpm_jax.convert", "ddpm_jax.load",
               "RELEASED")
    for cell in code_cells(notebook):
        if any(marker in cell.source for marker in markers):
            assert set(cell.metadata.get("tags", [])) & SKIPPED_TAGS, cell.source[:80]
    tags = [set(cell.metadata.get("tags", [])) for cell in code_cells(notebook)]
    assert {"colab-only"} in tags
    assert any("network-only" in t for t in tags) and any("tpu-only" in t for t in tags)


RUN_CELLS = """
import json, sys
import IPython.display
import nbformat

shown = []
IPython.display.display = lambda *objects: shown.extend(
    getattr(o, "filename", None) or type(o).__name__ for o in objects)
namespace = {"__name__": "__main__"}
for cell in nbformat.read(sys.argv[1], as_version=4).cells:
    if cell.cell_type == "code" and not set(cell.metadata.get("tags", [])) & set(sys.argv[2:]):
        exec(compile(cell.source, "<cell>", "exec"), namespace)
print("SHOWN=" + json.dumps(shown))
"""


def test_notebook_cpu_cells_train_and_show_samples(tmp_path):
    steps, timesteps, num_samples = 2, 20, 16
    env = dict(os.environ, JAX_PLATFORMS="cpu", DDPM_REPO_DIR=str(REPO),
               DDPM_NOTEBOOK_RUNS=str(tmp_path / "runs"), DDPM_NOTEBOOK_STEPS=str(steps),
               DDPM_NOTEBOOK_T=str(timesteps), DDPM_NOTEBOOK_CH="32",
               DDPM_NOTEBOOK_SAMPLES=str(num_samples))
    env.pop("XLA_FLAGS", None)  # one CPU device, like a Colab CPU runtime; compiles faster
    result = subprocess.run([sys.executable, "-c", RUN_CELLS, str(NOTEBOOK), *SKIPPED_TAGS],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    shown = json.loads(result.stdout.split("SHOWN=")[-1])

    workdir = tmp_path / "runs" / "digits"
    saved = json.loads((workdir / "checkpoints" / str(steps) / "config" / "metadata").read_text())
    assert saved["training"]["num_steps"] == steps
    assert saved["diffusion"]["num_timesteps"] == timesteps
    assert saved["model"]["ch"] == 32

    training_grid = workdir / "samples" / f"step_{steps:08d}.png"
    (sample_dir,) = (workdir / "samples").glob(f"ancestral_step{steps:08d}_seed0_*")
    assert str(training_grid) in shown
    assert str(sample_dir / "grid.png") in shown
    from helpers import read_grid

    with np.load(sample_dir / "samples.npz") as data:
        samples = data["images"]
    assert samples.shape == (num_samples, 8, 8, 1) and samples.dtype == np.uint8
    assert samples.std() > 0
    # Both grids: 16 grey digits as 4 x 4 tiles of 8 x 8; the sampling grid shows samples.npz.
    for png in (training_grid, sample_dir / "grid.png"):
        with Image.open(png) as image:
            assert image.mode == "L"
    assert read_grid(training_grid, 4, 4, 8).shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(read_grid(sample_dir / "grid.png", 4, 4, 8), samples)
