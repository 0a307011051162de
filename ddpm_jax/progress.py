"""The x̂_0 progress of a reverse chain: the prediction every `xstart_every` model calls, kept
in slots by the ancestral and DDIM chains (`chains.py`) and the ODE solvers (`solvers.py`)."""

from __future__ import annotations

import math

import jax


def num_slots(num_steps: int, xstart_every: int) -> int:
    if xstart_every <= 0:
        raise ValueError("xstart_every must be a positive integer")
    return math.ceil(num_steps / xstart_every)


def record(progress: jax.Array, pred_xstart: jax.Array, slot: jax.Array) -> jax.Array:
    """Writes this step's x̂_0 prediction into progress slot `slot` (the last write wins)."""
    return jax.lax.dynamic_update_index_in_dim(progress, pred_xstart.astype(progress.dtype), slot,
                                               axis=0)
