"""Device mesh and logical-axis sharding.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ...); one rule
table maps them onto mesh axes ``data``, ``fsdp``, ``tensor``. Activations shard
their batch over ``(data, fsdp)``. Meshes use ``AxisType.Auto`` so XLA's partitioner
inserts the collectives.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None = replicated). A mesh axis is used at most once per
# array: when two logical axes of one array map to the same mesh axis, the later one
# is replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "rank": None,
    "feature": "fsdp",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all); one of the sizes may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one of data/fsdp/tensor may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes product {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices; "
            "set the --mesh_* flags so their product equals the device count (or use -1 for one).")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array, dropping mesh axes that do not divide its dim."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape):
        target = LOGICAL_RULES.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_sharding(logical_axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Shard the leading (batch) axis over data x fsdp when it divides."""
    return named_sharding(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) a batch dimension is split over."""
    return tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shardings_of(state: nnx.State, mesh: Mesh) -> dict:
    """Pure-dict tree of NamedShardings from each variable's logical axes (``state`` may
    be abstract or hold tracers: only shapes and metadata are read)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        node[path[-1]] = named_sharding(axes, var.shape, mesh)
    return out
