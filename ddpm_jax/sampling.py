"""Generating images with the whole `data` mesh: each device runs the compiled sampler
(`samplers.ancestral_sample` / `ddim_sample`, one `lax.scan`) on its share of the batch.

Device d draws its x_T and step noise from `fold_in(key, d)`, so a key gives the same samples
on the same device count. Batches larger than one call are generated in consecutive calls
keyed `fold_in(key, call index)`.

Class-conditional models (`model.num_classes > 1`) sample each image for a requested label
with classifier-free guidance `sample.guidance_scale` (`models.guided_denoise_fn`: one batched
model call per step, in both samplers); `--mode=sample` writes one grid row per class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, models, samplers, unet
from ddpm_jax.parallel import DATA_AXIS, check_batch_divisible


def guidance_scale(config) -> float:
    return float(config.sample.get("guidance_scale", 0.0))


def requested_labels(config) -> list[int] | None:
    """The classes to sample: `sample.labels` ("" = all classes 0..C-1) for a conditional model,
    None for an unconditional one. Raises a one-line ValueError for labels on an unconditional
    model, guidance on one, or a label outside [0, C)."""
    num_classes = config.model.num_classes
    text = str(config.sample.get("labels", "")).strip()
    w = guidance_scale(config)
    if not unet.is_conditional(num_classes):
        if w != 0:
            raise ValueError(
                f"sample.guidance_scale={w} needs a class-conditional model, but model.num_classes="
                f"{num_classes}; drop --config.sample.guidance_scale (or train with "
                "--config.model.num_classes=C).")
        if text:
            raise ValueError(
                f"sample.labels={text!r} needs a class-conditional model, but model.num_classes="
                f"{num_classes}; drop --config.sample.labels.")
        return None
    if not text:
        return list(range(num_classes))
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"sample.labels={text!r} is not a comma list of integers, e.g. '3,7'."
                         ) from None
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad or not labels:
        raise ValueError(f"sample.labels={text!r}: label {bad[0] if bad else ''} is outside the "
                         f"model's classes 0..{num_classes - 1}.")
    return labels


def labels_per_sample(classes: list[int], num_samples: int) -> tuple[np.ndarray, int]:
    """One grid row per requested class: sample i gets classes[i // per_row], per_row =
    ceil(num_samples / len(classes)). Returns (labels [num_samples] int32, per_row)."""
    per_row = -(-num_samples // len(classes))
    labels = np.asarray([classes[i // per_row] for i in range(num_samples)], np.int32)
    return labels, per_row


def make_denoise_fn(graphdef: nnx.GraphDef, params: models.Params, config,
                    labels: jax.Array | None) -> Callable:
    """The sampler's `(x, t) -> output`: plain for unconditional models; for conditional ones the
    guided output, with w = 0 (unconditional) and w = 1 (conditional) in a single-batch call,
    which `models.guide` shows to give the same numbers."""
    if not unet.is_conditional(config.model.num_classes):
        return models.denoise_fn(graphdef, params)
    w = guidance_scale(config)
    if w == 0:
        return models.denoise_fn(graphdef, params, None)
    if w == 1:
        return models.denoise_fn(graphdef, params, labels)
    return models.guided_denoise_fn(graphdef, params, labels, w)


def make_sample_fn(graphdef: nnx.GraphDef, config, mesh: Mesh, batch_size: int, *,
                   method: str | None = None, progress_every: int = 0) -> Callable:
    """jit(shard_map(sampler)): `(params, key, labels=None) -> samples [batch_size, H, W, C]` in
    [-1, 1], or `(samples, progress [K, batch_size, H, W, C])` when `progress_every > 0`.

    `labels` [batch_size] int: the class of each sample (conditional models only; default one
    row per class of `sample.labels`)."""
    sc, dc = config.sample, config.diffusion
    method = method or sc.method
    classes = requested_labels(config)
    per_device = check_batch_divisible(batch_size, mesh, "sample.batch_size")
    schedule = diffusion.schedule_from_config(dc)
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    xstart_every = progress_every or None
    if method == "ddim":
        timesteps = samplers.ddim_timesteps(dc.num_timesteps, sc.ddim_steps, sc.ddim_skip)
    elif method != "ancestral":
        raise ValueError(f"sample.method={method!r} is unknown; use 'ancestral' or 'ddim'.")

    def device_sample(params, key, labels=None):
        key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, shape, jnp.float32)
        denoise = make_denoise_fn(graphdef, params, config, labels)
        if method == "ddim":
            return samplers.ddim_sample(
                denoise, schedule, x_T, loop_key, timesteps=timesteps, eta=sc.ddim_eta,
                mean_type=dc.mean_type, clip_denoised=sc.clip_denoised,
                xstart_every=xstart_every)
        return samplers.ancestral_sample(
            denoise, schedule, x_T, loop_key, mean_type=dc.mean_type, var_type=dc.var_type,
            clip_denoised=sc.clip_denoised, xstart_every=xstart_every)

    out_specs = (P(DATA_AXIS), P(None, DATA_AXIS)) if xstart_every else P(DATA_AXIS)
    if classes is None:  # unconditional: the original (params, key) program
        return jax.jit(jax.shard_map(device_sample, mesh=mesh, in_specs=(P(), P()),
                                     out_specs=out_specs))
    compiled = jax.jit(jax.shard_map(device_sample, mesh=mesh,
                                     in_specs=(P(), P(), P(DATA_AXIS)), out_specs=out_specs))
    return _LabelledSampleFn(compiled, labels_per_sample(classes, batch_size)[0], mesh)


class _LabelledSampleFn:
    """A conditional sampler: `(params, key, labels=None)`, labels defaulting to one row per
    requested class; `lower` as on a jitted function."""

    def __init__(self, compiled: Callable, default_labels: np.ndarray, mesh: Mesh):
        self._compiled = compiled
        self._default_labels = default_labels
        self._sharding = NamedSharding(mesh, P(DATA_AXIS))

    def _labels(self, labels) -> jax.Array:
        labels = self._default_labels if labels is None else np.asarray(labels, np.int32)
        if labels.shape != self._default_labels.shape:
            raise ValueError(f"labels must have shape {self._default_labels.shape}, got "
                             f"{labels.shape}")
        # Every process holds all labels; each device takes its rows (also across hosts).
        return jax.make_array_from_callback(labels.shape, self._sharding,
                                            lambda index: labels[index])

    def __call__(self, params, key, labels=None):
        return self._compiled(params, key, self._labels(labels))

    def lower(self, params, key, labels=None):
        return self._compiled.lower(params, key, self._labels(labels))


def to_host(x: jax.Array) -> np.ndarray:
    """The full global array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(graphdef: nnx.GraphDef, params: models.Params, config, mesh: Mesh,
             num_samples: int, key: jax.Array, *, batch_size: int | None = None,
             method: str | None = None, progress_every: int = 0, first_call: int = 0,
             labels: np.ndarray | None = None, sample_fn: Callable | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yields (samples, progress or None) per call until `num_samples` are made (last trimmed).

    `labels` [num_samples]: the class of each sample for a conditional model (default: one
    block of rows per class of `sample.labels`, see `labels_per_sample`). `sample_fn`: a
    compiled `make_sample_fn` for these settings and `batch_size`, to reuse one."""
    batch_size = batch_size or config.sample.batch_size
    classes = requested_labels(config)
    if labels is None:
        labels = (np.zeros(num_samples, np.int32) if classes is None
                  else labels_per_sample(classes, num_samples)[0])
    labels = np.asarray(labels, np.int32)
    num_classes = config.model.num_classes
    if classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}.")
    sample_fn = sample_fn or make_sample_fn(graphdef, config, mesh, batch_size, method=method,
                                            progress_every=progress_every)
    num_calls = -(-num_samples // batch_size)
    for call in range(first_call, num_calls):
        call_labels = labels[call * batch_size:(call + 1) * batch_size]
        call_labels = np.pad(call_labels, (0, batch_size - len(call_labels)), mode="edge")
        call_key = jax.random.fold_in(key, call)
        out = (sample_fn(params, call_key) if classes is None
               else sample_fn(params, call_key, call_labels))
        samples, progress = out if progress_every else (out, None)
        keep = min(batch_size, num_samples - call * batch_size)
        samples = to_host(samples)[:keep]
        progress = to_host(progress)[:, :keep] if progress is not None else None
        yield samples, progress


# Fields of `config.sample` that only editing tasks read; `--mode=sample` generation ignores them.
EDIT_ONLY_FIELDS = ("task", "input", "input2", "mask", "t0", "strength", "num_mix",
                    "denoise_steps")
DDIM_FIELDS = ("ddim_steps", "ddim_eta", "ddim_skip")
SETTINGS_FILE = "settings.json"


def output_settings(config, step: int, num_devices: int, sample: dict) -> dict:
    """What decides a `--mode=sample` result: the checkpoint step, the device count (x_T and the
    step noise are keyed per device), the model and diffusion configs and the given
    `config.sample` fields. Fields not known to be irrelevant are kept, so a new field can only
    make a new folder, never an overwrite."""
    return {"step": int(step), "devices": int(num_devices), "sample": sample,
            "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
            "data": {"image_size": config.data.image_size, "channels": config.data.channels}}


def generate_settings(config, step: int, num_devices: int) -> dict:
    sample = {k: v for k, v in config.sample.to_dict().items() if k not in EDIT_ONLY_FIELDS}
    if sample["method"] == "ancestral":
        sample = {k: v for k, v in sample.items() if k not in DDIM_FIELDS}
    else:  # DDIM writes no progress strip
        sample.pop("progress_every", None)
    return output_settings(config, step, num_devices, sample)


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def output_dir(workdir: str, prefix: str, settings: dict) -> tuple[str, bool]:
    """(`workdir/samples/<prefix>_<hash>`, whether it already holds these settings' results).

    One folder per distinct settings, named by a hash of them, with the settings in
    `settings.json`: a run with other settings never replaces earlier results, the same settings
    again give the same folder (and, being deterministic, the same files). A folder of that name
    with other (or no) settings is refused, not overwritten."""
    from etils import epath  # local paths and gs:// alike, as files.atomic_write writes them

    digest = hashlib.sha256(_canonical(settings).encode()).hexdigest()[:10]
    path = os.path.join(workdir, "samples", f"{prefix}_{digest}")
    if not epath.Path(path).exists():
        return path, False
    try:
        saved = json.loads(epath.Path(path, SETTINGS_FILE).read_text())
        same = _canonical(saved) == _canonical(settings)
    except (OSError, ValueError):
        same = False
    if not same:
        raise ValueError(f"{path} exists but does not hold the results of these settings (its "
                         f"{SETTINGS_FILE} is missing or differs); move it away or use another "
                         "--workdir.")
    return path, True


def write_settings(out_dir: str, settings: dict) -> None:
    from ddpm_jax import files

    files.save_json(os.path.join(out_dir, SETTINGS_FILE), settings)


def report_written(what: str, out_dir: str, existed: bool) -> None:
    if existed:
        print(f"{out_dir} already held {what} for these settings; rewrote the same results")
    else:
        print(f"wrote {what} to {out_dir}")


def load_ema_params(config, workdir: str, mesh: Mesh, checkpoint: int | None = None
                    ) -> tuple[nnx.GraphDef, models.Params, int]:
    """EMA weights of the latest (or given) checkpoint in `workdir`, replicated over `mesh`."""
    from ddpm_jax import checkpointing, parallel, train_step

    manager = checkpointing.make_manager(workdir, read_only=True)
    if manager.latest_step() is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first "
            "(--mode=train) or convert released weights (python -m ddpm_jax.convert).")
    if checkpoint is not None and checkpoint not in manager.all_steps():
        raise FileNotFoundError(
            f"--checkpoint={checkpoint} is not in {checkpointing.checkpoint_dir(workdir)}; "
            f"available steps: {list(manager.all_steps())}.")
    graphdef, abstract_state = train_step.abstract_train_state(config)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
    state, step = checkpointing.restore(manager, abstract_state, config, step=checkpoint,
                                        shardings=shardings)
    return graphdef, state.ema_params, step


def run(config, workdir: str, checkpoint: int | None = None) -> str:
    """`--mode=sample`: EMA samples → `samples/<method>_step<step>_seed<seed>[_w<w>]_<hash>/`
    (see `output_dir`): `samples.npz` (uint8), a grid PNG, `settings.json` and, for ancestral
    sampling with `sample.progress_every`, a denoising strip and GIF.

    A conditional model samples `sample.labels` (default every class) with guidance
    `sample.guidance_scale`, one grid row per class, and saves the labels in the npz; the
    editing tasks (`sample.task != "generate"`) are run by `tasks.run`."""
    from absl import logging

    from ddpm_jax import files, images, parallel

    sc = config.sample
    task = sc.get("task", "generate")
    if task != "generate":
        from ddpm_jax import tasks

        return tasks.run(config, workdir, checkpoint)
    classes = requested_labels(config)  # bad labels/guidance fail before anything is read
    labels, per_row = (None, None) if classes is None else labels_per_sample(classes,
                                                                             sc.num_samples)
    mesh = parallel.make_mesh()
    graphdef, params, step = load_ema_params(config, workdir, mesh, checkpoint)
    name = f"{sc.method}_step{step:08d}_seed{sc.seed}"
    if classes is not None:
        name += f"_w{guidance_scale(config):g}"
    settings = generate_settings(config, step, mesh.devices.size)
    out_dir, existed = output_dir(workdir, name, settings)
    progress_every = sc.progress_every if sc.method == "ancestral" else 0
    key = jax.random.key(sc.seed)
    all_samples, first_progress = [], None
    for samples, progress in generate(graphdef, params, config, mesh, sc.num_samples, key,
                                      progress_every=progress_every, labels=labels):
        all_samples.append(images.to_uint8(samples))
        if first_progress is None:
            first_progress = progress
        logging.info("sampled %d / %d", sum(len(s) for s in all_samples), sc.num_samples)
    samples_uint8 = np.concatenate(all_samples)
    if jax.process_index() == 0:
        write_settings(out_dir, settings)
        if labels is None:
            files.save_npz(os.path.join(out_dir, "samples.npz"), images=samples_uint8)
            grid = images.make_grid(samples_uint8[:100])
        else:  # one row per requested class
            files.save_npz(os.path.join(out_dir, "samples.npz"), images=samples_uint8,
                           labels=labels)
            grid = images.make_grid(samples_uint8, columns=per_row)
        images.save_png(os.path.join(out_dir, "grid.png"), images.upscale(grid))
        if first_progress is not None:
            images.save_png(os.path.join(out_dir, "progress.png"),
                            images.upscale(images.progress_strip(first_progress)))
            frames = [images.upscale(images.make_grid(images.to_uint8(p[:16])))
                      for p in first_progress[::-1]]
            images.save_gif(os.path.join(out_dir, "progress.gif"), frames)
        report_written(f"{len(samples_uint8)} samples of step {step}", out_dir, existed)
    return out_dir
