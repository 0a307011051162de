"""Orbax checkpoints of the train state under `workdir/checkpoints/<step>/`.

Each checkpoint holds the whole `TrainState` (step, params, EMA, Adam moments) and the run's
config as JSON, so a workdir cannot silently be resumed with a different model.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

# Config keys that may change between a run and its resumption without changing the model.
_RESUMABLE_KEYS = ("training", "sample", "eval", "data.prefetch", "data.data_dir",
                   "data.shuffle_buffer", "data.in_memory", "model.dtype",
                   # label dropout is a training choice; it leaves the weights' shapes alone.
                   "model.class_dropout")


class ConfigMismatchError(ValueError):
    """The workdir's checkpoints belong to a run with another model or data config."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


# The step each manager is (asynchronously) writing, to name it when the write fails later.
_pending_step: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = (
    weakref.WeakKeyDictionary())


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute for local paths (Orbax's array writer requires it, and
    `--workdir runs/x` is the common way to name one); `gs://...` stays as it is."""
    directory = os.path.join(workdir, "checkpoints")
    return directory if "://" in directory else os.path.abspath(directory)


def make_manager(workdir: str, training_config=None, *, read_only: bool = False
                 ) -> ocp.CheckpointManager:
    tc = training_config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep_checkpoints if tc else None,
        keep_period=(tc.archive_every or None) if tc else None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        # A write that failed half-way (full disk, kill -9) leaves `<step>.orbax-checkpoint-tmp`;
        # restore never reads it and the next save of that step must not trip over it.
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, config) -> bool:
    """Starts writing checkpoint `step` (finished in the background; see `wait_until_finished`).

    Raises `CheckpointWriteError` if this or the previous background write failed.
    """
    try:
        saved = manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)
    except Exception as e:
        raise write_error(manager, _pending_step.get(manager, step), e) from e
    _pending_step[manager] = step
    return saved


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Blocks until the background write is committed; `CheckpointWriteError` if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise write_error(manager, _pending_step.get(manager), e) from e
    _pending_step.pop(manager, None)


def _root_os_error(error: BaseException) -> OSError | None:
    """The first OSError in an exception chain (Orbax wraps the one from the file system)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_error(manager: ocp.CheckpointManager, step: int | None,
                error: BaseException) -> CheckpointWriteError:
    """One line: which checkpoint failed, why, what to do, and which checkpoints are intact."""
    os_error = _root_os_error(error)
    if os_error is not None and os_error.strerror:
        reason = os_error.strerror
    else:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
    try:
        manager.reload()
        intact = [s for s in manager.all_steps() if s != step]
    except Exception:  # the directory itself may be unreadable now
        intact = []
    kept = (f"checkpoints up to step {max(intact)} are intact" if intact
            else "no earlier checkpoint exists")
    what = f"checkpoint {step}" if step is not None else "a checkpoint"
    return CheckpointWriteError(
        f"could not save {what} to {manager.directory}: {reason} — free space or point "
        f"--workdir elsewhere; {kept}.")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_mismatches(saved: dict, config) -> list[str]:
    """Config entries that differ from the checkpoint's and would change the model or data."""
    now = _flatten(json.loads(config.to_json_best_effort()))
    before = _flatten(saved)
    differ = []
    for key in sorted(set(now) | set(before)):
        if any(key == k or key.startswith(k + ".") for k in _RESUMABLE_KEYS):
            continue
        a, b = before.get(key), now.get(key)
        if isinstance(a, list) or isinstance(b, list):
            a, b = tuple(a or ()), tuple(b or ())
        if a != b:
            differ.append(f"{key}: checkpoint {before.get(key)!r} vs now {now.get(key)!r}")
    return differ


def restore(manager: ocp.CheckpointManager, abstract_state: Any, config, step: int | None = None,
            shardings: Any = None) -> tuple[Any, int] | tuple[None, None]:
    """The latest (or given) checkpoint into `abstract_state`'s structure, placed on `shardings`.

    A latest checkpoint that cannot be read (partial or corrupt files) is skipped with a warning
    in favour of the one before it. Raises a one-line error if the checkpoint was written by a
    different model/data config.
    """
    if step is not None:
        return _restore_step(manager, abstract_state, config, step, shardings), step
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore_step(manager, abstract_state, config, candidate, shardings), candidate
        except ConfigMismatchError:
            raise
        except Exception as e:  # unreadable: fall back to the previous checkpoint
            kept = _set_aside(manager, candidate)
            logging.warning("checkpoint at step %d in %s cannot be read (%s: %s); falling back "
                            "to the previous one%s", candidate, manager.directory,
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                            f" (moved to {kept})" if kept else "")
    return None, None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str | None:
    """Moves an unreadable local checkpoint out of the way (kept, never deleted), so the run
    can write that step again."""
    source = os.path.join(str(manager.directory), str(step))
    if "://" in source or not os.path.isdir(source) or _is_read_only(manager):
        return None
    destination = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_unreadable",
                               f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(source, destination)
    manager.reload()
    return destination


def _is_read_only(manager: ocp.CheckpointManager) -> bool:
    return bool(getattr(getattr(manager, "_options", None), "read_only", False))


def _restore_step(manager, abstract_state, config, step, shardings):
    saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    differ = config_mismatches(saved_config["config"], config) if config is not None else []
    if differ:
        raise ConfigMismatchError(
            f"the checkpoint at step {step} in {manager.directory} was written with another "
            f"config ({'; '.join(differ[:3])}); use a new --workdir or the original config.")
    target = abstract_state
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    logging.info("restored checkpoint at step %d from %s", step, manager.directory)
    return restored["state"]
