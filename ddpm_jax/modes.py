"""The modes of `python -m ddpm_jax.main` and the one function that runs them.

`train` (default; resumes from the workdir, `train.py`), `sample` (`sample_mode.py`, or
`edit_mode.py` for an editing `sample.task`), `eval` (`evaluate.py`) and `info` (`info.py`).
Each mode's modules are imported only when it runs, so `--mode=info` never loads the trainer.
"""

from __future__ import annotations

from absl import logging

from ddpm_jax import cli, errors

MODES = ("train", "sample", "eval", "info")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is unknown; use one of {', '.join(MODES)}.")


def run_mode(mode: str, config, workdir: str | None, checkpoint: int | None = None) -> None:
    """Checks `config` for `mode` (`validate.py`), then runs the mode on `workdir`."""
    from ddpm_jax import validate

    check_mode(mode)
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
        from ddpm_jax import sample_mode

        sample_mode.write_samples(config, workdir, checkpoint)
    elif mode == "eval":
        from ddpm_jax import evaluate

        with workdirs.exclusive(workdir, workdirs.EVAL_LOCK_NAME, "evaluation"):
            evaluate.evaluate_checkpoint(config, workdir, checkpoint)


def run_or_exit(mode: str, config, workdir: str | None, checkpoint: int | None = None) -> None:
    """`run_mode`, with expected failures (`errors.EXPECTED`) reported as one `error:` line and
    exit status 2."""
    try:
        run_mode(mode, config, workdir, checkpoint)
    except errors.EXPECTED as e:
        logging.debug("failed", exc_info=True)
        cli.exit_with_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
