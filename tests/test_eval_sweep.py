"""`--mode=eval` over a list of samplers (`eval.samplers`) and the Pillow plot (ddpm_jax.plot).

References: `generate.batches` with each entry's method and the eval key, for the stored parts;
FID recomputed in NumPy from the stored Inception features and the reference images' features;
the log-axis arithmetic written out in the test, for the plot.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import evaluate, generate, images, inception, modes, plot, sampler_list
from test_evaluate import _fid_numpy, _mock_split_images, _tiny_cifar10_config, _write_checkpoint
from test_evaluate import inception_npz, mesh  # noqa: F401  (fixtures)

SWEEP = "ancestral:10,ddim:4:1,dpm_solver:4:2:linspace,unipc:3:3:linspace"


def _config(inception_npz_path: str, stats_dir: str, samplers: str = SWEEP):
    config = _tiny_cifar10_config(inception_npz_path, stats_dir)
    config.eval.bpd = False
    config.eval.samplers = samplers
    return config


def test_parse_samplers_reads_entries_and_names_their_folders(inception_npz):
    config = _config(inception_npz, "")
    entries = sampler_list.parse_samplers(config)
    assert [e.name for e in entries] == ["ancestral_10", "ddim_eta1_4",
                                         "dpm_solver_o2_4_linspace", "unipc_o3_3_linspace"]
    assert [(e.method, e.num_steps, e.order, e.spacing, e.eta) for e in entries] == [
        ("ancestral", 10, None, None, None), ("ddim", 4, None, None, 1.0),
        ("dpm_solver", 4, 2, "linspace", None), ("unipc", 3, 3, "linspace", None)]
    # Order and spacing default to sample.solver_order / sample.timestep_spacing.
    config.eval.samplers = "dpm_solver:5"
    config.sample.timestep_spacing = "trailing"
    assert sampler_list.parse_samplers(config) == [sampler_list.SamplerEntry("dpm_solver", 5, 2,
                                                                     "trailing")]
    config.eval.samplers = "ddim:5"
    assert sampler_list.parse_samplers(config)[0].name == "ddim_5"  # η = sample.ddim_eta = 0
    config.eval.samplers = ""
    assert sampler_list.parse_samplers(config) == []


@pytest.mark.parametrize("text, message", [
    ("plms:20", "eval.samplers entry 'plms:20': method 'plms' is unknown; use one of ancestral, "
                "ddim, dpm_solver, unipc"),
    ("ancestral:50", "eval.samplers entry 'ancestral:50': the ancestral sampler takes all 10 "
                     "steps (diffusion.num_timesteps); write ancestral:10."),
    ("ddim:5:0:1", "eval.samplers entry 'ddim:5:0:1' must read ddim:steps[:eta], e.g."),
    ("ancestral:10:2", "eval.samplers entry 'ancestral:10:2' must read ancestral:steps, e.g."),
    ("ddim:5:-1", "eval.samplers entry 'ddim:5:-1': eta -1 must be a number ≥ 0."),
    ("ddim:five", "eval.samplers entry 'ddim:five': steps and order must be integers and eta "
                  "a number"),
    ("unipc:5:4", "eval.samplers entry 'unipc:5:4': order 4 must be in [1, 3]."),
    ("unipc:5:2:karras", "eval.samplers entry 'unipc:5:2:karras': spacing 'karras' is unknown"),
    ("ddim:4,ddim:4", "eval.samplers entry 'ddim:4' is listed twice in eval.samplers; drop one."),
    ("dpm_solver:10", "eval.samplers entry 'dpm_solver:10': sample.num_steps=10 does not fit "
                      "sample.method=dpm_solver from paper step 10: it takes 1..9 model calls"),
    ("ddim:0", "eval.samplers entry 'ddim:0': steps must be in [1, diffusion.num_timesteps=10]."),
])
def test_parse_samplers_refuses_what_cannot_run_in_one_line(inception_npz, text, message):
    config = _config(inception_npz, "", text)
    with pytest.raises(ValueError) as error:
        sampler_list.parse_samplers(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sweep_writes_one_row_per_sampler_and_resumes_per_entry(mesh, inception_npz, tmp_path,
                                                                monkeypatch, capsys):
    config = _config(inception_npz, str(tmp_path / "fid_stats"))
    workdir = str(tmp_path / "workdir")
    graphdef, ema_params = _write_checkpoint(config, workdir, mesh)
    entries = sampler_list.parse_samplers(config)
    folders = [os.path.join(workdir, "eval", "5", e.name) for e in entries]
    save_part = evaluate.save_part

    def dies_in_the_third_entry(out_dir, part, *args):
        if out_dir == folders[2] and part == 1:
            raise KeyboardInterrupt("killed in the third sampler")
        save_part(out_dir, part, *args)

    with tfds.testing.mock_data(num_examples=8):
        monkeypatch.setattr(evaluate, "save_part", dies_in_the_third_entry)
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_checkpoint(config, workdir)
        monkeypatch.setattr(evaluate, "save_part", save_part)
        finished = {(path, part): os.stat(evaluate.part_path(path, part)).st_mtime_ns
                    for path in folders[:2] for part in (0, 1)}
        third = os.stat(evaluate.part_path(folders[2], 0)).st_mtime_ns
        assert not os.path.exists(evaluate.part_path(folders[2], 1))
        capsys.readouterr()
        modes.run_mode("eval", config, workdir)
        train_images = _mock_split_images("train")
    printed = capsys.readouterr().out

    # The restart made only what was missing: the finished parts are untouched.
    for (path, part), mtime in finished.items():
        assert os.stat(evaluate.part_path(path, part)).st_mtime_ns == mtime
    assert os.stat(evaluate.part_path(folders[2], 0)).st_mtime_ns == third

    with open(os.path.join(workdir, "eval", "5_samplers.json")) as f:
        results = json.load(f)
    rows = results["samplers"]
    assert [row["sampler"] for row in rows] == [e.name for e in entries]
    assert [row["nfe"] for row in rows] == [10, 4, 4, 3]
    assert not os.path.exists(os.path.join(workdir, "eval", "5.json"))  # a sweep has its own

    params = inception.load_inception_params(inception_npz)
    reference = np.asarray(jax.jit(inception.inception_apply)(
        params, train_images.astype(np.float32))["pool"], np.float64)
    key = jax.random.fold_in(jax.random.key(config.eval.seed), evaluate.SAMPLE_KEY_TAG)
    stored = []
    for entry, folder, row in zip(entries, folders, rows):
        parts = [np.load(evaluate.part_path(folder, p)) for p in range(2)]
        samples = np.concatenate([p["images"] for p in parts])
        # Each entry's parts are what its sampler makes from the eval key, uninterrupted.
        made = np.concatenate([s for s, _ in generate.batches(
            graphdef, ema_params, sampler_list.entry_config(config, entry), mesh, 12, key,
            batch_size=8)])
        np.testing.assert_array_equal(samples, images.to_uint8(made))
        pool = np.concatenate([p["pool"] for p in parts]).astype(np.float64)
        assert row["fid_train"] == pytest.approx(_fid_numpy(pool, reference), rel=1e-3)
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        assert meta["method"] == entry.method
        if entry.method == "ddim":
            assert meta["ddim_eta"] == 1.0 and meta["ddim_steps"] == 4
        stored.append(samples)
    # The samplers do differ (the test could tell them apart).
    assert len({s.tobytes() for s in stored}) == 4

    # The markdown table and the console show the same rows; the plot is a PNG.
    with open(os.path.join(workdir, "eval", "5_samplers.md")) as f:
        table = f.read()
    lines = table.strip().splitlines()
    assert lines[0] == "| sampler | NFE | IS | ± | FID train | FID test |"
    assert len(lines) == 2 + len(entries)
    for line, row in zip(lines[2:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["sampler"] and int(cells[1]) == row["nfe"]
        assert float(cells[4]) == pytest.approx(row["fid_train"], rel=1e-3)
    assert table.strip() in printed
    with Image.open(os.path.join(workdir, "eval", "5_samplers.png")) as picture:
        assert picture.format == "PNG" and picture.size == (720, 480)



# ------------------------------------------------------------------ the plot


def test_plot_places_points_on_a_log_x_axis_with_a_legend(tmp_path):
    path = str(tmp_path / "plot.png")
    series = {"ancestral": [(10, 300.0), (100, 30.0), (1000, 3.0)],
              "ddim": [(10, 12.0), (100, 4.0)]}
    axes = plot.save_line_plot(path, series, x_label="NFE", y_label="FID", title="t")
    # Each decade of x is the same number of pixels: a log axis.
    x10, _ = axes.to_pixel(10, 5.0)
    x100, _ = axes.to_pixel(100, 5.0)
    x1000, _ = axes.to_pixel(1000, 5.0)
    assert x100 - x10 == pytest.approx(x1000 - x100) and x100 - x10 > 100
    # y spans a factor of 100, so it is a log axis too; the limits are the data's / 1.25, × 1.25.
    assert axes.y_log and axes.y_range == pytest.approx((math.log10(3 / 1.25),
                                                         math.log10(300 * 1.25)))
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for index, values in enumerate(series.values()):
        colour = np.asarray(plot.COLOURS[index])
        for x, y in values:  # a marker of the series' colour at each point
            px, py = (int(round(v)) for v in axes.to_pixel(x, y))
            assert (np.abs(picture[py, px] - colour).sum()) < 30, (index, x, y)
        # ... and in the legend box at the top right, beside the plot's lines.
        top_right = picture[axes.top:axes.top + 60, axes.right - 200:axes.right]
        assert (np.abs(top_right - colour).sum(-1) < 30).sum() > 20


def test_ticks_are_round_numbers():
    assert plot.log_ticks(8, 1250) == [10, 20, 50, 100, 200, 500, 1000]
    assert plot.linear_ticks(0, 9.3) == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.save_line_plot("/nonexistent/x.png", {"a": [(0, 1.0)]}, x_label="", y_label="")
