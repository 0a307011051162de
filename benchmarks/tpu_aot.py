"""Compiles the real TPU programs ahead of time on this CPU machine; no TPU needed.

libtpu (`pip install "jax[tpu]==<installed jax version>"`) can describe a TPU slice and compile
for it. For each topology this script lowers and compiles

* the full CIFAR10 train step (`train_step.make_train_step`, global batch 128, `steps_per_call`
  as configured, sharded over every device of the slice), and
* the ancestral sampler (`generate.make_sample_fn`, batch 256, the full 1000-step scan),

and prints per device the argument / temporary memory XLA assigned and its cost model's time for
one step (`cost_analysis()["optimal_seconds"]`). XLA's cost analysis counts a while-loop body
once, so for the scanned programs that is the time of one optimizer step / one denoising step;
the paper's TPU v3-8 figures are 47.6 ms per train step and 17 s / 1000 = 17 ms per denoising
step of a 256 batch. The cost model's figure is an idealised lower bound, not a measurement.

    python benchmarks/tpu_aot.py                      # v3-8, v4-8, v5e-8, v6e-8; train and sample
    python benchmarks/tpu_aot.py --topologies v3-8 --programs train --set model.dtype=bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice as libtpu names it, and the HBM of one JAX device of it."""

    name: str
    options: dict[str, Any]
    hbm_bytes_per_device: int
    description: str


TOPOLOGIES = {
    # 4 chips x 2 TensorCores; each core is a JAX device with its own 16 GiB of HBM.
    "v3-8": Topology("v3:2x2", {}, 16 * GIB, "4 chips, 8 TensorCores (devices), 16 GiB HBM per core"),
    # 4 chips; the 2 TensorCores of a chip act as one megacore device with 32 GiB of HBM.
    "v4-8": Topology("v4:2x2x1", {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1)},
                     32 * GIB, "4 chips, megacore: 4 devices, 32 GiB HBM each"),
    # 8 chips of 1 TensorCore, 16 GiB of HBM each, on one host.
    "v5e-8": Topology("v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)}, 16 * GIB,
                      "8 chips, 8 devices, 16 GiB HBM each"),
    # Trillium: 8 chips of 1 TensorCore, 32 GiB of HBM each, on one host.
    "v6e-8": Topology("v6e:2x4", {"chips_per_host_bounds": (2, 4, 1)}, 32 * GIB,
                      "8 chips, 8 devices, 32 GiB HBM each"),
}

TRAIN_GLOBAL_BATCH = 128
SAMPLE_BATCH = 256


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a named slice (`TOPOLOGIES` key)."""
    from jax.experimental import topologies

    spec = TOPOLOGIES[topology]
    return list(topologies.get_topology_desc(topology_name=spec.name, platform="tpu",
                                             **spec.options).devices)


def tpu_mesh(topology: str):
    import numpy as np
    from jax.sharding import Mesh

    from ddpm_jax.parallel import DATA_AXIS

    return Mesh(np.array(tpu_devices(topology)), (DATA_AXIS,))


@contextlib.contextmanager
def traced_as_on_tpu():
    """Traces the model with the formulations a real TPU backend picks.

    `ddpm_jax.conv` (kernel gradients) and `ddpm_jax.unet.GroupNorm` (statistics) pick
    CPU-specific formulations when the default backend is the CPU, which it is in this process
    although we compile for a TPU.
    """
    from ddpm_jax import conv, unet

    previous = conv.KERNEL_GRAD, unet.GROUP_NORM_STATS
    conv.KERNEL_GRAD, unet.GROUP_NORM_STATS = "native", "native"
    try:
        yield
    finally:
        conv.KERNEL_GRAD, unet.GROUP_NORM_STATS = previous


def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compile(lowered, effort: float):
    """Compiles with XLA's execution-time optimisation effort in [-1, 1] (0 = default).

    Returns (compiled, wall seconds, process CPU seconds): the TPU compiler runs mostly on one
    thread, so CPU seconds are what a compile costs on an idle machine.
    """
    options = {"exec_time_optimization_effort": effort} if effort else None
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile(compiler_options=options)
    return compiled, time.perf_counter() - wall, time.process_time() - cpu


def compile_train_step(config, mesh, global_batch: int = TRAIN_GLOBAL_BATCH, effort: float = 0.0):
    """AOT-compiles the train step for `mesh`; returns (compiled, timings in seconds)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ddpm_jax import parallel, train_step

    config.training.batch_size = global_batch
    parallel.check_batch_divisible(global_batch, mesh)
    k = config.training.steps_per_call
    size, channels = config.data.image_size, config.data.channels
    replicated = parallel.replicated(mesh)
    batch_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    with traced_as_on_tpu():
        graphdef, abstract_state = train_step.abstract_train_state(config)
        args = (
            _abstract(abstract_state, replicated),
            jax.ShapeDtypeStruct((k, global_batch, size, size, channels), jnp.uint8,
                                 sharding=batch_sharding),
            jax.ShapeDtypeStruct((k, global_batch), jnp.int32, sharding=batch_sharding),
            _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated),
        )
        start = time.perf_counter()
        lowered = train_step.make_train_step(graphdef, config, mesh).lower(*args)
        lower_s = time.perf_counter() - start
    compiled, compile_s, compile_cpu_s = _compile(lowered, effort)
    return compiled, {"lower_s": lower_s, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s}


def compile_sampler(config, mesh, batch: int = SAMPLE_BATCH, method: str = "ancestral",
                    effort: float = 0.0):
    """AOT-compiles the sampler (one scan over the whole chain) for `mesh`."""
    import jax

    from ddpm_jax import generate, model_fns, parallel

    replicated = parallel.replicated(mesh)
    with traced_as_on_tpu():
        graphdef, abstract_params = model_fns.abstract_params(config)
        sample_fn = generate.make_sample_fn(graphdef, config, mesh, batch, method=method)
        start = time.perf_counter()
        lowered = sample_fn.lower(_abstract(abstract_params, replicated),
                                  _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated))
        lower_s = time.perf_counter() - start
    compiled, compile_s, compile_cpu_s = _compile(lowered, effort)
    return compiled, {"lower_s": lower_s, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s}


def summarize(compiled, topology: str) -> dict[str, Any]:
    """Per-device memory, its share of the device's HBM, and the cost model's figures."""
    spec = TOPOLOGIES[topology]
    memory = common.xla_memory(compiled)
    costs = common.xla_costs(compiled)
    return {
        "topology": topology,
        "device_kind": tpu_devices(topology)[0].device_kind,
        "hbm_gib_per_device": spec.hbm_bytes_per_device / GIB,
        "argument_gib": memory["argument_size_in_bytes"] / GIB,
        "temp_gib": memory["temp_size_in_bytes"] / GIB,
        "output_gib": memory["output_size_in_bytes"] / GIB,
        "alias_gib": memory["alias_size_in_bytes"] / GIB,
        "peak_estimate_gib": memory["peak_estimate_bytes"] / GIB,
        "fits": memory["peak_estimate_bytes"] <= spec.hbm_bytes_per_device,
        "xla_flops_per_step_per_device": costs["flops"],
        "xla_bytes_per_step_per_device": costs["bytes_accessed"],
        # libtpu's cost model only knows some chips; for others (v4 here) it returns a negative
        # placeholder, which is no estimate.
        "estimated_s_per_step": (costs["optimal_seconds"]
                                 if costs["optimal_seconds"] and costs["optimal_seconds"] > 0
                                 else None),
        "memory": memory,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--topologies", default="v3-8,v4-8,v5e-8,v6e-8")
    parser.add_argument("--programs", default="train,sample")
    parser.add_argument("--effort", type=float, default=0.0,
                        help="XLA exec_time_optimization_effort in [-1, 1]; -1 compiles ~2x faster")
    args = parser.parse_args(argv)
    common.setup_environment()
    if not libtpu_available():
        raise SystemExit('error: libtpu is not installed; pip install "jax[tpu]==$(python -c '
                         '"import jax; print(jax.__version__)")" (it must not change jax/jaxlib)')
    import jax

    for topology in args.topologies.split(","):
        mesh = tpu_mesh(topology)
        for program in args.programs.split(","):
            config = common.load_config(args.config, args.set)
            if program == "train":
                compiled, timings = compile_train_step(config, mesh, effort=args.effort)
                extra = {"global_batch": TRAIN_GLOBAL_BATCH,
                         "per_device_batch": TRAIN_GLOBAL_BATCH // mesh.devices.size,
                         "steps_per_call": config.training.steps_per_call,
                         "paper_s_per_step_v3_8": common.PAPER_TRAIN_SECONDS_PER_STEP}
            elif program == "sample":
                compiled, timings = compile_sampler(config, mesh, effort=args.effort)
                extra = {"batch": SAMPLE_BATCH, "per_device_batch": SAMPLE_BATCH // mesh.devices.size,
                         "chain_length": config.diffusion.num_timesteps,
                         "paper_s_per_step_v3_8": common.PAPER_SAMPLE_SECONDS_256
                         / config.diffusion.num_timesteps}
            else:
                raise ValueError(f"unknown program {program!r}; use train or sample")
            summary = summarize(compiled, topology)
            if program == "sample" and summary["estimated_s_per_step"]:
                summary["estimated_s_per_256_images"] = (summary["estimated_s_per_step"]
                                                         * config.diffusion.num_timesteps)
            common.emit({"bench": "tpu_aot", "program": program, "config": args.config,
                         "dtype": config.model.dtype, **extra, **summary,
                         "effort": args.effort, **timings, "jax": jax.__version__})


if __name__ == "__main__":
    main()
