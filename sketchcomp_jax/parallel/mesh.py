"""Device mesh from config, and multi-host initialisation.

Axes: `data` (pure data parallel), `fsdp` (data parallel + parameter/optimizer sharding), `tensor`
(reserved for model-parallel rules; size 1 by default). One axis may be -1 and is filled with the
remaining devices. With `dcn_mesh` (multi-slice TPU) the mesh is a hybrid ICI × DCN mesh.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in `AXES` order with one -1 filled in; raises if they do not multiply to `num_devices`."""
    unknown = [k for k in sizes if k not in AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; allowed {AXES}")
    values = [int(sizes.get(axis, 1)) for axis in AXES]
    if values.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, values))}")
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if num_devices % known:
            raise ValueError(f"cannot fill the -1 mesh axis: {num_devices} devices are not divisible by {known}")
        values[values.index(-1)] = num_devices // known
    if math.prod(values) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(AXES, values))} needs {math.prod(values)} devices but {num_devices} are available"
        )
    return tuple(values)


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A `Mesh` with axes `AXES`. `dcn` (multi-slice) sizes multiply the `ici` sizes per axis."""
    devices = jax.devices() if devices is None else devices
    if dcn:
        from jax.experimental import mesh_utils

        num_slices = math.prod(int(v) for v in dcn.values())
        ici_shape = resolve_axis_sizes(ici, len(devices) // num_slices)
        dcn_shape = resolve_axis_sizes(dcn, num_slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    else:
        shape = resolve_axis_sizes(ici, len(devices))
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # CPU / unusual topologies: plain row-major order
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` × `fsdp`; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> None:
    """`jax.distributed.initialize` for multi-host runs.

    On TPU pods and SLURM/Kubernetes-managed GPU clusters JAX detects everything (call with no
    arguments). Elsewhere pass `coordinator` (host:port of process 0), `num_processes`, `process_id`.
    Single-process runs with no flags and no cluster environment skip initialisation.
    """
    if jax.distributed.is_initialized():  # launch/train.py initialises before reporting the backend
        return
    explicit = coordinator is not None
    cluster = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS",
                                               "JAX_COORDINATOR_ADDRESS"))
    if not explicit and not cluster:
        return
    # Cross-process collectives for the CPU backend (simulated pods, CPU tests); no effect on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", os.environ.get("SKETCHCOMP_CPU_COLLECTIVES", "gloo"))
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


# --------------------------------------------------------------------------------------------------
# Multi-process helpers. Every process must call each of these at the same point of the program
# (they run collectives); with one process they cost nothing.
# --------------------------------------------------------------------------------------------------


_barriers: dict[str, int] = {}


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process has reached the barrier `name` (e.g. after process 0 made the data set,
    or after compiling: processes that reach their first collective minutes apart fail on CPU, where gloo
    gives up connecting after 30 s). Uses the coordination service (no device program), so the wait may
    be long: `timeout_s`."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _barriers[name] = _barriers.get(name, 0) + 1  # barrier ids must be unique per use
    client = distributed.global_state.client
    if client is None:  # initialised by a cluster runtime we do not see: a device collective instead
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"{name}#{_barriers[name]}", timeout_in_ms=timeout_s * 1000)


def all_processes(ok: bool) -> bool:
    """True iff `ok` is true on every process (a blocking all-gather of one integer per process)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(int(bool(ok)), np.int32))))


def replicate(mesh: Mesh, tree):
    """Host numpy arrays that are identical on every process → fully replicated global `jax.Array`s on `mesh`
    (each process fills only its own devices, so this works on any number of hosts)."""
    sharding = NamedSharding(mesh, P())

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(one, tree)


def place(tree, shardings):
    """Host-identical values (e.g. a seeded random init, computed by every process) → global arrays with
    `shardings`. Each process copies only its own devices' slices; unlike `jax.device_put` of a local array
    onto a multi-process sharding, this runs no cross-process program per leaf."""
    host = jax.device_get(tree)
    return jax.tree_util.tree_map(
        lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda index: np.asarray(x)[index]), host, shardings)


class AnyProcess:
    """`any_process.start(flag)` dispatches, without waiting, an OR of a per-process boolean over all
    processes; the returned replicated scalar is read later (`bool(result)`), so a flag checked every step
    costs one tiny collective and no host↔device synchronisation beyond the previous step's."""

    def __init__(self, mesh: Mesh):
        self._devices = list(mesh.devices.flat)
        self._sharding = NamedSharding(Mesh(np.asarray(self._devices), ("all",)), P("all"))
        self._replicated = NamedSharding(self._sharding.mesh, P())
        # compiled now, not at its first use, so that a barrier after start-up covers it
        self._max = jax.jit(lambda x: x.max(), out_shardings=self._replicated).lower(
            jax.ShapeDtypeStruct((len(self._devices),), np.int32, sharding=self._sharding)).compile()

    def start(self, flag: bool) -> jax.Array:
        value = np.asarray([int(bool(flag))], np.int32)
        shards = [jax.device_put(value, d) for d in self._devices if d.process_index == jax.process_index()]
        x = jax.make_array_from_single_device_arrays((len(self._devices),), self._sharding, shards)
        return self._max(x)
