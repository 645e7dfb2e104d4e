"""Compact a KV cache after tree verification: keep only the accepted path.

The verify pass wrote node i of the flattened tree (0 = the root/current token) at
cache slot ``start + i`` with RoPE position ``start + depth(i)``. The accepted path
(root, then one node per depth) is gathered to the contiguous slots ``start + 0..a``.
Because the node at depth j was already rotated for position ``start + j`` and
attended to exactly the prefix plus its ancestors, the compacted cache is the cache a
plain causal forward over the accepted tokens would have written, so every later
logit is unchanged. Slots past the new length are left as scratch.

Draft caches need no compaction here: DSpark's holds only committed context (the tree
is drafted from it without writing), and Eagle3's tree scratch keys live outside its
cache; both are extended with the target features gathered along the path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepspec_jax.models.transformer import KVCache


def path_slots(path: jax.Array) -> jax.Array:
    """Flat verify indices [B, D+1] of the root and the accepted nodes (``path`` [B,D]
    node indices, -1 past the accepted length; those entries map to the root)."""
    b = path.shape[0]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.maximum(path + 1, 0)], axis=1)


def _move(buf: jax.Array, slot_axis: int, src: jax.Array, dst: jax.Array) -> jax.Array:
    """Per row b copy ``buf[b, ..., src[b, j], ...]`` to slot ``dst[b, j]`` (dst out of
    range = skipped). ``buf``'s axis 0 is the batch; gathers before writing, so
    overlapping source/destination ranges are safe. The buffer keeps its layout (only
    the P moved slots are transposed): a moveaxis of the whole cache would copy it, at
    every layer, every round."""
    idx = src.reshape(src.shape[:1] + (1,) * (slot_axis - 1) + src.shape[1:]
                      + (1,) * (buf.ndim - slot_axis - 1))
    vals = jnp.take_along_axis(buf, idx, axis=slot_axis)           # slot axis now P long
    vals = jnp.moveaxis(vals, slot_axis, 1)                        # [B,P,...], small
    rows = jnp.arange(buf.shape[0])[:, None]
    index = (rows,) + (slice(None),) * (slot_axis - 1) + (dst,)
    # advanced indices at axes 0 and slot_axis: the updated block is [B,P,...rest]
    return buf.at[index].set(vals, mode="drop")


def compact_kv_cache(cache: KVCache, start: jax.Array, slots: jax.Array,
                     num_keep: jax.Array) -> KVCache:
    """Move tree slots ``start + slots[b, j]`` to ``start + j`` for ``j < num_keep[b]``
    and set ``lengths = start + num_keep`` in every layer's buffers (k [B,K,D,S],
    v [B,K,S,D])."""
    start = start.astype(jnp.int32)
    s_max = cache.max_len
    j = jnp.arange(slots.shape[1], dtype=jnp.int32)[None]
    src = jnp.minimum(start[:, None] + slots, s_max - 1)
    dst = jnp.where(j < num_keep[:, None], start[:, None] + j, s_max)   # s_max -> dropped

    ck = tuple(_move(c, 3, src, dst) for c in cache.k)
    cv = tuple(_move(c, 2, src, dst) for c in cache.v)
    return KVCache(ck, cv, jnp.minimum(start + num_keep.astype(jnp.int32), s_max))


def gather_path(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x [B,N+1,...] (per verify position) -> [B,D+1,...] along the accepted path."""
    idx = slots.reshape(slots.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


__all__ = ["compact_kv_cache", "path_slots", "gather_path"]
