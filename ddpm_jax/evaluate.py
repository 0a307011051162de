"""`--mode=eval`: Inception Score, FID (train and test) and bits/dim of the EMA weights.

Protocol (docs/original.md §5 and §2.6):

* Samples: `eval.num_samples` EMA samples (`sample.method`, `sample.clip_denoised`) made over all
  devices in parts of `eval.batch_size`. Part i is call i of `generate.batches` with the key
  `fold_in(key(eval.seed), 0)`; each sample is a function of that key and its index alone, so
  a part is the same whether or not the eval was interrupted.
* Inception (the FID network of 2015-12-05) runs over all devices. By default it sees the samples
  rounded to uint8 (`eval.quantize`), i.e. exactly the images stored in the parts and what an
  external scorer reads from saved images. With `eval.quantize=False` it sees the unquantised
  (x+1)·127.5 floats that the original repo's monitor used.
* IS: the OpenAI formula over the bias-free logits with `eval.is_splits` (10) splits, mean ± std,
  as the paper's numbers. Also reported: the original monitor's score (`logits:0`, one split).
* FID: against the Inception statistics of `data.split` (train) and `data.eval_split` (test),
  from all images of the split (or `eval.ref_max_images`). They are cached by dataset, split,
  image count, resolution and Inception weights, or read from `eval.train_stats`/`test_stats`.
* Bits/dim (`eval.bpd`): the full T-term bound of `diffusion.calc_bpd_loop` on the eval split (and
  on train with `eval.bpd_train`). Batches are `eval.bpd_batch_size` images with drop_remainder,
  like the original. Each device draws its noise from `fold_in(fold_in(split key, batch), device)`.

Files under `workdir/eval/`:
  <step>/meta.json                   settings that determine the parts (checked on resume)
  <step>/samples_<part>.npz          uint8 `images`, Inception `pool` and `logits_unbiased`
  <step>/bpd_<split>/batch_<b>.npz   one bpd batch: per-image terms, per-timestep sums
  <step>.json                        all metrics
  <step>_bpd_<split>.npz             per-timestep mean terms and per-image totals

With `eval.samplers` (a list of samplers, `parse_samplers`), each entry's parts and meta.json go
to `<step>/<entry name>/` instead (e.g. `<step>/dpm_solver_o2_20_logsnr/`), and the metrics to
  <step>_samplers.json / .md / .png  one row per entry (IS, FID train/test, NFE); FID vs NFE

Every file is written under a temporary name and renamed. A restarted eval reuses every finished
part and bpd batch, and computes only the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from ddpm_jax import diffusion, files, metrics, parallel
from ddpm_jax import images as images_lib
from ddpm_jax import utilisation, validate
from ddpm_jax.parallel import DATA_AXIS
from ddpm_jax.sampler_list import SamplerEntry, entry_config, parse_samplers

Params = Any
# (params, x_t, t) -> model output; the form `make_bpd_fn` shards over the mesh.
DenoiseWithParams = Callable[[Params, jax.Array, jax.Array], jax.Array]

SAMPLE_KEY_TAG = 0  # fold_in(key(eval.seed), tag): samples, bpd on the eval split, bpd on train
BPD_EVAL_KEY_TAG = 1
BPD_TRAIN_KEY_TAG = 2


# ---------------------------------------------------------------------------------------------
# Small host helpers.


def _same_on_all_processes(value: int) -> int:
    """Process 0's value everywhere, so every process skips the same finished work."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class _Progress:
    """Logs `what: done/total (rate/s, ETA)` lines, counting only the work done in this run."""

    def __init__(self, what: str, total: int, done: int = 0, unit: str = "images"):
        self.what, self.total, self.unit = what, total, unit
        self.start_done, self.start_time = done, time.time()

    def __call__(self, done: int) -> None:
        rate = (done - self.start_done) / max(time.time() - self.start_time, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = utilisation.format_seconds(eta) if math.isfinite(eta) else "?"
        logging.info("%s: %d/%d %s (%.2f %s/s, ETA %s)", self.what, done, self.total, self.unit,
                     rate, self.unit, eta_text)


# ---------------------------------------------------------------------------------------------
# Inception over the data mesh.


def inception_input(images: np.ndarray, *, quantize: bool = True) -> np.ndarray:
    """Inception's input from images: float32 RGB [N, H, W, 3] with values in [0, 255].

    uint8 images pass through unchanged. Float samples in [-1, 1] are clipped and mapped by
    (x+1)·127.5 (docs/original.md §5.1). With `quantize` they are also rounded to uint8 levels, giving
    exactly the values of the stored samples (`images.to_uint8`). Grey images are repeated to
    three channels.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32)
    else:
        pixels = images_lib.to_pixel_values(images, quantize=quantize)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    return pixels


@functools.lru_cache(maxsize=None)
def make_inception_fn(mesh: Mesh) -> Callable[[Params, jax.Array], dict[str, jax.Array]]:
    """jit(shard_map(inception_apply)): weights replicated, the image batch split over `data`."""
    from ddpm_jax.inception import inception_apply

    return jax.jit(jax.shard_map(inception_apply, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                                 out_specs=P(DATA_AXIS)))


def inception_outputs(params: Params, pixels: np.ndarray, batch_size: int, mesh: Mesh,
                      keys: Sequence[str] = ("pool", "logits_unbiased")) -> dict[str, np.ndarray]:
    """Inception outputs of at most `batch_size` images (padded so one shape compiles once).

    `pixels` is the full batch on every process; each process feeds its rows of the data mesh.
    """
    from ddpm_jax.generate import to_host

    count = pixels.shape[0]
    if count > batch_size:
        raise ValueError(f"got {count} images for an Inception batch of {batch_size}")
    if count < batch_size:
        padding = np.zeros((batch_size - count, *pixels.shape[1:]), pixels.dtype)
        pixels = np.concatenate([pixels, padding])
    local = pixels[parallel.host_batch_slice(batch_size)]
    outputs = make_inception_fn(mesh)(params, parallel.to_global_array(local, mesh))
    return {key: to_host(outputs[key])[:count] for key in keys}


def inception_fingerprint(params: Params) -> str:
    """sha256[:12] over every Inception weight, so caches from other weights are never reused."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Reference statistics of the data.


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "_"


def stats_cache_name(data_config, split: str, num_images: int, fingerprint: str) -> str:
    """File name of cached reference stats: dataset, split, image count, resolution, weights."""
    dataset = data_config.name
    if dataset == "imagefolder":
        folder = os.path.abspath(os.path.expanduser(data_config.folder))
        dataset = f"imagefolder-{hashlib.sha256(folder.encode()).hexdigest()[:8]}"
    return (f"{_slug(dataset)}-{_slug(split)}-{num_images}-{data_config.image_size}px"
            f"-{data_config.channels}ch-inception_{fingerprint}.npz")


def stats_dir(eval_config) -> str:
    return os.path.expanduser(eval_config.stats_dir or "~/.cache/ddpm_jax/fid_stats")


def load_reference_images(data_config, split: str, max_images: int = 0) -> np.ndarray:
    """uint8 NHWC images of a split in dataset order (the first `max_images` if > 0)."""
    from ddpm_jax import input_pipeline

    split_to_load = split
    if max_images > 0 and data_config.name not in ("digits", "imagefolder") and "[" not in split:
        split_to_load = f"{split}[:{max_images}]"  # TFDS reads only what is needed
    images = input_pipeline.load_dataset(data_config, split_to_load).images
    return images[:max_images] if max_images > 0 else images


def compute_image_stats(params: Params, images: np.ndarray, batch_size: int, mesh: Mesh,
                        what: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(mu, unbiased sigma) of the Inception pool features of uint8 images, over the mesh."""
    from ddpm_jax.inception import NUM_FEATURES

    accumulator = metrics.FeatureStatsAccumulator(NUM_FEATURES)
    progress = _Progress(f"inception {what}", len(images))
    for start in range(0, len(images), batch_size):
        pixels = inception_input(images[start:start + batch_size])
        accumulator.update(inception_outputs(params, pixels, batch_size, mesh, ("pool",))["pool"])
        progress(accumulator.count)
    return accumulator.stats()


def reference_stats(config, split: str, precomputed: str, params: Params, fingerprint: str,
                    mesh: Mesh) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu, sigma, meta) of a data split: the `precomputed` npz, else cached, else computed."""
    if precomputed:
        path = os.path.expanduser(precomputed)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference stats {path} not found; fix the eval.*_stats "
                                    "path or set it to '' to compute them from the data.")
        mu, sigma, meta = metrics.load_stats(path)
        return mu, sigma, {**meta, "source": path}
    ec = config.eval
    images = load_reference_images(config.data, split, ec.ref_max_images)
    if len(images) < 2:
        raise ValueError(f"data split {split!r} has {len(images)} images; FID needs at least 2 "
                         "(check --config.data.split / eval_split).")
    path = os.path.join(stats_dir(ec), stats_cache_name(config.data, split, len(images),
                                                        fingerprint))
    if os.path.isfile(path):
        logging.info("reference stats of %s from cache %s", split, path)
        mu, sigma, meta = metrics.load_stats(path)
        return mu, sigma, {**meta, "source": path}
    mu, sigma = compute_image_stats(params, images, ec.batch_size, mesh, f"{split} split")
    meta = {"dataset": config.data.name, "split": split, "num_images": len(images),
            "image_size": config.data.image_size, "inception": fingerprint}
    if jax.process_index() == 0:
        metrics.save_stats(path, mu, sigma, meta)
    return mu, sigma, {**meta, "source": path}


# ---------------------------------------------------------------------------------------------
# Samples in resumable parts.


def part_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Samples per part: whole batches, then the remainder."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def part_path(out_dir: str, part: int) -> str:
    return os.path.join(out_dir, f"samples_{part:05d}.npz")


def _part_count(path: str) -> int:
    """Images in a part file, or -1 if it is missing or unreadable."""
    try:
        with np.load(path) as data:
            counts = {data[key].shape[0] for key in ("images", "pool", "logits_unbiased")}
    except Exception:  # missing, truncated or foreign: the part is made again
        return -1
    return counts.pop() if len(counts) == 1 else -1


def finished_parts(out_dir: str, sizes: Sequence[int]) -> int:
    """Length of the prefix of parts whose files hold at least their share of samples."""
    for part, size in enumerate(sizes):
        if _part_count(part_path(out_dir, part)) < size:
            return part
    return len(sizes)


def save_part(out_dir: str, part: int, images_uint8: np.ndarray,
              outputs: Mapping[str, np.ndarray]) -> None:
    files.save_npz(part_path(out_dir, part), **{
        "images": images_uint8,
        "pool": np.asarray(outputs["pool"], np.float32),
        "logits_unbiased": np.asarray(outputs["logits_unbiased"], np.float32)})


def load_part_outputs(out_dir: str, sizes: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
    """Each part's Inception outputs, trimmed to its share (a larger old part is a prefix)."""
    for part, size in enumerate(sizes):
        with np.load(part_path(out_dir, part)) as data:
            yield {key: data[key][:size] for key in ("pool", "logits_unbiased")}


def check_meta(out_dir: str, meta: Mapping[str, Any]) -> None:
    """Writes `meta.json`, or raises if earlier parts were made with other settings."""
    path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        differ = [f"{key}: {before.get(key)!r} then, {meta.get(key)!r} now"
                  for key in sorted(set(before) | set(meta)) if before.get(key) != meta.get(key)]
        if differ:
            raise ValueError(f"{out_dir} holds eval samples made with other settings "
                             f"({'; '.join(differ)}); delete that folder or restore the settings.")
        return
    if jax.process_index() == 0:
        files.save_json(path, dict(meta))


def sample_meta(config, step: int, num_devices: int, fingerprint: str) -> dict[str, Any]:
    """Everything (beyond the checkpoint's model config) that decides a part's samples/features
    (`keying`: how samples are keyed, so parts drawn with an older rule are not resumed)."""
    from ddpm_jax import generate

    sc = config.sample
    meta = {"checkpoint_step": int(step), "batch_size": int(config.eval.batch_size),
            "seed": int(config.eval.seed), "num_devices": int(num_devices),
            "keying": generate.SAMPLE_KEYING,
            "method": sc.method, "clip_denoised": bool(sc.clip_denoised),
            "quantize": bool(config.eval.quantize), "inception": fingerprint}
    if sc.method != "ancestral":
        from ddpm_jax import results

        settings = results.method_settings(sc.to_dict())  # num_steps as the method resolves it
        if sc.method == "ddim":  # recorded under the names of parts made before the solvers
            meta.update(ddim_steps=int(settings["num_steps"]), ddim_eta=float(sc.ddim_eta),
                        ddim_skip=sc.ddim_skip)
        else:
            meta.update({field: settings[field] for field in results.METHOD_FIELDS[sc.method]})
    return meta


def make_sample_parts(config, graphdef, ema_params: Params, mesh: Mesh, out_dir: str,
                      inception_params: Params) -> list[int]:
    """Generates and scores every missing part (resuming after the finished ones); returns sizes."""
    from ddpm_jax import generate, images

    ec = config.eval
    sizes = part_sizes(ec.num_samples, ec.batch_size)
    first = _same_on_all_processes(finished_parts(out_dir, sizes))
    if first:
        logging.info("eval: %d of %d sample parts already in %s", first, len(sizes), out_dir)
    if first == len(sizes):
        return sizes
    key = jax.random.fold_in(jax.random.key(ec.seed), SAMPLE_KEY_TAG)
    done = sum(sizes[:first])
    progress = _Progress("eval samples", ec.num_samples, done)
    generator = generate.batches(graphdef, ema_params, config, mesh, ec.num_samples, key,
                                  batch_size=ec.batch_size, first_call=first)
    for part, (samples, _) in enumerate(generator, start=first):
        pixels = inception_input(samples, quantize=ec.quantize)
        outputs = inception_outputs(inception_params, pixels, ec.batch_size, mesh)
        if jax.process_index() == 0:
            save_part(out_dir, part, images.to_uint8(samples), outputs)
        done += len(samples)
        progress(done)
    return sizes


def sample_scores(part_outputs: Iterator[Mapping[str, np.ndarray]], logits_bias: np.ndarray,
                  reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  is_splits: int) -> dict[str, Any]:
    """IS (OpenAI, `is_splits`; and the repo monitor's 1-split score on `logits:0`) and FIDs."""
    from ddpm_jax.inception import NUM_FEATURES

    accumulator = metrics.FeatureStatsAccumulator(NUM_FEATURES)
    logits = []
    for outputs in part_outputs:
        accumulator.update(outputs["pool"])
        logits.append(np.asarray(outputs["logits_unbiased"], np.float64))
    logits_unbiased = np.concatenate(logits)
    is_mean, is_std = metrics.inception_score(logits_unbiased, num_splits=is_splits)
    monitor_is, _ = metrics.inception_score(
        logits_unbiased + np.asarray(logits_bias, np.float64), num_splits=1)
    mu, sigma = accumulator.stats()
    scores: dict[str, Any] = {
        "num_samples": int(accumulator.count),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_monitor": monitor_is,
    }
    for name, (mu_ref, sigma_ref) in reference.items():
        scores[f"fid_{name}"] = metrics.fid_from_stats(mu, sigma, mu_ref, sigma_ref)
    return scores


# ---------------------------------------------------------------------------------------------
# Bits/dim.


def make_bpd_fn(denoise: DenoiseWithParams, schedule: diffusion.Schedule, mesh: Mesh, *,
                mean_type: str, var_type: str, clip_denoised: bool = True
                ) -> Callable[[Params, jax.Array, jax.Array], dict[str, jax.Array]]:
    """jit(shard_map(calc_bpd_loop)): `(params, x_start [B, ...], key) -> per-image results`.

    Device d evaluates the bound L = L_T + Σ_t L_{t-1} (Eq. 5, `diffusion.calc_bpd_loop`) on
    its rows of the batch with the key `fold_in(key, d)`. The results are `total_bpd` [B],
    `terms_bpd` [B, T], `prior_bpd` [B] and `mse` [B, T], gathered along the batch.
    """

    def device_bpd(params, x_start, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        return diffusion.calc_bpd_loop(
            functools.partial(denoise, params), schedule, x_start, key,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)

    return jax.jit(jax.shard_map(device_bpd, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                                 out_specs=P(DATA_AXIS)))


def bpd_batch_path(out_dir: str, split: str, batch: int) -> str:
    return os.path.join(out_dir, f"bpd_{_slug(split)}", f"batch_{batch:05d}.npz")


def evaluate_bpd(bpd_fn: Callable, params: Params, images_uint8: np.ndarray, batch_size: int,
                 key: jax.Array, mesh: Mesh, out_dir: str | None = None, split: str = "test",
                 ) -> dict[str, np.ndarray]:
    """The bound over whole batches of `images_uint8` (the remainder is dropped).

    Batch b uses the key `fold_in(key, b)`. With `out_dir`, each batch's results are written to
    `bpd_<split>/batch_<b>.npz`, and batches already there are read instead of recomputed.
    Returns per-image `total_bpd`, `prior_bpd`, `decoder_bpd` [N] and per-timestep means
    `terms_bpd`, `mse` [T] over the N images.
    """
    from ddpm_jax.generate import to_host

    num_batches = len(images_uint8) // batch_size
    if num_batches == 0:
        raise ValueError(f"{len(images_uint8)} images are fewer than one bpd batch of "
                         f"{batch_size}; lower --config.eval.bpd_batch_size.")
    per_image: dict[str, list[np.ndarray]] = {"total_bpd": [], "prior_bpd": [], "decoder_bpd": []}
    sums: dict[str, np.ndarray] = {}
    progress = _Progress(f"bpd {split}", num_batches * batch_size)
    for batch in range(num_batches):
        path = bpd_batch_path(out_dir, split, batch) if out_dir else None
        done = _same_on_all_processes(int(path is not None and os.path.isfile(path)))
        if done:
            with np.load(path) as data:
                result = {name: data[name] for name in data.files}
        else:
            rows = images_uint8[batch * batch_size:(batch + 1) * batch_size]
            local = images_lib.to_model_range(rows[parallel.host_batch_slice(batch_size)])
            out = bpd_fn(params, parallel.to_global_array(local, mesh),
                         jax.random.fold_in(key, batch))
            out = {name: to_host(value).astype(np.float64) for name, value in out.items()}
            result = {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
                      "decoder_bpd": out["terms_bpd"][:, 0],
                      "terms_bpd_sum": out["terms_bpd"].sum(axis=0),
                      "mse_sum": out["mse"].sum(axis=0)}
            if path and jax.process_index() == 0:
                files.save_npz(path, **result)
        for name in per_image:
            per_image[name].append(result[name])
        for name in ("terms_bpd_sum", "mse_sum"):
            sums[name] = sums.get(name, 0.0) + result[name]
        progress((batch + 1) * batch_size)
    count = num_batches * batch_size
    return {**{name: np.concatenate(values) for name, values in per_image.items()},
            "terms_bpd": sums["terms_bpd_sum"] / count, "mse": sums["mse_sum"] / count}


def summarize_bpd(result: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Means over images: total = prior (L_T) + decoder (L_0) + Σ_{t≥1} KL terms (L_{t-1})."""
    terms = np.asarray(result["terms_bpd"], np.float64)
    return {"num_images": int(len(result["total_bpd"])),
            "total": float(np.mean(result["total_bpd"])),
            "prior": float(np.mean(result["prior_bpd"])),
            "decoder": float(np.mean(result["decoder_bpd"])),
            "kl_sum": float(terms[1:].sum())}


def bpd_splits(config) -> list[tuple[str, str, int]]:
    """(name in the results, data split, key tag) for each split the bound is computed on."""
    splits = []
    if config.data.eval_split:
        splits.append(("test", config.data.eval_split, BPD_EVAL_KEY_TAG))
    if config.eval.bpd_train:
        splits.append(("train", config.data.split, BPD_TRAIN_KEY_TAG))
    if not splits:
        raise ValueError("eval.bpd=True needs an evaluation split; set --config.data.eval_split "
                         "or --config.eval.bpd_train=True.")
    return splits


# ---------------------------------------------------------------------------------------------
# --mode=eval.


def _bpd_results(config, graphdef, ema_params: Params, mesh: Mesh, eval_dir: str, step: int,
                 out_dir: str) -> dict[str, Any]:
    from ddpm_jax import model_fns

    ec, dc = config.eval, config.diffusion

    def denoise(params, x, t):
        return model_fns.model_fn(graphdef, params)(x, t)

    bpd_fn = make_bpd_fn(denoise, diffusion.schedule_from_config(dc), mesh,
                         mean_type=dc.mean_type, var_type=dc.var_type,
                         clip_denoised=ec.bpd_clip_denoised)
    results = {}
    for name, split, tag in bpd_splits(config):
        check_meta(os.path.dirname(bpd_batch_path(out_dir, split, 0)), {
            "checkpoint_step": int(step), "batch_size": int(ec.bpd_batch_size),
            "seed": int(ec.seed), "num_devices": int(mesh.devices.size),
            "clip_denoised": bool(ec.bpd_clip_denoised)})
        images_uint8 = load_reference_images(config.data, split, ec.bpd_num_images)
        key = jax.random.fold_in(jax.random.key(ec.seed), tag)
        result = evaluate_bpd(bpd_fn, ema_params, images_uint8, ec.bpd_batch_size, key, mesh,
                              out_dir, split)
        results[name] = {**summarize_bpd(result), "split": split}
        if jax.process_index() == 0:
            files.save_npz(os.path.join(eval_dir, f"{step}_bpd_{name}.npz"), **result)
        logging.info("bits/dim %s (%s): %.4f (prior %.2e, decoder %.4f)", name, split,
                     results[name]["total"], results[name]["prior"], results[name]["decoder"])
    return results


# ---------------------------------------------------------------------------------------------
# A list of samplers (`eval.samplers`).


# Parsed in `sampler_list.py` (`SamplerEntry`, `parse_samplers`, `entry_config`), which
# `validate` also imports to refuse a bad list before a run starts.


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of the sweep: sampler, model evaluations, IS, FID train/test."""
    columns = [("sampler", "sampler"), ("NFE", "nfe"), ("IS", "inception_score"),
               ("± ", "inception_score_std"), ("FID train", "fid_train"),
               ("FID test", "fid_test")]
    present = [(title, key) for title, key in columns if any(key in row for row in rows)]

    def cell(row, key):
        value = row.get(key, "")
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title.strip() or "±" for title, _ in present) + " |",
             "|" + "|".join("---" for _ in present) + "|"]
    lines += ["| " + " | ".join(cell(row, key) for _, key in present) + " |" for row in rows]
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """FID (train, else test) against model evaluations, one line per method family."""
    from ddpm_jax import plot

    metric = "fid_train" if any("fid_train" in row for row in rows) else "fid_test"
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if metric in row:
            series.setdefault(row["family"], []).append((row["nfe"], row[metric]))
    plot.save_line_plot(path, series, x_label="model evaluations (NFE)",
                        y_label=metric.replace("fid_", "FID ").replace("train", "(train)")
                        .replace("test", "(test)"), title=title)


# ---------------------------------------------------------------------------------------------
# --mode=eval.


class _Inception(NamedTuple):
    params: Params  # replicated over the mesh
    fingerprint: str
    bias: np.ndarray


def _load_inception(config, mesh: Mesh) -> _Inception:
    from ddpm_jax.inception import load_inception_params

    params = load_inception_params(config.eval.inception_weights or None)
    fingerprint = inception_fingerprint(params)
    bias = np.asarray(params["fc"]["bias"])
    return _Inception(jax.device_put(params, parallel.replicated(mesh)), fingerprint, bias)


def _reference(config, net: _Inception, mesh: Mesh
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    ec = config.eval
    reference, reference_meta = {}, {}
    for name, split, precomputed in (("train", config.data.split, ec.train_stats),
                                     ("test", config.data.eval_split, ec.test_stats)):
        if split or precomputed:
            mu, sigma, meta = reference_stats(config, split, precomputed, net.params,
                                              net.fingerprint, mesh)
            reference[name], reference_meta[name] = (mu, sigma), meta
    return reference, reference_meta


def _sample_results(config, graphdef, ema_params: Params, mesh: Mesh, step: int, out_dir: str,
                    net: _Inception, reference: Mapping[str, tuple[np.ndarray, np.ndarray]]
                    ) -> dict[str, Any]:
    """IS and FIDs of `config.sample`'s sampler, from the parts in `out_dir` (made if missing)."""
    ec = config.eval
    meta = sample_meta(config, step, mesh.devices.size, net.fingerprint)
    check_meta(out_dir, meta)
    sizes = make_sample_parts(config, graphdef, ema_params, mesh, out_dir, net.params)
    results = sample_scores(load_part_outputs(out_dir, sizes), net.bias, reference, ec.is_splits)
    results["protocol"] = {
        **meta,
        "is_splits": int(ec.is_splits),
        "is_logits": "pool_3 @ W, no bias (OpenAI); monitor: logits:0, 1 split (TF-GAN)",
        "inception_input": ("samples rounded to uint8" if ec.quantize
                            else "unquantised (x+1)*127.5"),
        "fid": "pool_3 features, unbiased covariance",
    }
    return results


def _sweep_results(config, entries: Sequence[SamplerEntry], graphdef, ema_params: Params,
                   mesh: Mesh, step: int, out_dir: str, net: _Inception,
                   reference: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """One row per entry, each from the parts in `out_dir/<entry.name>/` (made if missing)."""
    from ddpm_jax import chains

    rows = []
    for entry in entries:
        logging.info("eval: sampler %s", entry.name)
        entry_conf = entry_config(config, entry)
        scores = _sample_results(entry_conf, graphdef, ema_params, mesh, step,
                                 os.path.join(out_dir, entry.name), net, reference)
        chosen = chains.Method(entry.method, entry.num_steps)
        rows.append({"sampler": entry.name, "family": entry.family, "method": entry.method,
                     "num_steps": entry.num_steps, "order": entry.order,
                     "spacing": entry.spacing, "eta": entry.eta,
                     "nfe": chains.model_calls(chosen, config.diffusion.num_timesteps),
                     **scores})
    return rows


def _scalars(results: Mapping[str, Any]) -> dict[str, float]:
    scalars = {f"eval/{key}": results[key] for key in (
        "inception_score", "inception_score_std", "fid_train", "fid_test") if key in results}
    for row in results.get("samplers", []):
        scalars.update({f"eval/{row['sampler']}/{key}": row[key] for key in (
            "inception_score", "fid_train", "fid_test") if key in row})
    for name, values in results.get("bpd", {}).items():
        scalars.update({f"eval/bpd_{name}": values["total"],
                        f"eval/bpd_{name}_prior": values["prior"],
                        f"eval/bpd_{name}_decoder": values["decoder"]})
    return scalars


def _write_results(config, workdir: str, eval_dir: str, step: int,
                   results: dict[str, Any]) -> None:
    """TensorBoard scalars, `eval/<step>.json` (a sweep: `<step>_samplers.{json,md,png}`), and
    the console line (a sweep: its table)."""
    from ddpm_jax import summaries

    scalars = _scalars(results)
    writer = summaries.SummaryWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_scalars(step, scalars)
    writer.close()
    if jax.process_index() != 0:
        return
    if "samplers" not in results:
        path = os.path.join(eval_dir, f"{step}.json")
        files.save_json(path, results)
        summary = ", ".join(f"{key.removeprefix('eval/')} {value:.4g}"
                            for key, value in scalars.items())
        print(f"eval of step {step}: {summary} → {path}")
        return
    base = os.path.join(eval_dir, f"{step}_samplers")
    table = format_table(results["samplers"])
    files.save_json(base + ".json", results)
    files.atomic_write(base + ".md", lambda tmp: pathlib.Path(tmp).write_text(table + "\n"))
    plot_sweep(results["samplers"], base + ".png",
               f"{config.data.name}, step {step}, {config.eval.num_samples} samples")
    bpd = ", ".join(f"bpd {name} {values['total']:.4g}"
                    for name, values in results.get("bpd", {}).items())
    print(f"eval of step {step}, {len(results['samplers'])} samplers"
          f"{' (' + bpd + ')' if bpd else ''} → {base}.json, .md, .png\n{table}")


def evaluate_checkpoint(config, workdir: str, checkpoint: int | None = None) -> dict[str, Any]:
    """`--mode=eval`: metrics of the latest (or `checkpoint`) EMA weights → `eval/<step>.json`;
    with `eval.samplers`, one row per sampler → `eval/<step>_samplers.{json,md,png}`."""
    from ddpm_jax import checkpointing

    ec = config.eval
    mesh = parallel.make_mesh()
    validate.check_batches(config, "eval", mesh)
    validate.check_eval_counts(config.eval)
    entries = parse_samplers(config)
    graphdef, ema_params, step = checkpointing.load_ema_params(config, workdir, mesh, checkpoint)
    eval_dir = os.path.join(workdir, "eval")
    out_dir = os.path.join(eval_dir, str(step))
    started = time.time()
    results: dict[str, Any] = {"step": int(step), "checkpoint_dir": os.path.join(workdir,
                                                                                  "checkpoints")}
    if ec.num_samples:
        net = _load_inception(config, mesh)
        reference, results["reference"] = _reference(config, net, mesh)
        if entries:
            results["samplers"] = _sweep_results(config, entries, graphdef, ema_params, mesh,
                                                 step, out_dir, net, reference)
        else:
            scores = _sample_results(config, graphdef, ema_params, mesh, step, out_dir, net,
                                     reference)
            results = {**results, **scores, "reference": results["reference"]}
    if ec.bpd:
        results["bpd"] = _bpd_results(config, graphdef, ema_params, mesh, eval_dir, step,
                                      out_dir)
    results["seconds"] = time.time() - started
    _write_results(config, workdir, eval_dir, step, results)
    return results
