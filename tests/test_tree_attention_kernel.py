"""Tree attention: reference vs an independent float64 dense computation, the Pallas
kernel bodies (TPU and Triton, interpreted on CPU) vs the reference, ancestor_bits vs a
Python loop, and the error paths."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from deepspec_jax.kernels.tree_attention import (ancestor_bits, tree_attention,
                                                 tree_attention_filled, tree_attention_reference,
                                                 tree_kv_from_cache)


def random_parents(rng, batch: int, n: int, max_depth: int) -> np.ndarray:
    """Random forests in topological order with depth exactly max_depth (a chain of
    max_depth nodes first, then nodes under random shallower nodes or the prefix)."""
    out = np.full((batch, n), -1, np.int32)
    for b in range(batch):
        depth = np.zeros(n, np.int32)
        for i in range(n):
            if i < max_depth:
                p = i - 1
            else:
                cands = [-1] + [j for j in range(i) if depth[j] < max_depth]
                p = int(rng.choice(cands))
            out[b, i] = p
            depth[i] = 1 if p < 0 else depth[p] + 1
        assert depth.max() == min(max_depth, n)
    return out


def ancestors_loop(parents_row, i: int) -> set[int]:
    out, j = set(), i
    while j >= 0:
        out.add(j)
        j = int(parents_row[j])
    return out


def bits_loop(parents: np.ndarray) -> np.ndarray:
    b, n = parents.shape
    out = np.zeros((b, n, -(-n // 32)), np.uint32)
    for r in range(b):
        for i in range(n):
            for j in ancestors_loop(parents[r], i):
                out[r, i, j // 32] |= np.uint32(1 << (j % 32))
    return out


def dense_attention_f64(q, k_cache, v_cache, prefix_len, parents, scale=None):
    """Independent oracle: explicit boolean mask from the parent arrays, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    b, n, h, d = q.shape
    kh, s = k.shape[1], k.shape[3]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, n, h, d))
    for r in range(b):
        p = int(prefix_len[r])
        for i in range(n):
            mask = np.zeros(s, bool)
            mask[:p] = True
            for j in ancestors_loop(parents[r], i):
                mask[p + j] = True
            for hh in range(h):
                logits = q[r, i, hh] @ k[r, hh // g] * scale
                logits = np.where(mask, logits, -np.inf)
                w = np.exp(logits - logits.max())
                out[r, i, hh] = (w / w.sum()) @ v[r, hh // g]
    return out


def make_case(seed, b, n, kh, g, d, s, prefix_len, depth, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    parents = random_parents(rng, b, n, depth)
    q = rng.standard_normal((b, n, kh * g, d)).astype(np.float32)
    k = rng.standard_normal((b, kh, d, s)).astype(np.float32)
    v = rng.standard_normal((b, kh, s, d)).astype(np.float32)
    for r, p in enumerate(prefix_len):  # stale slots past the tree: large, must be masked
        k[r, :, :, p + n:] *= 30.0
        v[r, :, p + n:, :] = 1e4
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(prefix_len, jnp.int32), ancestor_bits(jnp.asarray(parents)))
    return args, parents


# ------------------------------------------------------------------ reference / bits

@pytest.mark.parametrize("seed,b,n,kh,g,d,s,plen,depth", [
    (0, 3, 37, 2, 3, 8, 90, (0, 53, 17), 8),   # 2 bitmask words, empty prefix
    (1, 1, 4, 2, 1, 8, 12, (8,), 1),           # tree ends exactly at S
])
def test_reference_matches_dense_float64(seed, b, n, kh, g, d, s, plen, depth):
    args, parents = make_case(seed, b, n, kh, g, d, s, plen, depth)
    want = dense_attention_f64(*args[:4], parents)
    got = tree_attention_reference(*args)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    got = tree_attention_reference(*args, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), dense_attention_f64(*args[:4], parents, 0.3),
                               atol=1e-5, rtol=1e-5)


def test_reference_chain_is_causal_attention():
    """A chain tree is plain causal attention over prefix + chain (jax.nn oracle)."""
    rng = np.random.default_rng(3)
    b, n, kh, g, d, s, p = 1, 6, 2, 2, 16, 20, 9
    q = jnp.asarray(rng.standard_normal((b, n, kh * g, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kh, d)), jnp.float32)
    parents = jnp.arange(-1, n - 1, dtype=jnp.int32)[None]
    got = tree_attention_reference(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3),
                                   jnp.array([p], jnp.int32), ancestor_bits(parents))
    mask = jnp.arange(s)[None, :] <= p + jnp.arange(n)[:, None]
    want = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask[None, None])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_ancestor_bits_matches_python_loop():
    rng = np.random.default_rng(4)
    for n, depth in ((1, 1), (70, 20)):
        parents = random_parents(rng, 3, n, depth)
        got = np.asarray(jax.jit(ancestor_bits)(jnp.asarray(parents)))
        assert got.dtype == np.uint32 and got.shape == (3, n, -(-n // 32))
        np.testing.assert_array_equal(got, bits_loop(parents))


# -------------------------------------------------------------------------- kernels

def split_tree(args):
    """(args with the cache poisoned at slots >= prefix_len, k_tree, v_tree): the tree's
    keys/values move to separate arrays and the cache past the prefix becomes NaN, which
    the explicit-tree path must never read."""
    q, k, v, plen, bits = args
    kt, vt = tree_kv_from_cache(k, v, plen, q.shape[1])
    past = jnp.arange(k.shape[3])[None, :] >= plen[:, None]  # [B,S]
    k = jnp.where(past[:, None, None, :], jnp.nan, k)
    v = jnp.where(past[:, None, :, None], jnp.nan, v)
    return (q, k, v, plen, bits), kt, vt


def test_reference_explicit_tree_ignores_cache_past_prefix():
    args, _ = make_case(5, 2, 9, 2, 2, 16, 40, (0, 25), 4)
    poisoned, kt, vt = split_tree(args)
    got = tree_attention_reference(*poisoned, k_tree=kt, v_tree=vt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tree_attention_reference(*args)),
                               atol=1e-6, rtol=1e-6)


KERNEL_CASES = [
    # seed, B, N, K, G, D, S, two prefix_len sets (one per call), depth, dtype,
    # block_kv (tpu, gpu), explicit k_tree/v_tree. S=37 < block: TPU uses one
    # full-cache block; S=130/300 leave a partial edge block; prefixes of 0, on and off
    # block edges, trees ending exactly at S.
    (10, 2, 5, 1, 1, 64, 37, ((0, 29), (32, 3)), 1, jnp.float32, (128, 16), False),
    (11, 3, 13, 2, 2, 128, 130, ((117, 0, 60), (5, 100, 64)), 8, jnp.float32, (128, 32), True),
    (12, 2, 40, 2, 4, 64, 300, ((250, 89), (0, 256)), 5, jnp.float32, (128, 64), False),
    (13, 2, 20, 1, 3, 128, 300, ((140, 7), (280, 128)), 8, jnp.bfloat16, (128, 64), True),
]


@pytest.mark.parametrize("path", ["tpu", "gpu", "filled"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"seed{c[0]}")
def test_kernel_matches_reference(case, path):
    """The kernel bodies (interpreted) and the jnp path that reads the cache only up to
    the longest prefix ("filled") = the reference for both prefix-length sets, through
    one jitted function: new lengths (traced data) must not recompile. With an explicit
    tree, the cache past the prefix is NaN: it must never reach the result."""
    seed, b, n, kh, g, d, s, plens, depth, dtype, blocks, explicit = case
    if path == "filled":
        kw = dict(impl="filled")
    else:
        kw = dict(impl="pallas", interpret=True, backend=path,
                  block_kv=blocks[0] if path == "tpu" else blocks[1])
    if explicit:
        f = jax.jit(lambda *a, kt, vt: tree_attention(*a, k_tree=kt, v_tree=vt, **kw))
    else:
        f = jax.jit(lambda *a: tree_attention(*a, **kw))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for plen in plens:
        args, _ = make_case(seed, b, n, kh, g, d, s, plen, depth, dtype)
        want = tree_attention_reference(*args)
        if explicit:
            poisoned, kt, vt = split_tree(args)
            got = f(*poisoned, kt=kt, vt=vt)
        else:
            got = f(*args)
        assert got.dtype == dtype and got.shape == args[0].shape
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tol, rtol=tol)
    assert f._cache_size() == 1


def test_auto_on_cpu_uses_filled_path():
    args, _ = make_case(21, 1, 3, 1, 1, 8, 10, (4,), 2)
    if jax.default_backend() == "cpu":
        got = tree_attention(*args, block_kv=48)  # unsupported block: auto never raises
        np.testing.assert_array_equal(np.asarray(got), np.asarray(tree_attention_filled(*args)))


# --------------------------------------------------------------------------- errors

def _ok_args():
    args, _ = make_case(30, 2, 5, 2, 2, 16, 40, (0, 21), 3)
    return args


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0][0],) + a[1:], "q must be"),
    (lambda a: (a[0], a[1][:, :, :8]) + a[2:], "k_cache"),
    (lambda a: a[:2] + (a[2][:, :, :30],) + a[3:], "v_cache"),
    (lambda a: (a[0][:, :, :3],) + a[1:], "multiple of KV heads"),
    (lambda a: a[:3] + (a[3][:1],) + a[4:], "prefix_len"),
    (lambda a: a[:4] + (a[4].astype(jnp.int32),), "tree_bits must be uint32"),
    (lambda a: a[:4] + (a[4][:, :4],), "tree_bits"),
    (lambda a: a + (a[1][..., :5],), "both k_tree and v_tree"),
    (lambda a: a + (a[1][..., :4], a[2][:, :, :4]), "k_tree"),
])
def test_bad_shapes_raise(mutate, match):
    args = mutate(_ok_args())
    tree = dict(zip(("k_tree", "v_tree"), args[5:]))
    for impl in ("reference", "pallas"):
        with pytest.raises(ValueError, match=match):
            tree_attention(*args[:5], impl=impl, interpret=True, **tree)


def test_forced_pallas_on_unsupported_raises():
    args = _ok_args()
    with pytest.raises(ValueError, match="power of 2"):
        tree_attention(*args, impl="pallas", interpret=True, backend="gpu", block_kv=48)
    with pytest.raises(ValueError, match="multiple of 128"):
        tree_attention(*args, impl="pallas", interpret=True, backend="tpu", block_kv=16)
    with pytest.raises(ValueError, match="must equal"):
        tree_attention(args[0].astype(jnp.bfloat16), *args[1:], impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="impl="):
        tree_attention(*args, impl="triton")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            tree_attention(*args, impl="pallas")


def test_ancestor_bits_rejects_bad_input():
    with pytest.raises(ValueError, match="parents must be"):
        ancestor_bits(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="parents must be"):
        ancestor_bits(jnp.zeros((1, 4), jnp.float32))
