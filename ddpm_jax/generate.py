"""The sampling library: n samples from EMA weights on the whole `data` mesh, for
`--mode=sample` (`sample_mode.py`), `Pipeline.sample` (`api.py`), the training grids
(`train.write_sample_grid`), evaluation (`evaluate.make_sample_parts`) and the editing tasks
(`edit_mode.py`, which take `chain_method` and `sampling_model_fn` from here).

* Method: `check_method` / `chain_method` turn `config.sample` into a `chains.Method`
  (ancestral, DDIM, or the DPM-Solver++ / UniPC ODE solvers of `solvers.py`, each one
  `lax.scan`); `make_sample_fn` compiles it over the mesh, each device on its share of a batch.
* Labels: `sample_labels`, one rule for every caller: the requested classes in blocks over all
  n samples (one grid row per class), never per batch.
* Keys: sample i (its global index among all the samples of a call of `batches`) draws its
  x_T and its step noise from its own key `fold_in(key, i)` alone (`example_keys`), so a key
  gives the same samples whatever `sample.batch_size`, the device count or the caller (the CLI,
  the API, a resumed eval), as vdm keys its examples.
* Batches: `batches` pads the last call to the batch size, trims it and moves every call's
  samples to the host (`to_host`).

Class-conditional models (`model.num_classes > 1`) sample each image for its label with
classifier-free guidance `sample.guidance_scale` (`model_fns.guided_model_fn`: one batched
model call per step, in every sampler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import chains, diffusion, model_fns, solvers, unet
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


def sample_labels(config, num_samples: int) -> tuple[np.ndarray | None, int | None]:
    """(labels [num_samples] int32, samples per class) of `num_samples` samples: for a
    conditional model `labels_per_sample` of `requested_labels` over all of them, whatever the
    batch; (None, None) for an unconditional one."""
    classes = requested_labels(config)
    if classes is None:
        return None, None
    return labels_per_sample(classes, num_samples)


def sampling_model_fn(graphdef: nnx.GraphDef, params: model_fns.Params, config,
                      labels: jax.Array | None) -> Callable:
    """The sampler's `(x, t) -> output`: plain for unconditional models; for conditional ones the
    guided output, with w = 0 (unconditional) and w = 1 (conditional) in a single-batch call,
    which `model_fns.guide` shows to give the same numbers."""
    if not unet.is_conditional(config.model.num_classes):
        return model_fns.model_fn(graphdef, params)
    w = guidance_scale(config)
    if w == 0:
        return model_fns.model_fn(graphdef, params, None)
    if w == 1:
        return model_fns.model_fn(graphdef, params, labels)
    return model_fns.guided_model_fn(graphdef, params, labels, w)


DEFAULT_SOLVER_STEPS = 25  # dpm_solver / unipc when sample.num_steps = 0
METHODS = chains.METHODS
# configs/default.py's values of the fields added with the solvers, for configs saved before.
SOLVER_DEFAULTS = {"num_steps": 0, "solver_order": 2, "timestep_spacing": "logsnr"}


def chain_method(sample_config, method: str | None = None, *, start: int | None = None,
                 num_timesteps: int | None = None) -> chains.Method:
    """The `chains.Method` of `config.sample` (or of `method` instead of `sample.method`).

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
    return chains.Method(name, steps, int(sc["solver_order"]), str(sc["timestep_spacing"]),
                         float(sc["ddim_eta"]), str(sc["ddim_skip"]))


def check_method(config, method: str | None = None, *, start: int | None = None
                 ) -> chains.Method:
    """`chain_method` (from paper step `start`, default T), with the time grid of a solver
    built once on the host, so that a step count its spacing cannot take is one error line
    before anything is read or written."""
    num_timesteps = config.diffusion.num_timesteps
    start = num_timesteps if start is None else start
    chosen = chain_method(config.sample, method, start=start, num_timesteps=num_timesteps)
    chains.check_start(chosen, start)
    chains.check_mean_type(chosen, config.diffusion.mean_type)
    if chosen.name in chains.SOLVER_METHODS and start > 0:
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


# How `batches` keys its samples (recorded with eval parts): by each sample's global index.
SAMPLE_KEYING = "fold_in(key, sample index)"


def example_keys(key: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_T keys, chain keys) [N] of the samples with global `indices` [N]: sample i's key
    fold_in(key, i), split in two. The chain key draws sample i's noise at step t as
    normal(fold_in(chain key, t)) (`chains`), so nothing depends on the batch."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(indices)
    return keys[:, 0], keys[:, 1]


def initial_noise(noise_keys: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
    """x_T [N, *image_shape] ~ N(0, I) of the samples with these x_T keys [N] (`example_keys`)."""
    return jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)


def make_sample_fn(graphdef: nnx.GraphDef, config, mesh: Mesh, batch_size: int, *,
                   method: str | None = None, progress_every: int = 0,
                   given_noise: bool = False) -> Callable:
    """jit(shard_map(sampler)): `(params, key, labels=None, noise=None, first_index=0) ->
    samples [batch_size, H, W, C]` in [-1, 1], or `(samples, progress [K, batch_size, H, W, C])`
    when `progress_every > 0` (x̂_0 every `progress_every` model calls).

    Row r of the batch is sample `first_index + r`, drawn from its `example_keys`. `labels`
    [batch_size] int: the class of each sample (conditional models only; default one row per
    class of `sample.labels`). With `given_noise`, `noise` [batch_size, H, W, C] is the chain's
    x_T (each device takes its rows) instead of one drawn from the key."""
    sc, dc = config.sample, config.diffusion
    chosen = check_method(config, method)
    classes = requested_labels(config)
    per_device = check_batch_divisible(batch_size, mesh, "sample.batch_size")
    schedule = diffusion.schedule_from_config(dc)
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    xstart_every = progress_every or None

    def device_sample(params, key, first_index, labels, x_T):
        rows = first_index + lax.axis_index(DATA_AXIS) * per_device + jnp.arange(per_device)
        noise_keys, chain_keys = example_keys(key, rows)
        if x_T is None:
            x_T = initial_noise(noise_keys, shape[1:])
        model_fn = sampling_model_fn(graphdef, params, config, labels)
        return chains.run_chain(chosen, model_fn, schedule, x_T, chain_keys,
                                mean_type=dc.mean_type, var_type=dc.var_type,
                                clip_denoised=sc.clip_denoised, xstart_every=xstart_every)

    out_specs = (P(DATA_AXIS), P(None, DATA_AXIS)) if xstart_every else P(DATA_AXIS)
    # Only the inputs in use are arguments: unconditional, drawn noise is (params, key, index).
    extra = (["labels"] if classes is not None else []) + (["noise"] if given_noise else [])

    def program(params, key, first_index, *args):
        given = dict(zip(extra, args))
        return device_sample(params, key, first_index, given.get("labels"), given.get("noise"))

    compiled = jax.jit(jax.shard_map(program, mesh=mesh,
                                     in_specs=(P(), P(), P()) + (P(DATA_AXIS),) * len(extra),
                                     out_specs=out_specs))
    # Called without labels, one batch takes the labels of that many samples.
    return _SampleFn(compiled, sample_labels(config, batch_size)[0], given_noise, shape, mesh)


class _SampleFn:
    """A compiled sampler `(params, key, labels=None, noise=None, first_index=0)`: labels default
    to one row per requested class (conditional models), noise is required with `given_noise`;
    `lower` as on a jitted function."""

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

    def _args(self, labels, noise, first_index) -> tuple:
        args = [np.int32(first_index)]
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

    def __call__(self, params, key, labels=None, noise=None, first_index: int = 0):
        return self._compiled(params, key, *self._args(labels, noise, first_index))

    def lower(self, params, key, labels=None, noise=None, first_index: int = 0):
        return self._compiled.lower(params, key, *self._args(labels, noise, first_index))


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


def batches(graphdef: nnx.GraphDef, params: model_fns.Params, config, mesh: Mesh,
             num_samples: int, key: jax.Array, *, batch_size: int | None = None,
             method: str | None = None, progress_every: int = 0, first_call: int = 0,
             labels: np.ndarray | None = None, sample_fn: Callable | None = None,
             noise: np.ndarray | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yields (samples, progress or None) per call until `num_samples` are made (last trimmed).

    Sample i (0 ≤ i < num_samples) depends only on `key`, i and its label: its x_T and step
    noise come from `example_keys(key, i)`, so any `batch_size`, device count or `first_call`
    (the calls before it skipped, as a resumed eval does) gives the same samples. `labels`
    [num_samples]: the class of each sample for a conditional model (default `sample_labels`:
    one block of rows per class of `sample.labels`). `noise` [num_samples, H, W, C]: the x_T of
    each sample instead of drawing them from the key (the step noise of ancestral / DDIM η > 0
    sampling still comes from the key). `sample_fn`: a compiled `make_sample_fn` for these
    settings, `batch_size` and noise, to reuse one."""
    batch_size = batch_size or config.sample.batch_size
    noise = None if noise is None else check_noise(config, num_samples, noise)
    classes = requested_labels(config)
    if labels is None:
        labels = sample_labels(config, num_samples)[0]
        labels = np.zeros(num_samples, np.int32) if labels is None else labels
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
        out = sample_fn(params, key, None if classes is None else call_labels, call_noise,
                        first_index=call * batch_size)
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


def grid_batches(graphdef: nnx.GraphDef, params: model_fns.Params, config, mesh: Mesh,
                  num_samples: int, key: jax.Array, *, batch_size: int, progress_every: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """`batches` for a training grid (`grid_config`). `progress_every` counts ancestral
    steps; a faster method keeps x̂_0 at the same fraction of its chain (every ⌈k·S/T⌉ model
    calls)."""
    grid = grid_config(config)
    chosen = check_method(grid)
    if progress_every and chosen.name != "ancestral":
        progress_every = max(1, -(-progress_every * chosen.num_steps
                                  // config.diffusion.num_timesteps))
    return batches(graphdef, params, grid, mesh, num_samples, key, batch_size=batch_size,
                    progress_every=progress_every)
