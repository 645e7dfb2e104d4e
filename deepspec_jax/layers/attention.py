"""Dense masked multi-head attention with grouped KV heads.

Rows whose keys are all masked produce a zero output (not NaN, not a uniform
average): the reference's flex-attention does the same for DSpark dummy anchors and
Eagle3 TTT tails, and parity needs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,K,D] with H % K == 0, mask bool broadcastable to [B,T,S].

    Softmax runs in fp32; the result has q's dtype, shape [B,T,H,D].
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None, :, :]
    logits = jnp.where(m, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - row_max)  # masked entries are exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
