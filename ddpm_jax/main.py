"""Entry point: `python -m ddpm_jax.main --config configs/cifar10.py --workdir runs/cifar10`.

Modes: `train` (default; resumes from the workdir), `sample`, `eval` and `info`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import cli, interrupt, modes

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(modes.MODES)}.")
flags.DEFINE_integer("checkpoint", None, "Step of the checkpoint to sample, evaluate or resume "
                     "training from (default: the latest; in training, later ones are moved aside).")
flags.DEFINE_boolean("verbose", False, "Also show the INFO logs of the libraries underneath "
                     "(absl, Orbax, TensorFlow, JAX, CLU); by default only ours and warnings.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or config override reported as one `error:` line."""
    return [argv[0], *cli.parse_flags(FLAGS, argv, __doc__)]


def main(argv: list[str]) -> None:
    interrupt.install()  # before JAX or TensorFlow start threads, so that they all inherit it
    cli.use_cpu_devices_per_core()
    if len(argv) > 1:
        cli.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.load_config(FLAGS)
    if config is None:
        cli.exit_with_error("--config is required, e.g. --config configs/digits.py")
    cli.quiet_console(FLAGS.verbose)
    modes.run_or_exit(FLAGS.mode, config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
    interrupt.install()  # a Ctrl-C while the flags and the config file load is one line too
    app.run(main, flags_parser=parse_flags)
