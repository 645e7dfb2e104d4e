"""Tree attention in ``jnp`` that reads the cache only up to the filled length.

The reference (``reference.py``) materialises logits over all S cache slots: right as an
oracle, but on a backend without the Pallas kernel (CPU) a verify pass then costs what
the cache could hold rather than what it holds, at every layer. This path is the chain
verify's (``kernels.attention.segments.filled_cache_attention``): the committed prefix
is read block by block up to the longest row's ``prefix_len`` (a traced trip count, one
program for every length) and merged with the tree's own segment (ancestor mask).
As in the reference, cache slots at or past ``prefix_len`` never reach the result, even
non-finite ones (their values are zeroed in the blocks that hold them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepspec_jax.kernels.attention.segments import filled_cache_attention
from deepspec_jax.kernels.tree_attention.reference import (check_inputs, tree_kv_from_cache,
                                                          tree_visibility)


def tree_attention_filled(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                          prefix_len: jax.Array, tree_bits: jax.Array, *,
                          k_tree: jax.Array | None = None, v_tree: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
    """Same arguments and result as ``tree_attention_reference``; softmax in fp32, the
    matmuls in q's dtype."""
    check_inputs(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree)
    b, n = q.shape[:2]
    if k_tree is None:
        k_tree, v_tree = tree_kv_from_cache(k_cache, v_cache, prefix_len, n)
    start = prefix_len.astype(jnp.int32)

    def cache_mask(slots):                                            # [B, N, n_slots]
        return jnp.broadcast_to(slots[None, None, :] < start[:, None, None],
                                (b, n, slots.shape[0]))

    new = (k_tree.astype(q.dtype), v_tree.astype(q.dtype), tree_visibility(tree_bits))
    return filled_cache_attention(q, k_cache, v_cache, cache_mask, jnp.max(start), new,
                                  scale=scale, zero_hidden=True).astype(q.dtype)
