"""XLA's persistent compilation cache, on by default, and a count of what it served.

A second start of the same config loads its compiled programs from `compilation_cache_dir`
(default `~/.cache/ddpm_jax/xla`; a `gs://` path works too) instead of compiling them again.
`JAX_COMPILATION_CACHE_DIR`, when set, wins over the config. Multi-process CPU runs leave it
off unless that variable asks for it: there a cache warm on one process only made the gloo
collectives time out (tests/test_multihost.py).
"""

from __future__ import annotations

import os

import jax
from absl import logging

_counts = {"hits": 0, "requests": 0}
_listening = False


def _count(event: str, **kwargs) -> None:
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
        _counts["hits"] += 1
    elif event == "/jax/compilation_cache/compile_requests_use_cache":
        _counts["requests"] += 1


def enable(directory: str) -> str | None:
    """Points JAX's persistent cache at `directory` ("" = off); returns the directory used."""
    global _listening
    from_environment = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    directory = from_environment or directory
    if not directory:
        return None
    if not from_environment and jax.process_count() > 1 and jax.default_backend() == "cpu":
        return None
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            logging.warning("compilation cache off: cannot create %s (%s)", directory,
                            e.strerror or e)
            return None
    jax.config.update("jax_compilation_cache_dir", directory)
    # Only programs that take a while to compile are worth a file (the train step, samplers).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return directory


def hits() -> int:
    """How many compilations so far were served from the persistent cache."""
    return _counts["hits"]
