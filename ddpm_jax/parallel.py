"""The 1-D `data` device mesh and helpers to move host batches onto it.

Every device of every host is one slot of the `data` axis; the train step and the samplers
run under `jax.shard_map` over that axis, so each device sees its own slice of the batch,
like the original's 8 TPU replicas of 16 images each.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched as one of several processes.

    On Cloud TPU pod slices JAX discovers the coordinator itself; elsewhere the standard
    environment variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`)
    are honoured. A single-host run does nothing.
    """
    if jax.distributed.is_initialized():
        return
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    on_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif on_pod:
        jax.distributed.initialize()


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over all devices of all processes (process-major order)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding that splits array axis `batch_axis` over the `data` mesh axis."""
    spec = [None] * batch_axis + [DATA_AXIS]
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "training.batch_size") -> int:
    """Returns the per-device batch, or raises a one-line error naming the fix."""
    num_devices = mesh.devices.size
    if global_batch % num_devices:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {num_devices} devices of the data mesh; "
            f"set --config.{what} to a multiple of {num_devices}.")
    return global_batch // num_devices


def host_batch_slice(global_batch: int, process_index: int | None = None,
                     process_count: int | None = None) -> slice:
    """Rows of each global batch that a process feeds (its devices' contiguous part of the
    `data` mesh); by default this process of this run."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def to_global_array(local_batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """Assembles each host's rows into one global array sharded over `data`."""
    sharding = data_sharding(mesh, batch_axis)
    return jax.make_array_from_process_local_data(sharding, local_batch)


def log_layout(mesh: Mesh) -> None:
    logging.info(
        "process %d of %d; %d local of %d devices (%s); mesh %s",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform, dict(mesh.shape))
