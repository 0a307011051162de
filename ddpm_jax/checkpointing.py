"""Orbax checkpoints of the train state under `workdir/checkpoints/<step>/`.

Each checkpoint holds the whole `TrainState` (step, params, EMA, Adam moments), the run's
config as JSON, so a workdir cannot silently be resumed with a different model, a SHA-256
digest of every array, so damaged files are caught at restore instead of training on inf/NaN,
and for streaming data each process's data position (its Grain iterator state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as std_logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax.errors import CheckpointWriteError

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh

# Config keys that may change between a run and its resumption without changing the model.
_RESUMABLE_KEYS = ("training", "sample", "eval", "data.prefetch", "data.data_dir",
                   "data.shuffle_buffer", "data.in_memory", "model.dtype",
                   # label dropout is a training choice; it leaves the weights' shapes alone.
                   "model.class_dropout",
                   # the seed only draws the data order, noise and timesteps of later steps.
                   "seed")
# Resumable keys that change only bookkeeping, not a single weight; every other resumable key
# changes what the resumed steps compute (an uninterrupted run would not match it).
_BOOKKEEPING_KEYS = ("sample", "eval", "data.prefetch", "data.data_dir", "training.num_steps",
                     "training.steps_per_call", "training.log_every",
                     "training.checkpoint_every", "training.keep_checkpoints",
                     "training.archive_every", "training.sample_every",
                     "training.num_grid_samples", "training.max_nonfinite")


class ConfigMismatchError(ValueError):
    """The workdir's checkpoints belong to a run with another model or data config."""


class CheckpointCorruptError(ValueError):
    """A restored array differs from the digest recorded when its checkpoint was saved."""


DIGEST_ALGORITHM = "sha256"
_DIGESTS_ITEM = "digests"
_DATA_ITEM = "data"  # streaming runs: each process's Grain iterator state


class _GrainState:
    """A Grain iterator state (bytes) as Grain's Orbax handler takes it: the handler saves
    `get_state()` to one file per process and restores a file into `set_state`."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # the handler calls it after restoring; nothing to start
        pass


# The step each manager is (asynchronously) writing, to name it when the write fails later.
_pending_step: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = (
    weakref.WeakKeyDictionary())


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute for local paths (Orbax's array writer requires it, and
    `--workdir runs/x` is the common way to name one); `gs://...` stays as it is."""
    directory = os.path.join(workdir, "checkpoints")
    return directory if "://" in directory else os.path.abspath(directory)


class _OrbaxChatterFilter(std_logging.Filter):
    """Drops Orbax's warnings about what is done here on purpose: while a manager is being
    built, those about its options (a read-only manager 'setting save_interval_steps=0', 'Given
    directory is read only'), and the one about waiting for the previous save, which the
    training loop's own checkpoint line reports. (Its ~40 INFO lines per save reach the console
    only with --verbose: cli.quiet_console.)"""

    constructing = threading.local()

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if getattr(self.constructing, "active", False) and record.levelno < std_logging.ERROR:
            return False
        if str(record.msg).startswith("Waiting for previous save to complete"):
            return False
        return True


_CHATTER_FILTER = _OrbaxChatterFilter()


@contextlib.contextmanager
def _constructing():
    _CHATTER_FILTER.constructing.active = True
    try:
        yield
    finally:
        _CHATTER_FILTER.constructing.active = False


def make_manager(workdir: str, training_config=None, *, read_only: bool = False
                 ) -> ocp.CheckpointManager:
    tc = training_config
    absl_logger = logging.get_absl_logger()
    if _CHATTER_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_CHATTER_FILTER)
    with _constructing():  # the options warn about read_only's implications, too
        options = ocp.CheckpointManagerOptions(
            max_to_keep=tc.keep_checkpoints if tc else None,
            keep_period=(tc.archive_every or None) if tc else None,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
            # A write that failed half-way (full disk, kill -9) leaves
            # `<step>.orbax-checkpoint-tmp`; restore never reads it and the next save of that
            # step must not trip over it.
            cleanup_tmp_directories=not read_only,
        )
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, config,
         data_position: bytes | None = None) -> bool:
    """Starts writing checkpoint `step` (finished in the background; see `wait_until_finished`).

    The array digests are computed here, from a host copy taken before this returns, so the
    caller may donate `state` to the next train step. `data_position`: this process's streaming
    data state after step `step` (`input_pipeline.Batch.position`), saved per process. Raises
    `CheckpointWriteError` if this or the previous background write failed.
    """
    digests = {"algorithm": DIGEST_ALGORITHM, "arrays": array_digests(state)}
    items = {_DIGESTS_ITEM: ocp.args.JsonSave(digests)}
    if data_position is not None:
        import grain

        items[_DATA_ITEM] = grain.checkpoint.CheckpointSave(_GrainState(data_position))
    try:
        saved = manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            **items), force=True)
    except Exception as e:
        raise write_error(manager, _pending_step.get(manager, step), e) from e
    _pending_step[manager] = step
    return saved


def _leaf_name(path) -> str:
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def array_digests(tree: Any) -> dict[str, str]:
    """SHA-256 of each array's dtype, shape and bytes, keyed by its path (e.g. `params/conv_in/
    kernel`). Arrays are replicated, so each process hashes its first local copy."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    local = [leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
             for _, leaf in named]
    digests = {}
    for (path, _), value in zip(named, jax.device_get(local)):
        array = np.ascontiguousarray(np.asarray(value))
        digest = hashlib.new(DIGEST_ALGORITHM)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        digests[_leaf_name(path)] = digest.hexdigest()
    return digests


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


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model.ch": 128, ...}` from a nested config (a ConfigDict or its JSON dicts): one dotted
    key per leaf, values as they are."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def _differences(saved: dict, config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for every flattened config entry that differs."""
    now = flatten_config(json.loads(config.to_json_best_effort()))
    before = flatten_config(saved)
    defaults = _default_config()
    differ = []
    for key in sorted(set(now) | set(before)):
        a, b = before.get(key), now.get(key)
        if key not in before and key in defaults and _same(defaults[key], b):
            continue  # a key added after this checkpoint was written, at its default
        if not _same(a, b):
            differ.append((key, a, b))
    return differ


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return tuple(a or ()) == tuple(b or ())
    return a == b


def _default_config() -> dict[str, Any]:
    from configs import default

    return flatten_config(json.loads(default.get_config().to_json_best_effort()))


def config_mismatches(saved: dict, config) -> list[str]:
    """Config entries that differ from the checkpoint's and would change the model or data."""
    return [f"{key}: checkpoint {old!r} vs now {new!r}"
            for key, old, new in _differences(saved, config) if not _under(key, _RESUMABLE_KEYS)]


def changed_training_settings(saved: dict, config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) of the resumable settings that differ and
    change what the resumed steps compute (learning rate, batch size, seed, schedule, ...)."""
    return [(key, old, new) for key, old, new in _differences(saved, config)
            if _under(key, _RESUMABLE_KEYS) and not _under(key, _BOOKKEEPING_KEYS)]


def check_step(manager: ocp.CheckpointManager, step: int) -> None:
    """`--checkpoint=STEP` names a checkpoint that exists (one-line FileNotFoundError if not)."""
    if step not in manager.all_steps():
        raise FileNotFoundError(f"--checkpoint={step} is not in {manager.directory}; available "
                                f"steps: {sorted(manager.all_steps())}.")


def read_data_position(manager: ocp.CheckpointManager, step: int) -> bytes | None:
    """This process's streaming data state saved with checkpoint `step`; None when the
    checkpoint holds none for it (in-memory data, an older checkpoint, or one written by a
    different number of processes)."""
    from etils import epath

    if not (epath.Path(str(manager.directory)) / str(step) / _DATA_ITEM).exists():
        return None
    import grain

    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{_DATA_ITEM: grain.checkpoint.CheckpointRestore(_GrainState())}))
    except ValueError as e:  # Grain's handler: no file for this process index and count
        logging.info("checkpoint %d has no data position for this process: %s", step, e)
        return None
    return restored[_DATA_ITEM].get_state()


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config (as a nested dict) saved with checkpoint `step`."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore(manager: ocp.CheckpointManager, abstract_state: Any, config, step: int | None = None,
            shardings: Any = None) -> tuple[Any, int] | tuple[None, None]:
    """The latest (or given) checkpoint into `abstract_state`'s structure, placed on `shardings`.

    A latest checkpoint that cannot be read (partial or corrupt files, or an array that does not
    match its saved digest) is moved to `checkpoints_unreadable/` with a warning, in favour of
    the one before it. A given `step` is never skipped: a missing, unreadable or damaged one is
    a one-line error. Raises a one-line error if the checkpoint was written by a different
    model/data config.
    """
    if step is not None:
        check_step(manager, step)
        try:
            return _restore_step(manager, abstract_state, config, step, shardings), step
        except ConfigMismatchError:
            raise
        except Exception as e:
            raise ValueError(
                f"--checkpoint={step} in {manager.directory} cannot be used: {_reason(e)}; pick "
                f"another of {sorted(manager.all_steps())} or leave out --checkpoint to use the "
                "newest intact one.") from e
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore_step(manager, abstract_state, config, candidate, shardings), candidate
        except ConfigMismatchError:
            raise
        except Exception as e:  # unreadable: fall back to the previous checkpoint
            kept = _set_aside(manager, candidate, "checkpoints_unreadable")
            logging.warning("checkpoint at step %d in %s cannot be used (%s); falling back "
                            "to the previous one%s", candidate, manager.directory, _reason(e),
                            f" (moved to {kept})" if kept else "")
    return None, None


def _reason(error: BaseException) -> str:
    if isinstance(error, CheckpointCorruptError):
        return str(error)
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def supersede_later(manager: ocp.CheckpointManager, step: int) -> list[str]:
    """Moves the checkpoints after `step` to `checkpoints_superseded/<step>-<time>/` (kept,
    never deleted), so that a run resumed from `step` writes its own later ones."""
    later = [s for s in sorted(manager.all_steps()) if s > step]
    moved = []
    if jax.process_index() == 0:
        moved = [d for d in (_set_aside(manager, s, "checkpoints_superseded") for s in later) if d]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpointing.supersede_later")
    manager.reload()
    return moved


def _set_aside(manager: ocp.CheckpointManager, step: int, where: str) -> str | None:
    """Moves a local checkpoint to `<workdir>/<where>/<step>-<time>` (kept, never deleted), so
    the run can write that step again."""
    source = os.path.join(str(manager.directory), str(step))
    if "://" in source or not os.path.isdir(source) or _is_read_only(manager):
        return None
    destination = os.path.join(os.path.dirname(str(manager.directory)), where,
                               f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(source, destination)
    manager.reload()
    return destination


def _is_read_only(manager: ocp.CheckpointManager) -> bool:
    return bool(getattr(getattr(manager, "_options", None), "read_only", False))


def _has_digests(manager: ocp.CheckpointManager, step: int) -> bool:
    from etils import epath

    return (epath.Path(str(manager.directory)) / str(step) / _DIGESTS_ITEM).exists()


def verify_digests(saved: dict, tree: Any, step: int) -> None:
    """Raises `CheckpointCorruptError` naming the arrays whose digest differs from `saved`."""
    if saved.get("algorithm") != DIGEST_ALGORITHM:
        raise CheckpointCorruptError(f"its digests use {saved.get('algorithm')!r}, not "
                                     f"{DIGEST_ALGORITHM!r}")
    expected, actual = saved["arrays"], array_digests(tree)
    bad = sorted(name for name in set(expected) | set(actual)
                 if expected.get(name) != actual.get(name))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointCorruptError(
            f"array {bad[0]}{more} of checkpoint {step} does not match the digest recorded "
            "when it was saved (damaged files)")


def _restore_step(manager, abstract_state, config, step, shardings):
    differ = config_mismatches(read_config(manager, step), config) if config is not None else []
    if differ:
        raise ConfigMismatchError(
            f"the checkpoint at step {step} in {manager.directory} was written with another "
            f"config ({'; '.join(differ[:3])}); use a new --workdir or the original config.")
    target = abstract_state
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
    items = {"state": ocp.args.StandardRestore(target)}
    with_digests = _has_digests(manager, step)
    if with_digests:
        items[_DIGESTS_ITEM] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if with_digests:
        verify_digests(restored[_DIGESTS_ITEM], restored["state"], step)
    else:
        logging.debug("checkpoint %d in %s predates array digests; restored unverified",
                      step, manager.directory)
    logging.info("restored checkpoint at step %d from %s", step, manager.directory)
    return restored["state"]


def load_ema_params(config, workdir: str, mesh: Mesh, checkpoint: int | None = None
                    ) -> tuple[nnx.GraphDef, Any, int]:
    """EMA weights of the latest (or given) checkpoint in `workdir`, replicated over `mesh`:
    (graphdef, params, step), the weights that sampling, evaluation and the API use."""
    from ddpm_jax import parallel, train_step

    manager = make_manager(workdir, read_only=True)
    if manager.latest_step() is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)}; train first "
            "(--mode=train) or convert released weights (python -m ddpm_jax.convert).")
    if checkpoint is not None and checkpoint not in manager.all_steps():
        raise FileNotFoundError(
            f"--checkpoint={checkpoint} is not in {checkpoint_dir(workdir)}; "
            f"available steps: {list(manager.all_steps())}.")
    graphdef, abstract_state = train_step.abstract_train_state(config)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
    state, step = restore(manager, abstract_state, config, step=checkpoint, shardings=shardings)
    return graphdef, state.ema_params, step
