"""Config checks that run before any mode touches the workdir.

`validate(config, mode, mesh)` raises a one-line `ValueError` (or `FileNotFoundError`) naming
the first mistake and the flag that fixes it. `main.run` calls it after the device mesh exists
and before anything is created or written, so a bad command leaves the workdir as it was.
Checks that need the data (its size) or the workdir (the checkpoint's config) happen where
those are read, also before the first write.
"""

from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from ddpm_jax import samplers, solvers

MODES = ("train", "sample", "eval", "info")

# Every value the code accepts for each enumerated config entry.
CHOICES: dict[str, tuple[str, ...]] = {
    "diffusion.beta_schedule": ("linear", "quad", "const", "jsd", "warmup10", "warmup50",
                                "cosine"),
    "diffusion.mean_type": ("eps", "xstart", "xprev"),
    "diffusion.var_type": ("fixedlarge", "fixedsmall", "learned", "learned_range"),
    "diffusion.loss_type": ("mse", "l1", "kl"),
    "training.clip_mode": ("group", "per_device", "global"),
    "training.adam_eps_style": ("tf", "optax"),
    "sample.method": samplers.METHODS,
    "sample.timestep_spacing": solvers.SPACINGS,
    "training.grid_method": ("sample",) + samplers.METHODS,
    "sample.ddim_skip": ("uniform", "quad"),
    "model.dtype": ("float32", "bfloat16"),
}

BUILT_IN_DATASETS = ("digits", "imagefolder")


def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is unknown; use one of {', '.join(MODES)}.")


def check_choices(config) -> None:
    """Each enumerated entry holds one of its known values."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is unknown; set --config.{key} to one of "
                             f"{', '.join(allowed)}.")


def _require(condition: bool, key: str, value: Any, rule: str) -> None:
    if not condition:
        raise ValueError(f"{key}={value!r} must be {rule}; set --config.{key}.")


def check_numbers(config) -> None:
    """Counts, rates and probabilities in their valid ranges."""
    tc, dc, sc = config.training, config.diffusion, config.sample
    _require(dc.num_timesteps >= 1, "diffusion.num_timesteps", dc.num_timesteps, "≥ 1")
    _require(0 < dc.beta_start <= dc.beta_end < 1, "diffusion.beta_end", dc.beta_end,
             f"in [diffusion.beta_start={dc.beta_start}, 1) with beta_start > 0")
    _require(tc.num_steps >= 1, "training.num_steps", tc.num_steps, "≥ 1")
    _require(tc.batch_size >= 1, "training.batch_size", tc.batch_size, "≥ 1")
    _require(tc.lr > 0, "training.lr", tc.lr, "> 0")
    _require(tc.warmup_steps >= 0, "training.warmup_steps", tc.warmup_steps, "≥ 0")
    _require(tc.steps_per_call >= 1, "training.steps_per_call", tc.steps_per_call, "≥ 1")
    _require(0 <= tc.ema_decay < 1, "training.ema_decay", tc.ema_decay, "in [0, 1)")
    _require(tc.grad_clip >= 0, "training.grad_clip", tc.grad_clip, "≥ 0 (0 = no clipping)")
    for key in ("log_every", "checkpoint_every", "sample_every", "archive_every"):
        _require(tc[key] >= 0, f"training.{key}", tc[key], "≥ 0 (0 = never)")
    _require(tc.keep_checkpoints >= 1, "training.keep_checkpoints", tc.keep_checkpoints, "≥ 1")
    _require(0 <= config.model.dropout < 1, "model.dropout", config.model.dropout, "in [0, 1)")
    _require(sc.num_samples >= 1, "sample.num_samples", sc.num_samples, "≥ 1")
    if sc.method == "ddim":
        _require(1 <= sc.ddim_steps <= dc.num_timesteps, "sample.ddim_steps", sc.ddim_steps,
                 f"in [1, diffusion.num_timesteps={dc.num_timesteps}]")
    # The samplers of issue #16 (sampling.check_method then checks what a spacing allows).
    _require(sc.num_steps == 0 or 1 <= sc.num_steps <= dc.num_timesteps, "sample.num_steps",
             sc.num_steps, f"0 (the method's default) or in [1, diffusion.num_timesteps="
             f"{dc.num_timesteps}]")
    _require(1 <= sc.solver_order <= solvers.MAX_ORDER, "sample.solver_order", sc.solver_order,
             f"in [1, {solvers.MAX_ORDER}]")
    _require(tc.grid_steps >= 1, "training.grid_steps", tc.grid_steps, "≥ 1")


def check_model_shape(config) -> None:
    """The UNet can take `data.image_size`, and attention sits at resolutions it has."""
    mc, size = config.model, config.data.image_size
    _require(size >= 1, "data.image_size", size, "≥ 1")
    _require(config.data.channels in (1, 3), "data.channels", config.data.channels, "1 or 3")
    halvings = len(mc.ch_mult) - 1
    if size % 2 ** halvings:
        raise ValueError(
            f"data.image_size={size} cannot be halved {halvings} times by "
            f"model.ch_mult={tuple(mc.ch_mult)}; use an image size divisible by {2 ** halvings}.")
    if mc.ch % 32:
        raise ValueError(f"model.ch={mc.ch} must be a multiple of 32 (GroupNorm uses 32 groups); "
                         "set --config.model.ch to e.g. 32, 64 or 128.")
    resolutions = [size // 2 ** level for level in range(halvings + 1)]
    stray = [r for r in mc.attn_resolutions if r not in resolutions]
    if stray:
        raise ValueError(
            f"model.attn_resolutions={tuple(mc.attn_resolutions)}: {stray[0]} is not a "
            f"resolution of this UNet ({', '.join(map(str, resolutions))}); "
            "set --config.model.attn_resolutions to some of those, or () for none.")


def check_data_source(data_config) -> None:
    """The dataset exists: an image folder with images, or a TFDS name TFDS knows."""
    name = data_config.name
    if name == "imagefolder":
        from ddpm_jax.input_pipeline import list_image_folder

        list_image_folder(data_config.folder)
    elif name not in BUILT_IN_DATASETS:
        import tensorflow_datasets as tfds

        try:
            tfds.builder_cls(name.split(":")[0].split("/")[0])
        except Exception as e:
            raise ValueError(
                f"unknown dataset data.name={name!r} ({type(e).__name__}); use a TFDS name (e.g. "
                "cifar10, mnist), 'digits' or 'imagefolder'.") from e


def check_dataset_size(config, num_examples: int) -> None:
    """The dataset fills at least one global batch (the loop drops incomplete batches)."""
    batch = config.training.batch_size
    if num_examples < batch:
        raise ValueError(
            f"the dataset {config.data.name!r} has {num_examples} images, fewer than one batch of "
            f"training.batch_size={batch}; lower --config.training.batch_size.")


def _check_divisible(value: int, mesh: Mesh, key: str) -> None:
    devices = mesh.devices.size
    if value % devices:
        raise ValueError(
            f"{key}={value} is not divisible by the {devices} devices of the data mesh; "
            f"set --config.{key} to a multiple of {devices}.")


def check_batches(config, mode: str, mesh: Mesh) -> None:
    """Every batch the mode splits over the mesh splits evenly."""
    if mode == "train":
        _check_divisible(config.training.batch_size, mesh, "training.batch_size")
    elif mode == "sample":
        _check_divisible(config.sample.batch_size, mesh, "sample.batch_size")
    elif mode == "eval":
        ec = config.eval
        if ec.num_samples:
            _check_divisible(ec.batch_size, mesh, "eval.batch_size")
        if ec.bpd:
            _check_divisible(ec.bpd_batch_size, mesh, "eval.bpd_batch_size")


def check_eval_inputs(eval_config) -> None:
    """Files named by `eval.*` exist (the default Inception weights are fetched on first use)."""
    for key in ("inception_weights", "train_stats", "test_stats"):
        path = eval_config[key]
        if path and "://" not in path and not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"eval.{key}={path!r} does not exist; point --config.eval.{key} at the file"
                + (" (pt_inception-2015-12-05-6726825d.pth or its .npz)"
                   if key == "inception_weights" else " (an npz with mu and sigma)")
                + " or set it to '' for the default.")


def validate(config, mode: str, mesh: Mesh | None = None) -> None:
    """All checks for `mode`; `mesh` (the data mesh) enables the batch-split checks."""
    check_mode(mode)
    check_choices(config)
    check_model_shape(config)
    if mode == "info":
        return
    check_numbers(config)
    if mesh is not None:
        check_batches(config, mode, mesh)
    if mode == "train":
        check_data_source(config.data)
    if mode == "train" and config.training.sample_every:
        # The grid sampler fails now, not at the first grid (sampling imports models, which
        # imports this module, hence the local import).
        from ddpm_jax import sampling

        sampling.check_method(sampling.grid_config(config))
    if mode == "eval":
        check_eval_inputs(config.eval)
