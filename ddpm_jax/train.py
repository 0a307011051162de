"""The training loop: data → sharded train step → metrics, checkpoints and EMA sample grids.

`train_and_evaluate(config, workdir)` resumes from the newest checkpoint in `workdir`, trains
until `training.num_steps`, and stops cleanly on SIGTERM (checkpoint, then exit 0), which is
what a preempted Cloud TPU VM sends.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import (checkpointing, compile_cache, generate, images, input_pipeline, optim,
                      parallel, profiling, summaries, utilisation,
                      train_step, validate)
from ddpm_jax.errors import NonFiniteError
from ddpm_jax.interrupt import StopSignal as _StopSignal


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


def make_batches(config, dataset, start_step: int, steps_per_call: int,
                 position: bytes | None = None):
    """Host batches of `dataset` (in memory: an `input_pipeline.Dataset`, from `start_step`;
    streaming: an `input_pipeline.Stream`, from `position`, this process's data state after
    the last batch trained, None = the start of the stream)."""
    tc = config.training
    if config.data.in_memory:
        iterator = input_pipeline.in_memory_batches(
            dataset, global_batch=tc.batch_size, steps_per_call=steps_per_call,
            start_step=start_step, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
    else:
        iterator = input_pipeline.streaming_batches(
            dataset, global_batch=tc.batch_size, steps_per_call=steps_per_call,
            seed=config.seed, position=position)
    return input_pipeline.prefetch(iterator, config.data.prefetch)


def write_sample_grid(config, workdir, writer, graphdef, state, mesh, step: int) -> None:
    """EMA samples as a PNG grid + denoising strip under workdir/samples and in TensorBoard."""
    tc = config.training
    devices = mesh.devices.size
    batch = -(-tc.num_grid_samples // devices) * devices
    key = jax.random.fold_in(jax.random.key(config.sample.seed), step)
    progress_every = config.sample.progress_every if config.sample.method == "ancestral" else 0
    # num_grid_samples samples in one call padded to the devices: the labels are those of the
    # samples (generate.sample_labels), not of the padded call.
    samples, progress = next(generate.grid_batches(
        graphdef, state.ema_params, config, mesh, tc.num_grid_samples, key, batch_size=batch,
        progress_every=progress_every))
    # A conditional model's grid has one row per class, as --mode=sample's; else it is square.
    _, per_class = generate.sample_labels(config, tc.num_grid_samples)
    grid = images.make_grid(images.to_uint8(samples), columns=per_class)
    if jax.process_index() == 0:
        images.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                        images.upscale(grid))
        picture = {"samples": grid[None]}
        if progress is not None:
            strip = images.progress_strip(progress)
            images.save_png(os.path.join(workdir, "samples", f"step_{step:08d}_progress.png"),
                            images.upscale(strip))
            picture["denoising"] = strip[None]
        writer.write_images(step, picture)


def train_and_evaluate(config, workdir: str, checkpoint: int | None = None
                       ) -> train_step.TrainState:
    """Trains (or resumes) the configured model in `workdir`; returns the final state.

    `checkpoint`: resume from that step instead of the newest; the later checkpoints are moved
    to `checkpoints_superseded/` (kept, never deleted).
    """
    tc = config.training
    mesh = parallel.make_mesh()
    parallel.log_layout(mesh)
    validate.check_training_run(config, mesh)
    data = (_load_in_memory_dataset(config) if config.data.in_memory
            else input_pipeline.open_stream(config.data))
    manager = checkpointing.make_manager(workdir, tc)
    graphdef, state, start_step = _restore_or_create(config, workdir, manager, mesh, checkpoint)
    if start_step >= tc.num_steps:
        _print_nothing_to_do(workdir, tc, start_step)
        return state

    loop = _TrainLoop(config, workdir, manager, mesh, graphdef, data, start_step)
    try:
        while loop.step < tc.num_steps:
            before, state, metrics = loop.train_call(state)
            loop.log_and_check(before, state, metrics)
            loop.save_and_draw(before, state)
            if loop.stop_requested(state):
                break
    finally:
        loop.close()
    _print_outcome(manager, workdir, tc, loop.stop.received, start_step, loop.step, loop.summary)
    return state


class _TrainLoop:
    """What the loop carries between calls of the train step (the step, the data position, the
    compiled step per call length, the clock, the skipped updates) and its steps: one call,
    then the hooks that follow it (progress line and divergence check, checkpoint and sample
    grid, stop signal)."""

    def __init__(self, config, workdir: str, manager, mesh, graphdef, data, start_step: int):
        tc = config.training
        self.config, self.workdir, self.manager, self.mesh = config, workdir, manager, mesh
        self.graphdef, self.data = graphdef, data
        self.data_position = _restored_data_position(config, manager, start_step)
        self.writer = _make_writer(workdir)
        if start_step == 0:
            self.writer.write_hparams({
                key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in checkpointing.flatten_config(config).items()})
        self.seed_key = jax.random.key(config.seed)
        self.stop = _StopSignal().install()
        self.peak = utilisation.peak_flops(jax.local_devices()[0], config.model.dtype)
        self.flops_per_step = None
        self.profile = profiling.ProfileWindow(tuple(tc.get("profile_steps", ())), workdir)
        self.step = start_step
        self.step_fns = {}
        self.batches = None
        self.clock = _Clock(config)
        self.summary = {}
        self.skips = _SkippedUpdates()

    def train_call(self, state: train_step.TrainState
                   ) -> tuple[int, train_step.TrainState, Any]:
        """One call of the train step (compiled on first use of its length) on the next batch:
        (the step before it, the new state, its metrics)."""
        tc = self.config.training
        steps_this_call = min(tc.steps_per_call, tc.num_steps - self.step)
        if self.batches is None or steps_this_call not in self.step_fns:
            self.batches = make_batches(self.config, self.data, self.step, steps_this_call,
                                        self.data_position)
        batch = next(self.batches)
        self.data_position = batch.position
        batch_images = parallel.to_global_array(batch.images, self.mesh, batch_axis=1)
        batch_labels = parallel.to_global_array(batch.labels, self.mesh, batch_axis=1)
        if steps_this_call not in self.step_fns:
            self.step_fns[steps_this_call] = _compile_train_step(
                self.graphdef, self.config, self.mesh, steps_this_call,
                (state, batch_images, batch_labels, self.seed_key))
            self.flops_per_step = utilisation.step_flops(self.step_fns[steps_this_call])
        self.profile.before_call(self.step, steps_this_call)
        started = time.perf_counter()
        state, metrics = self.step_fns[steps_this_call](state, batch_images, batch_labels,
                                                        self.seed_key)
        skipped = np.asarray(jax.device_get(metrics["skipped_nonfinite"])) > 0
        self.clock.trained(steps_this_call, time.perf_counter() - started)
        before, self.step = self.step, self.step + steps_this_call
        self.profile.after_call(self.step)
        self.skips.record(before, skipped)
        return before, state, metrics

    def _due(self, before: int, every: int) -> bool:
        return crossed(before, self.step, every) or self.step == self.config.training.num_steps

    def log_and_check(self, before: int, state: train_step.TrainState, metrics: Any) -> None:
        """The progress line when due; a NonFiniteError after `training.max_nonfinite`
        consecutive skipped updates."""
        tc = self.config.training
        if self._due(before, tc.log_every):
            self.summary = _log_progress(self.writer, tc, self.step, metrics, state, self.clock,
                                         self.flops_per_step, self.peak)
        streak = int(state.nonfinite_streak)
        if streak >= tc.max_nonfinite:
            checkpointing.wait_until_finished(self.manager)
            raise NonFiniteError(_divergence_message(
                self.manager, tc, streak, self.skips.first or self.step, self.step))

    def save_and_draw(self, before: int, state: train_step.TrainState) -> None:
        """The checkpoint and the sample grid, when due."""
        tc = self.config.training
        if self._due(before, tc.checkpoint_every):
            self.skips.save_point(self.manager, self.step, state, self.config, self.clock,
                                  self.data_position)
        if self._due(before, tc.sample_every):
            logging.info("drawing %d samples for the grid at step %d from the EMA weights "
                         "(decay %g%s)%s...", tc.num_grid_samples, self.step, tc.ema_decay,
                         ", with warm-up" if tc.get("ema_warmup", False) else "",
                         "" if self.clock.grids_drawn else ", includes compiling the sampler")
            started = time.perf_counter()
            write_sample_grid(self.config, self.workdir, self.writer, self.graphdef, state,
                              self.mesh, self.step)
            self.clock.drew_grid(time.perf_counter() - started)
            logging.info("wrote %s in %.1f s", _grid_path(self.workdir, self.step),
                         self.clock.grid_seconds)

    def stop_requested(self, state: train_step.TrainState) -> bool:
        """Whether any process received SIGTERM or Ctrl-C; if so the state is saved first."""
        if not self.stop.any_process():
            return False
        logging.warning("received %s at step %d: saving a checkpoint and exiting",
                        self.stop.received or "a stop signal", self.step)
        if self.skips.in_window or self.manager.latest_step() != self.step:
            self.skips.save_point(self.manager, self.step, state, self.config, self.clock,
                                  self.data_position)
        return True

    def close(self) -> None:
        """Ends the profile, waits for the last checkpoint, flushes the events and restores the
        signal handlers (then all processes meet)."""
        self.profile.close()
        checkpointing.wait_until_finished(self.manager)
        self.writer.flush()
        self.stop.uninstall()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("train_and_evaluate:end")


def _print_nothing_to_do(workdir: str, tc, start_step: int) -> None:
    if jax.process_index() == 0:
        print(f"{checkpointing.checkpoint_dir(workdir)} is already at step {start_step} (training.num_steps="
              f"{tc.num_steps}); nothing to do. To train further, pass "
              f"--config.training.num_steps=N with N > {start_step}, e.g. "
              f"--config.training.num_steps={2 * start_step}.")


def _load_in_memory_dataset(config) -> input_pipeline.Dataset:
    """The whole split in host memory, checked against the model and the batch."""
    dataset = input_pipeline.load_dataset(config.data)
    logging.info("dataset %s: %d images of %s", config.data.name, len(dataset.images),
                 dataset.images.shape[1:])
    train_step.check_dataset_labels(config.model, dataset.num_classes, dataset.labels)
    validate.check_dataset_size(config, len(dataset.images))
    return dataset


def _restore_or_create(config, workdir: str, manager, mesh, checkpoint: int | None
                       ) -> tuple[Any, train_step.TrainState, int]:
    """(graphdef, state, step): checkpoint `checkpoint` (default the newest), made ready to go
    on unless it is already at training.num_steps; else a new model at step 0."""
    graphdef, abstract_state = train_step.abstract_train_state(config)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
    state, start_step = checkpointing.restore(manager, abstract_state, config, step=checkpoint,
                                              shardings=shardings)
    if state is None:
        graphdef, state = train_step.create_train_state(config, mesh)
        logging.info("initialised a new model: %s parameters",
                     f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")
        return graphdef, state, 0
    if start_step < config.training.num_steps:
        _prepare_resume(config, workdir, manager, start_step, checkpoint)
    return graphdef, state, start_step


def _prepare_resume(config, workdir: str, manager, start_step: int,
                    checkpoint: int | None) -> None:
    """Moves the checkpoints after an explicitly chosen one aside and reports changed settings."""
    if checkpoint is not None:
        for moved in checkpointing.supersede_later(manager, start_step):
            logging.warning("moved the later checkpoint %s aside to %s",
                            os.path.basename(moved).split("-")[0], moved)
    _report_changed_settings(workdir, checkpointing.read_config(manager, start_step),
                             config, start_step)
    logging.info("resuming from step %d", start_step)


def _compile_train_step(graphdef, config, mesh, steps_per_call: int, example_args: tuple):
    """The train step for `steps_per_call` steps, compiled ahead of time for these arguments."""
    logging.info("compiling the train step (%d steps per call)...", steps_per_call)
    started, hits = time.perf_counter(), compile_cache.hits()
    compiled = train_step.make_train_step(graphdef, config, mesh).lower(*example_args).compile()
    logging.info("compiled the train step in %.1f s%s", time.perf_counter() - started,
                 " (from the compilation cache)" if compile_cache.hits() > hits else "")
    return compiled


def _log_progress(writer, tc, step: int, metrics, state, clock: "_Clock",
                  flops_per_step: float | None, peak: float | None) -> dict[str, float]:
    """The progress line and TensorBoard scalars of the call that ended at `step`."""
    summary = train_step.summarize_metrics(metrics)
    summary["param_norm"] = float(_global_norm(state.params))
    summary["steps_per_sec"] = clock.recent_rate()
    summary.update(utilisation.utilisation(flops_per_step, summary["steps_per_sec"], peak))
    writer.write_scalars(step, summary)
    skipped_note = (f", {int(summary['skipped_nonfinite'])} skipped as non-finite"
                    if summary["skipped_nonfinite"] else "")
    logging.info("step %d/%d loss %.5f grad_norm %.3f lr %.3g%s | %.2f steps/s%s | "
                 "ETA %s", step, tc.num_steps, summary["loss"], summary["grad_norm"],
                 summary["learning_rate"], skipped_note, summary["steps_per_sec"],
                 utilisation.describe(summary), utilisation.format_seconds(clock.eta(step)))
    return summary


def _print_outcome(manager, workdir: str, tc, stopped_by: str | None, start_step: int,
                   step: int, summary: dict[str, float]) -> None:
    """The closing line: where a stopped run resumes, or what a finished one left."""
    directory = checkpointing.checkpoint_dir(workdir)
    latest = manager.latest_step()
    where = (f"checkpoint {latest} in {directory}" if latest is not None
             else f"no checkpoint in {directory}")
    if stopped_by:
        print(f"Stopped by {stopped_by} at step {step}; newest {where}. Run the same command "
              "to resume.")
    elif jax.process_index() == 0 and step > start_step:
        loss = f", loss {summary['loss']:.5f}" if "loss" in summary else ""
        print(f"done: step {step}/{tc.num_steps}{loss}; newest {where}; samples "
              f"{_grid_path(workdir, step)}")


def _report_changed_settings(workdir: str, saved_config: dict, config, step: int) -> None:
    """Warns which training settings differ from the checkpoint's, and appends one JSON line per
    key to `workdir/config_changes.jsonl` (step, time, key, old, new)."""
    changes = checkpointing.changed_training_settings(saved_config, config)
    if not changes:
        return
    record = os.path.join(workdir, "config_changes.jsonl")
    logging.warning(
        "resuming from step %d with changed training settings: %s. Training goes on from the "
        "checkpoint, but steps after %d now differ from an uninterrupted run with the "
        "checkpoint's settings (for an exact continuation use those); recorded in %s", step,
        "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes), step, record)
    if jax.process_index() == 0:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = "".join(json.dumps({"step": step, "time": now, "key": key, "old": old,
                                    "new": new}) + "\n" for key, old, new in changes)
        _append(record, lines)


def _append(path: str, text: str) -> None:
    """Appends `text` to a local file, or rewrites a remote (gs://) one, which cannot append."""
    if "://" in path:
        from etils import epath

        target = epath.Path(path)
        target.write_text((target.read_text() if target.exists() else "") + text)
        return
    with open(path, "a") as f:
        f.write(text)


def _grid_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "samples", f"step_{step:08d}.png")


def _make_writer(workdir: str) -> summaries.SummaryWriter:
    """TensorBoard events from process 0 only (no TensorFlow needed); the console gets our own
    progress line."""
    return summaries.SummaryWriter(workdir, enabled=jax.process_index() == 0)


def _restored_data_position(config, manager, start_step: int) -> bytes | None:
    """A streaming run's data position saved with checkpoint `start_step` (None at step 0 or
    for in-memory data, whose order is a function of the step)."""
    if config.data.in_memory or start_step == 0:
        return None
    position = checkpointing.read_data_position(manager, start_step)
    if position is None:
        logging.warning(
            "checkpoint %d holds no streaming data position for process %d of %d (written "
            "with in-memory data, by an older version or by another number of processes): "
            "the data stream starts from its beginning, so the resumed run sees other images "
            "than an uninterrupted one would", start_step, jax.process_index(),
            jax.process_count())
    return position


def _save(manager, step: int, state, config, clock: "_Clock",
          data_position: bytes | None = None) -> None:
    """Starts checkpoint `step`; first waits for the previous one itself, so the wait is named
    in our line (instead of Orbax's warning) and counted in the ETA."""
    started = time.perf_counter()
    checkpointing.wait_until_finished(manager)
    waited = time.perf_counter() - started
    checkpointing.save(manager, step, state, config, data_position)
    clock.saved(time.perf_counter() - started)
    logging.info("saving checkpoint %d to %s (%.1f s%s, then in the background)", step,
                 manager.directory, clock.save_seconds,
                 f", {waited:.1f} s of it waiting for the previous save: consider a larger "
                 "training.checkpoint_every" if waited > 1.0 else "")


class _SkippedUpdates:
    """Updates skipped as non-finite: how many since the previous save point, and the step of
    the first since the newest checkpoint. A save point with skips in its window keeps the
    newest checkpoint instead of saving weights that may have diverged."""

    def __init__(self):
        self.in_window = 0
        self.first: int | None = None

    def record(self, before: int, skipped: np.ndarray) -> None:
        """`skipped[k]`: whether the update of step before + 1 + k was skipped."""
        if skipped.any():
            self.in_window += int(skipped.sum())
            if self.first is None:
                self.first = before + 1 + int(np.argmax(skipped))

    def save_point(self, manager, step: int, state, config, clock: "_Clock",
                   data_position: bytes | None = None) -> None:
        if self.in_window:
            _withhold_warning(manager, step, self.in_window, self.first)
        else:
            _save(manager, step, state, config, clock, data_position)
            self.first = None
        self.in_window = 0


def _withhold_warning(manager, step: int, skipped: int, first_skipped: int) -> None:
    newest = manager.latest_step()
    logging.warning(
        "not saving checkpoint %d: %d update(s) since the previous save point were skipped as "
        "non-finite (the first at step %d), so the weights may have diverged; %s", step,
        skipped, first_skipped,
        "there is no checkpoint yet" if newest is None
        else f"the newest checkpoint stays {newest}")


def _divergence_message(manager, tc, streak: int, first_skipped: int, step: int) -> str:
    """The stop message: what happened, and the newest checkpoint from before it to resume."""
    good = [s for s in manager.all_steps() if s < first_skipped]
    head = (f"{streak} consecutive updates had a non-finite loss or gradient (the last at "
            f"step {step}); none was applied, and no checkpoint was written since the first "
            f"skipped update, at step {first_skipped}.")
    lower = f"--config.training.lr={tc.lr / 10:g}"
    if not good:
        return (f"{head} No checkpoint in {manager.directory} is older than that; start again "
                f"with a lower learning rate (now {tc.lr:g}), e.g. {lower}, or check the data.")
    return (f"{head} The newest checkpoint saved before it is step {max(good)} in "
            f"{manager.directory}; resume from it with a lower learning rate (now {tc.lr:g}): "
            f"--checkpoint={max(good)} {lower}, or check the data.")


class _Clock:
    """Training throughput without compile, grid or checkpoint time, and an ETA that adds the
    expected cost of the grids and checkpoints still to come."""

    def __init__(self, config):
        self.config = config
        self.train_seconds = 0.0
        self.train_steps = 0
        self._recent = (0.0, 0)
        self.grids_drawn = 0
        self.grid_seconds = 0.0
        self.save_seconds = 0.0

    def trained(self, steps: int, seconds: float) -> None:
        self.train_steps += steps
        self.train_seconds += seconds

    def recent_rate(self) -> float:
        """Steps/s since the previous call (the previous progress line)."""
        seconds = self.train_seconds - self._recent[0]
        steps = self.train_steps - self._recent[1]
        self._recent = (self.train_seconds, self.train_steps)
        return steps / max(seconds, 1e-9)

    def drew_grid(self, seconds: float) -> None:
        self.grids_drawn += 1
        self.grid_seconds = seconds

    def saved(self, seconds: float) -> None:
        self.save_seconds = seconds

    def _grid_estimate(self) -> float:
        """Seconds per grid: the last one drawn, or before any, from the training throughput
        (a sampler step is one forward pass, about a third of a train step's work)."""
        if self.grids_drawn:
            return self.grid_seconds
        c = self.config
        sampler_steps = (c.sample.ddim_steps if c.sample.method == "ddim"
                         else c.diffusion.num_timesteps)
        seconds_per_step = self.train_seconds / max(self.train_steps, 1)
        return (sampler_steps * c.training.num_grid_samples / c.training.batch_size / 3
                * seconds_per_step)

    def eta(self, step: int) -> float:
        tc = self.config.training
        rate = self.train_steps / max(self.train_seconds, 1e-9)
        return ((tc.num_steps - step) / rate
                + events_left(step, tc.num_steps, tc.sample_every) * self._grid_estimate()
                + events_left(step, tc.num_steps, tc.checkpoint_every) * self.save_seconds)


def events_left(step: int, num_steps: int, every: int) -> int:
    """How many of the loop's every-`every` events (and the one at `num_steps`) lie in
    (step, num_steps]."""
    if step >= num_steps:
        return 0
    regular = num_steps // every - step // every if every > 0 else 0
    return regular + (0 if every > 0 and num_steps % every == 0 else 1)


_global_norm = jax.jit(optim.global_norm)

