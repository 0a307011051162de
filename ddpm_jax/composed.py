"""Composed guidance on a class-conditional model: visual anagrams and hybrid images.

Both tasks replace the model output ε(x, c) of every reverse step by a combination of the model's
outputs for two classes c₁, c₂ and run any sampler (`chains.run_chain`) with it:

* anagram (Geng et al. 2024, "Visual Anagrams"): ε = ½[ε(x, c₁) + F(ε(F(x), c₂))], with F a flip
  (an involution, F∘F = id). The image reads as c₁ as it is and as c₂ through F.
* hybrid (Oliva et al. 2006 images, made with a diffusion model as in "Factorized Diffusion"):
  ε = L(ε(x, c₁)) + H(ε(x, c₂)), L a Gaussian low-pass filter and H = id − L. The blurred
  image (seen from afar) reads as c₁, its fine detail as c₂.

Both combinations are linear in the model output and leave x alone, so composing ε-predictions
is the same as composing x̂₀- or mean-predictions (x̂₀ = (x − σ ε)/α is affine in ε with the same
x in every term, and L(x) + H(x) = x, ½[x + F(F(x))] = x).

Guidance order: each ε(x, c) is first the classifier-free guided output of its class
(`sample.guidance_scale` w, `model_fns.guide`), and the guided outputs are then composed. With
c₁ = c₂ the hybrid is exactly ordinary guided sampling of c₁; the anagram is the flip-averaged
model ½[ε(x, c) + F(ε(F(x), c))], which equals ε itself for a flip-equivariant model.

Images are NHWC throughout. `write_composed` is the `--mode=sample` driver of `sample.task=anagram|hybrid`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("anagram", "hybrid")
FLIPS = ("vertical", "horizontal", "rotate180")
# The axes each flip reverses in NHWC: vertical = upside down (H), horizontal = mirror (W).
_FLIP_AXES = {"vertical": (1,), "horizontal": (2,), "rotate180": (1, 2)}

# (x [B, H, W, C], t [B], labels [B]) -> model output [B, H, W, C'] (guided if w is set).
LabelledDenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def flip(x: jax.Array, kind: str = "vertical") -> jax.Array:
    """F(x): `x` with its H axis (vertical), W axis (horizontal) or both (rotate180) reversed.

    F is a permutation of the pixels with F∘F = id."""
    if kind not in _FLIP_AXES:
        raise ValueError(f"flip {kind!r} is unknown; use one of {', '.join(FLIPS)}.")
    return jnp.flip(x, axis=_FLIP_AXES[kind])


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """The 1-D kernel k_i = exp(−(i − (size−1)/2)² / (2σ²)) / Σ_j exp(−(j − (size−1)/2)² / (2σ²)),
    i = 0..size−1 (odd `size`, σ > 0); it sums to 1."""
    if size < 1 or size % 2 == 0 or not sigma > 0:
        raise ValueError(f"a Gaussian kernel needs an odd size ≥ 1 and σ > 0, got size={size}, "
                         f"σ={sigma}.")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-offsets ** 2 / (2.0 * float(sigma) ** 2))
    return (weights / weights.sum()).astype(np.float32)


def lowpass(x: jax.Array, size: int, sigma: float) -> jax.Array:
    """L(x): separable Gaussian blur of each channel, (L x)[h, w] = Σ_ij k_i k_j x̃[h+i−r, w+j−r]
    with r = size // 2 and x̃ the image reflected at its borders without repeating the edge
    pixel (numpy's "reflect"; needs r < H and r < W). Constant images are kept exactly up to
    rounding, as the kernel sums to 1."""
    kernel = gaussian_kernel(size, sigma)
    radius = size // 2
    height, width = x.shape[1], x.shape[2]
    if radius >= min(height, width):
        raise ValueError(f"a Gaussian kernel of size {size} is too large for {height}x{width} "
                         f"images; use a size below {2 * min(height, width)}.")
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(float(k) * padded[:, i:i + height] for i, k in enumerate(kernel))
    return sum(float(k) * rows[:, :, j:j + width] for j, k in enumerate(kernel))


def highpass(x: jax.Array, size: int, sigma: float) -> jax.Array:
    """H(x) = x − L(x), so that L(x) + H(x) = x."""
    return x - lowpass(x, size, sigma)


def anagram_output(denoise: LabelledDenoiseFn, x: jax.Array, t: jax.Array, labels1: jax.Array,
                   labels2: jax.Array, kind: str = "vertical") -> jax.Array:
    """ε = ½[ε(x, c₁) + F(ε(F(x), c₂))] in one batched model call on [x; F(x)]."""
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    both = denoise(jnp.concatenate([x, flip(x, kind)]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels1, labels2]))
    return 0.5 * (both[:batch] + flip(both[batch:], kind))


def hybrid_output(denoise: LabelledDenoiseFn, x: jax.Array, t: jax.Array, labels1: jax.Array,
                  labels2: jax.Array, size: int, sigma: float) -> jax.Array:
    """ε = L(ε(x, c₁)) + H(ε(x, c₂)) in one batched model call on [x; x]."""
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    both = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels1, labels2]))
    return lowpass(both[:batch], size, sigma) + highpass(both[batch:], size, sigma)


def composed_denoise_fn(config, denoise: LabelledDenoiseFn, labels1: jax.Array,
                        labels2: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The sampler's `(x, t) -> output` of `sample.task` (anagram or hybrid)."""
    sc = config.sample
    if sc.task == "anagram":
        return lambda x, t: anagram_output(denoise, x, t, labels1, labels2, sc.anagram_flip)
    return lambda x, t: hybrid_output(denoise, x, t, labels1, labels2,
                                      int(sc.hybrid_kernel_size), float(sc.hybrid_sigma))


def views(config, images: np.ndarray) -> dict[str, np.ndarray]:
    """What to look at besides the image (NHWC floats in [-1, 1]): the flipped image of an
    anagram; the low-pass and high-pass parts of a hybrid (the high-pass part around mid-grey)."""
    sc = config.sample
    if sc.task == "anagram":
        return {"flipped": np.asarray(flip(jnp.asarray(images), sc.anagram_flip))}
    size, sigma = int(sc.hybrid_kernel_size), float(sc.hybrid_sigma)
    return {"lowpass": np.asarray(lowpass(jnp.asarray(images), size, sigma)),
            "highpass": np.asarray(highpass(jnp.asarray(images), size, sigma))}


# ----------------------------------------------------------------------------------------------
# Settings and the --mode=sample driver
# ----------------------------------------------------------------------------------------------


def classes(config) -> tuple[int, int]:
    """(c₁, c₂) from `sample.compose_labels` "c1,c2"; one-line ValueErrors for a model without
    classes, guidance w = 0 (which ignores the classes) or labels that are not two classes."""
    from ddpm_jax import unet

    sc, num_classes = config.sample, config.model.num_classes
    task, text = sc.task, str(sc.compose_labels).strip()
    if not unet.is_conditional(num_classes):
        raise ValueError(f"sample.task={task} needs a class-conditional model, but "
                         f"model.num_classes={num_classes}; use a model trained with "
                         "--config.model.num_classes=C (e.g. configs/digits_cond.py).")
    if float(sc.guidance_scale) == 0:
        raise ValueError(f"sample.task={task} with sample.guidance_scale=0 samples the "
                         "unconditional model, which ignores the classes; set "
                         "--config.sample.guidance_scale to 1 (conditional) or more (guided).")
    try:
        parsed = [int(part) for part in text.split(",")]
    except ValueError:
        parsed = []
    if len(parsed) != 2:
        raise ValueError(f"sample.compose_labels={text!r} must be two classes 'c1,c2' for "
                         f"sample.task={task}, e.g. --config.sample.compose_labels=6,9.")
    bad = [c for c in parsed if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"sample.compose_labels={text!r}: class {bad[0]} is outside the model's "
                         f"classes 0..{num_classes - 1}.")
    return parsed[0], parsed[1]


def check_settings(config) -> tuple[int, int]:
    """Everything `run` reads besides the checkpoint, checked before anything is read/written."""
    from ddpm_jax import generate

    sc = config.sample
    pair = classes(config)
    if sc.task == "anagram" and sc.anagram_flip not in FLIPS:
        raise ValueError(f"sample.anagram_flip={sc.anagram_flip!r} is unknown; set "
                         f"--config.sample.anagram_flip to one of {', '.join(FLIPS)}.")
    if sc.task == "hybrid":
        size, side = int(sc.hybrid_kernel_size), config.data.image_size
        if size % 2 == 0 or size >= 2 * side:
            raise ValueError(f"sample.hybrid_kernel_size={size} must be odd and below "
                             f"{2 * side} (twice data.image_size); set "
                             "--config.sample.hybrid_kernel_size.")
    generate.check_method(config)
    return pair


def sample(config, graphdef, params, num_samples: int, key: jax.Array) -> np.ndarray:
    """`num_samples` composed samples [-1, 1] on one device, sample i keyed by
    `generate.example_keys(key, i)` (x_T and step noise) as every generated sample is, so with
    c1 = c2 they are `--mode=sample`'s images of that seed."""
    from ddpm_jax import chains, diffusion, generate

    dc, sc = config.diffusion, config.sample
    c1, c2 = check_settings(config)
    chosen = generate.check_method(config)
    schedule = diffusion.schedule_from_config(dc)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    labels1 = jnp.full((num_samples,), c1, jnp.int32)
    labels2 = jnp.full((num_samples,), c2, jnp.int32)

    def program(params, key):
        noise_keys, chain_keys = generate.example_keys(key, jnp.arange(num_samples))
        x_T = generate.initial_noise(noise_keys, shape)

        def denoise(x, t, labels):
            return generate.sampling_model_fn(graphdef, params, config, labels)(x, t)

        model = composed_denoise_fn(config, denoise, labels1, labels2)
        return chains.run_chain(chosen, model, schedule, x_T, chain_keys, mean_type=dc.mean_type,
                                var_type=dc.var_type, clip_denoised=sc.clip_denoised)

    return np.asarray(jax.device_get(jax.jit(program)(params, key)))


def picture(config, samples: np.ndarray) -> np.ndarray:
    """uint8 grid: for each sample, image | flipped (anagram) or image | low-pass | high-pass
    (hybrid), side by side, four samples to a row."""
    from ddpm_jax import images

    panels = [samples, *views(config, samples).values()]
    ordered = np.stack([images.to_uint8(p) for p in panels], axis=1)  # [N, panels, H, W, C]
    per_row = min(4, len(samples))
    return images.make_grid(ordered.reshape((-1,) + samples.shape[1:]),
                            columns=per_row * len(panels))


def write_composed(config, workdir: str, checkpoint: int | None = None) -> str:
    """`--mode=sample` with `sample.task` = anagram | hybrid: `sample.num_samples` images →
    `samples/<task>_step<step>_seed<seed>_c<c1>-<c2>_<hash>/` with `composed.png` (see
    `picture`), `samples.npz` (uint8 `images` and each view) and `settings.json`."""
    from ddpm_jax import checkpointing, files, images, parallel, results

    sc = config.sample
    c1, c2 = check_settings(config)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    graphdef, params, step = checkpointing.load_ema_params(config, workdir, mesh, checkpoint)
    used = {"num_samples", "method", "clip_denoised", "seed", "guidance_scale", "compose_labels",
            "task", "solver_order", "timestep_spacing", "ddim_eta", "ddim_skip", "num_steps",
            "ddim_steps"}
    used |= {"anagram_flip"} if sc.task == "anagram" else {"hybrid_kernel_size", "hybrid_sigma"}
    settings = results.output_settings(config, step, results.method_settings(
        {k: v for k, v in sc.to_dict().items() if k in used}))
    out_dir, existed = results.output_dir(
        workdir, f"{sc.task}_step{step:08d}_seed{sc.seed}_c{c1}-{c2}", settings)
    samples = sample(config, graphdef, params, int(sc.num_samples), jax.random.key(sc.seed))
    if jax.process_index() == 0:
        results.write_settings(out_dir, settings)
        images.save_png(os.path.join(out_dir, "composed.png"),
                        images.upscale(picture(config, samples), 480))
        files.save_npz(os.path.join(out_dir, "samples.npz"), images=images.to_uint8(samples),
                       labels=np.asarray([c1, c2], np.int32),
                       **{name: images.to_uint8(np.clip(view, -1, 1))
                          for name, view in views(config, samples).items()})
        results.report_written(f"{len(samples)} {sc.task} samples of classes {c1},{c2} (step "
                                f"{step})", out_dir, existed)
    return out_dir
