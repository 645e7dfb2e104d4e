"""Pallas kernels on a device mesh: the call inside ``jax.shard_map``.

Why: XLA cannot partition a Pallas (Mosaic/Triton) custom call. Given inputs sharded
over a mesh it gathers them and runs the whole kernel on every device (every device
would hold every layer's full KV cache, or every sequence's keys), and Mosaic refuses
outright ("Mosaic kernels cannot be automatically partitioned"). Attention is
independent per batch row and per KV head, so each device runs the kernel on its own
rows and heads. Both kernels (``attention.span_attention``, ``tree_attention``) use
this module.

Where the mesh comes from: the mesh in context (``jax.set_mesh(mesh)`` around a jitted
call, or ``jax.sharding.use_abstract_mesh`` inside a traced function;
``jax.sharding.get_abstract_mesh()`` while tracing), or an explicit ``mesh`` argument.
The train step, ``speculative_generate`` and ``python -m deepspec_jax.plan`` set it; the
platform of its devices is also how a CPU host compiling for compile-only TPU devices
picks the TPU kernels (``context_platform``).

Layout rule (``deepspec_jax.sharding.LOGICAL_RULES``): batch over the ``batch`` axes
(``data``, ``fsdp``) when their product divides B, else replicated over them (as
``sharding.batch_sharding`` lays activations out); heads over ``tensor`` (t):

* K % t == 0 ("split"): each device gets H/t query heads and the K/t KV heads they read;
* K < t, t % K == 0, H % t == 0 ("one_kv_per_shard"): each device gets H/t query heads,
  which all read one KV head; the KV arrays enter replicated over ``tensor`` and each
  device slices its head (gradients included: shard_map's transpose sums the slices'
  cotangents over ``tensor``; tests/test_kernels_sharded.py checks it);
* anything else: no kernel (ValueError naming the fix; "auto" callers run the jnp
  reference, which XLA partitions itself).

Mesh axes other than these are replicated over.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

from deepspec_jax.sharding import LOGICAL_RULES

_WHERE = "deepspec_jax.kernels"


BATCH_AXES: tuple[str, ...] = tuple(LOGICAL_RULES["batch"])
HEAD_AXIS: str = LOGICAL_RULES["kv_heads"]   # the query heads' ("heads") axis too


def context_mesh():
    """The mesh in context (``jax.set_mesh``) if it has more than one device and is not
    the per-device view of a ``shard_map`` body, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    # Inside a shard_map body the axes are Manual: the caller already split the work.
    return None if AxisType.Manual in tuple(mesh.axis_types) else mesh


def context_platform() -> str:
    """The platform the program being traced is for: the devices of the mesh in context
    (compile-only TPU devices when a CPU host plans for TPU), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def head_layout(h: int, kh: int, t: int) -> str:
    """How H query / K KV heads go over a tensor axis of size t: "none" (t == 1),
    "split" (K % t == 0) or "one_kv_per_shard" (t % K == 0 and H % t == 0). ValueError
    otherwise."""
    if t == 1:
        return "none"
    if kh % t == 0:
        return "split"
    if t % kh == 0 and h % t == 0:
        return "one_kv_per_shard"
    raise ValueError(
        f"{_WHERE}: {kh} KV heads ({h} query heads) cannot be laid over the mesh's "
        f"'{HEAD_AXIS}' axis of size {t}: the kernel needs num_key_value_heads % {t} == 0, "
        f"or {t} % num_key_value_heads == 0 with num_attention_heads % {t} == 0. Use a tensor "
        f"axis size that divides {kh} (e.g. --mesh_tensor / mesh.tensor = "
        f"{math.gcd(kh, t)}), or impl='reference'.")


def layout_unsupported_reason(mesh, h: int, kh: int) -> str | None:
    """None if ``head_layout`` accepts H/K heads on ``mesh``'s tensor axis, else why not."""
    try:
        head_layout(h, kh, dict(mesh.shape).get(HEAD_AXIS, 1))
    except ValueError as e:
        return str(e).removeprefix(f"{_WHERE}: ")
    return None


# Argument roles for ``sharded_call``: (role, head axis). Every array's axis 0 is batch.
Q = "q"        # query-head arrays: heads split over tensor whenever it is used
KV = "kv"      # KV-head arrays: split ("split"), or replicated + sliced per device
ROWS = "rows"  # batch-only arrays (lengths, spans, masks)


def shard_specs(mesh, b: int, h: int, kh: int):
    """(batch mesh axes or None, head mesh axis or None, layout) of B rows, H query and
    K KV heads on ``mesh``."""
    shape = dict(mesh.shape)
    batch = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
    if not batch or b % math.prod(shape[a] for a in batch):
        batch = None
    elif len(batch) == 1:
        batch = batch[0]
    layout = head_layout(h, kh, shape.get(HEAD_AXIS, 1))
    return batch, (None if layout == "none" else HEAD_AXIS), layout


def _spec(ndim: int, role: str, head_axis: int | None, batch, head, layout) -> P:
    dims = [None] * ndim
    dims[0] = batch
    if role == Q or (role == KV and layout == "split"):
        dims[head_axis] = head
    return P(*dims)


def sharded_call(call: Callable, mesh, args: tuple, roles: tuple, out_roles, *, h: int,
                 kh: int):
    """``call(*args)`` run per device of ``mesh`` by ``jax.shard_map``: ``roles[i]`` =
    (Q | KV | ROWS, head axis of ``args[i]`` or None; None args pass through),
    ``out_roles`` = (role, head axis, ndim) of the output, or a tuple of those for a
    tuple output. Same result as ``call`` on the whole
    arrays, for the layouts of the module docstring."""
    b = args[0].shape[0]
    batch, head, layout = shard_specs(mesh, b, h, kh)
    in_specs = tuple(None if x is None else _spec(x.ndim, r, ax, batch, head, layout)
                     for x, (r, ax) in zip(args, roles))
    single = isinstance(out_roles[0], str)
    outs = (out_roles,) if single else tuple(out_roles)
    out_specs = tuple(_spec(nd, r, ax, batch, head, layout) for r, ax, nd in outs)

    def local(*xs):
        if layout == "one_kv_per_shard":
            # Shard j holds query heads [j*H/t, (j+1)*H/t): all read KV head j // (t/K).
            i = lax.axis_index(head) // (dict(mesh.shape)[head] // kh)
            xs = tuple(lax.dynamic_slice_in_dim(x, i, 1, axis=ax) if r == KV and x is not None
                       else x for x, (r, ax) in zip(xs, roles))
        return call(*xs)

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs[0] if single else out_specs,
                         check_vma=False)(*args)


__all__ = ["context_mesh", "context_platform", "head_layout", "layout_unsupported_reason",
           "shard_specs", "sharded_call", "BATCH_AXES", "HEAD_AXIS", "Q",
           "KV", "ROWS"]
