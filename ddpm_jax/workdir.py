"""The workdir before anything is written to it: can it be written, and is it ours alone.

`check_writable(path)` fails with one line when `--workdir` (or the output directory below it)
is a file or cannot be written, before any compute. `WorkdirLock` makes a training the only
one in its workdir: a second training on the same workdir stops with a one-line error naming
the holder, while sampling and evaluation of a workdir being trained stay allowed.

Local workdirs use an OS lock (`fcntl.flock`) on `workdir/.lock`, which the kernel drops when
its process dies, however it dies; the file holds the holder's pid, host, start time and
command, so the error can name it and a successor can say whom it took over from. A workdir
on a remote filesystem (`gs://...`) has no such lock: there the lock file carries a heartbeat
that the holder refreshes every HEARTBEAT_SECONDS, and one older than STALE_SECONDS counts as
left behind by a dead process. That is best effort: two runs starting within the same second
can both win.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

from ddpm_jax.errors import WorkdirInUseError

LOCK_NAME = ".lock"
EVAL_LOCK_NAME = ".eval.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


def is_remote(path: str) -> bool:
    return "://" in path


def check_writable(workdir: str, below: str = "") -> None:
    """`workdir`, and `below` inside it where the mode writes, is a directory we can write or
    can create. Remote paths are left to the first write (their permissions are not visible
    from here)."""
    if is_remote(workdir):
        return
    root = os.path.abspath(os.path.expanduser(workdir))
    existing = os.path.join(root, below) if below else root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    inside = existing != root and existing.startswith(root + os.sep)
    if not os.path.isdir(existing):
        if inside:
            raise ValueError(f"--workdir={workdir} has a file {existing} where a directory goes; "
                             "move it away or use another --workdir.")
        where = "is a file" if existing == root else f"is below {existing}, which is a file"
        raise ValueError(f"--workdir={workdir} {where}, not a directory; point --workdir at a "
                         "directory (it is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = ("read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY
                  else "permission denied")
        detail = ("" if existing == root else f" ({existing})" if inside
                  else f" ({existing} is where it would be created)")
        raise ValueError(f"--workdir={workdir} cannot be written{detail}: {reason}; point "
                         "--workdir at a directory you can write.")


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
            if isinstance(started, (int, float)) else "an unknown time")
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}: "
            f"{holder.get('command', '?')}")


def _me() -> dict[str, Any]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("ddpm_jax", "main.py")):  # python -m ddpm_jax.main
        argv[0:1] = ["python", "-m", "ddpm_jax.main"]
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": shlex.join(argv)}


def _parse(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class WorkdirLock:
    """`with WorkdirLock(workdir):` — the workdir is ours until the block ends.

    Creates the workdir if needed, and on release removes the lock file and the workdir again
    if it created it and nothing else was written (a run that failed its checks leaves no
    trace). `what` names the activity in the error ("training", "evaluation")."""

    def __init__(self, workdir: str, name: str = LOCK_NAME, what: str = "training"):
        self.workdir = workdir
        self.path = os.path.join(workdir, name)
        self.what = what
        self._fd: int | None = None
        self._created: list[str] = []
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._me = _me()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _busy(self, holder: dict[str, Any] | None) -> WorkdirInUseError:
        who = _describe(holder) if holder else "another process"
        return WorkdirInUseError(
            f"--workdir={self.workdir} is in use by another {self.what} ({who}); wait for it to "
            f"finish or stop it, or use another --workdir.")

    def _make_workdir(self) -> None:
        missing, path = [], os.path.abspath(self.workdir)
        while not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.workdir, exist_ok=True)
        self._created = missing  # deepest first

    def acquire(self) -> None:
        if is_remote(self.workdir):
            self._acquire_remote()
            return
        import fcntl

        self._make_workdir()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
                os.close(fd)
                self._remove_created()
                raise self._busy(holder) from None
            # A holder that was releasing may have unlinked the file we locked: lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if previous:
            logging.warning("took over the lock of %s, which is no longer running",
                            _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._me).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        from etils import epath

        path = epath.Path(self.path)
        if path.exists():
            previous = _parse(path.read_text())
            beat = previous.get("heartbeat") if previous else None
            if isinstance(beat, (int, float)) and time.time() - beat < STALE_SECONDS:
                raise self._busy(previous)
            if previous:
                logging.warning("took over the lock of %s, whose last heartbeat is %s old",
                                _describe(previous),
                                f"{time.time() - beat:.0f} s" if beat else "unknown")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_remote()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._heartbeat.start()

    def _write_remote(self) -> None:
        from etils import epath

        epath.Path(self.path).write_text(json.dumps({**self._me, "heartbeat": time.time()}))

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
            try:
                self._write_remote()
            except Exception:  # a missed heartbeat only makes the lock look older
                logging.warning("could not refresh %s", self.path, exc_info=True)

    def _remove_created(self) -> None:
        for path in self._created:
            try:
                os.rmdir(path)
            except OSError:  # something was written there: keep it
                break
        self._created = []

    def release(self) -> None:
        """Idempotent; also safe from another thread while the process is being aborted."""
        if self._heartbeat is not None:
            from etils import epath

            self._stop_heartbeat.set()
            self._heartbeat = None
            try:
                epath.Path(self.path).unlink()
            except Exception:
                logging.warning("could not remove %s", self.path)
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so no one else loses it
        except FileNotFoundError:
            pass
        os.close(fd)
        self._remove_created()


@contextlib.contextmanager
def exclusive(workdir: str, name: str = LOCK_NAME, what: str = "training") -> Iterator[None]:
    """The workdir's `name` lock for the duration of the block, taken by process 0 only; every
    process fails with the same one-line error when process 0 cannot take it."""
    import jax

    from ddpm_jax import interrupt

    lock = WorkdirLock(workdir, name, what) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(locked) and error is None:
            error = WorkdirInUseError(f"--workdir={workdir} is in use by another {what} (see "
                                      "process 0's error); wait for it to finish or stop it, "
                                      "or use another --workdir.")
    if error is not None:
        raise error
    forget = interrupt.on_abort(lock.release) if lock is not None else (lambda: None)
    try:
        yield
    finally:
        forget()
        if lock is not None:
            lock.release()
