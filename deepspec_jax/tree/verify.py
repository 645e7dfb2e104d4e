"""Lossless verification of a draft tree against the target's distributions.

Greedy (T=0): walk from the root, at each node move to the child whose token is the
target's argmax there; the first node without such a child emits the argmax. The
output is the target's greedy continuation token for token. ``verify_tree_greedy`` does
this on the argmax tokens alone (integer work on [B, N+1]); ``verify_tree(greedy=True)``
reaches the same verdict through one-hot distributions over the vocabulary.

Sampling (T>0): multi-candidate recursive rejection sampling. At node v with target
distribution p and children c_1..c_m (drawn from the draft distribution q_v without
replacement, in that order): try c_i with probability min(1, p(c_i)/q_i(c_i)); on
acceptance descend into c_i with the target's distribution there; on rejection
  p <- norm(max(p - q_i, 0))      (p itself if that is empty),
  q_{i+1} = q_i with c_i removed, renormalised
(the distribution the next sibling was actually drawn from). When no child is
accepted the next token is drawn from the current p. Each step is an ordinary
rejection step against the current p with the proposal the candidate was really drawn
from, so by induction the emitted token has the target's distribution at v; rejected
tokens have p - q_i <= 0, so removing them from q costs nothing. Node existence must
not depend on the node's own value (see ``tree.build``), which the builder ensures.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepspec_jax.tree.build import DraftTree

# Private wrong rules, only for tests that must show a broken verifier is detected.
TREE_RULES = ("exact", "always_accept", "residual_no_subtract", "q_no_exclude",
              "residual_unnormalised")
_MIN_DRAFT_PROB = 1e-8


class TreeVerdict(NamedTuple):
    accepted: jax.Array   # [B] accepted draft nodes (cut after an accepted stop token)
    path: jax.Array       # [B,D] node indices of the accepted nodes, -1 past ``accepted``
    tokens: jax.Array     # [B,D] their tokens (0 past ``accepted``)
    next_token: jax.Array  # [B] residual / bonus token (meaningless when ``stopped``)
    stopped: jax.Array    # [B] an accepted node is a stop token: nothing follows it


def child_table(tree: DraftTree, topk: int) -> jax.Array:
    """[B, N+1, topk] node index of the rank-r valid child of flat node f (f = 0 the
    root, f = i+1 node i), -1 where there is none."""
    b, n = tree.tokens.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
    f = jnp.where(tree.valid, tree.parents + 1, n + 1)          # invalid -> dropped
    return jnp.full((b, n + 1, topk), -1, jnp.int32).at[rows, f, tree.rank].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), mode="drop")


def _walk(tree: DraftTree, stop_ids: jax.Array, max_depth: int, step, bonus) -> TreeVerdict:
    """The walk both verifiers share: at depth t, ``step(t, cur, alive)`` gives the
    accepted child of flat node ``cur`` (-1: none) and the token emitted if none is;
    a stop token ends the row; rows alive after ``max_depth`` levels emit ``bonus(cur)``."""
    b = tree.tokens.shape[0]
    rows = jnp.arange(b)

    def level(t, c):
        cur, alive, acc, path, toks, nxt, stopped = c
        found, end_token = step(t, cur, alive)
        moved = alive & (found >= 0)
        tok = tree.tokens[rows, jnp.maximum(found, 0)]
        is_stop = moved & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        path = path.at[:, t].set(jnp.where(moved, found, -1))
        toks = toks.at[:, t].set(jnp.where(moved, tok, 0))
        nxt = jnp.where(alive & ~moved, end_token, nxt)     # rejected all / no children
        return (jnp.where(moved, found + 1, cur), moved & ~is_stop, acc + moved.astype(jnp.int32),
                path, toks, nxt, stopped | is_stop)

    init = (jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32),
            jnp.full((b, max_depth), -1, jnp.int32), jnp.zeros((b, max_depth), jnp.int32),
            jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
    cur, alive, acc, path, toks, nxt, stopped = jax.lax.fori_loop(0, max_depth, level, init)
    return TreeVerdict(acc, path, toks, jnp.where(alive, bonus(cur), nxt), stopped)


def verify_tree(p_t: jax.Array, tree: DraftTree, stop_ids: jax.Array, key: jax.Array, *,
                greedy: bool, topk: int, max_depth: int, rule: str = "exact") -> TreeVerdict:
    """``p_t`` [B,N+1,V]: target distributions at the flattened tree (index 0 = the
    root/current token, i+1 = node i); one-hot when greedy. Returns the accepted path
    and the token that follows it, per row."""
    if rule not in TREE_RULES:
        raise ValueError(f"rule must be one of {TREE_RULES}, got {rule!r}.")
    b, n1, v = p_t.shape
    rows = jnp.arange(b)
    table = child_table(tree, topk)
    dist_flat = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), tree.dist_id], axis=1)
    k_u, k_draw = jax.random.split(key)
    uniforms = jax.random.uniform(k_u, (max_depth, topk, b))
    draw_keys = jax.random.split(k_draw, max_depth + 1)

    def draw(p, k):
        if greedy:
            return jnp.argmax(p, axis=-1).astype(jnp.int32)
        return jax.random.categorical(k, jnp.log(p), axis=-1).astype(jnp.int32)

    def step(t, cur, alive):
        p_cur = p_t[rows, cur]                                           # [B,V]
        logq = tree.logq[rows, jnp.maximum(dist_flat[rows, cur], 0)]     # [B,V]
        target_tok = jnp.argmax(p_cur, axis=-1)

        def sibling(r, s):
            found, p, excluded = s
            child = table[rows, cur, r]
            trying = alive & (found < 0) & (child >= 0)
            x = tree.tokens[rows, jnp.maximum(child, 0)]
            lq = logq if rule == "q_no_exclude" else jnp.where(excluded, -jnp.inf, logq)
            q = jax.nn.softmax(lq, axis=-1)
            if greedy:
                ok = x == target_tok
            elif rule == "always_accept":
                ok = jnp.ones((b,), bool)
            else:
                px = p[rows, x]
                qx = jnp.maximum(q[rows, x], _MIN_DRAFT_PROB)
                ok = uniforms[t, r] < jnp.minimum(px / qx, 1.0)
            accept, reject = trying & ok, trying & ~ok
            if rule == "residual_no_subtract":
                resid = p
            else:
                resid = jnp.maximum(p - q, 0.0)
                z = jnp.sum(resid, axis=-1, keepdims=True)
                # Normalising matters here, unlike for a single draw: the next
                # sibling's ratio p(x)/q(x) reads this p (the wrong rule skips it).
                if rule != "residual_unnormalised":
                    resid = resid / jnp.where(z > 0, z, 1.0)
                resid = jnp.where(z > 0, resid, p)
            p = jnp.where(reject[:, None], resid, p)
            excluded = excluded | (reject[:, None] & (jnp.arange(v)[None] == x[:, None]))
            return jnp.where(accept, child, found), p, excluded

        init = (jnp.full((b,), -1, jnp.int32), p_cur, jnp.zeros((b, v), bool))
        found, p, _ = jax.lax.fori_loop(0, topk, sibling, init)
        return found, draw(p, draw_keys[t])     # the token where no child is accepted

    # rows that accepted a node at every depth: bonus token from the target at the leaf
    return _walk(tree, stop_ids, max_depth, step,
                 lambda cur: draw(p_t[rows, cur], draw_keys[max_depth]))


def verify_tree_greedy(target_tokens: jax.Array, tree: DraftTree, stop_ids: jax.Array, *,
                       topk: int, max_depth: int) -> TreeVerdict:
    """The T=0 verdict from the target's argmax token at each flattened node
    (``target_tokens`` [B,N+1], index 0 the root): follow the child that matches, emit
    the argmax where none does. Equal to ``verify_tree(one_hot(target_tokens),
    greedy=True)`` without touching [B,N+1,V] (the chain's ``verify_greedy`` for trees)."""
    b = target_tokens.shape[0]
    rows = jnp.arange(b)
    table = child_table(tree, topk)                                       # [B,N+1,k]
    kid_tokens = jnp.take_along_axis(tree.tokens[:, None, :],
                                     jnp.maximum(table, 0), axis=2)       # [B,N+1,k]
    hit = (table >= 0) & (kid_tokens == target_tokens[:, :, None])
    # at most one child matches (siblings carry distinct tokens); the first if several
    match = jnp.where(jnp.any(hit, axis=2), jnp.take_along_axis(
        table, jnp.argmax(hit, axis=2)[:, :, None], axis=2)[:, :, 0], -1)  # [B,N+1]

    return _walk(tree, stop_ids, max_depth,
                 lambda t, cur, alive: (match[rows, cur], target_tokens[rows, cur]),
                 lambda cur: target_tokens[rows, cur])


__all__ = ["TreeVerdict", "TREE_RULES", "verify_tree", "verify_tree_greedy", "child_table"]
