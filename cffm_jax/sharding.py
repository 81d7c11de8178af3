"""Data parallelism over all devices of all processes: mesh, shardings, global batches, multi-host start-up.

One 1-D mesh ``('data',)`` over every device (``jax.devices()``, all processes). The training batch is sharded
along its first axis (``P('data')``), the train state is replicated (``P()``). Under ``jax.jit`` the model
then sees the *global* batch, so BatchNorm statistics are reduced over all devices automatically (the SyncBN
of the official runs) and gradients are averaged over the global batch without any explicit collective.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize``; each process loads its own
slice of the data stream (``shard_index=jax.process_index()``) with ``global_batch / process_count`` clips and
:func:`global_batch` assembles the global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cffm_jax.experiment_config import ConfigError

log = logging.getLogger(__name__)

DATA_AXIS = "data"

# Environment variables holding a process count, for which jax.distributed detects the rest itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_job() -> bool:
    """True when the environment describes a multi-process job (SLURM, Open MPI, a multi-host Cloud TPU)."""
    for name in _CLUSTER_SIZE_ENV:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Starts multi-process JAX when asked to (or when a cluster environment says so).

    Args:
      coordinator_address: ``host:port`` of process 0; '' = from the environment.
      num_processes: number of processes; 0 = from the environment.
      process_id: this process's index; -1 = from the environment.
    Returns:
      True if ``jax.distributed.initialize`` was called.

    With all three given, they are used as they are. With none given, ``jax.distributed.initialize()`` is
    called only when the environment describes a multi-process job (SLURM with several tasks, Open MPI, Cloud
    TPU pods), where JAX detects everything itself; otherwise this is a single-process run.
    """
    explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if explicit:
        if not (coordinator_address and num_processes > 0 and process_id >= 0):
            raise ConfigError(
                "a multi-process run needs all of the coordinator address, the number of processes and the "
                "process id "
                f"(got {coordinator_address!r}, {num_processes}, {process_id})"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _cluster_job():
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: all devices of all processes), Auto axis type."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of the train state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: split along the first (batch) axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, grad_accum_steps: int, mesh: Mesh) -> int:
    """Checks that the global batch splits into micro-batches over devices and processes.

    Returns the number of clips each process loads per step. Raises ``ConfigError`` with the numbers otherwise.
    """
    devices = mesh.devices.size
    if grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if global_batch % grad_accum_steps:
        raise ConfigError(f"batch_size={global_batch} is not divisible by grad_accum_steps={grad_accum_steps}")
    micro = global_batch // grad_accum_steps
    if micro % devices:
        raise ConfigError(
            f"each micro-batch of batch_size / grad_accum_steps = {global_batch}/{grad_accum_steps} = {micro}"
            " "
            f"clips must split evenly over the {devices} devices: choose a batch_size that is a multiple of "
            f"grad_accum_steps * devices = {grad_accum_steps * devices}"
        )
    processes = jax.process_count()
    if global_batch % processes:
        raise ConfigError(f"batch_size={global_batch} is not divisible by the {processes} processes")
    return global_batch // processes


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch (numpy, leading axis = local batch) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Replicated (possibly multi-process) arrays -> numpy, from this process's first local copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)
