"""Draft-tree construction inside ``jit`` with a static node budget (EAGLE-2 style).

A tree is grown level by level: the root (the current token) gets ``topk`` children;
at every later level the ``topk`` best nodes of that level (the *frontier*) are
expanded by one draft step each and get ``topk`` children. Of all the candidates
(``topk + (D-1)*topk**2`` for depth D) the best ``num_nodes`` are kept. Shapes are
static: every level has a fixed width and the kept set is a ``top_k``.

Ranking uses *pre-sampling* scores: the rank-i child of node v gets
``score(v) + inc_v(i)`` where the increment depends only on v (its draft distribution
q_v and an optional per-node prior) and on i -- never on the child's own token. Why:
at T>0 the children are SAMPLED from the draft (without replacement, Gumbel-top-k, so
the rank-i child is the i-th draw) and multi-candidate rejection sampling is lossless
only if a node's existence does not depend on its own sampled value. Increments are
<= 0 and non-increasing in i, so (a) with ties broken by creation index the kept set is
ancestor-closed and each node keeps a prefix of its draws, and (b) every candidate
ranked above node c has a score that does not depend on c's token (only c's
descendants and later siblings do, and those rank below c): c's membership is
independent of its value. (Plain EAGLE-2 reranking by the drawn tokens' own
probabilities violates this and is measurably lossy at T>0; see the tests.)

* T=0: children are the top-k tokens and ``inc(i) = log q_(i)`` (the i-th largest
  draft log-probability): the score is the path's cumulative draft log-probability,
  exactly EAGLE-2's dynamic tree.
* T>0: ``inc(i) = log q_(i) - log q_(0) + log a_v``. The draft probability of a sampled
  token says little about its acceptance (a flat draft matching a flat target accepts
  almost every draw), so the first draw costs only ``log a_v``, an acceptance estimate
  the draft may supply (default 1); later draws are discounted by their probability
  relative to the first. With ``a_v = 1`` the chain of first draws is always kept
  (given ``num_nodes`` >= depth), so a sampled tree accepts at least as much as the
  chain in expectation: the first draws are tried first, exactly as the chain's.

``topk=1`` is the chain. A draft may also prune a node's children (prior -inf, e.g.
DSpark's confidence threshold); candidates with score -inf (pruned, or a rank beyond
the distribution's support) are invalid: kept only as padding.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from deepspec_jax.draft_vocab import scatter_to_target, to_target_ids
from deepspec_jax.sampling import SamplingParams, log_probs


class DraftTree(NamedTuple):
    """A flattened draft tree: ``N`` nodes in creation (breadth-first) order, so a
    parent always precedes its children and siblings appear in draw order.

    ``logq[b, e]`` are log draft distributions of the expanded nodes: row 0 is the
    root's (the distribution its children were drawn from), row ``dist_id[b, i]`` node
    i's (-1: never expanded, so it has no children)."""

    tokens: jax.Array    # [B,N] int32
    parents: jax.Array   # [B,N] int32 node index of the parent; -1 = child of the root
    depth: jax.Array     # [B,N] int32, 1 = child of the root
    rank: jax.Array      # [B,N] int32 sibling rank = order in which it was drawn
    valid: jax.Array     # [B,N] bool
    dist_id: jax.Array   # [B,N] int32
    scores: jax.Array    # [B,N] float32 pre-sampling scores (-inf when invalid)
    logq: jax.Array      # [B,E,V] float32, E = 1 + (max_depth-1)*topk


def candidate_count(topk: int, max_depth: int) -> int:
    """Candidates an EAGLE-2 expansion generates: ``k`` at depth 1, ``k**2`` below."""
    return topk + (max_depth - 1) * topk * topk


def tree_size(topk: int, num_nodes: int, max_depth: int) -> int:
    """Static node count of a tree: the budget, capped by what the expansion generates."""
    return min(int(num_nodes), candidate_count(topk, max_depth))


def draft_log_probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Log draft distribution used for ranking and (T>0) for drawing children: at T>0
    ``sampling.log_probs``, the distribution chain drafts sample from too."""
    if sp.greedy:
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return log_probs(logits, sp)


def draw_children(logq: jax.Array, k: int, key: jax.Array, greedy: bool):
    """``k`` children per row of ``logq`` [...,V]: the top-k tokens (greedy) or k draws
    without replacement in draw order (Gumbel-top-k). Returns (tokens [...,k] int32,
    sorted log-probs [...,k]: the pre-sampling score increments)."""
    sorted_logq = jax.lax.top_k(logq, k)[0]
    if greedy:
        return jax.lax.top_k(logq, k)[1].astype(jnp.int32), sorted_logq
    g = jax.random.gumbel(key, logq.shape, jnp.float32)
    return jax.lax.top_k(logq + g, k)[1].astype(jnp.int32), sorted_logq


def _increments(logq, tok, sorted_logq, prior, sp: SamplingParams, realized: bool):
    """Pre-sampling score increments [..., k] of a node's ranked children (see the
    module docstring); ``prior`` [...] log acceptance estimate, -inf prunes."""
    if realized:                                  # private: plain EAGLE-2 (lossy at T>0)
        inc = jnp.take_along_axis(logq, tok, axis=-1)
    elif sp.greedy:
        inc = sorted_logq
    else:
        inc = sorted_logq - sorted_logq[..., :1]
    if prior is None:
        return inc
    prior = prior.astype(jnp.float32)[..., None]
    if sp.greedy:                                 # T=0: the prior only prunes
        return jnp.where(prior > -jnp.inf, inc, -jnp.inf)
    return inc + prior


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B,M,...] gathered at idx [B,F] along axis 1."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


# expand(level, tokens [B,F], states pytree [B,F,...], anc [B,F,R] bool, carry)
#   -> (logits [B,F,V], prior [B,F] | None, child states pytree [B,F,...], carry)
# prior: log acceptance estimate of the nodes' children (<= 0; -inf prunes them).
ExpandFn = Callable[[int, jax.Array, Any, jax.Array, Any], tuple]


def build_tree(root_logits: jax.Array, root_prior: jax.Array | None, root_child_state: Any,
               expand: ExpandFn, carry: Any, *, topk: int, num_nodes: int, max_depth: int,
               sp: SamplingParams, key: jax.Array, d2t: jax.Array | None = None,
               vocab_size: int | None = None, _realized_scores: bool = False) -> DraftTree:
    """Grow a tree of at most ``max_depth`` levels and keep ``tree_size(...)`` nodes.

    ``root_logits`` [B,V]: draft logits of the root's children; ``root_prior`` [B] (or
    None): their prior (see ``ExpandFn``); ``root_child_state``: pytree [B,...] the root's children
    need for their own expansion. ``expand`` runs one draft step for the F frontier
    nodes of a level (see ``ExpandFn``); ``anc`` marks, over the R=(max_depth-1)*topk
    expansion slots (slot (level-1)*topk + j = frontier node j of that level), which
    slots are the node itself or its expanded ancestors -- what an autoregressive
    draft attends to among its own scratch keys. ``carry`` is threaded through.
    ``d2t`` (a reduced draft vocabulary, ``draft_vocab``): logits are over its K ids;
    drawn children are mapped to target ids before ``expand`` sees them and in the
    tree, and ``logq`` is scattered into the target's ``vocab_size`` (-inf elsewhere).
    ``_realized_scores`` (private, tests only) ranks by the drawn tokens' own
    log-probabilities -- plain EAGLE-2 -- which is lossy at T>0.
    """
    k, D = int(topk), int(max_depth)
    b, v = root_logits.shape
    if not 1 <= k <= v:
        raise ValueError(f"tree topk must be in [1, vocab_size={v}], got {k}.")
    if D < 1:
        raise ValueError(f"tree max_depth must be >= 1, got {D}.")
    n_keep = tree_size(k, num_nodes, D)
    if n_keep < 1:
        raise ValueError(f"tree num_nodes must be >= 1, got {num_nodes}.")
    R = (D - 1) * k
    keys = jax.random.split(key, D)

    # level 1: the root's children
    logq0 = draft_log_probs(root_logits, sp)
    tok, srt = draw_children(logq0, k, keys[0], sp.greedy)
    score = _increments(logq0, tok, srt, root_prior, sp, _realized_scores)
    lv = dict(tok=to_target_ids(tok, d2t), score=score, parent=jnp.full((b, k), -1, jnp.int32),
              depth=jnp.ones((b, k), jnp.int32),
              rank=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k)),
              amask=jnp.zeros((b, k, R), bool),
              state=jax.tree.map(lambda s: jnp.broadcast_to(s[:, None], (b, k) + s.shape[1:]),
                                 root_child_state))
    levels = [lv]
    logqs = [logq0[:, None]]
    own_dist = []          # per level: dist id of each candidate (-1 = not expanded)
    offset = 0             # global candidate index of the level's first candidate
    for d in range(1, D):
        width = lv["tok"].shape[1]
        # frontier: the k best candidates of this level (stable: ties -> lower index)
        fscore, fpos = jax.lax.top_k(lv["score"], k)
        ftok = jnp.take_along_axis(lv["tok"], fpos, axis=1)
        fstate = jax.tree.map(lambda s: _take(s, fpos), lv["state"])
        slot = (d - 1) * k + jnp.arange(k, dtype=jnp.int32)
        fanc = _take(lv["amask"], fpos) | (jnp.arange(R)[None, None, :] == slot[None, :, None])
        logits, prior, child_state, carry = expand(d, ftok, fstate, fanc, carry)
        logq = draft_log_probs(logits, sp)                              # [B,k,V]
        ctok, csrt = draw_children(logq, k, keys[d], sp.greedy)         # [B,k,k]
        cscore = fscore[:, :, None] + _increments(logq, ctok, csrt, prior, sp, _realized_scores)
        ctok = to_target_ids(ctok, d2t)
        dist_ids = 1 + (d - 1) * k + jnp.arange(k, dtype=jnp.int32)
        od = jnp.full((b, width), -1, jnp.int32).at[jnp.arange(b)[:, None], fpos].set(
            jnp.broadcast_to(dist_ids, (b, k)))
        own_dist.append(od)
        logqs.append(logq)
        fglob = offset + fpos                                            # [B,k]
        offset += width
        rep = lambda x: jnp.broadcast_to(x[:, :, None], x.shape[:2] + (k,) + x.shape[2:])  # noqa: E731
        flat = lambda x: x.reshape((b, k * k) + x.shape[3:])  # noqa: E731
        lv = dict(tok=flat(ctok), score=flat(cscore), parent=flat(rep(fglob)),
                  depth=jnp.full((b, k * k), d + 1, jnp.int32),
                  rank=jnp.broadcast_to(jnp.tile(jnp.arange(k, dtype=jnp.int32), k), (b, k * k)),
                  amask=flat(rep(fanc)),
                  state=jax.tree.map(lambda s: flat(rep(s)), child_state))
        levels.append(lv)
    own_dist.append(jnp.full((b, lv["tok"].shape[1]), -1, jnp.int32))   # deepest level

    cat = lambda name: jnp.concatenate([x[name] for x in levels], axis=1)  # noqa: E731
    score_all = cat("score")
    _, sel = jax.lax.top_k(score_all, n_keep)      # best first; ties -> lower index
    sel = jnp.sort(sel, axis=1)                     # creation order: parents first
    rows = jnp.arange(b)[:, None]
    m = score_all.shape[1]
    inv = jnp.full((b, m), -1, jnp.int32).at[rows, sel].set(
        jnp.broadcast_to(jnp.arange(n_keep, dtype=jnp.int32), (b, n_keep)))
    pick = lambda x: jnp.take_along_axis(x, sel, axis=1)  # noqa: E731
    parent_c = pick(cat("parent"))
    parents = jnp.where(parent_c >= 0, jnp.take_along_axis(inv, jnp.maximum(parent_c, 0), axis=1),
                        -1)
    scores = pick(score_all)
    return DraftTree(tokens=pick(cat("tok")), parents=parents.astype(jnp.int32),
                     depth=pick(cat("depth")), rank=pick(cat("rank")),
                     valid=scores > -jnp.inf,
                     dist_id=pick(jnp.concatenate(own_dist, axis=1)),
                     scores=scores, logq=scatter_to_target(jnp.concatenate(logqs, axis=1), d2t,
                                                           vocab_size, -jnp.inf))


__all__ = ["DraftTree", "build_tree", "candidate_count", "tree_size", "draft_log_probs",
           "draw_children"]
