"""Device mesh and shardings: data / fsdp / tensor axes, FSDP-style parameter sharding.

The same code runs on one CPU (a 1x1x1 mesh), on simulated CPU devices, on GPUs and on several
hosts (call `initialize_distributed` first; the mesh then spans every process's devices).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "make_mesh", "param_sharding", "shard_params", "batch_sharding",
           "batch_divisor", "initialize_distributed", "on_mesh"]

AXES = ("data", "fsdp", "tensor")


def initialize_distributed() -> None:
    """Starts multi-host JAX when the environment describes several processes.

    Set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or run
    where ``jax.distributed.initialize()`` detects the cluster, e.g. TPU pods or SLURM).
    """
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or os.environ.get("MOLF_DISTRIBUTED"):
        jax.distributed.initialize()


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``'data=1,fsdp=-1,tensor=1'`` -> sizes; one axis may be -1 (the remaining devices)."""
    sizes = {axis: 1 for axis in AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"mesh spec {spec!r}: expected items like 'fsdp=4' over axes "
                             f"{AXES}, got {part!r}")
        sizes[name] = int(value)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: sizes must be positive, at most one -1")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) > num_devices:
        raise ValueError(f"mesh spec {spec!r} gives {sizes} = "
                         f"{int(np.prod(list(sizes.values())))} devices; {num_devices} present")
    return sizes


def make_mesh(spec: str = "data=1,fsdp=-1,tensor=1", devices=None) -> Mesh:
    """A mesh with axes data, fsdp, tensor over ``devices`` (default: all; a spec without -1
    that asks for fewer uses the first ones, e.g. ``fsdp=1`` for one device)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    used = int(np.prod(list(sizes.values())))
    grid = np.array(devices[:used]).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """FSDP: the largest axis divisible by the fsdp size is split over fsdp; for matrices the
    last remaining axis divisible by the tensor size is split over tensor."""
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    axes: list[Any] = [None] * len(shape)
    if fsdp > 1:
        candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
        if candidates:
            axes[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
    if tensor > 1 and len(shape) >= 2:
        for i in reversed(range(len(shape))):
            if axes[i] is None and shape[i] % tensor == 0:
                axes[i] = "tensor"
                break
    return P(*axes)


def param_sharding(mesh: Mesh):
    """``(path, shape) -> NamedSharding``, the loader's and the trainer's placement rule."""
    return lambda path, shape: NamedSharding(mesh, param_spec(tuple(shape), mesh))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places every leaf on its FSDP sharding."""
    rule = param_sharding(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, rule("", x.shape)), params)


def batch_divisor(mesh: Mesh) -> int:
    """Batch rows must divide over data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Sharding of ``[micro, batch, ...]`` arrays: rows over (data, fsdp)."""
    return NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Puts leaves that are not laid out on ``mesh`` (e.g. an optimizer's step counters, which
    ``init`` leaves on one device) on it, replicated; leaves already on it stay as they are."""
    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(place, tree)
