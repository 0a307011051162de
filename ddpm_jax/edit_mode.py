"""`--mode=sample` with an editing task (`sample.task` = img2img | inpaint | interpolate |
denoise): the driver around the task functions of `tasks.py`.

`write_edits(config, workdir)` reads the inputs (image files or .npz), checks everything before
writing anything, and writes `input.png`, `output.png`, a `strip.png` of intermediate steps,
`outputs.npz` and `settings.json` under
`workdir/samples/<task>_step<step>_seed<seed>[_t<t0>]_<hash>/` (one folder per distinct settings
and input contents, `results.output_dir`). On a class-conditional model each input is edited
once per label of `sample.labels` (default every class) with guidance `sample.guidance_scale`,
one output row per label; w = 0 edits it once, unconditionally.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import chains, checkpointing, diffusion, generate, parallel, results, tasks
from ddpm_jax import images as images_lib


# ----------------------------------------------------------------------------------------------
# Reading inputs (host side)
# ----------------------------------------------------------------------------------------------


def load_images(path: str, image_size: int, channels: int, what: str = "sample.input"
                ) -> np.ndarray:
    """uint8 [N, H, W, C] from an image file (`input_pipeline.read_image`) or an .npz
    (`input_pipeline.load_npz_images`). The size must be the model's; a wrong size is an error
    naming it."""
    if not path:
        raise ValueError(f"{what} is empty; set --config.{what}=PATH (an image file or .npz).")
    if not os.path.exists(path):
        raise ValueError(f"{what}={path!r} does not exist.")
    from ddpm_jax.input_pipeline import load_npz_images, read_image

    if path.lower().endswith(".npz"):
        images = load_npz_images(path, f"{what}={path!r}")
    else:
        try:
            images = read_image(path, channels)[None]
        except Exception as e:
            raise ValueError(f"cannot read {what}={path!r} as an image ({e}).") from e
    if not len(images):
        raise ValueError(f"{what}={path!r} holds no images (shape {images.shape}).")
    check_image_shape(images.shape, image_size, channels, f"{what}={path!r}",
                      f"resize it to {image_size}x{image_size}, {channels} channel(s), first")
    return images


def check_image_shape(shape: tuple[int, ...], image_size: int, channels: int, what: str,
                      fix: str) -> None:
    """A one-line ValueError naming `what` (the input) and `fix` unless `shape` is the model's
    NHWC [N, image_size, image_size, channels]."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{what} has shape {shape}, not [N, H, W, C] (NHWC); {fix}.")
    if shape[1:3] != (image_size, image_size):
        raise ValueError(f"{what} is {shape[1]}x{shape[2]}, the model takes "
                         f"{image_size}x{image_size} images; {fix}.")
    if shape[3] != channels:
        raise ValueError(f"{what} has {shape[3]} channels, the model takes {channels}; {fix}.")


def load_mask(path: str, image_size: int) -> np.ndarray:
    """bool [1, H, W, 1] from an image file: white (≥ 128 grey) = regenerate, black = keep."""
    from ddpm_jax.input_pipeline import read_image

    if not path:
        raise ValueError("sample.task=inpaint needs --config.sample.mask=PATH (white = "
                         "regenerate).")
    if not os.path.exists(path):
        raise ValueError(f"sample.mask={path!r} does not exist.")
    try:
        grey = read_image(path, 1)[..., 0]
    except Exception as e:
        raise ValueError(f"cannot read sample.mask={path!r} as an image ({e}).") from e
    if grey.shape != (image_size, image_size):
        raise ValueError(f"sample.mask={path!r} is {grey.shape[0]}x{grey.shape[1]}, the model "
                         f"takes {image_size}x{image_size} images; the mask must be the same size.")
    return (grey >= 128)[None, :, :, None]


def resolve_t0(config, task: str) -> int:
    """`sample.t0` if set (≥ 0), else round(`sample.strength` · T) if strength > 0, else the
    task's default: T for inpaint, T / 2 for img2img and interpolate."""
    sc = config.sample
    num_timesteps = config.diffusion.num_timesteps
    t0 = int(sc.t0)
    if t0 >= 0:
        if t0 > num_timesteps:
            raise ValueError(f"sample.t0={t0} must be in [0, {num_timesteps}] (paper steps).")
        return t0
    if not 0 <= sc.strength <= 1:
        raise ValueError(f"sample.strength={sc.strength} must be in [0, 1].")
    if sc.strength > 0:
        return int(round(sc.strength * num_timesteps))
    return num_timesteps if task == "inpaint" else num_timesteps // 2


def parse_steps(text: str, num_timesteps: int) -> list[int]:
    try:
        steps = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"sample.denoise_steps={text!r} is not a comma list of integers."
                         ) from None
    if not steps:
        raise ValueError("sample.denoise_steps is empty; give e.g. '50,200,500,999'.")
    bad = [s for s in steps if not 0 <= s < num_timesteps]
    if bad:
        raise ValueError(f"sample.denoise_steps: step {bad[0]} is outside 0..{num_timesteps - 1}.")
    return steps


class TaskInputs(NamedTuple):
    x: np.ndarray  # float32 [B, H, W, C] in [-1, 1]: each input once per requested label
    x2: np.ndarray | None  # interpolate: the second images, aligned with x
    mask: np.ndarray | None  # inpaint: bool [1, H, W, 1]
    labels: np.ndarray | None  # int32 [B] for conditional models
    num_inputs: int  # distinct input images (grid columns)
    t0: int
    steps: list[int] | None  # denoise


def prepare_inputs(config) -> TaskInputs:
    """Reads and checks every input of `sample.task`; raises a one-line ValueError otherwise."""
    sc, data = config.sample, config.data
    task = sc.task
    if task not in tasks.TASKS:
        raise ValueError(f"sample.task={task!r} is unknown; use one of {', '.join(tasks.TASKS)}.")
    classes = generate.requested_labels(config)
    images = load_images(sc.input, data.image_size, data.channels)
    x2 = None
    if task == "interpolate":
        second = load_images(sc.input2, data.image_size, data.channels, "sample.input2")
        if len(second) != len(images) and 1 not in (len(second), len(images)):
            raise ValueError(f"sample.input has {len(images)} images and sample.input2 "
                             f"{len(second)}; give the same number (or one of them a single image).")
        count = max(len(images), len(second))
        images = np.broadcast_to(images, (count,) + images.shape[1:])
        x2 = np.broadcast_to(second, (count,) + second.shape[1:])
    mask = load_mask(sc.mask, data.image_size) if task == "inpaint" else None
    t0 = resolve_t0(config, task) if task in ("img2img", "inpaint", "interpolate") else 0
    if task != "denoise":  # denoise is one model call per step, whatever the method
        generate.check_method(config, start=t0)
    steps = parse_steps(sc.denoise_steps, config.diffusion.num_timesteps) if task == "denoise" \
        else None
    num_inputs = len(images)
    labels = None
    # Each input once per requested class, class-major; w = 0 is the unconditional model, for
    # which labels make no difference.
    if classes is not None and generate.guidance_scale(config) != 0:
        labels = np.repeat(np.asarray(classes, np.int32), num_inputs)
        images = np.concatenate([images] * len(classes))
        x2 = None if x2 is None else np.concatenate([x2] * len(classes))
    return TaskInputs(images_lib.to_model_range(images),
                      None if x2 is None else images_lib.to_model_range(x2), mask, labels,
                      num_inputs, t0, steps)


# ----------------------------------------------------------------------------------------------
# The --mode=sample driver
# ----------------------------------------------------------------------------------------------


def _progress_every(t0: int, columns: int = 10) -> int:
    return max(1, -(-t0 // columns))


def run_task(config, graphdef, params, inputs: TaskInputs, key: jax.Array
             ) -> dict[str, np.ndarray]:
    """Runs `sample.task` on prepared inputs (one compiled program); returns host arrays in
    [-1, 1] by name: output, start (x_{t0}) and progress, or for denoise noised and output."""
    dc, sc = config.diffusion, config.sample
    schedule = diffusion.schedule_from_config(dc)
    chain = dict(mean_type=dc.mean_type, var_type=dc.var_type, clip_denoised=sc.clip_denoised)
    task, t0 = sc.task, inputs.t0
    method = generate.chain_method(sc, start=t0, num_timesteps=dc.num_timesteps)
    calls = chains.model_calls(method, t0)
    every = _progress_every(calls) if calls > 0 else None
    weights = np.linspace(0.0, 1.0, sc.num_mix)
    labels = inputs.labels
    if labels is not None and task == "interpolate":  # the chain runs on [M·B] mixes, m-major
        labels = np.tile(labels, len(weights))

    def task_fn(params, x, x2, mask, key):
        model = generate.sampling_model_fn(graphdef, params, config,
                                         None if labels is None else jnp.asarray(labels))
        if task == "img2img":
            return tasks.img2img(model, schedule, x, key, t0=t0, xstart_every=every, method=method,
                           **chain)
        if task == "inpaint":
            return tasks.inpaint(model, schedule, x, mask, key, t0=t0, xstart_every=every,
                           method=method, **chain)
        if task == "interpolate":
            return tasks.interpolate(model, schedule, x, x2, key, t0=t0, mix_weights=weights,
                               xstart_every=every, method=method, **chain)
        return tasks.one_step_denoise(model, schedule, x, key, timesteps=inputs.steps, **chain)

    if task not in tasks.TASKS[1:]:
        raise ValueError(f"sample.task={task!r} is not an editing task.")
    result = jax.device_get(jax.jit(task_fn)(params, inputs.x, inputs.x2, inputs.mask, key))
    if task == "denoise":
        x_t, pred = result
        return {"noised": np.asarray(x_t), "output": np.asarray(pred)}
    out = {"output": np.asarray(result.output), "start": np.asarray(result.start)}
    if result.progress is not None:
        out["progress"] = np.asarray(result.progress)
    return out


def _rows(images_uint8: np.ndarray, num_inputs: int) -> np.ndarray:
    """Grid with one row per requested label (num_inputs columns)."""
    from ddpm_jax import images

    return images.make_grid(images_uint8, columns=num_inputs)


def render_outputs(config, inputs: TaskInputs, edited: dict[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(PNG images by file name, outputs.npz arrays): input.png, output.png, strip.png
    (+ mask.png, start.png), all made in memory so that a failure writes nothing."""
    from ddpm_jax import images

    task, n = config.sample.task, inputs.num_inputs
    u8 = images.to_uint8
    pictures: dict[str, np.ndarray] = {}
    save = lambda name, grid: pictures.__setitem__(name, images.upscale(grid))
    source = u8(inputs.x[:n])
    if task == "interpolate":
        source = np.concatenate([source, u8(inputs.x2[:n])])
        save("input.png", images.make_grid(source, columns=n))
        output = edited["output"]  # [M, B, ...]: one row per pair, columns = weights
        pairs = output.transpose(1, 0, 2, 3, 4)
        save("output.png", images.make_grid(u8(pairs.reshape((-1,) + pairs.shape[2:])),
                                            columns=output.shape[0]))
        start = edited["start"].transpose(1, 0, 2, 3, 4)
        save("start.png", images.make_grid(u8(start.reshape((-1,) + start.shape[2:])),
                                           columns=output.shape[0]))
    else:
        save("input.png", images.make_grid(source, columns=n))
    if task == "denoise":
        # Rows = images, columns = steps: x_t on the strip, x̂_0 in the output.
        for name, key in (("strip.png", "noised"), ("output.png", "output")):
            per_image = edited[key].transpose(1, 0, 2, 3, 4)
            save(name, images.make_grid(u8(per_image.reshape((-1,) + per_image.shape[2:])),
                                        columns=per_image.shape[1]))
    elif task != "interpolate":
        save("output.png", _rows(u8(edited["output"]), n))
        save("start.png", _rows(u8(np.clip(edited["start"], -1, 1)), n))
    if task == "inpaint":
        mask = np.broadcast_to(inputs.mask, inputs.x[:n].shape)
        save("mask.png", images.make_grid(np.where(mask, 255, 0).astype(np.uint8), columns=n))
    if task != "denoise":
        if "progress" in edited:
            save("strip.png", images.progress_strip(edited["progress"]))
        else:  # t0 = 0 takes no step: the strip is the chain's start next to its end
            start = edited["start"].reshape((-1,) + inputs.x.shape[1:])
            output = edited["output"].reshape((-1,) + inputs.x.shape[1:])
            pairs = np.stack([u8(np.clip(start, -1, 1)), u8(output)], axis=1)
            save("strip.png", images.make_grid(pairs.reshape((-1,) + pairs.shape[2:]),
                                               columns=2))
    arrays = {name: u8(np.clip(value, -1, 1)) for name, value in edited.items()}
    if inputs.labels is not None:
        arrays["labels"] = inputs.labels
    return pictures, arrays


def write_outputs(out_dir: str, config, inputs: TaskInputs, edited: dict[str, np.ndarray],
                  settings: dict) -> None:
    """settings.json, the pictures of `render_outputs` and outputs.npz in `out_dir`."""
    from ddpm_jax import files, images

    pictures, arrays = render_outputs(config, inputs, edited)
    results.write_settings(out_dir, settings)
    for name, picture in pictures.items():
        images.save_png(os.path.join(out_dir, name), picture)
    files.save_npz(os.path.join(out_dir, "outputs.npz"), **arrays)


def write_edits(config, workdir: str, checkpoint: int | None = None) -> str:
    """`--mode=sample` with `sample.task` = img2img | inpaint | interpolate | denoise. Every input
    is checked before the checkpoint is read, so a bad input writes nothing. The composed
    tasks (anagram, hybrid) take no input images: `composed.write_composed`."""
    from ddpm_jax import composed

    sc = config.sample
    if sc.task in composed.TASKS:
        return composed.write_composed(config, workdir, checkpoint)
    inputs = prepare_inputs(config)
    # A task is a few images: one device, not a copy of the work on each device of the mesh.
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    graphdef, params, step = checkpointing.load_ema_params(config, workdir, mesh, checkpoint)
    name = f"{sc.task}_step{step:08d}_seed{sc.seed}"
    if sc.task in ("img2img", "inpaint", "interpolate"):
        name += f"_t{inputs.t0}"
    settings = results.task_settings(config, inputs, step)
    out_dir, existed = results.output_dir(workdir, name, settings)
    edited = run_task(config, graphdef, params, inputs, jax.random.key(sc.seed))
    if jax.process_index() == 0:
        write_outputs(out_dir, config, inputs, edited, settings)
        results.report_written(f"{sc.task} of {inputs.num_inputs} input(s) (step {step})",
                               out_dir, existed)
    return out_dir
