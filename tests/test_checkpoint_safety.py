"""What may reach a checkpoint and what is trusted from one: no checkpoint after a non-finite
update, `--checkpoint=STEP` in train mode, array digests, changed settings on resume, and a
console that shows our own lines."""

import glob
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, modes, parallel, train, train_step
from helpers import tiny_config
from test_bad_input import _snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(workdir):
    return sorted(checkpointing.make_manager(workdir, read_only=True).all_steps())


def _restore(workdir, config, step):
    manager = checkpointing.make_manager(workdir, read_only=True)
    _, abstract = train_step.abstract_train_state(config)
    return jax.device_get(checkpointing.restore(manager, abstract, config, step=step)[0])


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def trained_4(tmp_path_factory):
    """A finished tiny run: checkpoints at 2 and 4 (copied per test before changing it)."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    modes.run_mode("train", tiny_config(), workdir)
    return workdir


def _copy(source, tmp_path):
    import shutil

    target = str(tmp_path / "run")
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------------
# 1.1 Divergence


def test_divergence_writes_no_checkpoint_after_a_skipped_update(tmp_path):
    config = tiny_config()
    config.training.num_steps = 2
    workdir = str(tmp_path / "run")
    modes.run_mode("train", config, workdir)
    good = _restore(workdir, config, 2)

    # lr 1e6: the first update leaves finite but exploded weights, the next ones are NaN.
    config.training.lr = 1e6
    config.training.num_steps = 20
    config.training.max_nonfinite = 6
    with pytest.raises(train.NonFiniteError) as error:
        modes.run_mode("train", config, workdir)
    message = str(error.value)
    # The streak stayed below max_nonfinite at step 4, 6 ...: none of them may be written.
    assert _steps(workdir) == [2]
    assert "The newest checkpoint saved before it is step 2" in message
    assert "--checkpoint=2 --config.training.lr=100000" in message
    assert _max_diff(_restore(workdir, config, 2).params, good.params) == 0.0


def test_divergence_from_the_start_names_no_checkpoint(tmp_path):
    config = tiny_config()
    config.training.lr = 1e6
    config.training.num_steps = 20
    config.training.max_nonfinite = 6
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError, match="No checkpoint in .* is older than that"):
        modes.run_mode("train", config, workdir)
    assert _steps(workdir) == []
    # With a sane learning rate the same workdir trains from scratch.
    config.training.lr = 1e-3
    config.training.num_steps = 2
    modes.run_mode("train", config, workdir)
    assert _steps(workdir) == [2]


def test_checkpoint_flag_in_train_mode_resumes_there_and_moves_later_ones_aside(trained_4,
                                                                                tmp_path):
    workdir = _copy(trained_4, tmp_path)
    config = tiny_config()
    old_4 = _restore(workdir, config, 4)
    before = _snapshot(os.path.join(workdir, "checkpoints", "4"))

    modes.run_mode("train", config, workdir, 2)

    (moved,) = glob.glob(os.path.join(workdir, "checkpoints_superseded", "4-*"))
    assert _snapshot(moved) == before  # kept byte for byte, not deleted
    assert _steps(workdir) == [2, 4]
    new_4 = _restore(workdir, config, 4)
    assert int(new_4.step) == 4
    # Training 2 → 4 again repeats the original steps exactly.
    assert _max_diff(new_4.params, old_4.params) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 1.2 Integrity


def _flip_bytes(workdir, step):
    """64 bytes of the largest array data file of checkpoint `step` set to 0xFF."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0",
                                   "d", "*"))
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 64)


def test_flipped_bytes_are_caught_set_aside_and_the_previous_checkpoint_used(trained_4, tmp_path,
                                                                             caplog):
    workdir = _copy(trained_4, tmp_path)
    config = tiny_config()
    _flip_bytes(workdir, 4)
    config.training.num_steps = 6
    with caplog.at_level(logging.WARNING):
        modes.run_mode("train", config, workdir)
    warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1
    assert re.search(r"array (params|ema_params|opt_state)/\S+ .*of checkpoint 4 does not match "
                     "the digest", warnings[0])
    assert glob.glob(os.path.join(workdir, "checkpoints_unreadable", "4-*", "state"))
    assert _steps(workdir) == [2, 4, 6]
    state = _restore(workdir, config, 6)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("mode", ["sample", "train"])
def test_flipped_bytes_with_an_explicit_checkpoint_are_one_error(trained_4, tmp_path, capsys,
                                                                 mode):
    workdir = _copy(trained_4, tmp_path)
    _flip_bytes(workdir, 4)
    before = _snapshot(workdir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        modes.run_or_exit(mode, tiny_config(), workdir, 4)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1
    assert errors[0].startswith("error: --checkpoint=4 in ")
    assert "does not match the digest recorded when it was saved" in errors[0]
    assert _snapshot(workdir) == before


def test_checkpoint_without_digests_still_restores(trained_4, tmp_path):
    """Checkpoints written before digests existed have no `digests` item."""
    import shutil

    workdir = _copy(trained_4, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "digests"))
    assert int(_restore(workdir, tiny_config(), 4).step) == 4


# ---------------------------------------------------------------------------------------------
# 3.1 Console and re-runs


def test_rerun_of_a_finished_training_changes_nothing(trained_4, tmp_path, capsys):
    workdir = _copy(trained_4, tmp_path)
    before = _snapshot(workdir)
    capsys.readouterr()
    modes.run_or_exit("train", tiny_config(), workdir)
    out = capsys.readouterr().out
    assert "is already at step 4 (training.num_steps=4); nothing to do" in out
    assert "--config.training.num_steps=8" in out
    assert _snapshot(workdir) == before


def test_reading_a_checkpoint_warns_about_nothing(trained_4, caplog):
    with caplog.at_level(logging.DEBUG):
        checkpointing.load_ema_params(tiny_config(), trained_4, parallel.make_mesh())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_events_left_counts_what_the_loop_does():
    for every in (0, 1, 3, 5):
        for num_steps in (5, 6, 9):
            for step in range(num_steps + 1):
                # The loop's rule: an event where a multiple of `every` is crossed, and at the end.
                counted = sum(1 for s in range(step + 1, num_steps + 1)
                              if train.crossed(s - 1, s, every) or s == num_steps)
                assert train.events_left(step, num_steps, every) == counted


ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\w+\.py):\d+\] (.*)$")


def test_console_shows_our_lines_only(tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", "configs/digits.py",
         "--workdir", workdir, "--config.model.ch=32", "--config.model.num_res_blocks=1",
         "--config.diffusion.num_timesteps=20", "--config.training.batch_size=16",
         "--config.training.num_steps=4", "--config.training.steps_per_call=1",
         "--config.training.log_every=1", "--config.training.checkpoint_every=2",
         "--config.training.sample_every=0", "--config.training.num_grid_samples=16"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [ABSL_LINE.match(line).groups() for line in result.stderr.splitlines()
              if ABSL_LINE.match(line)]
    ours = {os.path.basename(p)[:-3] + ".py" for p in glob.glob(os.path.join(REPO, "ddpm_jax",
                                                                              "*.py"))}
    # JAX's own "no TPU" line is the only one left to main.py's verbosity handling.
    foreign = [f"{source}: {text}" for source, text in logged
               if source not in ours and source != "xla_bridge.py"]
    assert foreign == []
    texts = [text for _, text in logged]
    assert len(texts) <= 15, texts
    compile_at = next(i for i, t in enumerate(texts) if t.startswith("compiling the train step"))
    # The tests share a compilation cache, so the step may come from it.
    assert re.fullmatch(r"compiled the train step in [\d.]+ s( \(from the compilation cache\))?",
                        texts[compile_at + 1])
    progress = [t for t in texts if re.match(r"step \d/4 loss ", t)]
    assert len(progress) == 4 and texts.index(progress[0]) > compile_at + 1
    assert all(re.search(r"\| [\d.]+ steps/s \| [\d.e+-]+ TFLOP/s per device \(\d+% of peak\) "
                         r"\| ETA \d+m\d\ds$", t) for t in progress), progress
    assert result.stdout.strip().splitlines()[-1] == (
        f"done: step 4/4, loss {progress[-1].split()[3]}; newest checkpoint 4 in "
        f"{os.path.join(workdir, 'checkpoints')}; samples "
        f"{os.path.join(workdir, 'samples', 'step_00000004.png')}")


# ---------------------------------------------------------------------------------------------
# 3.2 Changed settings on resume


def test_resume_with_changed_settings_names_them_and_records_them(trained_4, tmp_path, caplog):
    workdir = _copy(trained_4, tmp_path)
    config = tiny_config()
    config.training.num_steps = 6
    config.training.lr = 1e-4
    config.seed = 3
    config.training.log_every = 2  # bookkeeping: not a change of the training itself
    with caplog.at_level(logging.WARNING):
        modes.run_mode("train", config, workdir)
    (warning,) = [r.getMessage() for r in caplog.records if "changed training settings" in
                  r.getMessage()]
    assert "seed 0 -> 3" in warning and "training.lr 0.001 -> 0.0001" in warning
    assert "log_every" not in warning
    with open(os.path.join(workdir, "config_changes.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["key"], r["old"], r["new"]) for r in records] == [
        (4, "seed", 0, 3), (4, "training.lr", 0.001, 0.0001)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["time"]) for r in records)
    assert _steps(workdir)[-1] == 6


def test_a_key_added_after_the_checkpoint_is_no_mismatch_at_its_default():
    """A checkpoint written before `diffusion.t0_log_variance` existed resumes with the default,
    and is refused with any other value of it."""
    from ddpm_jax import checkpointing

    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["diffusion"]["t0_log_variance"]
    assert checkpointing.config_mismatches(saved, config) == []
    config.diffusion.t0_log_variance = "1e-20"
    assert checkpointing.config_mismatches(saved, config) == [
        "diffusion.t0_log_variance: checkpoint None vs now '1e-20'"]
