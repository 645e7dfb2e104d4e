"""Attention for training and prefill, in one place, with explicit mask kinds.

The mask of every long attention in this project is a *span* per query: key j is
visible to query t iff ``start[b, t] <= j < stop[b, t]``.

* causal over a right-padded batch: ``causal_span(lengths, T)`` (stop = t + 1, or 0
  past the row's length);
* a DSpark/DFlash block over the target context: stop = the block's anchor (dummy
  blocks: 0);
* Eagle3 training-time test: causal over the step-0 keys (its diagonal keys are a
  short ``dense_attention`` merged in);
* a sliding window: start = t - window + 1.

Short key sets with arbitrary masks (a DSpark block's own keys, Eagle3's diagonal
keys, the tokens of one decode step) go through ``dense_attention``; pieces are
combined into one softmax by ``merge_attention`` from their log-sum-exps. Tree
verification has its own kernel (``deepspec_jax.kernels.tree_attention``).

Public API (all return ``(out [B,T,H,D] float32, lse [B,T,H] float32)``):

* ``span_attention(q, k, v, start, stop, *, scale=None, impl="auto", block_q=512,
  block_kv=512, interpret=False)``: q [B,T,H,D], k/v [B,S,K,D], start/stop int32 [B,T].
* ``dense_attention(q, k, v, mask, scale=None)``; ``merge_attention(parts)``.
* ``span_attention_reference``: the pure-jnp oracle (query-blocked, rematerialised:
  memory O(block_q x S)); ``span_mask``, ``causal_span``.
* ``segment_attention(q, [(kt, v, mask), ...])``: dense attention over segments in the
  KV-cache layout (kt [B,K,D,S], v [B,K,S,D]) with one softmax: decode and verify
  steps read the cache in place, without a transpose or concatenation copy.
* ``filled_cache_attention(q, ck, cv, cache_mask, filled, (kt, v, mask))``: the same over
  a cache and the new tokens, reading the cache block by block only up to its filled
  length (online softmax in a ``fori_loop``): ``CausalLM.extend``'s decode/verify path.

``impl``: "reference" is the jnp path (CPU, and GPU through XLA); "pallas" the Pallas
TPU kernel (``interpret=True`` runs it on CPU); "auto" = the kernel on TPU, the
reference elsewhere ("on TPU": ``kernels.sharded.context_platform()``, which also sees
compile-only TPU devices through the mesh in context). On TPU, a mesh whose tensor
axis cannot take the heads runs the reference with a ``KernelFallbackWarning``.

The kernel (``flash_tpu.py``): flash-style forward, dQ and dK/dV kernels under one
``custom_vjp`` (residuals q, k, v, out, lse); key tiles outside a query block's span
range cost neither compute nor DMA, tiles every row sees skip the mask. It needs
q/k/v of one dtype (float32 or bfloat16) and block_q/block_kv multiples of 128; any
head dim (D % 128 == 0 uses the caller's layout, others a head-major transpose).
On a mesh in context (more than one device) the kernel runs inside ``jax.shard_map``,
batch over data/fsdp and heads over tensor (``deepspec_jax/kernels/sharded.py``: a
Pallas call is not partitioned automatically); the train step and the decode loops
trace under their mesh. ``span_flops(start, stop, ...)`` gives the dense
and the computed attention FLOPs of a mask, for the plan command's "fraction skipped".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepspec_jax.kernels import sharded
from deepspec_jax.kernels.fallback import warn_fallback
from deepspec_jax.kernels.attention.flash_tpu import span_attention_pallas, span_flops
from deepspec_jax.kernels.attention.reference import (dense_attention, merge_attention,
                                                      span_attention_reference, span_mask)
from deepspec_jax.kernels.attention.segments import filled_cache_attention, segment_attention

__all__ = ["span_attention", "span_attention_reference", "dense_attention", "merge_attention",
           "span_mask", "causal_span", "segment_attention", "filled_cache_attention", "span_flops"]

_IMPLS = ("auto", "pallas", "reference")


def causal_span(lengths: jax.Array, t: int, offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """(start, stop) [B,T] of causal attention over a right-padded batch: query t sees
    keys 0..t+offset; rows past ``lengths[b]`` see nothing."""
    pos = jnp.arange(t, dtype=jnp.int32)[None] + offset
    stop = jnp.where(pos < lengths[:, None].astype(jnp.int32), pos + 1, 0)
    return jnp.zeros_like(stop), stop


def span_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, stop: jax.Array,
                   *, scale: float | None = None, impl: str = "auto", block_q: int = 512,
                   block_kv: int = 512, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B,T,H,D] over k/v [B,S,K,D] where query t sees keys
    ``start[b,t] <= j < stop[b,t]``; see the module docstring."""
    if impl not in _IMPLS:
        raise ValueError(f"deepspec_jax.kernels.attention: impl={impl!r}; use one of {_IMPLS}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"deepspec_jax.kernels.attention: q {q.shape} / k {k.shape} / v {v.shape}"
                         " must be [B,T,H,D] / [B,S,K,D] / [B,S,K,D] with H a multiple of K")
    if start.shape != (b, t) or stop.shape != (b, t):
        raise ValueError(f"deepspec_jax.kernels.attention: start {start.shape} / stop "
                         f"{stop.shape} must both be [B,T] = {(b, t)}")
    start, stop = start.astype(jnp.int32), stop.astype(jnp.int32)
    use_kernel = impl == "pallas" or (impl == "auto" and sharded.context_platform() == "tpu")
    if not use_kernel:
        return span_attention_reference(q, k, v, start, stop, scale, block_q)
    call = functools.partial(span_attention_pallas, scale=scale, block_q=block_q,
                             block_kv=block_kv, interpret=interpret)
    mesh = sharded.context_mesh()
    if mesh is None:
        return call(q, k, v, start, stop)
    # On a mesh: the kernel per device, inside shard_map (kernels/sharded.py).
    reason = sharded.layout_unsupported_reason(mesh, h, k.shape[2])
    if reason is not None:
        if impl == "pallas":
            raise ValueError(f"deepspec_jax.kernels.attention: impl='pallas' unsupported: {reason}")
        warn_fallback("attention", reason)
        return span_attention_reference(q, k, v, start, stop, scale, block_q)
    Q, KV, ROWS = sharded.Q, sharded.KV, sharded.ROWS
    return sharded.sharded_call(call, mesh, (q, k, v, start, stop),
                                ((Q, 2), (KV, 2), (KV, 2), (ROWS, None), (ROWS, None)),
                                ((Q, 2, 4), (Q, 2, 3)), h=h, kh=k.shape[2])
