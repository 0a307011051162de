"""Generating images with the whole `data` mesh: each device runs the compiled sampler
(`sample.method` through `samplers.run_chain`: ancestral, DDIM, or the DPM-Solver++ / UniPC
ODE solvers of `solvers.py`, each one `lax.scan`) on its share of the batch.

Device d draws its x_T and step noise from `fold_in(key, d)`, so a key gives the same samples
on the same device count. Batches larger than one call are generated in consecutive calls
keyed `fold_in(key, call index)`.

Class-conditional models (`model.num_classes > 1`) sample each image for a requested label
with classifier-free guidance `sample.guidance_scale` (`models.guided_denoise_fn`: one batched
model call per step, in every sampler); `--mode=sample` writes one grid row per class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, models, samplers, solvers, unet
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


DEFAULT_SOLVER_STEPS = 25  # dpm_solver / unipc when sample.num_steps = 0
METHODS = samplers.METHODS
# configs/default.py's values of the fields added with the solvers, for configs saved before.
SOLVER_DEFAULTS = {"num_steps": 0, "solver_order": 2, "timestep_spacing": "logsnr"}


def chain_method(sample_config, method: str | None = None, *, start: int | None = None,
                 num_timesteps: int | None = None) -> samplers.Method:
    """The `samplers.Method` of `config.sample` (or of `method` instead of `sample.method`).

    `sample.num_steps` = 0 means the method's default: `sample.ddim_steps` (its older name,
    kept as an alias) for ddim, 25 for dpm_solver and unipc; an editing chain from paper step
    `start` of `num_timesteps` takes the default's share ⌈default · start / T⌉. Ancestral
    sampling takes every step and refuses a step count."""
    name = method or sample_config.method
    if name not in METHODS:
        raise ValueError(f"sample.method={name!r} is unknown; set --config.sample.method to one "
                         f"of {', '.join(METHODS)}.")
    sc = {**SOLVER_DEFAULTS, **sample_config.to_dict()}
    steps = int(sc["num_steps"])
    if name == "ancestral":
        if steps:
            raise ValueError(
                f"sample.num_steps={steps} is for ddim, dpm_solver and unipc; the ancestral "
                "sampler takes all diffusion.num_timesteps steps. Drop --config.sample.num_steps "
                "or set --config.sample.method.")
    elif not steps:
        steps = int(sc["ddim_steps"]) if name == "ddim" else DEFAULT_SOLVER_STEPS
        if start is not None and start < num_timesteps:
            steps = max(1, -(-steps * start // num_timesteps))
    return samplers.Method(name, steps, int(sc["solver_order"]), str(sc["timestep_spacing"]),
                           float(sc["ddim_eta"]), str(sc["ddim_skip"]))


def check_method(config, method: str | None = None, *, start: int | None = None
                 ) -> samplers.Method:
    """`chain_method` (from paper step `start`, default T), with the time grid of a solver
    built once on the host, so that a step count its spacing cannot take is one error line
    before anything is read or written."""
    num_timesteps = config.diffusion.num_timesteps
    start = num_timesteps if start is None else start
    chosen = chain_method(config.sample, method, start=start, num_timesteps=num_timesteps)
    samplers.check_start(chosen, start)
    samplers.check_mean_type(chosen, config.diffusion.mean_type)
    if chosen.name in samplers.SOLVER_METHODS and start > 0:
        table = np.asarray(diffusion.schedule_from_config(config.diffusion).alphas_cumprod)
        table = table[:start]
        try:
            solvers.solver_timesteps(table, chosen.num_steps, chosen.spacing)
        except ValueError as e:
            where = f" from paper step {start}" if start < num_timesteps else ""
            raise ValueError(f"sample.num_steps={chosen.num_steps} with sample.timestep_spacing="
                             f"{chosen.spacing}{where}: {e} (--config.sample.num_steps / "
                             "--config.sample.timestep_spacing).") from None
    return chosen


def make_sample_fn(graphdef: nnx.GraphDef, config, mesh: Mesh, batch_size: int, *,
                   method: str | None = None, progress_every: int = 0,
                   given_noise: bool = False) -> Callable:
    """jit(shard_map(sampler)): `(params, key, labels=None, noise=None) -> samples
    [batch_size, H, W, C]` in [-1, 1], or `(samples, progress [K, batch_size, H, W, C])` when
    `progress_every > 0` (x̂_0 every `progress_every` model calls).

    `labels` [batch_size] int: the class of each sample (conditional models only; default one
    row per class of `sample.labels`). With `given_noise`, `noise` [batch_size, H, W, C] is the
    chain's x_T (each device takes its rows) instead of one drawn from the key."""
    sc, dc = config.sample, config.diffusion
    chosen = check_method(config, method)
    classes = requested_labels(config)
    per_device = check_batch_divisible(batch_size, mesh, "sample.batch_size")
    schedule = diffusion.schedule_from_config(dc)
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    xstart_every = progress_every or None

    def device_sample(params, key, labels, x_T):
        key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        noise_key, loop_key = jax.random.split(key)
        if x_T is None:
            x_T = jax.random.normal(noise_key, shape, jnp.float32)
        denoise = make_denoise_fn(graphdef, params, config, labels)
        return samplers.run_chain(chosen, denoise, schedule, x_T, loop_key,
                                  mean_type=dc.mean_type, var_type=dc.var_type,
                                  clip_denoised=sc.clip_denoised, xstart_every=xstart_every)

    out_specs = (P(DATA_AXIS), P(None, DATA_AXIS)) if xstart_every else P(DATA_AXIS)
    # Only the inputs in use are arguments: unconditional, drawn noise is (params, key).
    extra = (["labels"] if classes is not None else []) + (["noise"] if given_noise else [])

    def program(params, key, *args):
        given = dict(zip(extra, args))
        return device_sample(params, key, given.get("labels"), given.get("noise"))

    compiled = jax.jit(jax.shard_map(program, mesh=mesh,
                                     in_specs=(P(), P()) + (P(DATA_AXIS),) * len(extra),
                                     out_specs=out_specs))
    default_labels = None if classes is None else labels_per_sample(classes, batch_size)[0]
    return _SampleFn(compiled, default_labels, given_noise, shape, mesh)


class _SampleFn:
    """A compiled sampler `(params, key, labels=None, noise=None)`: labels default to one row per
    requested class (conditional models), noise is required with `given_noise`; `lower` as on a
    jitted function."""

    def __init__(self, compiled: Callable, default_labels: np.ndarray | None, given_noise: bool,
                 device_shape: tuple[int, ...], mesh: Mesh):
        self._compiled = compiled
        self._default_labels = default_labels
        self._given_noise = given_noise
        self._noise_shape = (device_shape[0] * mesh.devices.size,) + device_shape[1:]
        self._sharding = NamedSharding(mesh, P(DATA_AXIS))

    def _shard(self, values: np.ndarray) -> jax.Array:
        # Every process holds all rows; each device takes its own (also across hosts).
        return jax.make_array_from_callback(values.shape, self._sharding,
                                            lambda index: values[index])

    def _args(self, labels, noise) -> tuple:
        args = []
        if self._default_labels is not None:
            labels = self._default_labels if labels is None else np.asarray(labels, np.int32)
            if labels.shape != self._default_labels.shape:
                raise ValueError(f"labels must have shape {self._default_labels.shape}, got "
                                 f"{labels.shape}")
            args.append(self._shard(labels))
        if self._given_noise:
            noise = np.asarray(noise, np.float32)
            if noise.shape != self._noise_shape:
                raise ValueError(f"noise must have shape {self._noise_shape}, got {noise.shape}")
            args.append(self._shard(noise))
        elif noise is not None:
            raise ValueError("this sampler draws x_T from the key; build it with "
                             "given_noise=True to pass noise")
        return tuple(args)

    def __call__(self, params, key, labels=None, noise=None):
        return self._compiled(params, key, *self._args(labels, noise))

    def lower(self, params, key, labels=None, noise=None):
        return self._compiled.lower(params, key, *self._args(labels, noise))


def to_host(x: jax.Array) -> np.ndarray:
    """The full global array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def check_noise(config, num_samples: int, noise) -> np.ndarray:
    """`noise` as float32 x_T [num_samples, H, W, C], finite; else a one-line ValueError."""
    noise = np.asarray(noise, np.float32)
    shape = (num_samples, config.data.image_size, config.data.image_size, config.data.channels)
    if noise.shape != shape:
        raise ValueError(f"noise must be x_T of shape {shape} (n, H, W, C), got {noise.shape}.")
    if not np.all(np.isfinite(noise)):
        raise ValueError("noise holds NaN or infinite values; pass finite x_T.")
    return noise


def generate(graphdef: nnx.GraphDef, params: models.Params, config, mesh: Mesh,
             num_samples: int, key: jax.Array, *, batch_size: int | None = None,
             method: str | None = None, progress_every: int = 0, first_call: int = 0,
             labels: np.ndarray | None = None, sample_fn: Callable | None = None,
             noise: np.ndarray | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yields (samples, progress or None) per call until `num_samples` are made (last trimmed).

    `labels` [num_samples]: the class of each sample for a conditional model (default: one
    block of rows per class of `sample.labels`, see `labels_per_sample`). `noise`
    [num_samples, H, W, C]: the x_T of each sample instead of drawing them from the key (the
    step noise of ancestral / DDIM η > 0 sampling still comes from the key). `sample_fn`: a
    compiled `make_sample_fn` for these settings, `batch_size` and noise, to reuse one."""
    batch_size = batch_size or config.sample.batch_size
    noise = None if noise is None else check_noise(config, num_samples, noise)
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
                                            progress_every=progress_every,
                                            given_noise=noise is not None)
    num_calls = -(-num_samples // batch_size)
    for call in range(first_call, num_calls):
        rows = slice(call * batch_size, (call + 1) * batch_size)
        call_labels = labels[rows]
        call_labels = np.pad(call_labels, (0, batch_size - len(call_labels)), mode="edge")
        call_noise = None
        if noise is not None:  # the padding rows are sampled and then dropped
            call_noise = np.pad(noise[rows], [(0, batch_size - len(noise[rows]))] + [(0, 0)] * 3)
        call_key = jax.random.fold_in(key, call)
        out = sample_fn(params, call_key, None if classes is None else call_labels, call_noise)
        samples, progress = out if progress_every else (out, None)
        keep = min(batch_size, num_samples - call * batch_size)
        samples = to_host(samples)[:keep]
        progress = to_host(progress)[:, :keep] if progress is not None else None
        yield samples, progress


def _steps_that_fit(config, method: str, steps: int) -> int:
    """The most model calls ≤ `steps` that `method`'s time grid can take on this schedule."""
    num_timesteps = config.diffusion.num_timesteps
    if method == "ddim":
        return min(steps, num_timesteps)
    table = diffusion.schedule_from_config(config.diffusion).alphas_cumprod
    for count in range(min(steps, num_timesteps - 1), 1, -1):
        try:
            solvers.solver_timesteps(table, count, config.sample.timestep_spacing)
            return count
        except ValueError:
            continue
    return 1


def grid_config(config):
    """The config of training sample grids: `training.grid_method` / `training.grid_steps` in
    place of `sample.method` / `sample.num_steps` ("sample" = `config.sample` as it is). A schedule
    too short for `grid_steps` calls (e.g. T = 20 in tests) takes as many as its grid allows."""
    tc = config.training
    if tc.get("grid_method", "sample") == "sample":
        return config
    grid = ml_collections.ConfigDict(config.to_dict())
    grid.sample.method = tc.grid_method
    grid.sample.num_steps = (0 if tc.grid_method == "ancestral"
                             else _steps_that_fit(config, tc.grid_method, int(tc.grid_steps)))
    return grid


def generate_grid(graphdef: nnx.GraphDef, params: models.Params, config, mesh: Mesh,
                  num_samples: int, key: jax.Array, *, batch_size: int, progress_every: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """`generate` for a training grid (`grid_config`). `progress_every` counts ancestral steps;
    a faster method keeps x̂_0 at the same fraction of its chain (every ⌈k·S/T⌉ model calls)."""
    grid = grid_config(config)
    chosen = check_method(grid)
    if progress_every and chosen.name != "ancestral":
        progress_every = max(1, -(-progress_every * chosen.num_steps
                                  // config.diffusion.num_timesteps))
    return generate(graphdef, params, grid, mesh, num_samples, key, batch_size=batch_size,
                    progress_every=progress_every)


# Fields of `config.sample` that only editing tasks read; `--mode=sample` generation ignores them.
EDIT_ONLY_FIELDS = ("task", "input", "input2", "mask", "t0", "strength", "num_mix",
                    "denoise_steps", "compose_labels", "anagram_flip", "hybrid_kernel_size",
                    "hybrid_sigma")
DDIM_FIELDS = ("ddim_steps", "ddim_eta", "ddim_skip")
SOLVER_FIELDS = ("solver_order", "timestep_spacing")
# What each method reads of `config.sample` beyond the common fields (num_steps as resolved).
METHOD_FIELDS = {"ancestral": ("progress_every",), "ddim": DDIM_FIELDS + ("num_steps",),
                 "dpm_solver": SOLVER_FIELDS + ("num_steps",),
                 "unipc": SOLVER_FIELDS + ("num_steps",)}
SETTINGS_FILE = "settings.json"


def output_settings(config, step: int, num_devices: int, sample: dict) -> dict:
    """What decides a `--mode=sample` result: the checkpoint step, the device count (x_T and the
    step noise are keyed per device), the model and diffusion configs and the given
    `config.sample` fields. Fields not known to be irrelevant are kept, so a new field can only
    make a new folder, never an overwrite."""
    return {"step": int(step), "devices": int(num_devices), "sample": sample,
            "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
            "data": {"image_size": config.data.image_size, "channels": config.data.channels}}


def method_settings(sample: dict) -> dict:
    """`sample` (a `config.sample` dict) without the fields of other methods, with num_steps as
    the method resolves it (so the old name ddim_steps and num_steps give the same folder).
    Ancestral settings read as before the solvers existed."""
    method = sample["method"]
    other = {field for fields in METHOD_FIELDS.values() for field in fields}
    out = {k: v for k, v in sample.items() if k not in other - set(METHOD_FIELDS[method])}
    if method != "ancestral":
        out["num_steps"] = chain_method(ml_collections.ConfigDict(sample)).num_steps
        out.pop("ddim_steps", None)
    return out


def generate_settings(config, step: int, num_devices: int) -> dict:
    sample = {k: v for k, v in config.sample.to_dict().items() if k not in EDIT_ONLY_FIELDS}
    return output_settings(config, step, num_devices, method_settings(sample))


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
    check_method(config)
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
