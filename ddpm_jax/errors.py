"""The failures a user can fix that are not a bad value (those are ValueError, a missing file
FileNotFoundError): each is raised where it happens, and `modes.run_or_exit` reports every
`EXPECTED` one as a single `error:` line with exit status 2, without importing the module that
raises it."""

from __future__ import annotations


class ExpectedError(RuntimeError):
    """A failure whose message says what went wrong and how to go on."""


class NonFiniteError(ExpectedError):
    """Training produced NaN or infinite updates; raised by `train.train_and_evaluate`."""


class CheckpointWriteError(ExpectedError):
    """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


class WorkdirInUseError(ExpectedError):
    """Another process holds the workdir's lock."""


# What `python -m ddpm_jax.main` reports as one `error:` line rather than a traceback.
EXPECTED = (ValueError, FileNotFoundError, KeyError, ExpectedError)
