"""Pure-``jnp`` attention: the oracle for the Pallas kernels and the path on CPU/GPU.

Every function returns ``(out, lse)``: ``out`` [B,T,H,D] float32 and ``lse`` [B,T,H]
float32, the log-sum-exp of the scaled logits over the visible keys. A row that sees
no key gets ``out = 0`` and ``lse = -inf`` (the reference's flex-attention gives
DSpark dummy anchors and Eagle3 TTT tails a zero output; parity needs it), and
``merge_attention`` treats it as an empty softmax. Gradients are finite everywhere,
fully masked rows included (double ``where``: no ``0 * inf``).

GQA: q has H = K * G heads, k/v have K; query head h reads KV head h // G.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _finish(acc, m, l):
    """out = acc / l and lse = m + log l, with l == 0 (no visible key) -> (0, -inf)."""
    has = l > 0
    safe_l = jnp.where(has, l, 1.0)
    out = acc / safe_l[..., None]
    lse = jnp.where(has, m + jnp.log(safe_l), -jnp.inf)
    return jnp.where(has[..., None], out, 0.0), lse


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B,T,H,D] over k/v [B,S,K,D] under a boolean ``mask``
    broadcastable to [B,T,S] (True = visible). Builds the [B,H,T,S] logits: for short
    key ranges (a DSpark block, a decode step, Eagle3's diagonal keys) and as the
    oracle; long ranges go through ``span_attention``."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m4 = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
    s = jnp.where(m4, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m_safe[..., None])                              # masked: exp(-inf) = 0
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out, lse = _finish(acc, m_safe, l)                              # [B,K,G,T,D], [B,K,G,T]
    return (out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d),
            lse.transpose(0, 3, 1, 2).reshape(b, t, h))


def span_mask(start: jax.Array, stop: jax.Array, num_keys: int) -> jax.Array:
    """[B,T,S] bool: key j is visible to query t iff ``start[b,t] <= j < stop[b,t]``."""
    j = jnp.arange(num_keys, dtype=jnp.int32)
    return (j >= start[..., None]) & (j < stop[..., None])


def span_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                             stop: jax.Array, scale: float | None = None,
                             block_q: int = 512) -> tuple[jax.Array, jax.Array]:
    """``span_attention`` in jnp, in rematerialised query blocks of ``block_q`` rows:
    memory O(block_q x S) per head, forward and backward (the [T,S] logits are never
    whole). One block (T <= block_q) is exactly ``dense_attention``."""
    b, t, h, d = q.shape
    if t <= block_q:
        return dense_attention(q, k, v, span_mask(start, stop, k.shape[1]), scale)
    n = -(-t // block_q)
    pad = n * block_q - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # padded rows see nothing (start = stop = 0) and are dropped below
    st = jnp.pad(start, ((0, 0), (0, pad)))
    sp = jnp.pad(stop, ((0, 0), (0, pad)))
    blocks = lambda x: jnp.moveaxis(x.reshape((b, n, block_q) + x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(xs):
        qb, sb, eb = xs
        return dense_attention(qb, k, v, span_mask(sb, eb, k.shape[1]), scale)

    out, lse = jax.lax.map(one, (blocks(qp), blocks(st), blocks(sp)))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, n * block_q) + x.shape[3:])[:, :t]  # noqa: E731
    return unblock(out), unblock(lse)


def merge_attention(parts: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """One softmax over the union of several key sets, from each set's ``(out, lse)``:
    ``out = sum_i exp(lse_i - lse) out_i``. Lets a long span (the kernel) and short
    dense pieces (a DSpark block's own keys, Eagle3's diagonal keys, a decode step's
    new tokens) share one normaliser without concatenating keys."""
    lses = jnp.stack([lse for _, lse in parts])
    m = jnp.max(lses, axis=0)
    m_safe = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    ws = [jnp.exp(lse - m_safe) for _, lse in parts]                # -inf -> 0
    total = sum(ws)
    out = sum(w[..., None] * o for w, (o, _) in zip(ws, parts))
    return _finish(out, m_safe, total)
