"""End to end on 8 simulated devices: train → checkpoint → resume → sample, and exact resumes
after a clean stop, SIGTERM and kill -9."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, modes, train_step
from helpers import Watched, config_flags, override, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_state(workdir, config, step=None):
    manager = checkpointing.make_manager(workdir, read_only=True)
    _, abstract = train_step.abstract_train_state(config)
    state, restored_step = checkpointing.restore(manager, abstract, config, step=step)
    return jax.device_get(state), restored_step


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _event_tags(workdir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags.get("tensors", [])) | set(tags.get("scalars", [])) | set(tags.get("images", []))


def test_mock_cifar10_train_resume_sample(tmp_path):
    import tensorflow_datasets as tfds

    config = tiny_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.model.attn_resolutions = (16,)
    config.training.num_steps = 4
    config.training.sample_every = 4
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=64):
        modes.run_mode("train", config, workdir)
        assert sorted(int(os.path.basename(p)) for p in
                      glob.glob(os.path.join(workdir, "checkpoints", "*"))) == [2, 4]
        config.training.num_steps = 6
        modes.run_mode("train", config, workdir)
    state, step = _final_state(workdir, config)
    assert step == 6 and int(state.step) == 6

    tags = _event_tags(workdir)
    assert {"loss", "grad_norm", "learning_rate", "param_norm", "loss_q0", "samples"} <= tags
    from helpers import read_grid

    # The 16 grid samples as 4 x 4 tiles of 32 x 32 RGB, each a picture (not a constant).
    tiles = read_grid(os.path.join(workdir, "samples", "step_00000004.png"), 4, 4, 32)
    assert tiles.shape == (16, 32, 32, 3) and tiles.reshape(16, -1).std(axis=1).min() > 0

    modes.run_mode("sample", config, workdir)
    (out_dir,) = glob.glob(os.path.join(workdir, "samples", "ancestral_step00000006_seed0_*"))
    samples = np.load(os.path.join(out_dir, "samples.npz"))["images"]
    assert samples.shape == (16, 32, 32, 3) and samples.dtype == np.uint8
    assert samples.std() > 10  # not a constant image
    assert os.path.getsize(os.path.join(out_dir, "progress.gif")) > 0
    np.testing.assert_array_equal(read_grid(os.path.join(out_dir, "grid.png"), 4, 4, 32), samples)
    # T = 20 with x̂0 kept every 5 steps: a strip of 4 columns for each of the first 8 images, whose
    # last column (x̂0 at t = 0, the final step's mean) is the sample itself, to a level of rounding.
    strip = read_grid(os.path.join(out_dir, "progress.png"), 8, 4, 32).reshape(8, 4, 32, 32, 3)
    assert np.abs(strip[:, -1].astype(int) - samples[:8]).max() <= 1
    assert np.abs(strip[:, 0].astype(int) - samples[:8]).max() > 10


def test_resume_continues_exactly(tmp_path):
    config = tiny_config()
    config.data.random_flip = True
    config.model.dropout = 0.1  # dropout keys are functions of the step too
    config.training.num_steps = 4
    modes.run_mode("train", config, str(tmp_path / "straight"))
    config.training.num_steps = 2
    modes.run_mode("train", config, str(tmp_path / "resumed"))
    config.training.num_steps = 4
    modes.run_mode("train", config, str(tmp_path / "resumed"))
    straight, _ = _final_state(str(tmp_path / "straight"), config)
    resumed, step = _final_state(str(tmp_path / "resumed"), config)
    assert step == 4
    _assert_same_state(straight, resumed)


# ---------------------------------------------------------------------------------------------
# The command line, stopped by signals.

# configs/digits.py shrunk for the command line and for reading what it wrote.
CLI_OVERRIDES = {
    "model.ch": 32, "model.num_res_blocks": 1, "model.dropout": 0.0,
    "diffusion.num_timesteps": 20, "training.batch_size": 16, "training.steps_per_call": 1,
    "training.log_every": 1, "training.sample_every": 0, "training.keep_checkpoints": 10,
}


def _cli(workdir, num_steps, checkpoint_every):
    return [sys.executable, "-m", "ddpm_jax.main", "--config", os.path.join(REPO, "configs/digits.py"),
            "--workdir", workdir, f"--config.training.num_steps={num_steps}",
            f"--config.training.checkpoint_every={checkpoint_every}", *config_flags(CLI_OVERRIDES)]


def _cli_config(num_steps, checkpoint_every):
    from configs import digits

    return override(digits.get_config(), {**CLI_OVERRIDES, "training.num_steps": num_steps,
                                          "training.checkpoint_every": checkpoint_every})


def _assert_same_state(a, b):
    """params, EMA and optimizer state equal to float32 rounding."""
    assert _max_diff(a.params, b.params) <= 1e-6
    assert _max_diff(a.ema_params, b.ema_params) <= 1e-6
    assert _max_diff(a.opt_state, b.opt_state) <= 1e-6


def _assert_resumes_exactly(workdir, checkpoint_every, resumed_from, uninterrupted):
    """The command line run again to step 12 resumes from `resumed_from` and ends in the state of
    the uninterrupted run."""
    result = subprocess.run(_cli(workdir, 12, checkpoint_every), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {resumed_from}" in result.stderr
    resumed, step = _final_state(workdir, _cli_config(12, checkpoint_every))
    assert step == 12
    _assert_same_state(resumed, uninterrupted)


def _wait_for(predicate, process, timeout=300):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = subprocess.run(_cli(workdir, 12, 100), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_state(workdir, _cli_config(12, 100))[0]


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
    workdir = str(tmp_path / "run")
    run = Watched(_cli(workdir, 12, 100)[3:], REPO)
    try:
        # SIGTERM before the first step (while it compiles, which may be a cache hit and fast):
        # the run must finish the current call, save and exit 0, whatever the machine's speed.
        run.wait_for("compiling the train step")
        run.process.send_signal(signal.SIGTERM)
        assert run.finish(timeout=300) == 0, run.text()[-3000:]
    finally:
        run.kill()
    # It saved at the step it stopped at (before the end), the only checkpoint with
    # checkpoint_every = 100, and the next run resumes from there.
    (stopped_at,) = [int(line.split(" at step ")[1].split(";")[0])
                     for line in run.text("stdout").splitlines() if "Stopped by SIGTERM" in line]
    assert 0 < stopped_at < 12
    manager = checkpointing.make_manager(workdir, read_only=True)
    assert list(manager.all_steps()) == [stopped_at]
    _assert_resumes_exactly(workdir, 100, stopped_at, uninterrupted)


def test_kill_9_resumes_from_last_checkpoint(tmp_path, uninterrupted):
    workdir = str(tmp_path / "run")
    process = subprocess.Popen(_cli(workdir, 12, 4), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    checkpoint_4 = os.path.join(workdir, "checkpoints", "4", "commit_success.txt")
    _wait_for(lambda: os.path.exists(checkpoint_4), process)
    process.kill()
    process.communicate(timeout=60)
    last = checkpointing.make_manager(workdir, read_only=True).latest_step()
    assert last in (4, 8)
    _assert_resumes_exactly(workdir, 4, last, uninterrupted)
