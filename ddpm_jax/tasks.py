"""Editing with a trained DDPM: img2img (SDEdit), inpainting, interpolation and one-step denoising.

The four tasks are pure functions over arrays, like `samplers.py`: a `denoise_fn(x, t)`, the
`Schedule`, images in [-1, 1] (NHWC) and a key. Timesteps follow the package's convention
(code index t = 0..T-1 is the paper's step t+1); a task's start `t0` counts *paper* steps:
x_{t0} = q_sample(x_0, code index t0 - 1), then `t0` reverse steps (code t0-1..0) bring it back to
x_0, and t0 = 0 is the image itself with no step at all.

`run(config, workdir)` is the `--mode=sample` driver for `sample.task != "generate"`: it reads
the inputs (image files or .npz), checks everything before writing anything, and writes
`input.png`, `output.png`, a `strip.png` of intermediate steps, `outputs.npz` and
`settings.json` under `workdir/samples/<task>_step<step>_seed<seed>[_t<t0>]_<hash>/` (one folder
per distinct settings and input contents, `sampling.output_dir`). On a class-conditional model each input is
edited once per label of `sample.labels` (default every class) with guidance
`sample.guidance_scale`, one output row per label; w = 0 edits it once, unconditionally.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, samplers
from ddpm_jax.diffusion import DenoiseFn, Schedule

TASKS = ("generate", "img2img", "inpaint", "interpolate", "denoise", "anagram", "hybrid")


class EditResult(NamedTuple):
    output: jax.Array  # the edited images x_0
    start: jax.Array  # the latent the reverse chain started from, x_{t0}
    progress: jax.Array | None  # x̂_0 predictions [K, B, H, W, C] (slot k at code index n·k)


def _code_index(t0: int, batch: int) -> jax.Array:
    """Code index of the paper's step t0 ≥ 1, for every example."""
    return jnp.full((batch,), t0 - 1, jnp.int32)


def _check_t0(schedule: Schedule, t0: int) -> None:
    if not 0 <= t0 <= schedule.num_timesteps:
        raise ValueError(f"t0={t0} must be in [0, {schedule.num_timesteps}] (paper steps; 0 = "
                         "the input itself).")


def noise_to_step(schedule: Schedule, x_start: jax.Array, t0: int, noise: jax.Array) -> jax.Array:
    """x_{t0} = √ᾱ_{t0} x_0 + √(1 − ᾱ_{t0}) ε (Eq. 4) for paper step t0 ≥ 1; x_0 itself for t0 = 0."""
    if t0 == 0:
        return x_start
    return diffusion.q_sample(schedule, x_start, _code_index(t0, x_start.shape[0]), noise)


def _reverse_chain(denoise_fn, schedule, x_t, key, t0, *, method, mean_type, var_type,
                   clip_denoised, xstart_every, after_step=None
                   ) -> tuple[jax.Array, jax.Array | None]:
    out = samplers.run_chain(
        method, denoise_fn, schedule, x_t, key, start=t0, mean_type=mean_type,
        var_type=var_type, clip_denoised=clip_denoised, xstart_every=xstart_every,
        after_step=after_step)
    return out if xstart_every else (out, None)


def img2img(denoise_fn: DenoiseFn, schedule: Schedule, x_start: jax.Array, key: jax.Array, *,
            t0: int, mean_type: str = "eps", var_type: str = "fixedlarge",
            clip_denoised: bool = True, xstart_every: int | None = None,
            method: samplers.Method = samplers.Method()) -> EditResult:
    """SDEdit (Meng et al. 2022): noise the input to x_{t0} with q(x_{t0} | x_0), then run the
    ancestral sampler (Alg. 2) for code indices t0-1..0, or `method` from t0 (`run_chain`).
    t0 = 0 returns `x_start` unchanged; t0 = T forgets the input entirely (up to √ᾱ_T ≈ 0.006
    of it)."""
    _check_t0(schedule, t0)
    noise_key, loop_key = jax.random.split(key)
    x_t = noise_to_step(schedule, x_start, t0, jax.random.normal(noise_key, x_start.shape))
    output, progress = _reverse_chain(
        denoise_fn, schedule, x_t, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, method=method)
    return EditResult(output, x_t, progress)


def inpaint(denoise_fn: DenoiseFn, schedule: Schedule, x_known: jax.Array, mask: jax.Array,
            key: jax.Array, *, t0: int | None = None, mean_type: str = "eps",
            var_type: str = "fixedlarge", clip_denoised: bool = True,
            xstart_every: int | None = None,
            method: samplers.Method = samplers.Method()) -> EditResult:
    """Inpainting by replacement: where `mask` is true the image is generated, elsewhere the
    known pixels are re-imposed at every step as a sample of q(x_{t-1} | x_known), so that

      x_{t-1} = mask · p_sample(x_t) + (1 − mask) · q_sample(x_known, t − 1),   and at the last
      step x_0 = mask · p_sample(x_1) + (1 − mask) · x_known  (the known pixels exactly).

    The chain starts at paper step t0 (default T) from q_sample(x_known, t0) outside the mask
    and pure noise N(0, I) inside it when t0 = T (else the noised input there too).
    `mask` broadcasts against x_known (e.g. [1, H, W, 1]); True / 1 = regenerate.
    With another `method` the same holds at each of its steps: every new x at code index s is
    re-imposed with a sample of q(x_s | x_known) (x_known itself at the data).
    """
    t0 = schedule.num_timesteps if t0 is None else t0
    _check_t0(schedule, t0)
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x_known.shape)
    start_key, known_key, loop_key = jax.random.split(key, 3)
    x_t = noise_to_step(schedule, x_known, t0, jax.random.normal(start_key, x_known.shape))
    if t0 == schedule.num_timesteps:
        fresh = jax.random.normal(jax.random.fold_in(start_key, 1), x_known.shape)
        x_t = jnp.where(mask, fresh, x_t)

    def reimpose_known(x, s):
        # x is at code index s; at s = -1 it is x_0 and the known pixels are exact.
        noise = jax.random.normal(jax.random.fold_in(known_key, s + 1), x_known.shape)
        known_s = diffusion.q_sample(
            schedule, x_known, jnp.full((x_known.shape[0],), jnp.maximum(s, 0)), noise)
        known = jnp.where(s < 0, x_known, known_s)
        return jnp.where(mask, x, known)

    output, progress = _reverse_chain(
        denoise_fn, schedule, x_t, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, after_step=reimpose_known,
        method=method)
    if t0 == 0:
        output = jnp.where(mask, output, x_known)
    return EditResult(output, x_t, progress)


def interpolate(denoise_fn: DenoiseFn, schedule: Schedule, x1: jax.Array, x2: jax.Array,
                key: jax.Array, *, t0: int, mix_weights: jax.Array | np.ndarray,
                mean_type: str = "eps", var_type: str = "fixedlarge", clip_denoised: bool = True,
                xstart_every: int | None = None,
                method: samplers.Method = samplers.Method()) -> EditResult:
    """The original's `GaussianDiffusion.interpolate`: diffuse both images to step t0 with
    independent noise, mix the latents linearly x̄_{t0} = (1 − λ) x_{t0} + λ x'_{t0}, and run the
    reverse chain from t0 (paper Fig. 8), with `method` (ancestral by default; a deterministic
    one, e.g. dpm_solver, maps the mixed latent along the probability-flow ODE).

    Returns outputs of shape [M, B, H, W, C] for the M weights λ (so row m is λ_m for every pair).
    At t0 = 0 the mix of the images themselves is returned; λ = 0 and λ = 1 give x1 and x2
    exactly. (The original q_samples at code index t and runs p_sample from t down to 0:
    t + 1 noise steps undone by t + 1 reverse steps, as here with t0 = t + 1 paper steps;
    docs/deviations.md D19.)
    """
    _check_t0(schedule, t0)
    weights = jnp.asarray(mix_weights, jnp.float32)
    key1, key2, loop_key = jax.random.split(key, 3)
    x1_t = noise_to_step(schedule, x1, t0, jax.random.normal(key1, x1.shape))
    x2_t = noise_to_step(schedule, x2, t0, jax.random.normal(key2, x2.shape))
    lam = weights.reshape((-1,) + (1,) * x1.ndim)
    mixed = (1.0 - lam) * x1_t[None] + lam * x2_t[None]  # [M, B, H, W, C]
    num_mix, batch = mixed.shape[:2]
    flat = mixed.reshape((num_mix * batch,) + mixed.shape[2:])
    output, progress = _reverse_chain(
        denoise_fn, schedule, flat, loop_key, t0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, xstart_every=xstart_every, method=method)
    return EditResult(output.reshape(mixed.shape), mixed, progress)


def denoise(denoise_fn: DenoiseFn, schedule: Schedule, x_start: jax.Array, key: jax.Array, *,
            timesteps: np.ndarray | list[int], mean_type: str = "eps",
            var_type: str = "fixedlarge", clip_denoised: bool = True
            ) -> tuple[jax.Array, jax.Array]:
    """What the model sees and predicts: for each code index t in `timesteps`, x_t = q_sample(
    x_0, t, ε) and the one-step prediction x̂_0(x_t, t), for eps models
    x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t (Eq. 15), clipped to [−1, 1] if `clip_denoised`.

    Returns (x_t, x̂_0), each [S, B, H, W, C].
    """
    timesteps = np.asarray(timesteps, np.int32)
    if timesteps.ndim != 1 or not len(timesteps):
        raise ValueError("denoise needs a non-empty list of timesteps")
    bad = timesteps[(timesteps < 0) | (timesteps >= schedule.num_timesteps)]
    if len(bad):
        raise ValueError(f"denoise step {int(bad[0])} is outside 0..{schedule.num_timesteps - 1}.")
    batch = x_start.shape[0]

    def one(t):
        t_batch = jnp.full((batch,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x_start.shape)
        x_t = diffusion.q_sample(schedule, x_start, t_batch, noise)
        out = diffusion.p_mean_variance(
            schedule, denoise_fn(x_t, t_batch), x_t, t_batch, mean_type=mean_type,
            var_type=var_type, clip_denoised=clip_denoised)
        return x_t, out.pred_xstart

    return jax.lax.map(one, jnp.asarray(timesteps))


# ----------------------------------------------------------------------------------------------
# Reading inputs (host side)
# ----------------------------------------------------------------------------------------------


def load_images(path: str, image_size: int, channels: int, what: str = "sample.input"
                ) -> np.ndarray:
    """uint8 [N, H, W, C] from an image file (PNG/JPEG/...) or an .npz with key `images`
    (uint8 NHWC). The size must be the model's; a wrong size is an error naming it."""
    if not path:
        raise ValueError(f"{what} is empty; set --config.{what}=PATH (an image file or .npz).")
    if not os.path.exists(path):
        raise ValueError(f"{what}={path!r} does not exist.")
    if path.lower().endswith(".npz"):
        try:
            with np.load(path) as data:
                keys = list(data)
                images = np.asarray(data["images"]) if "images" in data else None
        except Exception as e:  # empty (EOFError), truncated (BadZipFile), corrupt members
            raise ValueError(f"cannot read {what}={path!r} as .npz ({type(e).__name__}: {e}); "
                             "the file is empty, truncated or not an .npz, write it again "
                             "with numpy.savez.") from e
        if images is None:
            raise ValueError(f"{what}={path!r} has no array 'images' (keys: {keys}).")
        if images.ndim == 3:
            images = images[None] if images.shape[-1] in (1, 3) else images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{what}={path!r}: 'images' must be uint8 [N, H, W, C], got "
                             f"{images.dtype} {images.shape}.")
    else:
        from ddpm_jax.input_pipeline import read_image

        try:
            images = read_image(path, channels)[None]
        except Exception as e:
            raise ValueError(f"cannot read {what}={path!r} as an image ({e}).") from e
    if not len(images):
        raise ValueError(f"{what}={path!r} holds no images (shape {images.shape}).")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{what}={path!r} is {images.shape[1]}x{images.shape[2]}, the model "
                         f"takes {image_size}x{image_size} images; resize it first.")
    if images.shape[3] != channels:
        raise ValueError(f"{what}={path!r} has {images.shape[3]} channels, the model takes "
                         f"{channels}.")
    return images


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


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def prepare_inputs(config) -> TaskInputs:
    """Reads and checks every input of `sample.task`; raises a one-line ValueError otherwise."""
    from ddpm_jax import sampling

    sc, data = config.sample, config.data
    task = sc.task
    if task not in TASKS:
        raise ValueError(f"sample.task={task!r} is unknown; use one of {', '.join(TASKS)}.")
    classes = sampling.requested_labels(config)
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
        sampling.check_method(config, start=t0)
    steps = parse_steps(sc.denoise_steps, config.diffusion.num_timesteps) if task == "denoise" \
        else None
    num_inputs = len(images)
    labels = None
    # Each input once per requested class, class-major; w = 0 is the unconditional model, for
    # which labels make no difference.
    if classes is not None and sampling.guidance_scale(config) != 0:
        labels = np.repeat(np.asarray(classes, np.int32), num_inputs)
        images = np.concatenate([images] * len(classes))
        x2 = None if x2 is None else np.concatenate([x2] * len(classes))
    return TaskInputs(_to_float(images), None if x2 is None else _to_float(x2), mask, labels,
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
    from ddpm_jax import sampling

    dc, sc = config.diffusion, config.sample
    schedule = diffusion.schedule_from_config(dc)
    chain = dict(mean_type=dc.mean_type, var_type=dc.var_type, clip_denoised=sc.clip_denoised)
    task, t0 = sc.task, inputs.t0
    method = sampling.chain_method(sc, start=t0, num_timesteps=dc.num_timesteps)
    calls = samplers.model_calls(method, t0)
    every = _progress_every(calls) if calls > 0 else None
    weights = np.linspace(0.0, 1.0, sc.num_mix)
    labels = inputs.labels
    if labels is not None and task == "interpolate":  # the chain runs on [M·B] mixes, m-major
        labels = np.tile(labels, len(weights))

    def task_fn(params, x, x2, mask, key):
        model = sampling.make_denoise_fn(graphdef, params, config,
                                         None if labels is None else jnp.asarray(labels))
        if task == "img2img":
            return img2img(model, schedule, x, key, t0=t0, xstart_every=every, method=method,
                           **chain)
        if task == "inpaint":
            return inpaint(model, schedule, x, mask, key, t0=t0, xstart_every=every,
                           method=method, **chain)
        if task == "interpolate":
            return interpolate(model, schedule, x, x2, key, t0=t0, mix_weights=weights,
                               xstart_every=every, method=method, **chain)
        return denoise(model, schedule, x, key, timesteps=inputs.steps, **chain)

    if task not in TASKS[1:]:
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


def render_outputs(config, inputs: TaskInputs, results: dict[str, np.ndarray]
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
        output = results["output"]  # [M, B, ...]: one row per pair, columns = weights
        pairs = output.transpose(1, 0, 2, 3, 4)
        save("output.png", images.make_grid(u8(pairs.reshape((-1,) + pairs.shape[2:])),
                                            columns=output.shape[0]))
        start = results["start"].transpose(1, 0, 2, 3, 4)
        save("start.png", images.make_grid(u8(start.reshape((-1,) + start.shape[2:])),
                                           columns=output.shape[0]))
    else:
        save("input.png", images.make_grid(source, columns=n))
    if task == "denoise":
        # Rows = images, columns = steps: x_t on the strip, x̂_0 in the output.
        for name, key in (("strip.png", "noised"), ("output.png", "output")):
            per_image = results[key].transpose(1, 0, 2, 3, 4)
            save(name, images.make_grid(u8(per_image.reshape((-1,) + per_image.shape[2:])),
                                        columns=per_image.shape[1]))
    elif task != "interpolate":
        save("output.png", _rows(u8(results["output"]), n))
        save("start.png", _rows(u8(np.clip(results["start"], -1, 1)), n))
    if task == "inpaint":
        mask = np.broadcast_to(inputs.mask, inputs.x[:n].shape)
        save("mask.png", images.make_grid(np.where(mask, 255, 0).astype(np.uint8), columns=n))
    if task != "denoise":
        if "progress" in results:
            save("strip.png", images.progress_strip(results["progress"]))
        else:  # t0 = 0 takes no step: the strip is the chain's start next to its end
            start = results["start"].reshape((-1,) + inputs.x.shape[1:])
            output = results["output"].reshape((-1,) + inputs.x.shape[1:])
            pairs = np.stack([u8(np.clip(start, -1, 1)), u8(output)], axis=1)
            save("strip.png", images.make_grid(pairs.reshape((-1,) + pairs.shape[2:]),
                                               columns=2))
    arrays = {name: u8(np.clip(value, -1, 1)) for name, value in results.items()}
    if inputs.labels is not None:
        arrays["labels"] = inputs.labels
    return pictures, arrays


def write_outputs(out_dir: str, config, inputs: TaskInputs, results: dict[str, np.ndarray],
                  settings: dict) -> None:
    """settings.json, the pictures of `render_outputs` and outputs.npz in `out_dir`."""
    from ddpm_jax import files, images, sampling

    pictures, arrays = render_outputs(config, inputs, results)
    sampling.write_settings(out_dir, settings)
    for name, picture in pictures.items():
        images.save_png(os.path.join(out_dir, name), picture)
    files.save_npz(os.path.join(out_dir, "outputs.npz"), **arrays)


def task_settings(config, inputs: TaskInputs, step: int) -> dict:
    """`sampling.output_settings` for an editing task: the `config.sample` fields the task
    reads (t0 as resolved), and the sha256 of each input file, whose contents may change under
    the same name."""
    from ddpm_jax import sampling
    from ddpm_jax.inception import _sha256

    sc, task = config.sample, config.sample.task
    unused = {"num_samples", "batch_size", "progress_every", "t0", "strength"}
    unused |= {"input2", "num_mix"} if task != "interpolate" else set()
    unused |= {"mask"} if task != "inpaint" else set()
    unused |= {"denoise_steps"} if task != "denoise" else set()
    sample = sc.to_dict()
    if task == "denoise" or sc.method == "ancestral":  # as before other methods existed
        unused |= {"method", *(f for fields in sampling.METHOD_FIELDS.values() for f in fields)}
    else:
        sample = sampling.method_settings(sample)
        sample["num_steps"] = sampling.chain_method(  # as run from t0
            sc, start=inputs.t0, num_timesteps=config.diffusion.num_timesteps).num_steps
    sample = {k: v for k, v in sample.items() if k not in unused}
    if task == "denoise":
        sample["denoise_steps"] = inputs.steps
    else:
        sample["t0"] = inputs.t0
    names = ["input"] + (["input2"] if task == "interpolate" else []) + (
        ["mask"] if task == "inpaint" else [])
    sample["sha256"] = {name: _sha256(sc[name]) for name in names}
    return sampling.output_settings(config, step, 1, sample)


def run(config, workdir: str, checkpoint: int | None = None) -> str:
    """`--mode=sample` with `sample.task` = img2img | inpaint | interpolate | denoise. Every input
    is checked before the checkpoint is read, so a bad input writes nothing."""
    from ddpm_jax import composed, parallel, sampling

    sc = config.sample
    if sc.task in composed.TASKS:  # generation from two classes, no input images
        return composed.run(config, workdir, checkpoint)
    inputs = prepare_inputs(config)
    # A task is a few images: one device, not a copy of the work on each device of the mesh.
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    graphdef, params, step = sampling.load_ema_params(config, workdir, mesh, checkpoint)
    name = f"{sc.task}_step{step:08d}_seed{sc.seed}"
    if sc.task in ("img2img", "inpaint", "interpolate"):
        name += f"_t{inputs.t0}"
    settings = task_settings(config, inputs, step)
    out_dir, existed = sampling.output_dir(workdir, name, settings)
    results = run_task(config, graphdef, params, inputs, jax.random.key(sc.seed))
    if jax.process_index() == 0:
        write_outputs(out_dir, config, inputs, results, settings)
        sampling.report_written(f"{sc.task} of {inputs.num_inputs} input(s) (step {step})",
                                out_dir, existed)
    return out_dir
