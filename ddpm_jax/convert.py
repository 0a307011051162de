"""Importers for released DDPM weights: the authors' TF checkpoints and diffusers model folders.

`params_from_diffusers` maps a diffusers `UNet2DModel` state dict (e.g. `google/ddpm-cifar10-32`,
`google/ddpm-celebahq-256`) onto our parameters. Names are derived through the original TF names
(`unet.tf_variable_names`), so every level/block index is computed from the model, not hard-coded.
`params_from_tf` does the same for the original TF checkpoints (docs/original.md §1.8), whose names and
layouts are ours already.

Command line (writes an Orbax checkpoint that `--mode=sample|eval|train` load like our own):

    python -m ddpm_jax.convert --from tf  diffusion_cifar10_model/model.ckpt-790000 \
        --config configs/cifar10.py --workdir runs/cifar10_released
    python -m ddpm_jax.convert --from diffusers ddpm-cifar10-32/ \
        --config configs/cifar10.py --workdir runs/cifar10_diffusers

Everything is read and checked before the workdir is created, so a failed import writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from ddpm_jax import cli, model_fns, torch_file
from ddpm_jax.unet import UNet, tf_variable_names

# TF layer scope -> diffusers submodule name.
_RESNET_LAYERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_LAYERS = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_LEAVES = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
_TOP_LEVEL = {
    "temb/dense0": "time_embedding.linear_1",
    "temb/dense1": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_MID_SUBMODULES = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
# Attention parameter names of diffusers < 0.15 checkpoints (as stored on the Hub).
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_layer(tf_layer_scopes: list[str]) -> str:
    """Translate TF scopes below a level (e.g. ['block_0', 'nin_shortcut']) to a diffusers path."""
    head, *rest = tf_layer_scopes
    kind, index = head.rsplit("_", 1)
    if kind == "block":
        return f"resnets.{index}.{_RESNET_LAYERS[rest[0]]}"
    if kind == "attn":
        return f"attentions.{index}.{_ATTN_LAYERS[rest[0]]}"
    raise KeyError(head)


def diffusers_name(tf_name: str, num_levels: int) -> str:
    """The diffusers `UNet2DModel` state-dict key holding the original TF variable `tf_name`.

    Our up level i is diffusers' `up_blocks[num_levels - 1 - i]` (diffusers numbers up blocks in
    execution order); down levels keep their index.
    E.g. 'model/up_1/block_2/nin_shortcut/W' -> 'up_blocks.2.resnets.2.conv_shortcut.weight' (L=4).
    """
    scopes = tf_name.split("/")
    if scopes[0] != "model":
        raise KeyError(tf_name)
    scopes, leaf = scopes[1:-1], _LEAVES[scopes[-1]]
    joined = "/".join(scopes)
    if joined in _TOP_LEVEL:
        return f"{_TOP_LEVEL[joined]}.{leaf}"
    head = scopes[0]
    if head == "mid":
        sub = _MID_SUBMODULES[scopes[1]]
        layer = _RESNET_LAYERS[scopes[2]] if scopes[1].startswith("block") else _ATTN_LAYERS[scopes[2]]
        return f"mid_block.{sub}.{layer}.{leaf}"
    direction, level = head.rsplit("_", 1)
    if direction == "down":
        prefix = f"down_blocks.{level}"
    elif direction == "up":
        prefix = f"up_blocks.{num_levels - 1 - int(level)}"
    else:
        raise KeyError(tf_name)
    if scopes[1] == "downsample":
        return f"{prefix}.downsamplers.0.conv.{leaf}"
    if scopes[1] == "upsample":
        return f"{prefix}.upsamplers.0.conv.{leaf}"
    return f"{prefix}.{_diffusers_layer(scopes[1:])}.{leaf}"


def _normalize_legacy_key(key: str) -> str:
    """Rename old diffusers attention keys (query/key/value/proj_attn) to the current names."""
    match = re.fullmatch(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))", key)
    if match is None:
        return key
    return f"{match.group(1)}{_LEGACY_ATTN[match.group(2)]}{match.group(3)}"


def _to_target_layout(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> TF/Flax layout.

    Conv OIHW -> HWIO; a 1x1 conv (O, I, 1, 1) or Linear (O, I) -> dense [I, O]; vectors unchanged.
    """
    if array.ndim == 4 and len(target_shape) == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
        return np.transpose(array[:, :, 0, 0])
    if array.ndim == 2:
        return np.transpose(array)
    return array


def params_from_diffusers(state_dict: Mapping[str, Any], model: UNet) -> nnx.State:
    """Build our parameter State from a diffusers `UNet2DModel` state dict.

    Pure: `model` (which may be an `nnx.eval_shape` model) is only read for structure; apply the
    result with `nnx.update(model, state)` or `nnx.merge(nnx.graphdef(model), state)`.
    Values are float32 jax arrays. Raises ValueError naming the variable if any parameter of
    `model` has no source tensor, any source tensor is unused or duplicated, or a shape differs.
    Architecture hyperparameters that leave no trace in the weights (timestep-embedding shift,
    padding, eps, heads) are checked by `check_diffusers_config`, not here.
    """
    source: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = _normalize_legacy_key(key)
        if name in source:
            raise ValueError(f"diffusers tensor {key!r} duplicates {name!r}")
        source[name] = np.asarray(value)

    num_levels = len(model.ch_mult)
    targets = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    filled = []
    used: set[str] = set()
    for tf_name, path in tf_variable_names(model).items():
        key = diffusers_name(tf_name, num_levels)
        target = targets[path]
        if key not in source:
            raise ValueError(f"diffusers state dict lacks {key!r} (needed for {tf_name})")
        if key in used:
            raise ValueError(f"diffusers tensor {key!r} would fill two parameters (second: {tf_name})")
        value = _to_target_layout(source[key], tuple(target.shape))
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {key!r} -> {tf_name}: source {source[key].shape} gives "
                f"{value.shape}, expected {tuple(target.shape)}"
            )
        used.add(key)
        filled.append((path, target.replace(jnp.asarray(value, dtype=jnp.float32))))
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"unused diffusers tensors: {unused}")
    return nnx.from_flat_state(filled)


def _expected_block_types(model: UNet) -> tuple[list[str], list[str]]:
    down = ["AttnDownBlock2D" if len(level.attn) else "DownBlock2D" for level in model.down]
    # diffusers lists up blocks in execution order: our level L-1 first.
    up = ["AttnUpBlock2D" if len(level.attn) else "UpBlock2D" for level in reversed(list(model.up))]
    return down, up


# Keys whose diffusers default differs from the original model: a config must state them.
_REQUIRED_DIFFUSERS_KEYS = ("flip_sin_to_cos", "freq_shift", "downsample_padding", "norm_eps")


def diffusers_unet_config(model: UNet) -> dict[str, Any]:
    """`UNet2DModel(**kwargs)` kwargs for a diffusers UNet computing the same function as `model`
    (which may be an `nnx.eval_shape` model); for configs/cifar10.py those of
    google/ddpm-cifar10-32. `dropout` is the model's, for training the diffusers copy."""
    if model.num_classes > 1:
        raise ValueError("a class-conditional UNet has no diffusers UNet2DModel equivalent")
    down_types, up_types = _expected_block_types(model)
    return dict(
        sample_size=model.resolution,
        in_channels=model.in_ch,
        out_channels=model.out_ch,
        block_out_channels=tuple(model.ch * m for m in model.ch_mult),
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        layers_per_block=model.num_res_blocks,
        norm_eps=1e-6,
        norm_num_groups=32,
        downsample_padding=0,  # TF SAME (0, 1) padding, not symmetric 1
        flip_sin_to_cos=False,  # sin first
        freq_shift=1,  # divisor half - 1
        attention_head_dim=None,  # single-head attention over all channels
        act_fn="silu",
        time_embedding_type="positional",
        center_input_sample=False,
        dropout=model.dropout,
    )


def check_diffusers_config(config: Mapping[str, Any], model: UNet) -> None:
    """Raise ValueError unless a diffusers `UNet2DModel` config computes the same function as `model`.

    Keys whose diffusers default differs from the original model (flip_sin_to_cos, freq_shift,
    downsample_padding, norm_eps, attention_head_dim) must be present; others are checked if
    present. `dropout` is not checked: it does not change the function at inference.
    """
    built = diffusers_unet_config(model)
    expected_values = {key: list(value) if isinstance(value, tuple) else value
                       for key, value in built.items()
                       if key not in ("attention_head_dim", "dropout")}
    required = {key: expected_values.pop(key) for key in _REQUIRED_DIFFUSERS_KEYS}
    optional = {
        **expected_values,
        "resnet_time_scale_shift": "default",
        "mid_block_scale_factor": 1,
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }
    for key, expected in required.items():
        if key not in config:
            raise ValueError(f"diffusers config lacks {key!r} (its default differs from the original)")
    for key, expected in {**required, **optional}.items():
        if key in config:
            value = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
            if value != expected:
                raise ValueError(f"diffusers config {key}={config[key]!r}, expected {expected!r}")
    # Single-head attention: diffusers uses heads = channels // attention_head_dim, with None = channels.
    if "attention_head_dim" not in config:
        raise ValueError("diffusers config lacks 'attention_head_dim' (default 8 means multi-head)")
    head_dim = config["attention_head_dim"]
    attn_channels = {model.ch * model.ch_mult[-1]} | {
        model.ch * model.ch_mult[i] for i, level in enumerate(model.down) if len(level.attn)
    }
    if head_dim is not None and any(head_dim != c for c in attn_channels):
        raise ValueError(f"diffusers config attention_head_dim={head_dim!r}: not single-head")


# ----------------------------------------------------------------------------------------------
# The authors' TF checkpoints (docs/original.md §1.8)
# ----------------------------------------------------------------------------------------------

MODEL_SCOPE = "model/"
EMA_SUFFIX = "/ExponentialMovingAverage"
# Per-variable slots of TF1 Adam (m and v) that a training checkpoint also holds; not weights.
_OPTIMIZER_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
_NAMES_SHOWN = 3


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _listing(names: Sequence[str]) -> str:
    """'a', 'b', 'c' and 4 more."""
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _model_summary(model: UNet) -> str:
    return (f"ch={model.ch}, ch_mult={model.ch_mult}, num_res_blocks={model.num_res_blocks}, "
            f"attn_resolutions={model.attn_resolutions}, resolution={model.resolution}, "
            f"in/out channels {model.in_ch}/{model.out_ch}")


def _parameter_shapes(model: UNet) -> dict[str, tuple[int, ...]]:
    """TF name -> shape of the parameter that holds it (TF layouts equal ours, §1.8)."""
    targets = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {name: tuple(targets[path].shape) for name, path in tf_variable_names(model).items()}


@dataclasses.dataclass(frozen=True)
class TFImportPlan:
    """Which checkpoint variable fills each parameter, keyed by the parameter's TF name.

    `params` are the training weights, `ema_params` the weights that sampling and evaluation use.
    """

    params: dict[str, str]
    ema_params: dict[str, str]
    ignored: int  # checkpoint variables that are not model weights (global_step, Adam slots, ...)
    description: str


def plan_tf_import(variable_shapes: Mapping[str, Sequence[int]], model: UNet) -> TFImportPlan:
    """Match a TF checkpoint's variables (name -> shape) to the parameters of `model`.

    The weights are `model/<scope>/<W|b|gamma|beta>`; `<var>/ExponentialMovingAverage` are their
    EMA shadows, preferred for sampling when present (the paper evaluates EMA weights only).
    Variables outside `model/` and Adam slots are ignored. Raises ValueError naming the variable
    for a parameter the checkpoint lacks, a model variable the config has no place for, a
    partial set of EMA shadows, or a shape that differs.
    """
    expected = _parameter_shapes(model)
    raw: dict[str, str] = {}
    shadows: dict[str, str] = {}
    ignored = 0
    for name in variable_shapes:
        if not name.startswith(MODEL_SCOPE) or name.endswith(_OPTIMIZER_SLOT_SUFFIXES):
            ignored += 1
        elif name.endswith(EMA_SUFFIX):
            shadows[name[: -len(EMA_SUFFIX)]] = name
        else:
            raw[name] = name
    if not raw and not shadows:
        raise ValueError(f"the TF checkpoint has no '{MODEL_SCOPE}...' variables; it is not a "
                         "DDPM checkpoint of the original code")
    for kind, found in (("", raw), ("EMA shadows of ", shadows)):
        unknown = sorted(found[n] for n in set(found) - set(expected))
        if unknown:
            raise ValueError(
                f"TF checkpoint variable {_listing(unknown)} has no counterpart in the configured "
                f"model ({_model_summary(model)}); use the config the checkpoint was trained with")
        missing = sorted(set(expected) - set(found))
        if found and missing:
            suffix = EMA_SUFFIX if found is shadows else ""
            raise ValueError(
                f"the TF checkpoint lacks {kind}{_listing([n + suffix for n in missing])} "
                f"({len(missing)} of {len(expected)}); it is incomplete or of another model")
    for name, shape in expected.items():
        for variable in (raw.get(name), shadows.get(name)):
            if variable is not None and tuple(variable_shapes[variable]) != shape:
                raise ValueError(
                    f"shape mismatch for TF variable {variable!r}: checkpoint "
                    f"{tuple(variable_shapes[variable])}, configured model {shape} "
                    f"({_model_summary(model)}); use the config the checkpoint was trained with")

    count = len(expected)
    if raw and shadows:
        description = (f"took the EMA shadows (<var>{EMA_SUFFIX}) of all {count} variables as "
                       "ema_params (used by sample/eval) and the raw weights as params (for "
                       "further training)")
    elif shadows:
        description = (f"took the EMA shadows (<var>{EMA_SUFFIX}) of all {count} variables as "
                       "params and ema_params (the checkpoint has no raw weights)")
    else:
        description = (f"took the raw weights of all {count} variables as params and ema_params "
                       f"(the checkpoint has no {EMA_SUFFIX} shadows)")
    return TFImportPlan(params=raw or shadows, ema_params=shadows or raw, ignored=ignored,
                        description=description)


def params_from_tf(arrays: Mapping[str, Any], model: UNet) -> nnx.State:
    """Our parameter State from arrays keyed by original TF name (e.g. 'model/conv_in/W').

    The layouts are the same (§1.8: conv HWIO, dense [in, out]), so values are only cast to
    float32. Raises ValueError naming the variable if one is missing, extra, non-float or
    of another shape.
    """
    targets = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = tf_variable_names(model)
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise ValueError(f"TF variable {_listing(extra)} has no counterpart in the configured "
                         f"model ({_model_summary(model)})")
    filled = []
    for name, path in names.items():
        if name not in arrays:
            raise ValueError(f"no value for TF variable {name!r}")
        value = np.asarray(arrays[name])
        target = targets[path]
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"TF variable {name!r} has dtype {value.dtype}, expected floats")
        if value.shape != tuple(target.shape):
            raise ValueError(f"shape mismatch for TF variable {name!r}: {value.shape}, "
                             f"expected {tuple(target.shape)}")
        filled.append((path, target.replace(jnp.asarray(value, dtype=jnp.float32))))
    return nnx.from_flat_state(filled)


def _tensorflow():
    """TensorFlow, imported on first use (only TF checkpoints need it)."""
    import tensorflow as tf

    return tf


def _tf_checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix for a prefix, a directory with a `checkpoint` file, or a file of it."""
    path = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", path)
    if os.path.isdir(path):
        prefix = _tensorflow().train.latest_checkpoint(path)
        if prefix is None:
            raise FileNotFoundError(
                f"no TF checkpoint in directory {path}; pass the checkpoint prefix, e.g. "
                f"{os.path.join(path, 'model.ckpt-790000')}")
        path = prefix
    if not os.path.exists(path + ".index"):
        raise FileNotFoundError(
            f"no TF checkpoint at {path} ({path}.index does not exist); pass the prefix shared "
            "by its .index and .data-* files, e.g. diffusion_cifar10_model/model.ckpt-790000")
    return path


TFArrays = dict[str, np.ndarray]  # keyed by TF name, e.g. 'model/conv_in/W'


def read_tf_checkpoint(path: str, model: UNet) -> tuple[TFArrays, TFArrays, int, str]:
    """Read the weights `plan_tf_import` selects: (params, ema_params, global_step, description).

    Uses TF2's `tf.train.load_checkpoint`, which reads TF1 checkpoints; no TF1 runtime needed.
    Both dicts are keyed by TF name. Every tensor is read here, so a truncated or corrupt data
    file fails (ValueError naming the variable) before anything is written.
    """
    prefix = _tf_checkpoint_prefix(path)
    try:
        reader = _tensorflow().train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:  # TF raises assorted OpErrors for damaged index files
        raise ValueError(f"cannot read the TF checkpoint {prefix} ({_first_line(e)}); it is "
                         "truncated or not a TF checkpoint") from e
    plan = plan_tf_import(shapes, model)

    def read(variable: str) -> np.ndarray:
        try:
            return np.asarray(reader.get_tensor(variable))
        except Exception as e:  # IndexError/DataLossError/OutOfRangeError for damaged data
            raise ValueError(f"cannot read {variable!r} from the TF checkpoint {prefix} "
                             f"({_first_line(e)}); the checkpoint is truncated or corrupt") from e

    arrays = {v: read(v) for v in {*plan.params.values(), *plan.ema_params.values()}}
    params = {name: arrays[variable] for name, variable in plan.params.items()}
    ema_params = {name: arrays[variable] for name, variable in plan.ema_params.items()}
    step = int(read("global_step")) if "global_step" in shapes else 0
    description = f"{plan.description}; ignored {plan.ignored} other variables"
    return params, ema_params, step, description


# ----------------------------------------------------------------------------------------------
# diffusers model folders (`UNet2DModel.save_pretrained`, or a Hub snapshot)
# ----------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _diffusers_model_folder(path: str) -> str:
    """`path` itself or its `unet/` subfolder (a pipeline snapshot), whichever holds a UNet."""
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(folder, "config.json")) and any(
                os.path.isfile(os.path.join(folder, f)) for f in DIFFUSERS_WEIGHT_FILES):
            return folder
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no diffusers model folder at {path}; pass the directory "
                                "written by UNet2DModel.save_pretrained (or a Hub snapshot)")
    raise FileNotFoundError(
        f"{path} (and {os.path.join(path, 'unet')}) lacks config.json plus one of "
        f"{', '.join(DIFFUSERS_WEIGHT_FILES)}; pass a UNet2DModel folder")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ValueError(f"reading {file} needs the safetensors package; pip install "
                         "safetensors") from e
    with safe_open(file, framework="numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def read_diffusers_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """(config.json as a dict, numpy state dict, weight file) of a diffusers UNet2DModel folder.

    Reads `diffusion_pytorch_model.safetensors` if present, else the PyTorch `.bin` (neither
    needs torch). A damaged file raises ValueError naming it.
    """
    folder = _diffusers_model_folder(path)
    config_file = os.path.join(folder, "config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_file} ({_first_line(e)})") from e
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"{config_file} describes a {class_name}, not a UNet2DModel")
    file = next(os.path.join(folder, f) for f in DIFFUSERS_WEIGHT_FILES
                if os.path.isfile(os.path.join(folder, f)))
    reader = _read_safetensors if file.endswith(".safetensors") else torch_file.read_state_dict
    try:
        state_dict = reader(file)
    except ValueError:
        raise
    except Exception as e:  # safetensors/pickle errors for truncated files
        raise ValueError(f"cannot read {file} ({_first_line(e)}); it is truncated or "
                         "corrupt") from e
    return config, state_dict, file


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint that every mode loads
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImportedWeights:
    """Imported parameters as pure dicts (`nnx.to_pure_dict` layout, what Orbax stores)."""

    params: model_fns.Params  # training weights
    ema_params: model_fns.Params  # weights for sampling and evaluation
    step: int  # the source's global_step (0 if it has none)
    description: str  # which weights were taken, for the user


def _abstract_model(config) -> UNet:
    return nnx.eval_shape(lambda: model_fns.create_model(config))


def import_tf_checkpoint(path: str, config) -> ImportedWeights:
    """The weights of an original TF checkpoint for the model of `config`, fully validated."""
    model = _abstract_model(config)
    params, ema_params, step, description = read_tf_checkpoint(path, model)
    return ImportedWeights(
        params=nnx.to_pure_dict(params_from_tf(params, model)),
        ema_params=nnx.to_pure_dict(params_from_tf(ema_params, model)),
        step=step, description=f"{description}; global_step {step}")


def import_diffusers_folder(path: str, config) -> ImportedWeights:
    """The weights of a diffusers UNet2DModel folder for the model of `config`, fully validated.

    A diffusers folder holds a single set of weights and no step; they become both params and
    ema_params, at step 0.
    """
    model = _abstract_model(config)
    diffusers_config, state_dict, file = read_diffusers_folder(path)
    try:
        check_diffusers_config(diffusers_config, model)
    except ValueError as e:
        raise ValueError(f"{e}: the folder's config.json does not describe the configured model "
                         f"({_model_summary(model)}); use a matching --config") from e
    params = nnx.to_pure_dict(params_from_diffusers(state_dict, model))
    return ImportedWeights(
        params=params, ema_params=params, step=0,
        description=(f"took all {len(state_dict)} tensors of {file} as params and ema_params "
                     "(diffusers folders hold one set of weights); step 0"))


def _check_no_checkpoints(workdir: str) -> None:
    from ddpm_jax import checkpointing

    directory = checkpointing.checkpoint_dir(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file; pass a new directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"{directory} already holds checkpoints; convert into a new --workdir "
                         "(nothing was written)")


def write_checkpoint(weights: ImportedWeights, config, workdir: str) -> str:
    """Save a full TrainState at `weights.step` under `workdir/checkpoints/`; returns its path.

    `weights` must come from `import_*` with the same `config`. A fresh optimizer state
    (`optim.make_optimizer`) lets training continue from the imported weights;
    `checkpointing.load_ema_params` reads `ema_params`. Refuses a workdir that already has
    checkpoints; removes what it created if saving fails.
    """
    from ddpm_jax import checkpointing, optim, train_step

    _check_no_checkpoints(workdir)
    state = train_step.TrainState(
        step=jnp.asarray(weights.step, jnp.int32),
        params=weights.params,
        ema_params=weights.ema_params,
        opt_state=jax.jit(optim.make_optimizer(config.training).init)(weights.params),
        nonfinite_streak=jnp.zeros([], jnp.int32),
    )
    created = [d for d in (workdir, checkpointing.checkpoint_dir(workdir)) if not os.path.exists(d)]
    try:
        manager = checkpointing.make_manager(workdir)
        checkpointing.save(manager, weights.step, state, config)
        manager.wait_until_finished()
        manager.close()
    except BaseException:
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return os.path.join(checkpointing.checkpoint_dir(workdir), str(weights.step))


SOURCES: dict[str, Callable[[str, Any], ImportedWeights]] = {
    "tf": import_tf_checkpoint,
    "diffusers": import_diffusers_folder,
}


def convert(source_format: str, source: str, config, workdir: str) -> tuple[ImportedWeights, str]:
    """Import `source` (a TF checkpoint prefix or a diffusers folder) into `workdir`.

    Everything is read and checked before the workdir is touched: any error leaves no files.
    Returns the weights and the written checkpoint directory.
    """
    if source_format not in SOURCES:
        raise ValueError(f"--from={source_format!r} is unknown; use one of {', '.join(SOURCES)}")
    _check_no_checkpoints(workdir)
    cli.check_can_create(workdir, "--workdir")
    weights = SOURCES[source_format](source, config)
    return weights, write_checkpoint(weights, config, workdir)


def run_cli(source_format: str, source: str, config, workdir: str) -> int:
    """Convert and report on stdout; a user error is one `error: ...` line on stderr, exit 2."""
    from ddpm_jax.errors import CheckpointWriteError

    try:
        weights, directory = convert(source_format, source, config, workdir)
    except (ValueError, OSError, CheckpointWriteError) as e:
        print(cli.error_line(e), file=sys.stderr)
        return 2
    print(weights.description)
    print(f"wrote step {weights.step} to {directory}; sample with: python -m ddpm_jax.main "
          f"--mode=sample --config <the same config> --workdir {workdir}")
    return 0


EXAMPLE = ("python -m ddpm_jax.convert --from tf diffusion_cifar10_model/model.ckpt-790000 "
           "--config configs/cifar10.py --workdir runs/cifar10_released")


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    """This tool's own flags (not absl's global FLAGS), so `main` can run more than once."""
    flag_values = flags.FlagValues()
    flags.DEFINE_enum("from", None, list(SOURCES), "Source format: 'tf' (a checkpoint prefix of "
                      "the original code) or 'diffusers' (a UNet2DModel folder).",
                      flag_values=flag_values)
    config_flags.DEFINE_config_file("config", None, "Config of the model the weights belong to "
                                    "(e.g. configs/cifar10.py).", flag_values=flag_values,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "New directory to write the checkpoint into.",
                        flag_values=flag_values)
    return flag_values


def main(argv: Sequence[str]) -> NoReturn:
    """`python -m ddpm_jax.convert`; `argv` as `sys.argv` (the program name first)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    # Keep stderr to our one-line errors: no TF C++ start-up notices (TF only reads files here).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    flag_values = _flag_values(argv)
    sources = cli.parse_flags(flag_values, argv, __doc__)
    config = cli.load_config(flag_values)
    missing = [f"--{name}" for name in ("from", "config", "workdir") if not flag_values[name].value]
    if missing:
        cli.exit_with_error(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            f"required, e.g. {EXAMPLE}")
    if len(sources) != 1:
        got = f"got {len(sources)}: {' '.join(sources)}" if sources else "got none"
        cli.exit_with_error(f"pass exactly one source, a TF checkpoint prefix or a diffusers "
                            f"folder ({got}), e.g. {EXAMPLE}")
    sys.exit(run_cli(flag_values["from"].value, sources[0], config, flag_values.workdir))


if __name__ == "__main__":
    main(sys.argv)
