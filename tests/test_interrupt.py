"""Ctrl-C on the command line (ddpm_jax/interrupt.py): real SIGINTs sent to real processes.

Training: the first Ctrl-C is answered at once, even in the middle of a compile or a long device
call, and the run saves a checkpoint after that call and exits 0; a second Ctrl-C ends it at
once with status 130. Every other phase and mode (start-up, sampling, evaluation) ends at once
with status 130 and one line, without a traceback or a crash.
"""

import glob
import os
import re
import signal
import time

import pytest

from ddpm_jax import workdir as workdirs
from helpers import Watched, tiny_config_file, trained_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "stopping after the current call"
REACTION_SECONDS = 3.0  # generous for a loaded machine; the calls below last far longer


def _interrupt(run: Watched) -> float:
    sent = time.monotonic()
    os.kill(run.process.pid, signal.SIGINT)
    return sent


def _exit_time(run: Watched, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while run.process.poll() is None:
        assert time.monotonic() < deadline, "did not exit"
        time.sleep(0.02)
    return time.monotonic()


def _lines_after(run: Watched, sent: float) -> list[str]:
    """stderr lines that arrived after `sent`, less INFO log lines already on their way."""
    return [line for arrived, line in run.lines["stderr"]
            if arrived >= sent and line.strip() and not re.match(r"I\d{4} ", line)]


def _ended_with_one_line(run: Watched, sent: float) -> str:
    run.finish()
    assert run.process.returncode == 130, run.text()[-3000:]  # not -11 (segfault), not 1
    assert "Traceback" not in run.text()
    [line] = _lines_after(run, sent)
    assert run.text().strip().splitlines()[-1] == line
    return line


@pytest.fixture
def train_args(tmp_path):
    return ["--config", tiny_config_file(tmp_path), "--workdir", str(tmp_path / "run"),
            "--config.training.num_steps=100000"]


def test_ctrl_c_during_start_up_is_one_line_and_status_130(train_args, tmp_path):
    run = Watched(train_args, REPO)
    try:
        run.wait_for("process 0 of 1")  # JAX is up; the data and the model are still to come
        sent = _interrupt(run)
        assert _ended_with_one_line(run, sent) == (
            "interrupted by SIGINT: stopped at once (exit status 130).")
        assert not os.path.exists(tmp_path / "run" / workdirs.LOCK_NAME)
    finally:
        run.kill()


def test_ctrl_c_during_the_first_call_is_answered_at_once_then_saves_and_exits_0(train_args,
                                                                                  tmp_path):
    run = Watched(train_args + ["--config.training.steps_per_call=5"], REPO)
    try:
        run.wait_for("Ctrl-C (or SIGTERM) stops after the current call")  # the loop begins
        sent = _interrupt(run)
        assert run.wait_for(PROMPT) - sent < REACTION_SECONDS  # while the call compiles
        assert run.finish() == 0, run.text()[-3000:]
        stdout = run.text("stdout")
        assert "Stopped by SIGINT at step 5;" in stdout, stdout
        assert os.path.isdir(tmp_path / "run" / "checkpoints" / "5")
        assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*tmp*"))
    finally:
        run.kill()


def test_second_ctrl_c_during_a_long_call_aborts_at_once(train_args, tmp_path):
    run = Watched(train_args + ["--config.training.steps_per_call=100"], REPO)
    try:
        run.wait_for("step 100/100000")  # the second call of 100 steps has begun
        first = _interrupt(run)
        assert run.wait_for(PROMPT) - first < REACTION_SECONDS
        second = _interrupt(run)
        assert _exit_time(run) - second < REACTION_SECONDS
        assert _ended_with_one_line(run, second) == (
            "SIGINT again: aborted at once; the next run resumes from the last saved checkpoint.")
        assert "Stopped by" not in run.text("stdout")  # it did not wait for the call to end
        assert not os.path.exists(tmp_path / "run" / workdirs.LOCK_NAME)
    finally:
        run.kill()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def test_ctrl_c_while_sampling_is_one_line_and_status_130(trained, tmp_path):
    run = Watched(["--config", tiny_config_file(tmp_path), "--workdir", trained, "--mode=sample",
                   "--config.sample.num_samples=1600", "--config.sample.batch_size=16"], REPO)
    try:
        run.wait_for("sampled 16 / 1600")
        sent = _interrupt(run)
        assert _exit_time(run) - sent < REACTION_SECONDS
        assert _ended_with_one_line(run, sent) == (
            "interrupted by SIGINT: stopped at once (exit status 130).")
        assert not glob.glob(os.path.join(trained, "samples", "ancestral_*"))
    finally:
        run.kill()


def test_ctrl_c_during_eval_is_one_line_and_status_130(trained, tmp_path):
    lock = os.path.join(trained, workdirs.EVAL_LOCK_NAME)
    run = Watched(["--config", tiny_config_file(tmp_path), "--workdir", trained, "--mode=eval",
                   "--config.eval.num_samples=0", "--config.eval.bpd=True",
                   "--config.eval.bpd_batch_size=16"], REPO)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(lock):  # validated; the evaluation itself begins
            assert run.process.poll() is None and time.monotonic() < deadline, run.text()[-3000:]
            time.sleep(0.05)
        time.sleep(2)
        sent = _interrupt(run)
        assert _exit_time(run) - sent < REACTION_SECONDS
        assert _ended_with_one_line(run, sent) == (
            "interrupted by SIGINT: stopped at once (exit status 130).")
        assert not os.path.exists(lock)
    finally:
        run.kill()
