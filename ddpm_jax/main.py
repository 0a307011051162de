"""Entry point: `python -m ddpm_jax.main --config configs/cifar10.py --workdir runs/cifar10`.

Modes: `train` (default; resumes from the workdir), `sample`, `eval` and `info`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "info")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.")
flags.DEFINE_integer("checkpoint", None, "Step of the checkpoint to sample/evaluate "
                     "(default: the latest).")


def run(mode: str, config, workdir: str | None, checkpoint: int | None = None) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is unknown; use one of {', '.join(MODES)}.")
    if mode == "info":
        from ddpm_jax import info

        print(info.format_info(config, info.model_info(config)))
        return
    if not workdir:
        raise ValueError(f"--mode={mode} needs --workdir (where checkpoints and outputs go).")

    from ddpm_jax import parallel

    parallel.maybe_initialize_distributed()
    if mode == "train":
        from ddpm_jax import train

        train.train_and_evaluate(config, workdir)
    elif mode == "sample":
        from ddpm_jax import sampling

        sampling.run(config, workdir, checkpoint)
    elif mode == "eval":
        from ddpm_jax import evaluate

        evaluate.run(config, workdir, checkpoint)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/digits.py")
    logging.set_verbosity(logging.INFO)
    from ddpm_jax.train import NonFiniteError

    try:
        run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    except (ValueError, FileNotFoundError, KeyError, NonFiniteError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        logging.debug("failed", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
