"""Multi-process set-up on JAX's own distributed runtime (`jax.distributed`).

One process per host (or per GPU under SLURM auto-detection) joins a coordinator; afterwards
`jax.devices()` lists every process's devices and the training mesh spans them all. See
docs/multihost.md for launch recipes.
"""

from __future__ import annotations

import logging

import jax

from resnet_jax import backend

log = logging.getLogger("resnet_jax")

CPU_COLLECTIVES = "gloo"


def platform_is_cpu() -> bool:
    """Whether JAX will compute on CPU, decided without starting a backend (which must wait
    until after `jax.distributed.initialize`): `jax_platforms` (JAX_PLATFORMS) names cpu first,
    or no accelerator plugin is installed (`backend.cpu_expected`)."""
    return backend.cpu_expected(jax.config.jax_platforms or "")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Join a multi-process run: explicit coordinator/num/id, or `auto` (TPU pods, SLURM).

    Must run before anything touches a JAX device. Explicit values are used as given (JAX's
    cluster detection is switched off, so under SLURM a process keeps all its local GPUs);
    `auto` calls `jax.distributed.initialize()` with no arguments and lets JAX read the TPU
    metadata or SLURM/Open MPI environment (SLURM: one process per GPU). Cross-process
    collectives on CPU use gloo unless another implementation was configured; GPU/TPU
    settings are left to JAX. Does nothing for a single-process run (no arguments, no `auto`).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "--coordinator-address, --num-processes and --process-id go together; "
                f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if auto:
            raise ValueError(
                "--distributed-auto detects the coordinator, process count and id itself; "
                "pass it or --coordinator-address/--num-processes/--process-id, not both"
            )
        if num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
        kwargs = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
            "cluster_detection_method": "deactivate",
        }
    elif auto:
        kwargs = {}
    else:
        return
    if platform_is_cpu() and jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        if not auto:
            raise
        raise ValueError(
            "--distributed-auto found no cluster to join (TPU pod slice, SLURM job step, Open "
            "MPI or Kubernetes job); launch under one, or pass --coordinator-address, "
            f"--num-processes and --process-id ({err})"
        ) from err
    log.info(
        "process %d of %d: %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.default_backend(),
    )  # fmt: skip
