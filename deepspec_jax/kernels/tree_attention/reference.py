"""Pure-``jnp`` tree attention: the semantics every kernel must match.

A verify pass feeds the N nodes of a flattened draft tree (topological order: parent
index < child index). Node i attends to every committed cache slot ``< prefix_len[b]``
and to the keys/values of itself and its ancestors. The tree's own keys/values either
already sit in the cache at slots ``prefix_len[b] + i`` (default) or come as separate
[B,K,D,N]/[B,K,N,D] arrays (``k_tree``/``v_tree``: then no cache slot >= prefix_len is
read, so a caller need not write, or copy, the cache before attending). The ancestor
relation travels as a bitmask (``tree_bits`` [B,N,W] uint32, W = ceil(N/32)) rather
than a dense [B,N,S] mask so kernels read N*W words instead of N*S booleans.

Both the reference and the kernel see the problem as two segments: the committed
prefix (cache, mask slot < prefix_len) and the tree (N slots, mask = ancestor bits).
The reference materialises [B,H,N,S] logits (``kernels.attention.segment_attention``
over the two segments, in fp32): it is the test oracle, not the fast path (on CPU,
``filled.py`` reads the cache only up to the longest prefix).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from deepspec_jax.kernels.attention.segments import segment_attention


def num_words(n: int) -> int:
    """Words of the ancestor bitmask for an N-node tree."""
    return max(1, -(-n // 32))


def check_inputs(q, k_cache, v_cache, prefix_len, tree_bits, k_tree=None,
                 v_tree=None) -> tuple[int, ...]:
    """Validate the layouts shared by the reference and the kernel; returns
    (B, N, H, D, K, S). Raises ValueError naming the argument and the fix."""
    where = "deepspec_jax.kernels.tree_attention"
    if q.ndim != 4:
        raise ValueError(f"{where}: q must be [B, N, H, D], got shape {q.shape}")
    b, n, h, d = q.shape
    if k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(f"{where}: k_cache must be [B, K, D, S] and v_cache [B, K, S, D], "
                         f"got {k_cache.shape} and {v_cache.shape}")
    kb, kh, kd, s = k_cache.shape
    if (kb, kd) != (b, d):
        raise ValueError(f"{where}: k_cache {k_cache.shape} must be [B={b}, K, D={d}, S] "
                         "(keys stored transposed, head dim before slots) to match q "
                         f"{q.shape}")
    if v_cache.shape != (b, kh, s, d):
        raise ValueError(f"{where}: v_cache {v_cache.shape} must be [B, K, S, D] = "
                         f"{(b, kh, s, d)} to match k_cache {k_cache.shape}")
    if kh == 0 or h % kh:
        raise ValueError(f"{where}: query heads H={h} must be a multiple of KV heads K={kh} "
                         "(GQA: query head h reads KV head h // (H // K))")
    if (k_tree is None) != (v_tree is None):
        raise ValueError(f"{where}: pass both k_tree and v_tree, or neither (then the tree's "
                         "keys/values are read from the cache at prefix_len + i)")
    if k_tree is None and (n < 1 or n > s):
        raise ValueError(f"{where}: tree size N={n} must be in [1, S={s}] (the tree's own "
                         "keys live in the cache at prefix_len + i)")
    if k_tree is not None and (k_tree.shape != (b, kh, d, n) or v_tree.shape != (b, kh, n, d)):
        raise ValueError(f"{where}: k_tree {k_tree.shape} / v_tree {v_tree.shape} must be "
                         f"[B, K, D, N] = {(b, kh, d, n)} / [B, K, N, D] = {(b, kh, n, d)} "
                         "(the cache layouts over the N tree slots)")
    if prefix_len.shape != (b,) or not jnp.issubdtype(prefix_len.dtype, jnp.integer):
        raise ValueError(f"{where}: prefix_len must be an int array of shape [B]={(b,)}, got "
                         f"{prefix_len.dtype}{list(prefix_len.shape)}")
    w = num_words(n)
    if tree_bits.shape != (b, n, w) or tree_bits.dtype != jnp.uint32:
        raise ValueError(f"{where}: tree_bits must be uint32 [B, N, ceil(N/32)] = {(b, n, w)}, "
                         f"got {tree_bits.dtype}{list(tree_bits.shape)}; build it with "
                         "ancestor_bits(parents)")
    return b, n, h, d, kh, s


@jax.jit
def _ancestor_bits(parents: jax.Array) -> jax.Array:
    b, n = parents.shape
    ids = jnp.arange(n, dtype=parents.dtype)
    reach = (ids[:, None] == ids[None, :]) | (parents[:, :, None] == ids[None, None, :])
    reach = reach.astype(jnp.float32)  # [B,N,N]; counts stay < 2^24, exact in fp32
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        reach = jnp.minimum(jnp.einsum("bij,bjk->bik", reach, reach,
                                       precision=jax.lax.Precision.HIGHEST), 1.0)
    w = num_words(n)
    bits = jnp.pad(reach > 0.5, ((0, 0), (0, 0), (0, 32 * w - n))).reshape(b, n, w, 32)
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
    return jnp.sum(jnp.where(bits, weights, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)


def ancestor_bits(parents: jax.Array) -> jax.Array:
    """parents [B,N] int (-1 = child of the committed prefix) -> tree_bits [B,N,W]
    uint32 with bit j%32 of word j//32 of row i set iff j == i or j is an ancestor of i.

    Reachability by repeated squaring of the (self | parent) relation: ceil(log2 N)
    small matmuls, no sequential loop over nodes, static shapes under jit. Out-of-range
    parent entries (>= N or < -1) are treated as roots; cycles are the caller's bug.
    """
    parents = jnp.asarray(parents)
    if parents.ndim != 2 or not jnp.issubdtype(parents.dtype, jnp.integer):
        raise ValueError("deepspec_jax.kernels.tree_attention.ancestor_bits: parents must be "
                         f"an int array [B, N], got {parents.dtype}{list(parents.shape)}")
    return _ancestor_bits(parents)


def tree_mask(prefix_len: jax.Array, tree_bits: jax.Array, num_slots: int) -> jax.Array:
    """Dense visibility [B,N,S] bool over a cache holding the tree at prefix_len: slot
    s < prefix_len, or s = prefix_len + j with bit j of row i set (for dense paths and
    tests; the kernel and the reference never build it)."""
    b, n, w = tree_bits.shape
    slots = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    j = slots - prefix_len.astype(jnp.int32)[:, None]  # [B,S] tree index of each slot
    in_tree = (j >= 0) & (j < n)
    jc = jnp.clip(j, 0, n - 1)
    words = jnp.take_along_axis(tree_bits, jnp.broadcast_to((jc // 32)[:, None, :], (b, n, num_slots)),
                                axis=2)  # [B,N,S]
    bit = jnp.right_shift(words, (jc % 32).astype(jnp.uint32)[:, None, :]) & jnp.uint32(1)
    return (j < 0)[:, None, :] | (in_tree[:, None, :] & (bit == 1))


def tree_kv_from_cache(k_cache: jax.Array, v_cache: jax.Array, prefix_len: jax.Array,
                       n: int) -> tuple[jax.Array, jax.Array]:
    """The tree's keys [B,K,D,N] / values [B,K,N,D] at cache slots prefix_len + i (a
    gather of N slots per row; requires prefix_len + N <= S, else the slice clamps)."""
    take_k = jax.vmap(lambda c, p: jax.lax.dynamic_slice_in_dim(c, p, n, axis=2))
    take_v = jax.vmap(lambda c, p: jax.lax.dynamic_slice_in_dim(c, p, n, axis=1))
    p = prefix_len.astype(jnp.int32)
    return take_k(k_cache, p), take_v(v_cache, p)


def tree_visibility(tree_bits: jax.Array) -> jax.Array:
    """Unpack tree_bits [B,N,W] -> [B,N,N] bool: node i sees tree node j."""
    b, n, _ = tree_bits.shape
    j = jnp.arange(n)
    words = tree_bits[:, :, j // 32]  # [B,N,N]
    return (jnp.right_shift(words, (j % 32).astype(jnp.uint32)) & jnp.uint32(1)) == 1


def tree_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             prefix_len: jax.Array, tree_bits: jax.Array, *,
                             k_tree: jax.Array | None = None, v_tree: jax.Array | None = None,
                             scale: float | None = None) -> jax.Array:
    """q [B,N,H,D], k_cache [B,K,D,S], v_cache [B,K,S,D], prefix_len [B] int,
    tree_bits [B,N,W] uint32 (optional k_tree [B,K,D,N], v_tree [B,K,N,D]) -> [B,N,H,D]
    in q.dtype. Logits, softmax and the value sum in fp32. A fully masked row (only
    possible with malformed bits) gives zeros. Jitted inside (scale traced) so eager
    callers compile once per shape."""
    check_inputs(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree)
    if k_tree is None:
        k_tree, v_tree = tree_kv_from_cache(k_cache, v_cache, prefix_len, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _reference(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree,
                      jnp.float32(scale))


@jax.jit
def _reference(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree, scale):
    s = k_cache.shape[3]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    committed = (jnp.arange(s)[None, :] < prefix_len[:, None])[:, None, :]  # [B,1,S]
    # Slots the mask hides may hold anything (stale or never-written cache): zero them
    # so 0 * inf/NaN cannot leak into the value sum.
    vc = jnp.where(committed[:, 0, None, :, None], f32(v_cache), 0.0)
    out, _ = segment_attention(f32(q), [(f32(k_cache), vc, committed),
                                        (f32(k_tree), f32(v_tree), tree_visibility(tree_bits))],
                               scale, precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
