"""Reference FID statistics (mu, sigma of Inception pool features) for a folder of images or an npz.

Usage:
  python -m ddpm_jax.fid_stats --images DIR_OR_NPZ --out stats.npz \
      [--inception_weights PATH] [--batch_size 200] [--overwrite]

A folder is listed like `data.folder` (`input_pipeline.list_image_files`: recursive, its image
suffixes in any case, hidden files skipped, each file once) and each file read as RGB by
`input_pipeline.read_image`. An npz must hold uint8 NHWC images under the key `images` (or as
its first array; `input_pipeline.load_npz_images`). The output is written by
`metrics.save_stats` (keys mu, sigma, num_images, meta) and is never overwritten without
`--overwrite`. A mistake (a missing flag or path, input that is not images, an output that
cannot be written) is one `error: ...` line on stderr, exit status 2, and nothing written.
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from absl import flags

from ddpm_jax import cli, input_pipeline


class FidStatsError(Exception):
    """A user-facing input problem, reported as one line by the CLI."""


def read_image(path: str) -> np.ndarray:
    """One image file as uint8 RGB [H, W, 3]."""
    try:
        return input_pipeline.read_image(path, 3)
    except Exception as error:
        raise FidStatsError(f"cannot read image {path}: {error}") from error


def _same_shape_runs(images: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Stack consecutive images of equal size (so folders of mixed sizes still batch)."""
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or images[end].shape != images[start].shape:
            yield np.stack(images[start:end])
            start = end


def folder_batches(files: Sequence[str], batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [n <= batch_size, H, W, 3] batches of the given files, in order."""
    for start in range(0, len(files), batch_size):
        yield from _same_shape_runs([read_image(path) for path in files[start : start + batch_size]])


def compute_stats(
    params,
    batches: Iterable[np.ndarray],
    batch_size: int,
    total: int | None = None,
    log_every: int = 10,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, unbiased sigma, count) of the 2048-d pool features of all images in `batches`.

    Each batch runs over all local devices, padded to `batch_size` rounded up to a multiple of
    their count (so each image size compiles once)."""
    from ddpm_jax import evaluate, parallel
    from ddpm_jax.inception import NUM_FEATURES
    from ddpm_jax.metrics import FeatureStatsAccumulator

    mesh = parallel.make_mesh()
    padded = -(-batch_size // mesh.devices.size) * mesh.devices.size
    accumulator = FeatureStatsAccumulator(NUM_FEATURES)
    start = time.time()
    for index, batch in enumerate(batches, 1):
        pixels = evaluate.inception_input(batch)
        accumulator.update(evaluate.inception_outputs(params, pixels, padded, mesh, ("pool",))["pool"])
        if log_every and index % log_every == 0:
            rate = accumulator.count / max(time.time() - start, 1e-9)
            of_total = f"/{total}" if total else ""
            print(f"fid_stats: {accumulator.count}{of_total} images ({rate:.1f} img/s)", file=sys.stderr)
    if accumulator.count < 2:
        raise FidStatsError(f"need at least 2 images for a covariance, got {accumulator.count}")
    mu, sigma = accumulator.stats()
    return mu, sigma, accumulator.count


def _image_source(images: Path, batch_size: int) -> tuple[Iterable[np.ndarray], int]:
    if images.is_dir():
        files = input_pipeline.list_image_files(str(images))
        if not files:
            raise FidStatsError(f"no {'/'.join(input_pipeline.IMAGE_SUFFIXES)} images found "
                                f"under {images}")
        return folder_batches(files, batch_size), len(files)
    if images.is_file():
        if not zipfile.is_zipfile(images):  # np.load would try it as a pickle and say so
            raise FidStatsError(f"--images={images} is neither a folder nor an npz file "
                                "(np.savez's zip of arrays); pass a folder of images or an npz "
                                "of uint8 images")
        array = input_pipeline.load_npz_images(str(images), str(images))
        if array.shape[0] == 0:
            raise FidStatsError(f"{images} holds no images")
        batches = (array[i : i + batch_size] for i in range(0, array.shape[0], batch_size))
        return batches, array.shape[0]
    raise FidStatsError(f"--images={images} does not exist; pass a folder of images "
                        "or an npz of uint8 NHWC images")


def _flag_values() -> flags.FlagValues:
    """This tool's own flags (not absl's global FLAGS), so `main` can run more than once."""
    fv = flags.FlagValues()
    flags.DEFINE_string("images", None, "Folder of PNG/JPEG images, or an npz of uint8 NHWC "
                        "images.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output .npz (mu, sigma, num_images, meta).", flag_values=fv)
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth or its "
                        "converted .npz (default: download to the cache).", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "Weights cache (default ~/.cache/ddpm_jax).",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", 200, "Images per Inception call.", flag_values=fv)
    flags.DEFINE_integer("log_every", 10, "Progress line every N batches (0: never).",
                         flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --out.", flag_values=fv)
    return fv


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isdir(out):
        raise FidStatsError(f"--out={out} is a directory; pass a file name such as "
                            f"{os.path.join(out, 'stats.npz')}")
    if os.path.exists(out) and not overwrite:
        raise FidStatsError(f"--out={out} exists; pass --overwrite to replace it")
    cli.check_can_create(out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ddpm_jax.fid_stats`; `argv` without the program name (default sys.argv[1:]).

    Returns 0; a mistake is one `error: ...` line on stderr and SystemExit(2), with nothing
    written to --out.
    """
    fv = _flag_values()
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = cli.parse_flags(fv, ["fid_stats", *argv], __doc__, config_flag=None)
    if rest:
        cli.exit_with_error(f"unexpected arguments: {' '.join(rest)} (pass the images with "
                            "--images)")
    missing = [f"--{name}" for name in ("images", "out") if not fv[name].value]
    if missing:
        cli.exit_with_error(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "required, e.g. python -m ddpm_jax.fid_stats --images DIR_OR_NPZ "
                            "--out stats.npz")
    try:
        _check_out(fv.out, fv.overwrite)
        if fv.batch_size < 1:
            raise FidStatsError(f"--batch_size must be positive, got {fv.batch_size}")
        weights = fv.inception_weights
        if weights and not os.path.isfile(os.path.expanduser(weights)):
            raise FidStatsError(f"--inception_weights={weights} does not exist; pass "
                                "pt_inception-2015-12-05-6726825d.pth (or its .npz), or leave "
                                "the flag out to download it")
        batches, total = _image_source(Path(fv.images), fv.batch_size)

        from ddpm_jax.inception import load_inception_params
        from ddpm_jax.metrics import save_stats

        try:
            params = load_inception_params(weights, fv.cache_dir)
        except ValueError as e:
            raise FidStatsError(f"--inception_weights={weights}: {e}" if weights else e) from e
        mu, sigma, count = compute_stats(params, batches, fv.batch_size, total, fv.log_every)
        meta = {
            "num_images": count,
            "source": str(fv.images),
            "inception_weights": str(fv.inception_weights or "default"),
        }
        save_stats(fv.out, mu, sigma, meta)
    except (FidStatsError, ValueError, OSError, RuntimeError) as error:
        cli.exit_with_error(error)
    print(f"fid_stats: wrote {fv.out} ({count} images)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
