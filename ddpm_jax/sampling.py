"""Generating images with the whole `data` mesh: each device runs the compiled sampler
(`samplers.ancestral_sample` / `ddim_sample`, one `lax.scan`) on its share of the batch.

Device d draws its x_T and step noise from `fold_in(key, d)`, so a key gives the same samples
on the same device count. Batches larger than one call are generated in consecutive calls
keyed `fold_in(key, call index)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from ddpm_jax import diffusion, models, samplers
from ddpm_jax.parallel import DATA_AXIS, check_batch_divisible


def make_sample_fn(graphdef: nnx.GraphDef, config, mesh: Mesh, batch_size: int, *,
                   method: str | None = None, progress_every: int = 0) -> Callable:
    """jit(shard_map(sampler)): `(params, key) -> samples [batch_size, H, W, C]` in [-1, 1],
    or `(samples, progress [K, batch_size, H, W, C])` when `progress_every > 0`."""
    sc, dc = config.sample, config.diffusion
    method = method or sc.method
    per_device = check_batch_divisible(batch_size, mesh, "sample.batch_size")
    schedule = diffusion.schedule_from_config(dc)
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    xstart_every = progress_every or None
    if method == "ddim":
        timesteps = samplers.ddim_timesteps(dc.num_timesteps, sc.ddim_steps, sc.ddim_skip)
    elif method != "ancestral":
        raise ValueError(f"sample.method={method!r} is unknown; use 'ancestral' or 'ddim'.")

    def device_sample(params, key):
        key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, shape, jnp.float32)
        denoise = models.denoise_fn(graphdef, params)
        if method == "ddim":
            return samplers.ddim_sample(
                denoise, schedule, x_T, loop_key, timesteps=timesteps, eta=sc.ddim_eta,
                mean_type=dc.mean_type, clip_denoised=sc.clip_denoised,
                xstart_every=xstart_every)
        return samplers.ancestral_sample(
            denoise, schedule, x_T, loop_key, mean_type=dc.mean_type, var_type=dc.var_type,
            clip_denoised=sc.clip_denoised, xstart_every=xstart_every)

    out_specs = (P(DATA_AXIS), P(None, DATA_AXIS)) if xstart_every else P(DATA_AXIS)
    return jax.jit(jax.shard_map(device_sample, mesh=mesh, in_specs=(P(), P()),
                                 out_specs=out_specs))


def to_host(x: jax.Array) -> np.ndarray:
    """The full global array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(graphdef: nnx.GraphDef, params: models.Params, config, mesh: Mesh,
             num_samples: int, key: jax.Array, *, batch_size: int | None = None,
             method: str | None = None, progress_every: int = 0, first_call: int = 0
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yields (samples, progress or None) per call until `num_samples` are made (last trimmed)."""
    batch_size = batch_size or config.sample.batch_size
    sample_fn = make_sample_fn(graphdef, config, mesh, batch_size, method=method,
                               progress_every=progress_every)
    num_calls = -(-num_samples // batch_size)
    for call in range(first_call, num_calls):
        out = sample_fn(params, jax.random.fold_in(key, call))
        samples, progress = out if progress_every else (out, None)
        keep = min(batch_size, num_samples - call * batch_size)
        samples = to_host(samples)[:keep]
        progress = to_host(progress)[:, :keep] if progress is not None else None
        yield samples, progress


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
    """`--mode=sample`: EMA samples → `samples/<step>/samples.npz` (uint8), a grid PNG and,
    for ancestral sampling with `sample.progress_every`, a denoising strip and GIF."""
    import os

    from absl import logging

    from ddpm_jax import files, images, parallel

    sc = config.sample
    mesh = parallel.make_mesh()
    graphdef, params, step = load_ema_params(config, workdir, mesh, checkpoint)
    out_dir = os.path.join(workdir, "samples", f"{sc.method}_step{step:08d}_seed{sc.seed}")
    progress_every = sc.progress_every if sc.method == "ancestral" else 0
    key = jax.random.key(sc.seed)
    all_samples, first_progress = [], None
    for samples, progress in generate(graphdef, params, config, mesh, sc.num_samples, key,
                                      progress_every=progress_every):
        all_samples.append(images.to_uint8(samples))
        if first_progress is None:
            first_progress = progress
        logging.info("sampled %d / %d", sum(len(s) for s in all_samples), sc.num_samples)
    samples_uint8 = np.concatenate(all_samples)
    if jax.process_index() == 0:
        files.save_npz(os.path.join(out_dir, "samples.npz"), images=samples_uint8)
        images.save_png(os.path.join(out_dir, "grid.png"),
                        images.upscale(images.make_grid(samples_uint8[:100])))
        if first_progress is not None:
            images.save_png(os.path.join(out_dir, "progress.png"),
                            images.upscale(images.progress_strip(first_progress)))
            frames = [images.upscale(images.make_grid(images.to_uint8(p[:16])))
                      for p in first_progress[::-1]]
            images.save_gif(os.path.join(out_dir, "progress.gif"), frames)
        print(f"wrote {len(samples_uint8)} samples of step {step} to {out_dir}")
    return out_dir
