"""`eval.samplers`: the list of (method, steps[, order, spacing | eta]) a `--mode=eval` sweeps,
parsed and checked here so that `validate` can refuse a bad list before anything runs."""

from __future__ import annotations

import math
from typing import NamedTuple


class SamplerEntry(NamedTuple):
    """One entry of `eval.samplers`: `ancestral:T`, `ddim:steps[:eta]` or
    `dpm_solver|unipc:steps[:order[:spacing]]`."""

    method: str
    num_steps: int  # model calls; the ancestral chain's is diffusion.num_timesteps
    order: int | None = None  # solvers only
    spacing: str | None = None  # solvers only
    eta: float | None = None  # ddim only

    @property
    def name(self) -> str:
        """Folder and table name, e.g. ancestral_1000, ddim_50, ddim_eta1_50,
        dpm_solver_o2_20_logsnr."""
        if self.method == "ancestral":
            return f"ancestral_{self.num_steps}"
        if self.method == "ddim":
            eta = f"eta{self.eta:g}_" if self.eta else ""
            return f"ddim_{eta}{self.num_steps}"
        return f"{self.method}_o{self.order}_{self.num_steps}_{self.spacing}"

    @property
    def family(self) -> str:
        """Plot line: ancestral, ddim, ddim eta=1, dpm_solver (order 2), ..."""
        if self.method == "ddim":
            return "ddim" if not self.eta else f"ddim eta={self.eta:g}"  # the plot font is ASCII
        return self.method if self.order is None else f"{self.method} (order {self.order})"


SAMPLERS_EXAMPLE = "--config.eval.samplers=ancestral:1000,ddim:50,dpm_solver:20,unipc:10:3"
_ENTRY_SHAPES = {"ancestral": "ancestral:steps", "ddim": "ddim:steps[:eta]",
                 "dpm_solver": "dpm_solver:steps[:order[:spacing]]",
                 "unipc": "unipc:steps[:order[:spacing]]"}


def parse_samplers(config) -> list[SamplerEntry]:
    """`eval.samplers` as entries ([] when empty), with one-line ValueErrors for what cannot be
    run: an unknown method or spacing, a step count the method cannot take on this schedule
    (`generate.check_method`), more fields than the method takes, or a repeated entry. Order,
    spacing and η default to `sample.solver_order`, `sample.timestep_spacing`, `sample.ddim_eta`."""
    from ddpm_jax import chains, generate, solvers

    text = str(config.eval.get("samplers", "")).strip()
    if not text:
        return []
    num_timesteps = config.diffusion.num_timesteps
    entries: list[SamplerEntry] = []
    for item in (part.strip() for part in text.split(",")):
        fields = item.split(":")
        method = fields[0]
        where = f"eval.samplers entry {item!r}"
        if method not in chains.METHODS:
            raise ValueError(f"{where}: method {method!r} is unknown; use one of "
                             f"{', '.join(chains.METHODS)}, e.g. {SAMPLERS_EXAMPLE}.")
        solver = method in ("dpm_solver", "unipc")
        if not 2 <= len(fields) <= _ENTRY_SHAPES[method].count(":") + 1:
            raise ValueError(f"{where} must read {_ENTRY_SHAPES[method]}, e.g. "
                             f"{SAMPLERS_EXAMPLE}.")
        try:
            steps = int(fields[1])
            order = int(fields[2] if solver and len(fields) > 2 else config.sample.solver_order)
            eta = float(fields[2]) if method == "ddim" and len(fields) > 2 else float(
                config.sample.ddim_eta)
        except ValueError:
            raise ValueError(f"{where}: steps and order must be integers and eta a number, e.g. "
                             f"{SAMPLERS_EXAMPLE}.") from None
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"{where}: eta {eta:g} must be a number ≥ 0.")
        spacing = fields[3] if len(fields) > 3 else str(config.sample.timestep_spacing)
        if method == "ancestral" and steps != num_timesteps:
            raise ValueError(f"{where}: the ancestral sampler takes all {num_timesteps} steps "
                             f"(diffusion.num_timesteps); write ancestral:{num_timesteps}.")
        if solver and not 1 <= order <= solvers.MAX_ORDER:
            raise ValueError(f"{where}: order {order} must be in [1, {solvers.MAX_ORDER}].")
        if solver and spacing not in solvers.SPACINGS:
            raise ValueError(f"{where}: spacing {spacing!r} is unknown; use one of "
                             f"{', '.join(solvers.SPACINGS)}.")
        entry = SamplerEntry(method, steps, order if solver else None,
                             spacing if solver else None, eta if method == "ddim" else None)
        if entry in entries:
            raise ValueError(f"{where} is listed twice in eval.samplers; drop one.")
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"{where}: steps must be in [1, diffusion.num_timesteps="
                             f"{num_timesteps}].")
        try:
            generate.check_method(entry_config(config, entry))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        entries.append(entry)
    return entries


def entry_config(config, entry: SamplerEntry):
    """`config` with `sample.*` set to the entry's method, steps, order and spacing."""
    import ml_collections

    changed = ml_collections.ConfigDict(config.to_dict())
    changed.sample.method = entry.method
    changed.sample.num_steps = 0 if entry.method == "ancestral" else entry.num_steps
    if entry.order is not None:
        changed.sample.solver_order, changed.sample.timestep_spacing = entry.order, entry.spacing
    if entry.eta is not None:
        changed.sample.ddim_eta = entry.eta
    return changed
