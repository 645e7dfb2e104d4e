"""Tree construction + verification, without any model: exact distribution checks.

A toy "language model" over 6 tokens whose next-token distribution depends on (depth,
last token) gives the target p and a different draft q. Trees are built by
``build_tree`` (children sampled without replacement at T=1) and verified by
``verify_tree`` on 120k independent rows at once; when a round emits only one token a
second round rooted at it supplies the second. The empirical joint of the first two
emitted tokens must match the exact p(t1) p(t2 | t1) (chi-square goodness of fit), and
deliberately wrong verification rules must fail the same test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deepspec_jax.sampling import SamplingParams
from deepspec_jax.tree import (build_tree, candidate_count, child_table, tree_size, verify_tree,
                               verify_tree_greedy)

V = 6
DEPTH = 3
ROWS = 120_000
STOP = jnp.asarray([-2], jnp.int32)   # no stop token


def _tables(seed: int = 0):
    """Target and draft conditionals [depth, last token, V] (draft = perturbed target,
    with some zero-probability tokens so the support logic is exercised)."""
    rng = np.random.default_rng(seed)
    t_logits = rng.normal(0, 1.5, (DEPTH + 3, V, V))
    d_logits = t_logits + rng.normal(0, 1.2, t_logits.shape)
    d_logits[rng.random(d_logits.shape) < 0.15] = -np.inf
    d_logits[..., 0] = np.maximum(d_logits[..., 0], -5.0)     # never an empty row
    p = np.exp(t_logits - t_logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True), jnp.asarray(d_logits, jnp.float32)


@functools.partial(jax.jit, static_argnames=("topk", "num_nodes", "rule", "realized"))
def _round(p_table, d_table, root_depth, root_tok, key, *, topk, num_nodes, rule,
           realized=False):
    """One build + verify round per row, rooted at (root_depth [B], root_tok [B])."""
    b = root_tok.shape[0]
    sp = SamplingParams(1.0)
    k_build, k_verify = jax.random.split(key)

    def expand(level, tokens, states, anc, carry):
        dep = root_depth[:, None] + level
        return d_table[dep, tokens], None, states, carry

    tree = build_tree(d_table[root_depth, root_tok], None, jnp.zeros((b,)), expand, None,
                      topk=topk, num_nodes=num_nodes, max_depth=DEPTH, sp=sp, key=k_build,
                      _realized_scores=realized)
    depth = jnp.concatenate([root_depth[:, None], root_depth[:, None] + tree.depth], axis=1)
    toks = jnp.concatenate([root_tok[:, None], tree.tokens], axis=1)
    p_t = p_table[depth, toks]
    verdict = verify_tree(p_t, tree, STOP, k_verify, greedy=False, topk=topk, max_depth=DEPTH,
                          rule=rule)
    return tree, verdict


def _two_tokens(topk: int, num_nodes: int, rule: str, seed: int = 0, realized: bool = False):
    p_np, d_table = _tables()
    p_table = jnp.asarray(p_np, jnp.float32)
    root = jnp.full((ROWS,), 2, jnp.int32)
    k1, k2 = jax.random.split(jax.random.key(seed))
    tree, v1 = _round(p_table, d_table, jnp.zeros((ROWS,), jnp.int32), root, k1, topk=topk,
                      num_nodes=num_nodes, rule=rule, realized=realized)
    acc = np.asarray(v1.accepted)
    toks = np.asarray(v1.tokens)
    nxt = np.asarray(v1.next_token)
    t1 = np.where(acc >= 1, toks[:, 0], nxt)
    _, v2 = _round(p_table, d_table, jnp.ones((ROWS,), jnp.int32), jnp.asarray(t1), k2,
                   topk=topk, num_nodes=num_nodes, rule=rule, realized=realized)
    second_round = np.where(np.asarray(v2.accepted) >= 1, np.asarray(v2.tokens)[:, 0],
                            np.asarray(v2.next_token))
    t2 = np.where(acc >= 2, toks[:, 1], np.where(acc == 1, nxt, second_round))
    exact = p_np[0, 2][:, None] * p_np[1]                      # p(t1) p(t2 | t1)
    return tree, acc, t1, t2, exact


def _gof_p(t1, t2, exact) -> float:
    counts = np.bincount(t1 * V + t2, minlength=V * V).astype(np.float64)
    expected = exact.reshape(-1) * len(t1)
    keep = expected >= 20
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    nz = exp > 0
    return float(stats.chisquare(obs[nz], exp[nz] * obs[nz].sum() / exp[nz].sum())[1])


@pytest.mark.parametrize("topk,num_nodes", [
    (3, 9),
    pytest.param(1, 3, marks=pytest.mark.slow),     # the chain
    pytest.param(2, 5, marks=pytest.mark.slow),
    pytest.param(4, 40, marks=pytest.mark.slow),    # every candidate kept
])
def test_sampled_tree_is_lossless(topk, num_nodes):
    tree, acc, t1, t2, exact = _two_tokens(topk, num_nodes, "exact")
    n = tree_size(topk, num_nodes, DEPTH)
    assert tree.tokens.shape == (ROWS, n)
    # the tree is exercised: rejections of first siblings, and deep acceptances
    assert 0.01 < np.mean(acc == 0) < 0.9 and np.mean(acc >= 2) > 0.05
    p = _gof_p(t1, t2, exact)
    assert p > 1e-3, (topk, num_nodes, p)


@pytest.mark.parametrize("rule", ["residual_no_subtract",
                                  # p not renormalised between siblings: the next ratio is off
                                  pytest.param("residual_unnormalised", marks=pytest.mark.slow),
                                  pytest.param("q_no_exclude", marks=pytest.mark.slow),
                                  pytest.param("always_accept", marks=pytest.mark.slow)])
def test_wrong_tree_rules_are_detected(rule):
    _, _, t1, t2, exact = _two_tokens(3, 9, rule)
    p = _gof_p(t1, t2, exact)
    assert p < 1e-6, (rule, p)


@pytest.mark.slow
def test_ranking_by_drawn_values_is_detected():
    """Why the builder ranks by pre-sampling scores: keeping the best nodes by their own
    drawn log-probabilities (plain EAGLE-2 reranking) makes a node's existence depend on
    its value, which biases sampled trees -- and this test sees it."""
    _, _, t1, t2, exact = _two_tokens(3, 9, "exact", realized=True)
    p = _gof_p(t1, t2, exact)
    assert p < 1e-6, p


def test_tree_structure_invariants():
    """Parents precede children, depth = parent depth + 1, scores never rise from parent
    to child, siblings are numbered by draw rank in creation order, and greedy children
    of the root are the draft's top-k with exact log-probability scores."""
    _, d_table = _tables(1)
    b = 16
    root_tok = jnp.arange(b, dtype=jnp.int32) % V

    def expand(level, tokens, states, anc, carry):
        return d_table[level, tokens], None, states, carry

    @functools.partial(jax.jit, static_argnums=(0, 1, 2))
    def build(topk, num_nodes, greedy):
        sp = SamplingParams(0.0 if greedy else 1.0)
        return build_tree(d_table[0, root_tok], None, jnp.zeros((b,)), expand, None, topk=topk,
                          num_nodes=num_nodes, max_depth=DEPTH, sp=sp, key=jax.random.key(0))

    lq_root = np.asarray(jax.nn.log_softmax(d_table[0, root_tok]))           # [b,V]
    for topk, num_nodes, greedy in [(3, 12, True), (4, 100, False)]:
        tree = build(topk, num_nodes, greedy)
        n = min(num_nodes, candidate_count(topk, DEPTH))
        par, dep, rank, tok, score = (np.asarray(x) for x in (
            tree.parents, tree.depth, tree.rank, tree.tokens, tree.scores))
        assert par.shape == (b, n)
        idx = np.arange(n)[None]
        has_p = par >= 0
        pp = np.maximum(par, 0)
        assert np.all(np.where(has_p, par < idx, dep == 1))
        assert np.all(np.where(has_p, dep == np.take_along_axis(dep, pp, 1) + 1, True))
        assert np.all(np.where(has_p, score <= np.take_along_axis(score, pp, 1), True))
        # siblings: ranks 0..m-1 in creation order
        same = par[:, :, None] == par[:, None, :]
        earlier = same & (idx[:, None, :] < idx[:, :, None])
        assert np.array_equal(rank, earlier.sum(-1))
        assert np.array_equal(np.asarray(tree.valid), np.isfinite(score))
        if greedy:
            roots = has_p == False  # noqa: E712
            top = np.argsort(-lq_root, axis=1, kind="stable")
            for r in range(b):
                got = tok[r, roots[r]]
                assert got.tolist() == top[r, :len(got)].tolist()
                np.testing.assert_allclose(score[r, roots[r]], lq_root[r, got], atol=1e-5)
        table = np.asarray(child_table(tree, topk))
        assert table.shape == (b, n + 1, topk)


@pytest.mark.parametrize("topk,num_nodes,greedy_build", [(2, 5, True), (3, 12, False), (4, 100, True)])
def test_greedy_path_follower_equals_one_hot_verify(topk, num_nodes, greedy_build):
    """verify_tree_greedy (argmax tokens only) gives verify_tree(one-hot, greedy=True)'s
    verdict field for field: on built trees, with target argmaxes that follow a child
    70% of the time (deep accepted paths) and a stop token among them."""
    _, d_table = _tables(2)
    b = 4096
    rng = np.random.default_rng(topk)
    root_tok = jnp.asarray(rng.integers(0, V, b), jnp.int32)

    def expand(level, tokens, states, anc, carry):
        return d_table[level, tokens], None, states, carry

    sp = SamplingParams(0.0 if greedy_build else 1.0)
    tree = jax.jit(lambda k: build_tree(d_table[0, root_tok], None, jnp.zeros((b,)), expand, None,
                                        topk=topk, num_nodes=num_nodes, max_depth=DEPTH, sp=sp,
                                        key=k))(jax.random.key(5))
    n = tree.tokens.shape[1]
    table = np.asarray(child_table(tree, topk))                       # [b, n+1, topk]
    toks = np.asarray(tree.tokens)
    pick = rng.integers(0, topk, (b, n + 1))
    kid = np.take_along_axis(table, pick[:, :, None], axis=2)[:, :, 0]
    follow = (rng.random((b, n + 1)) < 0.7) & (kid >= 0)
    target = np.where(follow, np.take_along_axis(toks, np.maximum(kid, 0), axis=1),
                      rng.integers(0, V, (b, n + 1))).astype(np.int32)
    stop = jnp.asarray([3], jnp.int32)
    want = verify_tree(jax.nn.one_hot(target, V, dtype=jnp.float32), tree, stop,
                       jax.random.key(0), greedy=True, topk=topk, max_depth=DEPTH)
    got = jax.jit(functools.partial(verify_tree_greedy, topk=topk, max_depth=DEPTH))(
        jnp.asarray(target), tree, stop)
    for name, w, g in zip(want._fields, want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    acc, stopped = np.asarray(want.accepted), np.asarray(want.stopped)
    assert acc.max() == DEPTH and (acc == 0).any() and stopped.any()   # the cases occur
