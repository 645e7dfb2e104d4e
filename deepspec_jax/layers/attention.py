"""Dense masked multi-head attention with grouped KV heads.

Rows whose keys are all masked produce a zero output (not NaN, not a uniform
average): the reference's flex-attention does the same for DSpark dummy anchors and
Eagle3 TTT tails, and parity needs it.

``segmented_attention`` takes keys/values in several segments (e.g. a read-only KV
cache plus the new tokens) and softmaxes over all of them jointly, so callers never
concatenate (copy) a large cache just to attend to it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def segmented_attention(q: jax.Array, segments: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
                        scale: float | None = None) -> jax.Array:
    """q [B,T,H,D]; each segment is (kt [B,K,D,S], v [B,K,S,D], mask bool broadcastable
    to [B,T,S]) with H % K == 0. Keys come transposed (D before S) because that is the
    KV-cache layout: both attention matmuls then read the cache without a transpose
    copy. Softmax in fp32 over all segments; output [B,T,H,D]."""
    b, t, h, d = q.shape
    kv = segments[0][0].shape[1]
    g = h // kv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    logits = []
    for k, _, mask in segments:
        s = jnp.einsum("bkgtd,bkds->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        m = jnp.broadcast_to(mask, (b, t, k.shape[3]))[:, None, None, :, :]
        logits.append(jnp.where(m, s, -jnp.inf))
    row_max = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in logits]), axis=0)[..., None]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = [jnp.exp(s - row_max) for s in logits]  # masked entries: exp(-inf) = 0
    denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs)
    inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
    out = sum(jnp.einsum("bkgts,bksd->bkgtd", (p * inv).astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
              for p, (_, v, _) in zip(probs, segments))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,K,D] with H % K == 0, mask bool broadcastable to [B,T,S]."""
    return segmented_attention(q, [(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)], scale)
