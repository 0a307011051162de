"""Entry point: `python -m ddpm_jax.main --config configs/cifar10.py --workdir runs/cifar10`.

Modes: `train` (default; resumes from the workdir), `sample`, `eval` and `info`.
"""

from __future__ import annotations

import logging as logging_lib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import cli

MODES = ("train", "sample", "eval", "info")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.")
flags.DEFINE_integer("checkpoint", None, "Step of the checkpoint to sample, evaluate or resume "
                     "training from (default: the latest; in training, later ones are moved aside).")
flags.DEFINE_boolean("verbose", False, "Also show the INFO logs of the libraries underneath "
                     "(absl, Orbax, TensorFlow, JAX, CLU); by default only ours and warnings.")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOnly(logging_lib.Filter):
    """Passes warnings and errors from anywhere, and lower levels only from ddpm_jax itself."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return (record.levelno >= logging_lib.WARNING
                or os.path.abspath(record.pathname).startswith(PACKAGE_DIR))


def quiet_console(verbose: bool) -> None:
    """Our INFO lines on the console; other libraries' only with --verbose. Call before
    TensorFlow is imported (its C++ logging reads TF_CPP_MIN_LOG_LEVEL once)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
    if not verbose:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())


def run(mode: str, config, workdir: str | None, checkpoint: int | None = None) -> None:
    from ddpm_jax import validate

    validate.check_mode(mode)
    if mode == "info":
        from ddpm_jax import info

        validate.validate(config, mode)
        print(info.format_info(config, info.model_info(config)))
        return
    if not workdir:
        raise ValueError(f"--mode={mode} needs --workdir (where checkpoints and outputs go).")

    from ddpm_jax import compile_cache, parallel
    from ddpm_jax import workdir as workdirs

    parallel.maybe_initialize_distributed()
    compile_cache.enable(config.get("compilation_cache_dir", ""))
    validate.validate(config, mode, parallel.make_mesh())
    workdirs.check_writable(workdir, {"sample": "samples", "eval": "eval"}.get(mode, ""))
    if mode == "train":
        from ddpm_jax import train

        with workdirs.exclusive(workdir, workdirs.LOCK_NAME, "training"):
            train.train_and_evaluate(config, workdir, checkpoint)
    elif mode == "sample":
        if config.sample.get("task", "generate") == "generate":
            from ddpm_jax import sample_mode

            sample_mode.write_samples(config, workdir, checkpoint)
        else:
            from ddpm_jax import edit_mode

            edit_mode.write_edits(config, workdir, checkpoint)
    elif mode == "eval":
        from ddpm_jax import evaluate

        with workdirs.exclusive(workdir, workdirs.EVAL_LOCK_NAME, "evaluation"):
            evaluate.run(config, workdir, checkpoint)


def run_or_exit(mode: str, config, workdir: str | None, checkpoint: int | None = None) -> None:
    """`run`, with expected failures reported as one `error:` line and exit status 2."""
    from ddpm_jax.checkpointing import CheckpointWriteError
    from ddpm_jax.train import NonFiniteError
    from ddpm_jax.workdir import WorkdirInUseError

    try:
        run(mode, config, workdir, checkpoint)
    except (ValueError, FileNotFoundError, KeyError, NonFiniteError, CheckpointWriteError,
            WorkdirInUseError) as e:
        logging.debug("failed", exc_info=True)
        cli.exit_with_error(e.args[0] if isinstance(e, KeyError) and e.args else e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or config override reported as one `error:` line."""
    return [argv[0], *cli.parse_flags(FLAGS, argv, __doc__)]


# XLA:CPU runs most fusions of one device's program on one thread; with one CPU device per core
# (data-parallel over the cores) the digits train step ran 1.2x (idle) to 1.6x (loaded) faster on 2 cores
# (benchmarks/README.md). At most 4, a power of two, so the usual batch sizes (64, 100, 128, 256)
# still divide. No effect on TPU/GPU backends, and none when XLA_FLAGS already sets a count.
MAX_CPU_DEVICES = 4


def cpu_device_flags(xla_flags: str, cores: int) -> str:
    """`xla_flags` plus one host-platform device per core (a power of two ≤ MAX_CPU_DEVICES)."""
    if "xla_force_host_platform_device_count" in xla_flags:
        return xla_flags
    devices = min(1 << (max(cores, 1).bit_length() - 1), MAX_CPU_DEVICES)
    if devices == 1:
        return xla_flags
    return f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()


def main(argv: list[str]) -> None:
    from ddpm_jax import interrupt

    interrupt.install()  # before JAX or TensorFlow start threads, so that they all inherit it
    if "jax" not in sys.modules:  # read when JAX creates its CPU client
        os.environ["XLA_FLAGS"] = cpu_device_flags(os.environ.get("XLA_FLAGS", ""),
                                                   len(os.sched_getaffinity(0)))
    if len(argv) > 1:
        cli.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.load_config(FLAGS)
    if config is None:
        cli.exit_with_error("--config is required, e.g. --config configs/digits.py")
    quiet_console(FLAGS.verbose)
    run_or_exit(FLAGS.mode, config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
    from ddpm_jax import interrupt

    interrupt.install()  # a Ctrl-C while the flags and the config file load is one line too
    app.run(main, flags_parser=parse_flags)
