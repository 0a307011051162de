"""Pictures people look at: sample grids, denoising strips and GIFs, written atomically."""

from __future__ import annotations

import math

import numpy as np

from ddpm_jax.files import atomic_write


def to_model_range(images_uint8):
    """uint8 0..255 → float32 in [-1, 1]: x / 127.5 − 1, the original's `normalize_data`
    (docs/original.md §3.2). NumPy in, NumPy out; a jax array (inside the train step) stays one."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_pixel_values(images: np.ndarray, *, quantize: bool = True) -> np.ndarray:
    """[-1, 1] floats → float32 in [0, 255]: clipped to [-1, 1], then (x+1)·127.5.

    `quantize` rounds to the 256 uint8 levels (half to even), the values of `to_uint8`;
    without it the floats stay as the original's Inception input has them (docs/original.md
    §5.1, docs/deviations.md D20/D21).
    """
    pixels = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * np.float32(127.5)
    return np.round(pixels) if quantize else pixels


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 by rounding (x+1)·127.5, clipped to 0..255."""
    return to_pixel_values(images, quantize=True).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Tiles uint8 NHWC images into one HWC image, row-major, `columns` per row."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c),
                   pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def upscale(image: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour enlargement so tiny images (8x8 digits) are visible."""
    factor = max(1, int(math.ceil(min_side / max(image.shape[:2]))))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    image = np.asarray(image)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_gif(path: str, frames: list[np.ndarray], duration_ms: int = 100) -> None:
    from PIL import Image

    pils = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    atomic_write(path, lambda tmp: pils[0].save(
        tmp, format="GIF", save_all=True, append_images=pils[1:], duration=duration_ms, loop=0))


def progress_strip(progress: np.ndarray, max_images: int = 8) -> np.ndarray:
    """Rows = images, columns = x0 predictions from t = T−1 (left) to the final sample (right).

    `progress` is [K, B, H, W, C] in [-1, 1] with slot k holding pred_x0 at t = k·every.
    """
    progress = to_uint8(progress[:, :max_images])
    steps, batch = progress.shape[:2]
    ordered = progress[::-1].transpose(1, 0, 2, 3, 4).reshape(batch * steps, *progress.shape[2:])
    return make_grid(ordered, columns=steps)
