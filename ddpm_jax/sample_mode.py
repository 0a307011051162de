"""`--mode=sample`: EMA samples of a checkpoint written to their own results folder
(`sample.task = "generate"`), or an editing task (`edit_mode.py`)."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from ddpm_jax import checkpointing, edit_mode, files, generate, images, parallel, results


def write_samples(config, workdir: str, checkpoint: int | None = None) -> str:
    """EMA samples → `samples/<method>_step<step>_seed<seed>[_w<w>]_<hash>/` (see
    `results.output_dir`): `samples.npz` (uint8), a grid PNG, `settings.json` and, for
    ancestral sampling with `sample.progress_every`, a denoising strip and GIF.

    A conditional model samples `sample.labels` (default every class) with guidance
    `sample.guidance_scale`, one grid row per class (`generate.sample_labels`), and saves the
    labels in the npz. Another `sample.task` is run by `edit_mode.write_edits`."""
    sc = config.sample
    if sc.get("task", "generate") != "generate":
        return edit_mode.write_edits(config, workdir, checkpoint)
    labels, per_row = generate.sample_labels(config, sc.num_samples)  # bad labels fail first
    generate.check_method(config)
    mesh = parallel.make_mesh()
    graphdef, params, step = checkpointing.load_ema_params(config, workdir, mesh, checkpoint)
    name = f"{sc.method}_step{step:08d}_seed{sc.seed}"
    if labels is not None:
        name += f"_w{generate.guidance_scale(config):g}"
    settings = results.generate_settings(config, step)
    out_dir, existed = results.output_dir(workdir, name, settings)
    progress_every = sc.progress_every if sc.method == "ancestral" else 0
    key = jax.random.key(sc.seed)
    all_samples, first_progress = [], None
    for samples, progress in generate.batches(graphdef, params, config, mesh, sc.num_samples,
                                              key, progress_every=progress_every):
        all_samples.append(images.to_uint8(samples))
        if first_progress is None:
            first_progress = progress
        logging.info("sampled %d / %d", sum(len(s) for s in all_samples), sc.num_samples)
    samples_uint8 = np.concatenate(all_samples)
    if jax.process_index() == 0:
        results.write_settings(out_dir, settings)
        if labels is None:
            files.save_npz(os.path.join(out_dir, "samples.npz"), images=samples_uint8)
            grid = images.make_grid(samples_uint8[:100])
        else:  # one row per requested class
            files.save_npz(os.path.join(out_dir, "samples.npz"), images=samples_uint8,
                           labels=labels)
            grid = images.make_grid(samples_uint8, columns=per_row)
        images.save_png(os.path.join(out_dir, "grid.png"), images.upscale(grid))
        if first_progress is not None:
            images.save_png(os.path.join(out_dir, "progress.png"),
                            images.upscale(images.progress_strip(first_progress)))
            frames = [images.upscale(images.make_grid(images.to_uint8(p[:16])))
                      for p in first_progress[::-1]]
            images.save_gif(os.path.join(out_dir, "progress.gif"), frames)
        results.report_written(f"{len(samples_uint8)} samples of step {step}", out_dir, existed)
    return out_dir
