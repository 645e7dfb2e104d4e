"""Tree attention on a device mesh: the Pallas call inside ``jax.shard_map``.

Why: XLA cannot partition a Pallas (Mosaic/Triton) custom call. Given inputs sharded
over a mesh it gathers them and runs the whole kernel on every device: every device
would hold every layer's full KV cache while it attends. The kernel is independent per
batch row and per KV head, so each device can run it on its own rows and heads.

Where the mesh comes from: the mesh in context (``jax.set_mesh(mesh)`` around the
jitted call; ``jax.sharding.get_abstract_mesh()`` while tracing), or an explicit
``mesh`` argument. ``spec_decode.speculative_generate`` and ``plan.decode`` set the
target's mesh; without a mesh (or on a single device) the kernel is called directly.

Layout rule (``deepspec_jax.sharding.LOGICAL_RULES``): batch over the ``batch`` axes
(``data``, ``fsdp``) when their product divides B, else replicated over them (as
``sharding.batch_sharding`` lays activations out); heads over ``tensor`` (t):

* K % t == 0: each device gets H/t query heads and the K/t KV heads they read;
* K < t, t % K == 0, H % t == 0 (fewer KV heads than tensor shards): each device gets
  H/t query heads, which all read one KV head; the KV arrays enter replicated over
  ``tensor`` and each device slices its head (the model's K/V projections cannot give
  each shard whole heads then either);
* anything else: no kernel (``tree_attention``'s impl="pallas" raises ValueError naming
  the fix, "auto" runs the jnp reference, which XLA partitions itself).

Mesh axes other than these are replicated over.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from deepspec_jax.sharding import LOGICAL_RULES

_WHERE = "deepspec_jax.kernels.tree_attention"


BATCH_AXES: tuple[str, ...] = tuple(LOGICAL_RULES["batch"])
HEAD_AXIS: str = LOGICAL_RULES["kv_heads"]   # the query heads' ("heads") axis too


def context_mesh():
    """The mesh in context (``jax.set_mesh``) if it has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


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


def shard_specs(mesh, b: int, h: int, kh: int) -> tuple[P, P, str]:
    """(spec of [B,...] batch-only arrays' batch dim, the head axis name or None, layout)."""
    shape = dict(mesh.shape)
    batch = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
    if not batch or b % math.prod(shape[a] for a in batch):
        batch = None
    elif len(batch) == 1:
        batch = batch[0]
    head = HEAD_AXIS
    layout = head_layout(h, kh, shape.get(head, 1))
    return batch, (None if layout == "none" else head), layout


def sharded_call(call: Callable, mesh, q, k_cache, v_cache, prefix_len, tree_bits, k_tree,
                 v_tree):
    """``call(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree)`` (one device's
    kernel, all arrays given) run per device of ``mesh`` by ``jax.shard_map`` with the
    layout of the module docstring. Same result as ``call`` on the whole arrays."""
    b, _, h, _ = q.shape
    kh = k_cache.shape[1]
    batch, head, layout = shard_specs(mesh, b, h, kh)
    kv_head = head if layout == "split" else None
    q_spec = P(batch, None, head, None)
    kv_spec = P(batch, kv_head, None, None)
    rows = P(batch)

    def local(q, kc, vc, plen, bits, kt, vt):
        if layout == "one_kv_per_shard":
            # Shard j holds query heads [j*H/t, (j+1)*H/t): all read KV head j // (t/K).
            i = lax.axis_index(head) // (mesh.shape[head] // kh)
            kc, vc, kt, vt = (lax.dynamic_slice_in_dim(x, i, 1, axis=1) for x in (kc, vc, kt, vt))
        return call(q, kc, vc, plen, bits, kt, vt)

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, rows, P(batch, None, None), kv_spec,
                                   kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, prefix_len,
                                                            tree_bits, k_tree, v_tree)


__all__ = ["context_mesh", "context_platform", "head_layout", "layout_unsupported_reason",
           "shard_specs", "sharded_call", "BATCH_AXES", "HEAD_AXIS"]
