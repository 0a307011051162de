"""A Python API for notebooks: `ddpm_jax.load(workdir)` → the config, EMA weights, a jitted
denoiser and a sampler.

    import jax, ddpm_jax
    pipe = ddpm_jax.load("runs/cifar10_released")      # a workdir, or workdir/checkpoints/<step>
    eps = pipe.denoise(x_t, t)                          # NHWC floats in [-1, 1], integer t
    images = pipe.sample(16, jax.random.key(0))         # uint8 [16, 32, 32, 3]
    fast = pipe.sample(16, 0, method="dpm_solver", num_steps=25, output="float")
    same_x_T = pipe.sample(16, 0, method="unipc", noise=x_T)  # x_T: [16, 32, 32, 3] floats

The weights are those `--mode=sample` and `--mode=eval` use (the checkpoint's EMA), and
`sample` draws through `generate.batches`, which keys each sample by its index: the same key
gives the same images as `--mode=sample` with that seed, whatever the batch size or the number
of devices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ddpm_jax import generate, images, model_fns, parallel
from ddpm_jax.edit_mode import check_image_shape

OUTPUTS = ("uint8", "float")


def _tuples(value: Any) -> Any:
    """JSON turns the config's tuples into lists; restore them (as `configs/*.py` write them)."""
    if isinstance(value, dict):
        return {key: _tuples(v) for key, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def resolve_checkpoint_path(path: str) -> tuple[str, int | None]:
    """(workdir, step or None for the latest) for a workdir or a `workdir/checkpoints/<step>`."""
    path = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
    parent, name = os.path.split(path)
    if re.fullmatch(r"\d+", name) and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    if name == "checkpoints":
        return parent, None
    return path, None


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config stored next to the state in the latest (or given) checkpoint of `workdir`."""
    import orbax.checkpoint as ocp

    from ddpm_jax import checkpointing

    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {directory}; pass a workdir written by training or by "
            "`python -m ddpm_jax.convert`, or a workdir/checkpoints/<step> directory")
    manager = checkpointing.make_manager(workdir, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {directory}; "
                                f"available steps: {list(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_tuples(restored["config"]))


class Pipeline:
    """A loaded model: `config`, EMA `params` (replicated over `mesh`), `step`, `denoise` and
    `sample`."""

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 params: model_fns.Params, step: int, mesh: Mesh):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.step = step
        self.mesh = mesh
        self._apply = jax.jit(lambda p, x, t: model_fns.model_fn(graphdef, p)(x, t))
        self._sample_fns: dict[tuple, Any] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        data = self.config.data
        return (data.image_size, data.image_size, data.channels)

    def denoise(self, x: Any, t: Any) -> jax.Array:
        """The model output for x_t: ε_θ(x_t, t) for the paper's eps models (dropout off).

        x: [B, H, W, C] floats in [-1, 1] (NHWC); t: an integer or [B] integers in 0..T-1.
        For learned variances the output has 2C channels (ε, then the variance part). A batch
        divisible by the number of devices is split over them, otherwise every device runs it.
        """
        x = self._check_denoise_input(x)
        t = self._check_timesteps(t, x.shape[0])
        num_devices = self.mesh.devices.size
        sharding = (parallel.data_sharding(self.mesh) if x.shape[0] % num_devices == 0
                    else parallel.replicated(self.mesh))
        x, t = jax.device_put((x, t), sharding)
        return self._apply(self.params, x, t)

    def _check_denoise_input(self, x: Any) -> jax.Array:
        """x as float32 NHWC of the model's shape; integer pixels (uint8 0..255) are refused, the
        model takes floats in [-1, 1] (scale with x / 127.5 - 1)."""
        dtype = x.dtype if isinstance(x, jax.Array) else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"denoise expects float images in [-1, 1], got dtype {dtype}; for "
                             "uint8 pixels pass x / 127.5 - 1.")
        x = jnp.asarray(x, jnp.float32)
        size, _, channels = self.image_shape
        check_image_shape(x.shape, size, channels, "denoise: x",
                          f"pass x of shape [batch, {size}, {size}, {channels}] (NHWC)")
        return x

    def _check_timesteps(self, t: Any, batch: int) -> jax.Array:
        """t as int32 [batch]: integers in 0..T-1, one or one per image."""
        values = np.asarray(t)
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"denoise expects integer timesteps, got dtype {values.dtype}")
        num_timesteps = self.config.diffusion.num_timesteps
        bad = values[(values < 0) | (values >= num_timesteps)]
        if bad.size:
            raise ValueError(f"denoise: timestep {int(bad.flat[0])} is outside the model's "
                             f"0..{num_timesteps - 1}")
        if values.ndim > 1 or values.size not in (1, batch):
            raise ValueError(f"denoise expects t as one integer or {batch} integers (one per "
                             f"image), got shape {values.shape}")
        return jnp.broadcast_to(jnp.asarray(values, jnp.int32).reshape(-1), (batch,))

    def _sample_config(self, method: str | None, overrides: dict[str, Any]
                       ) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict(self.config.to_dict())
        for field, value in generate.SOLVER_DEFAULTS.items():  # a config saved before them
            if field not in config.sample:
                config.sample[field] = value
        unknown = sorted(set(overrides) - set(config.sample.keys()))
        if unknown:
            raise ValueError(f"sample() got unknown option(s) {unknown}; use fields of "
                             f"config.sample: {sorted(config.sample.keys())}")
        config.sample.update(overrides)
        if method is not None:
            config.sample.method = method
        return config

    def sample(self, n: int, key: jax.Array | int = 0, *, method: str | None = None,
               batch_size: int | None = None, output: str = "uint8", noise: Any = None,
               **overrides: Any) -> np.ndarray:
        """n samples [n, H, W, C] from the EMA model, as uint8 (rounded) or floats in [-1, 1].

        method: 'ancestral' (the paper's 1000 steps), 'ddim', 'dpm_solver' (DPM-Solver++) or
        'unipc'; default `config.sample.method`.
        noise: x_T [n, H, W, C] (floats) to start every chain from, e.g. the same points for
        several samplers; default drawn from `key`. ddim (η = 0), dpm_solver and unipc are
        then deterministic; ancestral sampling still draws its step noise from `key`.
        overrides: fields of `config.sample`, e.g. num_steps=25, solver_order=3,
        timestep_spacing='trailing', ddim_eta=0.0, clip_denoised.
        The batch per call is `batch_size` or min(n, config.sample.batch_size), rounded up to a
        multiple of the device count; it changes the speed, not the images. Compiled samplers
        are cached per setting.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is unknown; use one of {OUTPUTS}")
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one sample")
        config = self._sample_config(method, overrides)
        if noise is not None:
            noise = generate.check_noise(config, n, noise)
        num_devices = self.mesh.devices.size
        batch_size = batch_size or min(n, config.sample.batch_size)
        batch_size = -(-batch_size // num_devices) * num_devices
        cache_key = (batch_size, noise is not None, config.sample.to_json())
        if cache_key not in self._sample_fns:
            self._sample_fns[cache_key] = generate.make_sample_fn(
                self.graphdef, config, self.mesh, batch_size, given_noise=noise is not None)
        key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
        # The keying and labels of `--mode=sample` (labels over all n, not per call).
        parts = [samples for samples, _ in generate.batches(
            self.graphdef, self.params, config, self.mesh, n, key, batch_size=batch_size,
            sample_fn=self._sample_fns[cache_key], noise=noise)]
        samples = np.concatenate(parts)[:n]
        return images.to_uint8(samples) if output == "uint8" else samples

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Pipeline(step={self.step}, image_shape={self.image_shape}, ch={m.ch}, "
                f"ch_mult={tuple(m.ch_mult)}, T={self.config.diffusion.num_timesteps}, "
                f"devices={self.mesh.devices.size})")


def load(path: str, config: ml_collections.ConfigDict | None = None, *,
         devices: Sequence[jax.Device] | None = None) -> Pipeline:
    """Load the EMA weights of a checkpoint for use in Python.

    path: a workdir (its latest checkpoint) or `workdir/checkpoints/<step>`.
    config: default the config saved with the checkpoint; one passed here must describe the same
      model (checked like a resumed run).
    devices: the devices to use (default: this process's); samples and batches are split over them.
    """
    workdir, step = resolve_checkpoint_path(path)
    if config is None:
        config = saved_config(workdir, step)
    mesh = parallel.make_mesh(list(devices) if devices is not None else jax.local_devices())
    from ddpm_jax import checkpointing

    graphdef, params, step = checkpointing.load_ema_params(config, workdir, mesh, checkpoint=step)
    return Pipeline(config, graphdef, params, step, mesh)
