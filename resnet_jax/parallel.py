"""Data parallelism: the device mesh, compiling a per-replica step over it, placing state and
batches on the devices and fetching results, and joining a multi-process run.

`parallelize` wraps a per-replica step (`resnet_jax.steps`) in `jax.jit(jax.shard_map(...))`
over a 1-D mesh (state replicated, batch sharded on dim 0) or in `jax.pmap`.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import cpu

log = logging.getLogger("resnet_jax")

BATCH_AXIS = "batch"
PARALLEL_KINDS = ("shard_map", "pmap")
CPU_COLLECTIVES = "gloo"  # cross-process collectives on CPU
# Output layouts for `parallelize`: the train step returns (state, metrics), both replicated;
# the eval step returns (replicated sums, per-example outputs sharded along the batch).
TRAIN_OUT_SPECS = (P(), P())
EVAL_OUT_SPECS = (P(), P(BATCH_AXIS))

StepFn = Callable[..., tuple[Any, Any]]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D data-parallel mesh with axis "batch" over `devices` (default: all, every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def check_divisible(what: str, batch_size: int, num_devices: int) -> None:
    """Raise naming `what` (the argument), the batch and the device count unless `batch_size`
    splits evenly over `num_devices` (every device gets the same positive share)."""
    if batch_size <= 0 or batch_size % num_devices:
        raise ValueError(
            f"{what} {batch_size} is not divisible by the number of devices {num_devices}; "
            f"use a positive multiple of {num_devices}"
        )


def _check_kind(kind: str) -> None:
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"Unknown parallel kind {kind!r}; choices: {', '.join(PARALLEL_KINDS)}")


def parallelize(
    step_fn: StepFn,
    mesh: Mesh,
    *,
    kind: str = "shard_map",
    donate: bool = True,
    out_specs: Any = TRAIN_OUT_SPECS,
) -> StepFn:
    """Compile a per-replica `(state, batch)` step for data parallelism over `mesh`.

    "shard_map": `jit(shard_map)` with the state replicated and the batch sharded on dim 0
    (`out_specs`: TRAIN_OUT_SPECS or EVAL_OUT_SPECS). "pmap": `jax.pmap` with the state stacked
    per local device and batches shaped [devices, per_device, ...]; every output gets the
    leading device axis (`out_specs` unused). Use `place_state` / `prepare_batch` for inputs
    and `fetch_state` / `fetch_batch` for outputs; `donate=False` for the eval step.
    """
    _check_kind(kind)
    donate_argnums = (0,) if donate else ()
    if kind == "pmap":
        return jax.pmap(
            step_fn,
            axis_name=BATCH_AXIS,
            devices=list(mesh.devices.flat),
            donate_argnums=donate_argnums,
        )
    # Replication checking stays on (check_vma=True): every replicated output is a pmean/psum
    # or computed from replicated inputs, so shard_map proves `P()` outputs correct.
    mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(BATCH_AXIS)), out_specs=out_specs)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def place_state(state: Any, mesh: Mesh, kind: str = "shard_map") -> Any:
    """Copy a state tree (via the host) to where the parallelized step expects it.

    Going through the host guarantees fresh device buffers: a plain `device_put` to a
    replicated sharding reuses the buffer already on device 0, and the donating step would then
    delete the caller's original `state`.
    """
    _check_kind(kind)
    host = jax.device_get(state)
    if kind == "shard_map":
        return jax.device_put(host, NamedSharding(mesh, P()))
    n = mesh.local_mesh.size
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), host)
    return jax.device_put(stacked, NamedSharding(mesh.local_mesh, P(BATCH_AXIS)))


def fetch_state(state: Any, kind: str = "shard_map") -> Any:
    """One host (numpy) copy of a replicated output tree: state, metrics or eval sums."""
    _check_kind(kind)

    def one(x: jax.Array) -> np.ndarray:
        local = np.asarray(x.addressable_data(0))
        return local[0] if kind == "pmap" else local

    return jax.tree.map(one, state)


def _leading_size(batch: dict) -> int:
    """The shared leading (batch) dimension of every array in `batch`."""
    sizes = {
        jax.tree_util.keystr(p): np.shape(x)[0] if np.ndim(x) else None
        for p, x in jax.tree_util.tree_leaves_with_path(batch)
    }
    if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"batch arrays must share a leading batch dimension, got {sizes}")
    return next(iter(sizes.values()))


def prepare_batch(batch: dict, mesh: Mesh, kind: str = "shard_map") -> dict:
    """Shard this process's slice of the global batch over its devices for the step.

    shard_map: a global array sharded on dim 0 (works multi-host: each process passes its
    own rows). pmap: arrays reshaped to [local_devices, per_device, ...].
    """
    _check_kind(kind)
    n = len(mesh.local_devices)
    check_divisible("process-local batch size", _leading_size(batch), n)
    if kind == "shard_map":
        sharding = NamedSharding(mesh, P(BATCH_AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    sharding = NamedSharding(mesh.local_mesh, P(BATCH_AXIS))
    stacked = jax.tree.map(lambda x: np.reshape(x, (n, -1, *np.shape(x)[1:])), batch)
    return jax.device_put(stacked, sharding)


def prefetch_to_device(
    batches: Iterable[dict], mesh: Mesh, kind: str = "shard_map", size: int = 2
) -> Iterator[dict]:
    """Yield `batches` placed on the devices (`prepare_batch`), keeping `size` of them there.

    The copies are asynchronous: when the caller dispatches a step on the batch it got and asks
    for the next one, the batch after that is read on the host and its copy starts, so the
    devices need not idle while the host reads and copies. Past the end, nothing is read.
    """
    _check_kind(kind)
    if size < 1:
        raise ValueError(f"prefetch_to_device: size must be >= 1, got {size}")
    iterator = iter(batches)
    queue = collections.deque(
        prepare_batch(batch, mesh, kind) for batch in itertools.islice(iterator, size)
    )
    while queue:
        yield queue.popleft()
        batch = next(iterator, None)
        if batch is not None:
            queue.append(prepare_batch(batch, mesh, kind))


def fetch_batch(outputs: Any, kind: str = "shard_map") -> Any:
    """This process's rows of a batch-sharded output (e.g. eval predictions) as numpy."""
    _check_kind(kind)

    def rows(x: jax.Array) -> np.ndarray:
        if kind == "pmap":
            return np.asarray(x).reshape(-1, *x.shape[2:])
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    return jax.tree.map(rows, outputs)


# --------------------------------------------------------------------------------------------
# Multi-process runs (jax.distributed); see docs/multihost.md for launch recipes


def platform_is_cpu() -> bool:
    """Whether JAX will compute on CPU, decided without starting a backend (which must wait
    until after `jax.distributed.initialize`): `jax_platforms` (JAX_PLATFORMS) names cpu first,
    or no accelerator plugin is installed (`resnet_jax.cpu.expected`)."""
    return cpu.expected(jax.config.jax_platforms or "")


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
