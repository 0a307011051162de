"""Config checks that run before any mode touches the workdir.

`validate(config, mode, mesh)` raises a one-line `ValueError` (or `FileNotFoundError`) naming
the first mistake and the flag that fixes it. `modes.run_mode` calls it after the device mesh
exists and before anything is created or written, so a bad command leaves the workdir as it was.
Checks that need the data (its size) or the workdir (the checkpoint's config) happen where
those are read, also before the first write.
"""

from __future__ import annotations

import os
import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import chains, diffusion, gradients, model_fns, optim, profiling, solvers, unet
from ddpm_jax.parallel import check_batch_divisible

# Every value the code accepts for each enumerated config entry, from the modules that
# implement them.
CHOICES: dict[str, tuple[str, ...]] = {
    "diffusion.beta_schedule": diffusion.BETA_SCHEDULES,
    "diffusion.mean_type": diffusion.MEAN_TYPES,
    "diffusion.var_type": diffusion.VAR_TYPES,
    "diffusion.loss_type": diffusion.LOSS_TYPES,
    "diffusion.t0_log_variance": diffusion.T0_LOG_VARIANCES,
    "training.clip_mode": gradients.CLIP_MODES,
    "training.adam_eps_style": optim.ADAM_EPS_STYLES,
    "sample.method": chains.METHODS,
    "sample.timestep_spacing": solvers.SPACINGS,
    "training.grid_method": ("sample",) + chains.METHODS,
    "sample.ddim_skip": chains.DDIM_SKIPS,
    "model.dtype": unet.COMPUTE_DTYPES,
}

BUILT_IN_DATASETS = ("digits", "imagefolder")


def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


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


@dataclass(frozen=True)
class Rule:
    """The type of one config entry and, for numbers, its range: `low`/`high` inclusive unless
    `low_open`/`high_open`; `items` applies the rule to every entry of a tuple."""

    kind: type  # bool, int, float (an int is accepted), str or tuple
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    items: "Rule | None" = None

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '≥'} {self.low:g}"
        else:
            text = ""
        return f"{text} ({self.note})" if self.note else text

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


BOOL, STR, ANY_INT = Rule(bool), Rule(str), Rule(int)
COUNT = Rule(int, 1)  # ≥ 1
EVERY = Rule(int, 0, note="0 = never")
RATE = Rule(float, 0, 1, high_open=True)  # [0, 1)

TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string",
              tuple: "a tuple"}

# Every entry of configs/default.py. Entries whose range depends on another entry (beta_end,
# ddim_steps, t0, channels, ch, the model's resolutions) are checked in code below.
RULES: dict[str, Rule] = {
    "seed": ANY_INT,
    "compilation_cache_dir": STR,
    "data.name": STR, "data.split": STR, "data.eval_split": STR,
    "data.image_size": COUNT,
    "data.channels": ANY_INT,
    "data.random_flip": BOOL, "data.data_dir": STR, "data.folder": STR, "data.in_memory": BOOL,
    "data.shuffle_buffer": COUNT,
    "data.prefetch": Rule(int, 0, note="0 = no prefetching"),
    "model.ch": COUNT,
    "model.ch_mult": Rule(tuple, items=COUNT),
    "model.num_res_blocks": COUNT,
    "model.attn_resolutions": Rule(tuple, items=COUNT),
    "model.dropout": RATE,
    "model.num_classes": Rule(int, 0, note="0 or 1 = unconditional"),
    "model.class_dropout": Rule(float, 0, 1),
    "model.dtype": STR,
    "diffusion.num_timesteps": COUNT,
    "diffusion.beta_start": Rule(float, 0, 1, low_open=True, high_open=True),
    "diffusion.beta_end": Rule(float, 0, 1, low_open=True, high_open=True),
    "diffusion.beta_schedule": STR, "diffusion.mean_type": STR, "diffusion.var_type": STR,
    "diffusion.loss_type": STR, "diffusion.t0_log_variance": STR,
    "training.batch_size": COUNT,
    "training.num_steps": COUNT,
    "training.lr": Rule(float, 0, low_open=True),
    "training.warmup_steps": Rule(int, 0),
    "training.adam_b1": RATE,
    "training.adam_b2": RATE,
    "training.adam_eps": Rule(float, 0, low_open=True),
    "training.adam_eps_style": STR,
    "training.grad_clip": Rule(float, 0, note="0 = no clipping"),
    "training.clip_mode": STR,
    "training.clip_group_size": COUNT,
    "training.microbatch_size": Rule(int, 0, note="0 = the whole shard"),
    "training.ema_decay": RATE,
    "training.ema_warmup": BOOL,
    "training.steps_per_call": COUNT,
    "training.log_every": EVERY,
    "training.checkpoint_every": EVERY,
    "training.keep_checkpoints": COUNT,
    "training.archive_every": EVERY,
    "training.sample_every": EVERY,
    "training.num_grid_samples": COUNT,
    "training.grid_method": STR,
    "training.grid_steps": COUNT,
    "training.max_nonfinite": COUNT,
    "training.profile_steps": Rule(tuple, items=COUNT),
    "sample.method": STR,
    "sample.num_samples": COUNT,
    "sample.batch_size": COUNT,
    "sample.ddim_steps": COUNT,
    "sample.num_steps": Rule(int, 0, note="0 = the method's default"),
    "sample.solver_order": Rule(int, 1, solvers.MAX_ORDER),
    "sample.timestep_spacing": STR,
    "sample.ddim_eta": Rule(float, 0),
    "sample.ddim_skip": STR,
    "sample.clip_denoised": BOOL,
    "sample.progress_every": Rule(int, 0, note="0 = off"),
    "sample.seed": ANY_INT,
    "sample.guidance_scale": Rule(float),
    "sample.labels": STR,
    "sample.task": STR, "sample.input": STR, "sample.input2": STR, "sample.mask": STR,
    "sample.t0": Rule(int, -1, note="-1 = from sample.strength"),
    "sample.strength": Rule(float, 0, 1),
    "sample.num_mix": Rule(int, 2, note="the mixing weights linspace(0, 1, num_mix) run from "
                                        "the first image to the second"),
    "sample.denoise_steps": STR,
    "sample.compose_labels": STR,
    "sample.anagram_flip": STR,
    "sample.hybrid_kernel_size": Rule(int, 1, note="odd"),
    "sample.hybrid_sigma": Rule(float, 0, low_open=True),
    "eval.num_samples": Rule(int, 0, note="0 = no IS/FID"),
    "eval.batch_size": COUNT,
    "eval.seed": ANY_INT,
    "eval.inception_weights": STR,
    "eval.quantize": BOOL,
    "eval.is_splits": COUNT,
    "eval.stats_dir": STR, "eval.train_stats": STR, "eval.test_stats": STR,
    "eval.ref_max_images": Rule(int, 0, note="0 = the whole split"),
    "eval.bpd": BOOL, "eval.bpd_train": BOOL,
    "eval.bpd_batch_size": COUNT,
    "eval.bpd_num_images": Rule(int, 0, note="0 = all"),
    "eval.bpd_clip_denoised": BOOL,
    "eval.samplers": STR,
}


def _has_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):  # True is an int to Python, not to a config
        return False
    if kind is int:
        return isinstance(value, (int, np.integer))
    if kind is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def _check_rule(key: str, value: Any, rule: Rule) -> None:
    if not _has_type(value, rule.kind):
        range_text = rule.range_text()
        _require(False, key, value, TYPE_NAMES[rule.kind]
                 + (f" {range_text}" if range_text and not rule.items else ""))
    if rule.items is not None:
        for item in value:
            if not (_has_type(item, rule.items.kind) and rule.items.in_range(item)):
                _require(False, key, value, f"a tuple of integers {rule.items.range_text()}")
    elif rule.kind in (int, float):
        _require(rule.in_range(value), key, value, rule.range_text())


def check_types_and_ranges(config) -> None:
    """Each entry of RULES present in `config` has its type and lies in its range."""
    for key, rule in RULES.items():
        try:
            value = _get(config, key)
        except (KeyError, AttributeError):  # an older config without the entry: its default
            continue
        _check_rule(key, value, rule)


def check_numbers(config) -> None:
    """The ranges that depend on other entries."""
    dc, sc = config.diffusion, config.sample
    _require(dc.beta_start <= dc.beta_end, "diffusion.beta_end", dc.beta_end,
             f"in [diffusion.beta_start={dc.beta_start}, 1) with beta_start > 0")
    profiling.check_window(tuple(config.training.get("profile_steps", ())))
    if sc.method == "ddim":
        _require(1 <= sc.ddim_steps <= dc.num_timesteps, "sample.ddim_steps", sc.ddim_steps,
                 f"in [1, diffusion.num_timesteps={dc.num_timesteps}]")
    # The solvers' step count (generate.check_method then checks what a spacing allows).
    _require(sc.num_steps == 0 or 1 <= sc.num_steps <= dc.num_timesteps, "sample.num_steps",
             sc.num_steps, f"0 (the method's default) or in [1, diffusion.num_timesteps="
             f"{dc.num_timesteps}]")


def check_label_dropout(model_config) -> None:
    """Training a conditional model: a label dropout of 1 would never show it a label (RULES
    allows 1 for the unconditional models, which ignore it)."""
    class_dropout = model_config.get("class_dropout", 0.0)
    if unet.is_conditional(model_config.num_classes):
        _require(class_dropout < 1, "model.class_dropout", class_dropout,
                 "in [0, 1) for a conditional model (model.num_classes > 1)")


def check_sample_settings(config) -> None:
    """Labels, guidance and the editing task's settings parse and fit the model."""
    from ddpm_jax import composed, edit_mode, generate

    generate.requested_labels(config)
    task = config.sample.task  # an unknown one is reported by edit_mode.prepare_inputs
    if task in ("img2img", "inpaint", "interpolate"):
        edit_mode.resolve_t0(config, task)
    elif task == "denoise":
        edit_mode.parse_steps(config.sample.denoise_steps, config.diffusion.num_timesteps)
    elif task in composed.TASKS:
        composed.check_settings(config)


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


def check_batches(config, mode: str, mesh: Mesh) -> None:
    """Every batch the mode splits over the mesh (and, for training, over the processes) splits
    evenly."""
    if mode == "train":
        tc = config.training
        check_batch_divisible(tc.batch_size, mesh, "training.batch_size")
        if tc.batch_size % jax.process_count():
            raise ValueError(f"training.batch_size={tc.batch_size} must divide over "
                             f"{jax.process_count()} processes.")
        gradients.group_layout(tc, tc.batch_size, mesh.devices.size)
    elif mode == "sample":
        check_batch_divisible(config.sample.batch_size, mesh, "sample.batch_size")
    elif mode == "eval":
        ec = config.eval
        if ec.num_samples:
            check_batch_divisible(ec.batch_size, mesh, "eval.batch_size")
        if ec.bpd:
            check_batch_divisible(ec.bpd_batch_size, mesh, "eval.bpd_batch_size")


def check_eval_counts(eval_config) -> None:
    """`--mode=eval` has something to do, and enough samples for its Inception Score splits."""
    ec = eval_config
    if ec.num_samples and ec.num_samples < max(ec.is_splits, 2):
        raise ValueError(f"eval.num_samples={ec.num_samples} is too few for "
                         f"eval.is_splits={ec.is_splits}; raise --config.eval.num_samples.")
    if not ec.num_samples and not ec.bpd:
        raise ValueError("nothing to evaluate: eval.num_samples=0 and eval.bpd=False; set "
                         "--config.eval.num_samples or --config.eval.bpd=True.")


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


def check_training_run(config, mesh: Mesh) -> None:
    """The rules the training loop itself relies on, for callers of `train.train_and_evaluate`
    that did not run `validate` first (modes.run_mode does)."""
    check_types_and_ranges(config)
    check_batches(config, "train", mesh)
    check_label_dropout(config.model)


def validate(config, mode: str, mesh: Mesh | None = None) -> None:
    """All checks for `mode` (one of `modes.MODES`); `mesh` (the data mesh) enables the
    batch-split checks."""
    check_types_and_ranges(config)
    check_choices(config)
    model_fns.check_model_shape(config)
    if mode == "info":
        return
    check_numbers(config)
    check_sample_settings(config)
    if mesh is not None:
        check_batches(config, mode, mesh)
    if mode == "train":
        check_label_dropout(config.model)
        check_data_source(config.data)
    if mode == "train" and config.training.sample_every:
        # The grid sampler fails now, not at the first grid.
        from ddpm_jax import generate

        generate.check_method(generate.grid_config(config))
    if mode == "eval":
        check_eval_inputs(config.eval)
        check_eval_counts(config.eval)
        from ddpm_jax import sampler_list

        sampler_list.parse_samplers(config)
