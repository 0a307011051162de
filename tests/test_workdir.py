"""One training per workdir (ddpm_jax/workdir.py's lock), and workdirs that cannot be written.

The lock tests use real processes: a second training started by the command line while the
first runs, and a lock holder killed with SIGKILL.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ddpm_jax import generate, modes
from ddpm_jax import workdir as workdirs
from helpers import Watched, tiny_config, tiny_config_file, trained_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _hold_lock(workdir: str, name: str = workdirs.LOCK_NAME) -> subprocess.Popen:
    """A process that takes the workdir's lock and sleeps holding it."""
    code = ("import sys, time\nfrom ddpm_jax.workdir import WorkdirLock\n"
            f"WorkdirLock({workdir!r}, {name!r}).acquire()\nprint('locked', flush=True)\n"
            "time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_training_exits_2_naming_the_first_which_goes_on_while_sampling_works(tmp_path):
    config = tiny_config_file(tmp_path)
    workdir = str(tmp_path / "run")
    common = ["--config", config, "--workdir", workdir]
    first = Watched(common + ["--config.training.num_steps=100000"], REPO)
    try:
        # Checkpoint 2 is complete once checkpoint 4 starts: a save waits for the one before.
        first.wait_for("saving checkpoint 4 to")

        second = subprocess.run([sys.executable, "-m", "ddpm_jax.main", *common,
                                 "--config.training.num_steps=100000"], cwd=REPO,
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": REPO})
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        [line] = [x for x in _errors(second.stderr) if x.startswith("error")]
        assert line.startswith(f"error: --workdir={workdir} is in use by another training "
                               f"(pid {first.process.pid} on host {HOST}, started "), line
        assert line.endswith("); wait for it to finish or stop it, or use another --workdir.")

        # Sampling a workdir that is being trained is allowed.
        sample = subprocess.run([sys.executable, "-m", "ddpm_jax.main", *common, "--mode=sample",
                                 "--config.sample.num_samples=8", "--config.sample.batch_size=8"],
                                cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": REPO})
        assert sample.returncode == 0, sample.stderr[-3000:]
        assert "wrote 8 samples of step " in sample.stdout

        assert first.process.poll() is None  # the first training went on throughout
        os.kill(first.process.pid, signal.SIGINT)
        assert first.finish() == 0, first.text()[-3000:]
        assert "Stopped by SIGINT at step " in first.text("stdout")
        assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_NAME))
    finally:
        first.kill()


def test_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    holder = _hold_lock(workdir)
    holder.kill()  # SIGKILL: the holder cannot tidy up
    holder.wait()
    assert os.path.exists(os.path.join(workdir, workdirs.LOCK_NAME))

    config = tiny_config()
    config.training.num_steps = 2
    with caplog.at_level("WARNING"):
        modes.run_or_exit("train", config, workdir)
    warnings = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"took over the lock of pid {holder.pid} on host {HOST}, "
                                  "started "), warnings[0]
    assert warnings[0].endswith(", which is no longer running")
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_NAME))


@pytest.mark.parametrize("mode,name,what", [("train", workdirs.LOCK_NAME, "training"),
                                            ("eval", workdirs.EVAL_LOCK_NAME, "evaluation")])
def test_locked_workdir_is_one_error_line_and_left_as_it_was(mode, name, what, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    holder = _hold_lock(workdir, name)
    try:
        with open(os.path.join(workdir, name)) as f:
            before = f.read()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            modes.run_or_exit(mode, tiny_config(), workdir)
        assert exit_info.value.code == 2
        [line] = _errors(capsys.readouterr().err)
        assert line.startswith(f"error: --workdir={workdir} is in use by another {what} (pid "
                               f"{holder.pid} on host {HOST}, started "), line
        assert os.listdir(workdir) == [name]
        with open(os.path.join(workdir, name)) as f:
            assert f.read() == before
    finally:
        holder.kill()
        holder.wait()


def test_remote_lock_refuses_a_fresh_heartbeat_and_takes_over_a_stale_one(tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.setattr(workdirs, "is_remote", lambda path: True)  # gs:// through etils.epath
    workdir = str(tmp_path / "bucket" / "run")
    first = workdirs.WorkdirLock(workdir)
    first.acquire()
    try:
        with pytest.raises(workdirs.WorkdirInUseError, match=f"pid {os.getpid()} on host {HOST}"):
            workdirs.WorkdirLock(workdir).acquire()
    finally:
        first.release()
    assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_NAME))

    stale = {"pid": 4321, "host": "tpu-vm-7", "started": 0.0, "command": "train",
             "heartbeat": time.time() - workdirs.STALE_SECONDS - 5}
    with open(os.path.join(workdir, workdirs.LOCK_NAME), "w") as f:
        json.dump(stale, f)
    successor = workdirs.WorkdirLock(workdir)
    with caplog.at_level("WARNING"):
        successor.acquire()
    try:
        assert any("took over the lock of pid 4321 on host tpu-vm-7" in r.getMessage()
                   for r in caplog.records)
        with open(os.path.join(workdir, workdirs.LOCK_NAME)) as f:
            assert json.load(f)["pid"] == os.getpid()
    finally:
        successor.release()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture
def read_only(tmp_path):
    """A function that bind-mounts a directory read-only at a new path (unmounted afterwards)."""
    mounts = []

    def mount(source: str) -> str:
        target = str(tmp_path / f"read_only_{len(mounts)}")
        os.makedirs(target)
        result = subprocess.run(["mount", "--bind", "-o", "ro", source, target],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot bind-mount read-only here ({result.stderr.strip()}); run as "
                        "root with mount rights to test an unwritable workdir")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", target], check=True)


def _fails_with(mode, workdir, capsys, monkeypatch) -> str:
    def no_compute(*args, **kwargs):
        raise AssertionError("sampled before checking the workdir")

    monkeypatch.setattr(generate, "batches", no_compute)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        modes.run_or_exit(mode, tiny_config(), workdir)
    assert exit_info.value.code == 2
    [line] = _errors(capsys.readouterr().err)
    return line


def test_sampling_a_read_only_workdir_fails_before_sampling(trained, read_only, capsys,
                                                           monkeypatch):
    workdir = read_only(trained)
    assert os.path.isdir(os.path.join(workdir, "samples"))  # the training's sample grid
    assert _fails_with("sample", workdir, capsys, monkeypatch) == (
        f"error: --workdir={workdir} cannot be written ({workdir}/samples): read-only file "
        "system; point --workdir at a directory you can write.")


def test_training_into_a_read_only_directory_fails_before_anything_runs(tmp_path, read_only,
                                                                       capsys, monkeypatch):
    parent = read_only(str(tmp_path))
    workdir = os.path.join(parent, "run")
    assert _fails_with("train", workdir, capsys, monkeypatch) == (
        f"error: --workdir={workdir} cannot be written ({parent} is where it would be created): "
        "read-only file system; point --workdir at a directory you can write.")
    assert not os.path.exists(workdir)
