"""The training loop: data → sharded train step → metrics, checkpoints and EMA sample grids.

`train_and_evaluate(config, workdir)` resumes from the newest checkpoint in `workdir`, trains
until `training.num_steps`, and stops cleanly on SIGTERM (checkpoint, then exit 0), which is
what a preempted Cloud TPU VM sends.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from ddpm_jax import (checkpointing, images, input_pipeline, optim, parallel, sampling,
                      train_step, validate)


class NonFiniteError(RuntimeError):
    pass


class _StopSignal:
    """Remembers a SIGTERM/SIGINT so the loop can checkpoint before exiting."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


def validate_config(config, mesh) -> None:
    tc = config.training
    parallel.check_batch_divisible(tc.batch_size, mesh, "training.batch_size")
    if tc.steps_per_call < 1:
        raise ValueError(f"training.steps_per_call={tc.steps_per_call} must be ≥ 1.")
    if tc.batch_size % jax.process_count():
        raise ValueError(f"training.batch_size={tc.batch_size} must divide over "
                         f"{jax.process_count()} processes.")


def make_batches(config, dataset, start_step: int, steps_per_call: int):
    tc = config.training
    if config.data.in_memory:
        iterator = input_pipeline.in_memory_batches(
            dataset, global_batch=tc.batch_size, steps_per_call=steps_per_call,
            start_step=start_step, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
    else:
        iterator = input_pipeline.streaming_batches(
            config.data, global_batch=tc.batch_size, steps_per_call=steps_per_call,
            start_step=start_step, seed=config.seed)
    return input_pipeline.prefetch(iterator, config.data.prefetch)


def write_sample_grid(config, workdir, writer, graphdef, state, mesh, step: int) -> None:
    """EMA samples as a PNG grid + denoising strip under workdir/samples and in TensorBoard."""
    tc = config.training
    devices = mesh.devices.size
    batch = -(-tc.num_grid_samples // devices) * devices
    key = jax.random.fold_in(jax.random.key(config.sample.seed), step)
    progress_every = config.sample.progress_every if config.sample.method == "ancestral" else 0
    samples, progress = next(sampling.generate_grid(
        graphdef, state.ema_params, config, mesh, batch, key, batch_size=batch,
        progress_every=progress_every))
    grid = images.make_grid(images.to_uint8(samples[:tc.num_grid_samples]))
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


def train_and_evaluate(config, workdir: str) -> train_step.TrainState:
    """Trains (or resumes) the configured model in `workdir`; returns the final state."""
    tc = config.training
    mesh = parallel.make_mesh()
    parallel.log_layout(mesh)
    validate_config(config, mesh)

    dataset = input_pipeline.load_dataset(config.data) if config.data.in_memory else None
    if dataset is not None:
        logging.info("dataset %s: %d images of %s", config.data.name, len(dataset.images),
                     dataset.images.shape[1:])
        train_step.check_dataset_labels(config.model, dataset.num_classes, dataset.labels)
        validate.check_dataset_size(config, len(dataset.images))

    manager = checkpointing.make_manager(workdir, tc)
    graphdef, abstract_state = train_step.abstract_train_state(config)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
    state, start_step = checkpointing.restore(manager, abstract_state, config,
                                              shardings=shardings)
    if state is None:
        graphdef, state = train_step.create_train_state(config, mesh)
        start_step = 0
        logging.info("initialised a new model: %s parameters",
                     f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")
    else:
        logging.info("resuming from step %d", start_step)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in _flat_config(config).items()})
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=tc.num_steps, writer=writer, every_secs=60.0)
    seed_key = jax.random.key(config.seed)

    stop = _StopSignal().install()
    step = start_step
    step_fns = {}
    batches = None
    try:
        while step < tc.num_steps:
            steps_this_call = min(tc.steps_per_call, tc.num_steps - step)
            if batches is None or steps_this_call not in step_fns:
                batches = make_batches(config, dataset, step, steps_this_call)
                step_fns[steps_this_call] = train_step.make_train_step(graphdef, config, mesh)
            batch = next(batches)
            batch_images = parallel.to_global_array(batch.images, mesh, batch_axis=1)
            batch_labels = parallel.to_global_array(batch.labels, mesh, batch_axis=1)
            call_start = time.time()
            state, metrics = step_fns[steps_this_call](state, batch_images, batch_labels,
                                                       seed_key)
            before, step = step, step + steps_this_call
            report_progress(step, time.time())

            if crossed(before, step, tc.log_every) or step == tc.num_steps:
                summary = train_step.summarize_metrics(metrics)
                summary["param_norm"] = float(_global_norm(state.params))
                summary["steps_per_sec"] = steps_this_call / max(time.time() - call_start, 1e-9)
                writer.write_scalars(step, summary)
                eta = (tc.num_steps - step) / summary["steps_per_sec"]
                logging.info("step %d/%d loss %.5f grad_norm %.3f lr %.3g (%.2f steps/s, ETA %s)",
                             step, tc.num_steps, summary["loss"], summary["grad_norm"],
                             summary["learning_rate"], summary["steps_per_sec"],
                             _format_seconds(eta))
            streak = int(state.nonfinite_streak)
            if streak >= tc.max_nonfinite:
                raise NonFiniteError(
                    f"{streak} consecutive updates had a non-finite loss or gradient (last at "
                    f"step {step}); none was applied. Lower --config.training.lr or check the "
                    "data; the last good checkpoint is kept.")

            if crossed(before, step, tc.checkpoint_every) or step == tc.num_steps:
                checkpointing.save(manager, step, state, config)
            if crossed(before, step, tc.sample_every) or step == tc.num_steps:
                write_sample_grid(config, workdir, writer, graphdef, state, mesh, step)
            if stop.any_process():
                logging.warning("received %s at step %d: saving a checkpoint and exiting",
                                stop.received or "a stop signal", step)
                if manager.latest_step() != step:
                    checkpointing.save(manager, step, state, config)
                break
    finally:
        checkpointing.wait_until_finished(manager)
        writer.flush()
        stop.uninstall()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("train_and_evaluate:end")
    if stop.received:
        print(f"Stopped by {stop.received} at step {step}; checkpoint saved in "
              f"{checkpointing.checkpoint_dir(workdir)}. Run the same command to resume.")
    return state


_global_norm = jax.jit(optim.global_norm)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _flat_config(config) -> dict:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                visit(name + ".", value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config)
    return flat
