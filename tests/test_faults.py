"""Faults during training: an unreadable latest checkpoint and non-finite updates."""

import glob
import os

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, images, modes, train, train_step
from helpers import tiny_config


def _restore(workdir, config, step):
    manager = checkpointing.make_manager(workdir, read_only=True)
    _, abstract = train_step.abstract_train_state(config)
    return jax.device_get(checkpointing.restore(manager, abstract, config, step=step)[0])


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = tiny_config()
    workdir = str(tmp_path)
    modes.run_mode("train", config, workdir)  # checkpoints at 2 and 4
    damaged = []
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "*")):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\0garbage")
            damaged.append(os.path.basename(path))
    config.training.num_steps = 6
    caplog.set_level("INFO")
    modes.run_mode("train", config, workdir)
    # The run resumed from 2 (not from scratch) and went on.
    assert "resuming from step 2" in caplog.text
    assert "initialised a new model" not in caplog.text
    # The damaged checkpoint is kept aside, not deleted.
    (aside,) = glob.glob(os.path.join(workdir, "checkpoints_unreadable", "4-*"))
    for name in damaged:
        with open(os.path.join(aside, "state", name), "rb") as f:
            assert f.read() == b"\0garbage", name
    manager = checkpointing.make_manager(workdir, read_only=True)
    assert sorted(manager.all_steps()) == [2, 4, 6]
    state = _restore(workdir, config, 6)
    assert int(state.step) == 6


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    config = tiny_config()
    config.training.num_steps = 2
    workdir = str(tmp_path)
    modes.run_mode("train", config, workdir)
    good = _restore(workdir, config, 2)

    # From now on every batch is NaN: updates must be skipped and never saved as NaN.
    monkeypatch.setattr(images, "to_model_range", lambda batch: batch * np.nan)
    config.training.num_steps = 10
    config.training.checkpoint_every = 1
    config.training.max_nonfinite = 3
    with pytest.raises(train.NonFiniteError, match="3 consecutive updates"):
        modes.run_mode("train", config, workdir)
    for step in checkpointing.make_manager(workdir, read_only=True).all_steps():
        state = _restore(workdir, config, step)
        leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
        if step > 2:  # skipped updates leave the weights as they were
            assert all(np.array_equal(a, b) for a, b in
                       zip(jax.tree.leaves(state.params), jax.tree.leaves(good.params)))


def _tree_snapshot(root):
    """(relative path, size, sha256) of every file below `root`."""
    import hashlib

    snapshot = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            snapshot.append((os.path.relpath(path, root), os.path.getsize(path), digest))
    return sorted(snapshot)


def test_full_disk_while_saving_is_one_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch,
                                                                           capsys):
    import errno

    from orbax.checkpoint import JsonCheckpointHandler

    config = tiny_config()  # checkpoints at 2 and 4
    workdir = str(tmp_path)
    checkpoint_2 = os.path.join(workdir, "checkpoints", "2")
    snapshots = []
    original = JsonCheckpointHandler._save_fn

    async def disk_full_from_the_second_save(self, item, directory):
        if snapshots or os.path.isdir(checkpoint_2):
            # Checkpoint 2 is committed; the disk fills while checkpoint 4 is being written.
            snapshots.append(_tree_snapshot(checkpoint_2))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, item, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", disk_full_from_the_second_save)
    with pytest.raises(SystemExit) as exit_info:
        modes.run_or_exit("train", config, workdir)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        f"error: could not save checkpoint 4 to {os.path.join(workdir, 'checkpoints')}: No space "
        "left on device — free space or point --workdir elsewhere; checkpoints up to step 2 are "
        "intact.")

    # Checkpoint 2 is byte for byte what it was, restores, and is the only one that looks valid.
    # (Each of checkpoint 4's JSON items, config and digests, met the full disk.)
    assert snapshots and all(snapshot == _tree_snapshot(checkpoint_2) for snapshot in snapshots)
    assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2]
    assert int(_restore(workdir, config, 2).step) == 2

    # With space again the same command resumes from 2 and writes 4 over the partial attempt.
    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", original)
    modes.run_or_exit("train", config, workdir)
    assert sorted(checkpointing.make_manager(workdir, read_only=True).all_steps()) == [2, 4]
    assert int(_restore(workdir, config, 4).step) == 4


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """`--workdir runs/x` (the README's form): Orbax writes arrays only under absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    manager = checkpointing.make_manager("runs/x", config.training)
    checkpointing.save(manager, 2, state, config)
    checkpointing.wait_until_finished(manager)
    assert os.path.isdir(tmp_path / "runs" / "x" / "checkpoints" / "2")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, step = checkpointing.restore(checkpointing.make_manager("runs/x", read_only=True),
                                           abstract, config)
    assert step == 2
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), state[key])
