"""Ctrl-C (SIGINT) and SIGTERM on the command line: a message at once, whatever is running.

Python runs signal handlers only between bytecodes of the main thread, so during a long XLA
compile or device call a Ctrl-C would wait, silently, until the call returns. `install()`,
called by `main` before JAX or TensorFlow start any thread, blocks both signals in the main
thread (every later thread inherits that mask) and receives them in a thread of its own with
`signal.sigwait`:

* during the training loop (a `StopSignal` is installed) the first signal is passed to the
  loop, which saves a checkpoint after the current call and exits 0, and says so at once;
* otherwise (start-up, sampling, evaluation, after the loop), and on a second signal, the
  process prints one line and ends at once with `os._exit` — 130 for SIGINT, 143 for SIGTERM —
  which also skips the interpreter teardown that used to crash JAX (segmentation fault).

Without `install()` (the library used from Python, tests in process) `StopSignal` falls back
to ordinary Python handlers, as before.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_installed = False
_training: StopSignal | None = None
_on_abort: list[Callable[[], None]] = []


def exit_status(signum: int) -> int:
    return 128 + signum


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # stderr closed: nothing to tell
        pass


def _abort(signum: int, line: str) -> None:
    for callback in reversed(_on_abort):
        try:
            callback()
        except Exception:  # leaving now matters more than tidying up
            pass
    _say(line)
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os._exit(exit_status(signum))


def _watch() -> None:
    received = 0
    while True:
        signum = signal.sigwait(SIGNALS)
        name = signal.Signals(signum).name
        received += 1
        with _lock:
            stop = _training
        if stop is not None and received == 1:
            stop.received = name
            _say(f"{name}: stopping after the current call, then saving a checkpoint… "
                 "(Ctrl-C again to abort at once without saving)")
            continue
        if received > 1:
            _abort(signum, f"{name} again: aborted at once; the next run resumes from the last "
                           "saved checkpoint.")
        else:
            _abort(signum, f"interrupted by {name}: stopped at once (exit status "
                           f"{exit_status(signum)}).")


def install() -> None:
    """Receives SIGINT/SIGTERM in a thread of their own from now on. Call first thing, from the
    main thread, before any other thread exists; later calls do nothing."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_watch, name="signals", daemon=True).start()
    _installed = True


def on_abort(callback: Callable[[], None]) -> Callable[[], None]:
    """Runs `callback` (e.g. releasing a lock) if a signal ends the process; returns a function
    that unregisters it."""
    _on_abort.append(callback)

    def remove() -> None:
        if callback in _on_abort:
            _on_abort.remove(callback)

    return remove


class StopSignal:
    """Remembers a SIGTERM/SIGINT so the training loop can checkpoint before exiting."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> StopSignal:
        global _training
        if _installed:
            with _lock:
                _training = self
            logging.info("Ctrl-C (or SIGTERM) stops after the current call and saves a "
                         "checkpoint; a second Ctrl-C aborts at once")
            return self
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def uninstall(self) -> None:
        global _training
        with _lock:
            if _training is self:
                _training = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def any_process(self) -> bool:
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        flag = self.received is not None
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag
