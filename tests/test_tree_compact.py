"""The tree verify pass and cache compaction against fresh full forwards.

On the tiny fixture target: prefill two prompts of different lengths, run a random tree through
``CausalLM.extend_tree``, and check that every node's logits and features equal a
plain causal forward over prefix + the node's root path; then compact the cache to
one root path and check that the next token's logits equal a fresh forward over
prefix + path + that token.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fp32_tol, load_manifest, target_fixture_sets
from deepspec_jax import load_target
from deepspec_jax.kernels.tree_attention import ancestor_bits
from deepspec_jax.models.transformer import init_cache
from deepspec_jax.tree import compact_kv_cache

LAYERS = (0, 2, 4)
TOL = 1e-4


def _random_tree(rng, n: int):
    """parents [n] (node 0 = root, -1), depths [n]."""
    parents = np.full(n, -1, np.int32)
    depth = np.zeros(n, np.int32)
    for i in range(1, n):
        parents[i] = rng.integers(0, i)
        depth[i] = depth[parents[i]] + 1
    return parents, depth


def _root_path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def _fresh(target, seqs):
    """Last-position logits and features of each sequence (one padded forward)."""
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
    out = target.forward(ids, LAYERS)
    last = np.asarray([len(s) - 1 for s in seqs])
    rows = np.arange(len(seqs))
    return np.asarray(out.logits)[rows, last], np.asarray(out.features)[rows, last]


@functools.partial(jax.jit, static_argnums=(0,))
def _run(graphdef, state, prefill, lens, ids, depths, parents, slots, num_keep, nxt):
    """prefill -> tree pass -> compaction -> one more token, in one compiled call."""
    model = nnx.merge(graphdef, state)
    b = prefill.shape[0]
    cache = init_cache(model.cfg, b, 64, model.dtype)
    _, cache = model.extend(cache, prefill, lens, LAYERS)
    out, tcache = model.extend_tree(cache, ids, depths, ancestor_bits(parents), LAYERS)
    ccache = compact_kv_cache(tcache, tcache.lengths, slots, num_keep)
    out2, _ = model.extend(ccache, nxt, jnp.ones((b,), jnp.int32), LAYERS)
    return out, tcache.lengths, ccache.lengths, out2


@pytest.mark.parametrize("fs", target_fixture_sets())
def test_tree_pass_and_compaction_match_fresh_forward(fs):
    """Both fixture targets: the Gemma-4 one's sliding layers (window 8) see a 9-node
    tree through the dense windowed path, its KV-shared layers borrow the tree's K/V."""
    target = load_target(os.path.join(fs, load_manifest(fs)["global"]["target_dir"]))
    vocab = target.config.vocab_size
    rng = np.random.default_rng(3)
    lens = [7, 12]
    prompts = [rng.integers(0, vocab, n) for n in lens]
    b, n = 2, 9
    prefill = np.zeros((b, 16), np.int32)
    for r, p in enumerate(prompts):
        prefill[r, :len(p)] = p
    trees = [_random_tree(rng, n) for _ in range(b)]
    parents = np.stack([t[0] for t in trees])
    depths = np.stack([t[1] for t in trees])
    ids = rng.integers(0, vocab, (b, n)).astype(np.int32)
    # Keep the root path of the deepest node (row 0) / of the last node (row 1).
    keep = [_root_path(parents[0], int(np.argmax(depths[0]))), _root_path(parents[1], n - 1)]
    slots = np.zeros((b, max(len(k) for k in keep) + 1), np.int32)
    for r, k in enumerate(keep):
        slots[r, :len(k)] = k
    num_keep = np.asarray([len(k) for k in keep], np.int32)
    nxt = rng.integers(0, vocab, (b, 1)).astype(np.int32)

    out, tree_len, kept_len, out2 = _run(target.graphdef, target.state, prefill,
                                         np.asarray(lens, np.int32), ids, depths, parents, slots,
                                         num_keep, nxt)
    assert np.array_equal(np.asarray(tree_len), lens)                 # not advanced
    assert np.array_equal(np.asarray(kept_len), np.asarray(lens) + num_keep)

    seqs = [list(prompts[r]) + [int(ids[r, j]) for j in _root_path(parents[r], i)]
            for r in range(b) for i in range(n)]
    seqs += [list(prompts[r]) + [int(ids[r, j]) for j in keep[r]] + [int(nxt[r, 0])]
             for r in range(b)]
    ref_logits, ref_feats = _fresh(target, seqs)
    lt, ft = fp32_tol(ref_logits, TOL), fp32_tol(ref_feats, TOL)
    np.testing.assert_allclose(np.asarray(out.logits).reshape(b * n, -1), ref_logits[:b * n],
                               atol=lt)
    np.testing.assert_allclose(np.asarray(out.features).reshape(b * n, -1), ref_feats[:b * n],
                               atol=ft)
    np.testing.assert_allclose(np.asarray(out2.logits)[:, 0], ref_logits[b * n:], atol=lt)
    np.testing.assert_allclose(np.asarray(out2.features)[:, 0], ref_feats[b * n:], atol=ft)
