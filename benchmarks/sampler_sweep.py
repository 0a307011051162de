"""Sample quality against model evaluations on a digits model: every sampler, one table, one plot.

    python benchmarks/sampler_sweep.py --config configs/digits.py --workdir runs/digits \
        --seeds 1,2 --out benchmarks/sampler_sweep_digits

For each entry of `--samplers` (the syntax of `--config.eval.samplers`, parsed by
`sampler_list.parse_samplers`: `ancestral:T`, `ddim:steps[:eta]`, `dpm_solver|unipc:steps[:order
[:spacing]]`) and each seed, draws `--num_samples` digits with the run's EMA weights from the
same x_T (the seed's key), and scores them with the Fréchet distance of
`benchmarks/quality_digits.py` (64-unit MLP features; held-out real digits as the reference).
`ddim:S:1` (η = 1, σ² = β̃ on S of the T steps) is the ancestral sampler on fewer steps.

Prints one JSON line per entry (both seeds' distances, their mean, and the real-vs-real value
at the same sample count) and a markdown table; writes `<out>.json` (the lines), `<out>.md`
(the table) and `<out>.png` (Fréchet distance against NFE, log-x, one line per family).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import quality_digits  # noqa: E402
from ddpm_jax import chains, checkpointing, evaluate, generate, images, parallel, plot, sampler_list  # noqa: E402

FLAGS = flags.FLAGS

DEFAULT_SAMPLERS = ",".join(
    ["ancestral:1000", "dpm_solver:20:2:logsnr"]
    + [f"ddim:{s}:1" for s in (10, 20, 50, 100)]
    + [f"ddim:{s}" for s in (10, 20, 50, 100)]
    + [f"dpm_solver:{s}:{o}:{'logsnr' if s <= 38 else 'linspace'}" for o in (2, 3)
       for s in (5, 10, 15, 20, 50) if (s, o) != (20, 2)]
    + [f"unipc:{s}:2:{'logsnr' if s <= 38 else 'linspace'}" for s in (5, 10, 20, 50)])
# The log-SNR grid of the linear 1000-step schedule repeats timesteps above 38 steps
# (solvers.solver_timesteps), so the 50-step solver entries use the linspace grid.


def sweep_rows(config, graphdef, params, mesh, entries, seeds, num_samples: int,
               batch_size: int, lines_path: str = "") -> list[dict]:
    """One row per entry: the Fréchet distance of each seed's samples, and real vs real; each
    row is also appended to `lines_path` (JSON lines) as soon as it is measured."""
    rows = []
    for entry in entries:
        entry_config = sampler_list.entry_config(config, entry)
        distances, real, seconds = [], None, 0.0
        for seed in seeds:
            start = time.time()
            batches = generate.batches(graphdef, params, entry_config, mesh, num_samples,
                                        jax.random.key(seed), batch_size=batch_size)
            samples = np.concatenate([images.to_uint8(s) for s, _ in batches])
            seconds += time.time() - start
            report = quality_digits.frechet_report(samples)
            distances.append(report["frechet_distance"])
            real = (report["frechet_distance_real"], report["frechet_real_count"])
        nfe = chains.model_calls(chains.Method(entry.method, entry.num_steps),
                                   config.diffusion.num_timesteps)
        row = {"benchmark": "sampler_sweep", "sampler": entry.name, "family": entry.family,
               "method": entry.method, "nfe": nfe, "order": entry.order,
               "spacing": entry.spacing, "eta": entry.eta, "num_samples": num_samples,
               "seeds": list(seeds), "frechet_distance": [round(d, 4) for d in distances],
               "frechet_distance_mean": round(float(np.mean(distances)), 4),
               "frechet_distance_real": round(real[0], 4), "frechet_real_count": real[1],
               "sampling_seconds": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        if lines_path:
            with open(lines_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def merge_rows(rows: list[dict], order: list[str]) -> list[dict]:
    """Rows of one sampler measured by separate runs (other seeds) as one row, in `order`."""
    merged: dict[str, dict] = {}
    for row in rows:
        if row["sampler"] in merged:
            into = merged[row["sampler"]]
            into["seeds"] = into["seeds"] + row["seeds"]
            into["frechet_distance"] = into["frechet_distance"] + row["frechet_distance"]
            into["frechet_distance_mean"] = round(float(np.mean(into["frechet_distance"])), 4)
            into["sampling_seconds"] = round(into["sampling_seconds"]
                                             + row["sampling_seconds"], 1)
        else:
            merged[row["sampler"]] = dict(row)
    rank = {name: index for index, name in enumerate(order)}
    return sorted(merged.values(), key=lambda row: rank.get(row["sampler"], len(rank)))


def table(rows: list[dict]) -> str:
    seeds = max((row["seeds"] for row in rows), key=len)
    head = (["sampler", "NFE"] + [f"FD seed {s}" for s in seeds]
            + ["FD mean", "vs ancestral"])
    reference = next((r["frechet_distance_mean"] for r in rows if r["method"] == "ancestral"),
                     None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = f"{r['frechet_distance_mean'] / reference - 1:+.0%}" if reference else ""
        lines.append("| " + " | ".join([r["sampler"], str(r["nfe"])]
                                       + [f"{dict(zip(r['seeds'], r['frechet_distance']))[s]:.3f}"
                                          if s in r["seeds"] else "" for s in seeds]
                                       + [f"{r['frechet_distance_mean']:.3f}", ratio]) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    config = FLAGS.config
    config.eval.samplers = FLAGS.samplers
    entries = sampler_list.parse_samplers(config)
    seeds = [int(s) for s in FLAGS.seeds.split(",")]
    lines_path = FLAGS.out + ".json" if FLAGS.out else ""
    if FLAGS.render_only:  # the table and plot of rows measured before, by other runs too
        rows = []
        for path in [lines_path] + [p for p in FLAGS.merge.split(",") if p]:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        rows = merge_rows(rows, [entry.name for entry in entries])
        step = FLAGS.checkpoint
    else:
        mesh = parallel.make_mesh()
        graphdef, params, step = checkpointing.load_ema_params(config, FLAGS.workdir, mesh,
                                                          FLAGS.checkpoint)
        if lines_path and os.path.exists(lines_path):
            os.remove(lines_path)
        rows = sweep_rows(config, graphdef, params, mesh, entries, seeds, FLAGS.num_samples,
                          FLAGS.batch_size, lines_path)
    text = table(rows)
    real = rows[0]["frechet_distance_real"], rows[0]["frechet_real_count"]
    count = rows[0]["num_samples"]
    print(f"step {step}, {count} samples per seed; real vs real ({real[1]} real "
          f"digits): {real[0]:.3f}\n{text}")
    if FLAGS.out:
        from ddpm_jax import files

        files.atomic_write(FLAGS.out + ".md", lambda tmp: open(tmp, "w").write(text + "\n"))
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            series.setdefault(row["family"], []).append((row["nfe"],
                                                         row["frechet_distance_mean"]))
        plot.save_line_plot(FLAGS.out + ".png", series, x_label="model evaluations (NFE)",
                            y_label="Frechet distance (digits)",
                            title=f"digits, step {step}: {count} samples, mean of "
                                  f"{len(rows[0]['seeds'])} seeds; real vs real {real[0]:.2f}")


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", "configs/digits.py", "The run's config.")
    flags.DEFINE_string("workdir", None, "The trained digits run.", required=True)
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("samplers", DEFAULT_SAMPLERS, "Comma list as eval.samplers.")
    flags.DEFINE_integer("num_samples", 1000, "Digits per sampler and seed.")
    flags.DEFINE_integer("batch_size", 1000, "Digits per sampling call.")
    flags.DEFINE_string("seeds", "1,2", "Comma list of sampling seeds.")
    flags.DEFINE_string("out", "", "Path prefix of the .json/.md/.png outputs; '' = print only.")
    flags.DEFINE_bool("render_only", False, "Only redraw <out>.md/.png from <out>.json "
                      "and the --merge files (--checkpoint names the step in the title).")
    flags.DEFINE_string("merge", "", "With --render_only: comma list of more JSON-lines files "
                        "(e.g. other seeds of the same samplers, run in parallel).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
