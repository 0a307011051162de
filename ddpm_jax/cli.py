"""What every command-line tool of the project shares: absl flag parsing whose mistakes are one
`error: ...` line on stderr with exit status 2 (never a traceback or the whole usage text), a
`--help` that prints the usage and exits 0, the check that an output path can be created, and
the process set-up of `python -m ddpm_jax.main` (a quiet console, one CPU device per core).

Used by `python -m ddpm_jax.convert` and `python -m ddpm_jax.fid_stats`; the helpers take the
`FlagValues` to parse, so each tool can parse its own set (and be called more than once, e.g.
from tests) without touching absl's global `FLAGS`.
"""

from __future__ import annotations

import difflib
import logging as logging_lib
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NoReturn

from absl import flags, logging

HELP_FLAGS = ("-?", "-h", "--help", "-help", "--helpshort", "--helpfull")


def error_line(message: Any) -> str:
    """`error: <message>` folded onto one line."""
    return "error: " + " ".join(str(message).split())


def exit_with_error(message: Any) -> NoReturn:
    """The one-line `error: ...` on stderr and exit status 2, for every mistake we can name."""
    print(error_line(message), file=sys.stderr)
    sys.exit(2)


def unknown_config_key(argv: Sequence[str], error: Exception, name: str = "config") -> str | None:
    """`--config.a.b=...` naming a key the config does not have, with ml_collections' hint."""
    message = error
    while isinstance(message, BaseException):  # AttributeError(KeyError("'key'\nDid you ..."))
        message = message.args[0] if message.args else str(message)
    message = str(message)
    key = message.split("'")[1] if message.count("'") >= 2 else message
    suggestion = " ".join(message.split("\n", 1)[1:]).strip()
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith(f"--{name}.") and flag.rsplit(".", 1)[-1] == key:
            return (f"{flag}: the config has no key {key!r}"
                    f"{' (' + suggestion + ')' if suggestion else ''}; see configs/default.py "
                    "for the keys.")
    return None


def config_file_error(filename: str, error: Exception, name: str = "config") -> str:
    """Why `--config=filename` could not be loaded, from the innermost cause."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    reason = getattr(cause, "strerror", None) or (lines[-1].strip() if lines else type(cause).__name__)
    if not isinstance(cause, OSError):  # an error in the file: say which kind
        reason = f"{type(cause).__name__}: {reason}"
    return (f"--{name}={filename} cannot be loaded ({reason}); "
            "pass a config file such as configs/digits.py.")


def _flag_argument(argv: Sequence[str], name: str) -> str:
    """The last value given to `--name` (`--name=value` or `--name value`) in `argv`."""
    value = ""
    for i, arg in enumerate(argv):
        if arg.lstrip("-") == name and arg.startswith("-") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-") and arg.lstrip("-").startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], usage: str,
                config_flag: str | None = "config") -> list[str]:
    """Parse `argv` (program name first) into `flag_values`; returns the positional arguments
    after the program name.

    `--help` prints `usage` and the flags and exits 0. A bad flag, a `--config.*` override of a
    missing key or a config file that cannot be read is one `error:` line and exit status 2.
    """
    argv = list(argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage.rstrip() + "\n\nflags:\n" + flag_values.get_help())
        sys.exit(0)
    try:
        return flag_values(argv)[1:]
    except flags.UnrecognizedFlagError as e:
        close = difflib.get_close_matches(e.flagname, list(flag_values), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        if config_flag and e.flagname.startswith(config_flag + "."):
            hint = f" (overrides need a --{config_flag} file, e.g. --{config_flag} configs/digits.py)"
        exit_with_error(f"unknown flag --{e.flagname}{hint}; see --help for the flags.")
    except flags.Error as e:
        exit_with_error(e)
    except Exception as e:  # pylint: disable=broad-except
        if config_flag is None:
            raise
        # Parsing runs only two things that can raise: ml_collections' `--config.*` overrides
        # (AttributeError/KeyError for a missing key) and the config file itself, whatever it
        # raises (OSError when missing, SyntaxError, its own exceptions).
        message = None
        if isinstance(e, (AttributeError, KeyError)):
            message = unknown_config_key(argv, e, config_flag)
        exit_with_error(message or config_file_error(
            _flag_argument(argv, config_flag), e, config_flag))


def load_config(flag_values: flags.FlagValues, name: str = "config") -> Any:
    """The parsed config of flag `name` (None if not given), or one `error:` line if its file
    cannot be loaded (ml_collections reads it lazily, on first use)."""
    try:
        config = flag_values[name].value
        if config is not None:
            config.keys()
        return config
    except Exception as e:  # pylint: disable=broad-except  (whatever the config file raises)
        exit_with_error(config_file_error(flag_values[name].config_filename, e, name))


def check_can_create(path: str, flag: str) -> None:
    """Raise ValueError unless `path` (a directory to fill or a file to write) can be written.

    The nearest existing directory at or above `path` must take new entries, which is tried with
    a temporary directory removed at once: permission bits do not bind root, and read-only or
    virtual filesystems only tell on an attempt. Remote paths (`gs://`) are not checked.
    """
    if "://" in path:
        return
    target = os.path.abspath(path)
    ancestor = target if os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag}={path} cannot be created: {ancestor} is a file, not a "
                         "directory; pass a path in a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".ddpm_jax_write_test"))
    except OSError as e:
        raise ValueError(f"{flag}={path} cannot be created: {ancestor} is not writable "
                         f"({e.strerror}); pass a path you can write to") from e


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
    if not verbose:  # TF prints its oneDNN start-up line whatever the log level, unless off
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
    if not verbose:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())


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


def use_cpu_devices_per_core() -> None:
    """Sets XLA_FLAGS to `cpu_device_flags` for this process's cores, if JAX has not started
    (it reads them when it creates its CPU client)."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = cpu_device_flags(os.environ.get("XLA_FLAGS", ""),
                                                   len(os.sched_getaffinity(0)))
