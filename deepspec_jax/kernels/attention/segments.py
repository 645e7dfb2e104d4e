"""Dense attention over KV-cache-layout segments (decode, verify, tree reference).

A decode step attends to a read-only KV cache plus its own new tokens. Both come in
the cache layout, keys transposed ``[B,K,D,S]`` and values ``[B,K,S,D]``, so the two
attention matmuls read the cache without a transpose copy (what XLA:CPU decode speed
depends on), and the segments share one softmax so the cache is never concatenated
(copied) with the new keys. Returns ``(out [B,T,H,D] float32, lse [B,T,H])`` like the
rest of ``deepspec_jax.kernels.attention``; a row that sees nothing gets (0, -inf).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from deepspec_jax.kernels.attention.reference import merge_attention


def segment_attention(q: jax.Array, segments: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
                      scale: float | None = None,
                      precision: jax.lax.Precision | None = None) -> tuple[jax.Array, jax.Array]:
    """q [B,T,H,D]; each segment is (kt [B,K,D,S], v [B,K,S,D], mask bool broadcastable
    to [B,T,S]) with H % K == 0 (query head h reads KV head h // (H // K)). One fp32
    softmax over all segments, normalised before the value matmul (in v's dtype)."""
    b, t, h, d = q.shape
    kv = segments[0][0].shape[1]
    if h % kv or any(k.shape[:3] != (b, kv, d) or v.shape != (b, kv, k.shape[3], d)
                     for k, v, _ in segments):
        raise ValueError("deepspec_jax.kernels.attention.segment_attention: every segment must "
                         f"be kt [B,K,D,S] / v [B,K,S,D] with B={b}, D={d} and the same K "
                         f"dividing H={h}; got {[(k.shape, v.shape) for k, v, _ in segments]}")
    g = h // kv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    logits = []
    for k, _, mask in segments:
        s = jnp.einsum("bkgtd,bkds->bkgts", qg, k, preferred_element_type=jnp.float32,
                       precision=precision) * scale
        m = jnp.broadcast_to(mask, (b, t, k.shape[3]))[:, None, None, :, :]
        logits.append(jnp.where(m, s, -jnp.inf))
    row_max = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in logits]), axis=0)[..., None]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = [jnp.exp(s - row_max) for s in logits]  # masked entries: exp(-inf) = 0
    denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs)
    has = denom > 0
    inv = 1.0 / jnp.where(has, denom, 1.0)
    out = sum(jnp.einsum("bkgts,bksd->bkgtd", (p * inv).astype(v.dtype), v,
                         preferred_element_type=jnp.float32, precision=precision)
              for p, (_, v, _) in zip(probs, segments))
    lse = jnp.where(has, row_max + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)[..., 0]
    return (out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d),
            lse.transpose(0, 3, 1, 2).reshape(b, t, h))


def cache_block(capacity: int, block: int = 128) -> int:
    """The block ``filled_cache_attention`` reads a cache of ``capacity`` slots in: the
    largest size <= ``block`` dividing the capacity (one that did not divide it would
    read past the end: dynamic slices clamp, re-reading slots). A capacity with no
    divisor of at least ``block // 4`` (a prime, say) is read whole, in one block."""
    if capacity <= 0:
        raise ValueError(f"cache capacity must be positive, got {capacity}")
    size = next(n for n in range(min(block, capacity), 0, -1) if capacity % n == 0)
    return size if size >= min(block // 4, capacity) else capacity


def filled_cache_attention(q: jax.Array, ck: jax.Array, cv: jax.Array, cache_mask,
                           filled: jax.Array, new: tuple[jax.Array, jax.Array, jax.Array],
                           scale: float | None = None, block: int = 128,
                           zero_hidden: bool = False) -> jax.Array:
    """``segment_attention(q, [(ck, cv, cache_mask(all slots)), new])[0]`` that reads the
    cache only up to ``filled`` (a traced int, the longest row's length) rounded up to a
    block: its cost follows the filled length, not the cache capacity.

    ``ck`` [B,K,D,S] / ``cv`` [B,K,S,D] is the cache, ``cache_mask(slots)`` gives the
    [B,T,n] visibility of cache slots ``slots`` [n] (int32), ``new`` = (kt, v, mask) the
    segment of the new tokens. Each cache block is one ``segment_attention`` in a
    ``fori_loop`` (traced trip count: one program for every length), folded into the
    running result with ``merge_attention``. ``zero_hidden`` (static) zeroes the values
    of slots no query sees, for callers whose hidden slots may hold non-finite data
    (0 * NaN would reach the sum). Returns out [B,T,H,D] float32."""
    s_cap = ck.shape[3]
    blk = cache_block(s_cap, block)

    def body(i, carry):
        start = i * blk
        slots = start + jnp.arange(blk, dtype=jnp.int32)
        k = jax.lax.dynamic_slice_in_dim(ck, start, blk, axis=3).astype(q.dtype)
        v = jax.lax.dynamic_slice_in_dim(cv, start, blk, axis=2).astype(q.dtype)
        mask = cache_mask(slots)
        if zero_hidden:
            v = jnp.where(jnp.any(mask, axis=1)[:, None, :, None], v, jnp.zeros((), v.dtype))
        return merge_attention([carry, segment_attention(q, [(k, v, mask)], scale=scale)])

    n_blocks = (jnp.minimum(filled.astype(jnp.int32), s_cap) + blk - 1) // blk
    out, _ = jax.lax.fori_loop(0, n_blocks, body, segment_attention(q, [new], scale=scale))
    return out
