"""`training.profile_steps=(start, end)`: a `jax.profiler` trace of those steps for TensorBoard.

The trace covers every call whose steps overlap [start, end] (calls run `steps_per_call` steps
at once) and lands in `workdir/profile/`, where TensorBoard's profile tab finds it. Only
process 0 traces.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def check_window(steps: tuple[int, ...]) -> None:
    """() or (start, end) with 1 ≤ start ≤ end, else a one-line ValueError."""
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise ValueError(f"training.profile_steps={tuple(steps)} must be (start, end) with "
                         "1 ≤ start ≤ end, or () for none; set --config.training.profile_steps.")


class ProfileWindow:
    def __init__(self, steps: tuple[int, ...], workdir: str):
        check_window(steps)
        self.window = tuple(steps) if jax.process_index() == 0 else ()
        self.directory = os.path.join(workdir, "profile")
        self.tracing = False
        self.done = False

    def before_call(self, step: int, steps_this_call: int) -> None:
        """Starts the trace if this call (steps step+1 .. step+steps_this_call) reaches `start`."""
        if self.window and not self.tracing and not self.done and \
                step + steps_this_call >= self.window[0] and step < self.window[1]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
            logging.info("profiling steps %d-%d into %s", step + 1,
                         max(self.window[1], step + steps_this_call), self.directory)

    def after_call(self, step: int) -> None:
        if self.tracing and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            self.done = True
            logging.info("wrote the profile trace to %s (TensorBoard: profile tab)", self.directory)
