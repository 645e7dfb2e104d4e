"""Speculative decoding: a draft proposes, the frozen target verifies (SPEC §4).

The whole generation -- prefill, first token, and every propose/verify/commit round --
runs inside one jitted ``lax.while_loop`` (``_spec_generate``), like
``target._generate``. Shapes are static: the proposal always has the draft's full
width (DSpark/DFlash ``block_size``, Eagle3 ``ttt_length``) with a per-row valid
length, caches are preallocated with per-row ``lengths`` (rolling back a rejected
tail = lowering ``lengths``), the PRNG key is folded with the round index, and the
per-round statistics are written into fixed-size device arrays. Prompt and cache
lengths are bucketed, so a serving loop compiles once per (batch, bucket, settings).

Rows are independent: each has its own position, acceptance and stop state; a
finished row keeps running through the (static) computation but commits nothing.

Verification is exact rejection sampling, so the output distribution is the target's
(greedy: token-identical to ``Target.generate``): accept draft token k with
probability min(1, p_t/p_d) left to right; at the first rejection sample from
norm(max(p_t - p_d, 0)) (p_t if that is empty); if all are accepted sample a bonus
token from p_t after the last one. Greedy uses the same rule on one-hot
distributions. Round bookkeeping (when to stop, what a round whose accepted drafts
contain a stop token records) follows the reference evaluator's loop.

Tree mode (``tree=(topk, num_nodes)``, ``_spec_generate_tree``) replaces the chain by
a draft tree per round (``deepspec_jax.tree``): the target runs the flattened tree in
one pass with tree-masked attention, verification is greedy path-following (T=0) or
multi-candidate recursive rejection sampling (T>0, lossless), and the target KV cache
is compacted to the accepted path so later rounds see a plain causal cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepspec_jax.drafts.registry import family_for_kind
from deepspec_jax.errors import ConfigError
from deepspec_jax.kernels.tree_attention import ancestor_bits
from deepspec_jax.models.transformer import init_cache as target_init_cache, write_new_kv
from deepspec_jax.sampling import SamplingParams, probs as sampling_probs, sample as sampling_sample
from deepspec_jax.target import (NonFiniteLogitsError, Target, nonfinite_rows, pad_prompts,
                                 raise_if_nonfinite, round_up)
from deepspec_jax.tree import (compact_kv_cache, gather_path, path_slots, verify_tree,
                               verify_tree_greedy)
from deepspec_jax.tree.build import tree_size
from deepspec_jax.tree.verify import TREE_RULES as _TREE_RULES

# Private acceptance rules, only for tests that must show a wrong rule is detected
# (each is a plausible implementation slip; see ``verify`` and ``_planted_dists``).
_RULES = ("exact", "always_accept", "residual_no_subtract", "bonus_wrong_position",
          "draft_no_temperature", "target_no_temperature", "residual_unnormalised")
_MIN_DRAFT_PROB = 1e-8  # the reference clamps p_d(x) before dividing


@dataclasses.dataclass
class SpecResult:
    """One prompt's speculative generation.

    ``tokens``: new tokens, cut like ``Target.generate`` (up to and including the first
    stop token, at most max_new_tokens). ``accepted_lengths[r]``: accepted draft tokens
    + 1 in round r (the reference's acceptance length; a round ended by an accepted
    stop token records only the accepted drafts). ``proposal_lengths[r]``: draft tokens
    proposed (after confidence truncation, cut after an accepted stop token); in tree
    mode the depth of the tree (the longest path that could be accepted).
    ``confidences``: [rounds, width] confidence logits of every block position before
    truncation (DSpark drafts with a confidence head), else None.
    """

    tokens: list[int]
    accepted_lengths: list[int]
    proposal_lengths: list[int]
    confidences: np.ndarray | None
    num_rounds: int
    tree_nodes: list[int] | None = None   # tree mode: valid draft nodes verified per round

    @property
    def acceptance_length(self) -> float:
        """tau: mean accepted + 1 per round (nan without rounds)."""
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else float("nan")


# ---------------------------------------------------------------------------
# draft adapters: every family's decode interface (drafts.common.DraftFamily), looked
# up by the draft's kind (a static argument of the compiled loops)
# ---------------------------------------------------------------------------

def _proposal_width(kind: str, cfg) -> int:
    return family_for_kind(kind).width(cfg)


def _draft_init(kind, dmodel, batch, cache_len, prompt, prompt_len, first, feats):
    """Draft state after prefill: the prompt's target features are committed."""
    return family_for_kind(kind).init(dmodel, batch, cache_len, prompt, prompt_len, first, feats)


def _draft_propose(kind, dmodel, dstate, current, key, sp: SamplingParams):
    """(tokens [B,W], dists [B,W,V], confidence logits [B,W], state for commit)."""
    prop, st = family_for_kind(kind).propose(dmodel, dstate, current, key, sp)
    return prop.tokens, prop.dists, prop.confidence_logits, st


def _draft_commit(kind, dmodel, dstate, feats, committed, num_new):
    """Commit ``num_new[b]`` verified positions: target features of [current, accepted
    drafts] (``feats`` [B,W+1,F]) and ``committed`` (accepted drafts then the new
    current token)."""
    return family_for_kind(kind).commit(dmodel, dstate, feats, committed, num_new)


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------

def _prefill(target, draft, kind, prompt, prompt_len, cache_len, sp, layer_ids, key, max_new):
    """Prefill the target cache, sample the first token from the target alone, and
    start the draft's state from the prompt's features (shared by chain and tree loops).
    Also returns per row whether the first token's logits were non-finite."""
    b = prompt.shape[0]
    tcache = target_init_cache(target.cfg, b, cache_len, target.dtype)
    out, tcache = target.extend(tcache, prompt, prompt_len, layer_ids, fresh=True)
    last = target.logits_at(out, prompt_len - 1)
    first = sampling_sample(last, jax.random.fold_in(key, max_new + 1), sp)
    return tcache, first, _draft_init(kind, draft, b, cache_len, prompt, prompt_len, first,
                                      out.features), nonfinite_rows(last)


def _draw(dist: jax.Array, key: jax.Array, greedy: bool) -> jax.Array:
    """One token per row from a (possibly unnormalised) distribution [B,V]:
    ``categorical`` on its log normalises implicitly, so the residual needs no division."""
    if greedy:
        return jnp.argmax(dist, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, jnp.log(dist), axis=-1).astype(jnp.int32)


def _draw_inverse_cdf(dist: jax.Array, key: jax.Array) -> jax.Array:
    """Private (rule "residual_unnormalised"): the inverse-CDF draw of samplers that
    assume a normalised input (FlashInfer-style kernels): u ~ U[0,1) against the
    running sum; mass missing from an unnormalised input lands on the last token."""
    u = jax.random.uniform(key, dist.shape[:-1] + (1,))
    idx = jnp.sum(jnp.cumsum(dist, axis=-1) <= u, axis=-1)
    return jnp.minimum(idx, dist.shape[-1] - 1).astype(jnp.int32)


def _planted_dists(rule: str, p_t, target_logits, p_d, sp: SamplingParams):
    """Private: the distributions handed to ``verify`` under the wrong rules that drop
    the temperature -- the target's computed from the raw logits (T=1, same top-k/top-p)
    or the draft's ratio/residual taken at T=1 (p_d**T renormalised: softmax of the raw
    draft logits on the same support) while the drafts were sampled at T."""
    if rule == "target_no_temperature":
        p_t = sampling_probs(target_logits, dataclasses.replace(sp, temperature=1.0))
    elif rule == "draft_no_temperature":
        w = jnp.where(p_d > 0, jnp.exp(sp.temperature * jnp.log(jnp.maximum(p_d, 1e-30))), 0.0)
        p_d = w / jnp.sum(w, axis=-1, keepdims=True)
    return p_t, p_d


def _accepted_prefix(ok, drafts, stop_ids):
    """(accepted [B], stopped [B]) from the per-draft acceptance ``ok`` [B,W]: the
    accepted prefix, cut after its first stop token."""
    j = jnp.arange(drafts.shape[1], dtype=jnp.int32)[None]
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    hit = jnp.any(drafts[..., None] == stop_ids, axis=-1) & (j < accepted[:, None])
    stopped = jnp.any(hit, axis=1)
    return jnp.where(stopped, jnp.argmax(hit, axis=1) + 1, accepted), stopped


def verify_greedy(target_tokens, drafts, n_prop, stop_ids):
    """``verify`` at T=0 from the target's argmax tokens [B,W+1] alone: a draft is
    accepted while it equals the target's choice, and the next token is the target's
    choice after the accepted prefix. This is what ``verify`` computes on one-hot
    distributions (the ratio is 1 on a match, 0 otherwise; the residual of a rejection
    is the target's one-hot), without building [B,W+1,V] distributions."""
    w = drafts.shape[1]
    ok = (drafts == target_tokens[:, :w]) & (jnp.arange(w)[None] < n_prop[:, None])
    accepted, stopped = _accepted_prefix(ok, drafts, stop_ids)
    return accepted, target_tokens[jnp.arange(drafts.shape[0]), accepted], stopped


def verify(p_t, p_d, drafts, n_prop, stop_ids, key, greedy: bool, rule: str = "exact"):
    """Rejection sampling for one round, per row.

    p_t [B,W+1,V] target distributions at [current, d_1..d_W]; p_d [B,W,V] draft
    distributions; drafts [B,W]; n_prop [B] valid proposal lengths. Returns
    (accepted [B], next token [B], stopped-inside-drafts [B]). ``accepted`` is cut
    after the first accepted stop token, in which case no next token is committed.
    """
    b, w = drafts.shape
    k_acc, k_next = jax.random.split(key)
    j = jnp.arange(w, dtype=jnp.int32)[None]
    valid = j < n_prop[:, None]
    pt_x = jnp.take_along_axis(p_t[:, :w], drafts[..., None], axis=-1)[..., 0]
    pd_x = jnp.maximum(jnp.take_along_axis(p_d, drafts[..., None], axis=-1)[..., 0], _MIN_DRAFT_PROB)
    u = jax.random.uniform(k_acc, (b, w))
    ok = valid if rule == "always_accept" else (u < jnp.minimum(pt_x / pd_x, 1.0)) & valid
    accepted, stopped = _accepted_prefix(ok, drafts, stop_ids)
    rows = jnp.arange(b)
    # position of the rejection / bonus (the wrong rule takes the bonus from the last
    # draft's position, the distribution that verified d_W, instead of the one after it)
    pt_a = p_t[rows, jnp.minimum(accepted, w - 1) if rule == "bonus_wrong_position" else accepted]
    pd_a = p_d[rows, jnp.minimum(accepted, w - 1)]
    rejected = accepted < n_prop
    if rule == "residual_no_subtract":
        resid = pt_a
    else:
        resid = jnp.maximum(pt_a - pd_a, 0.0)
        resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, pt_a)
    dist = jnp.where(rejected[:, None], resid, pt_a)
    if rule == "residual_unnormalised" and not greedy:
        return accepted, _draw_inverse_cdf(dist, k_next), stopped
    return accepted, _draw(dist, k_next, greedy), stopped


# ---------------------------------------------------------------------------
# the compiled loop
# ---------------------------------------------------------------------------

def _isin(tokens, stop_ids):
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def loop_cache_len(prompt_width: int, max_new: int, depth: int, written: int,
                   bucket: int) -> int:
    """Cache length that no write of a decode loop can pass. Each round writes
    ``written`` positions at the row's position; an active row's position is below
    prompt + max_new, and a finished row keeps running (static shapes) at its final
    position, which its last round may have pushed ``depth`` (most drafts accepted)
    past that."""
    return round_up(prompt_width + max_new + depth + written, bucket)


def spec_cache_len(kind: str, cfg, prompt_width: int, max_new: int,
                   tree: tuple[int, int] | None, bucket: int) -> int:
    """The cache length ``speculative_generate`` allocates (``loop_cache_len`` of the
    chain, or of the ``tree=(topk, num_nodes)`` loop), for compiling its loops ahead."""
    if tree is None:
        width = _proposal_width(kind, cfg)
        return loop_cache_len(prompt_width, max_new, width, width + 1, bucket)
    depth = _tree_depth(kind, cfg)
    return loop_cache_len(prompt_width, max_new, depth, tree_size(*tree, depth) + 1, bucket)


def _commit_tokens(gen, active, pos, prompt_len, drafts, acc, nxt, stopped):
    """A round's committed tokens [B,W+1] (the ``acc`` accepted drafts, then the next
    token unless a stop token was accepted) and ``gen`` with them written at each active
    row's output offset (everything else is dropped)."""
    b = drafts.shape[0]
    j = jnp.arange(drafts.shape[1] + 1, dtype=jnp.int32)[None]
    committed = jnp.where(j < acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    write = active[:, None] & ((j < acc[:, None]) | ((j == acc[:, None]) & ~stopped[:, None]))
    g = jnp.where(write, (pos - prompt_len)[:, None] + 1 + j, gen.shape[1])  # out of range: dropped
    return committed, gen.at[jnp.arange(b)[:, None], g].set(committed, mode="drop")


def _first_nonfinite(bad_pos, acc, stopped, pos, prompt_len):
    """Output index of the first new token this round decided from non-finite target
    logits (-1: none). ``bad_pos`` [B,T]: per verify position along the committed path
    (current token, then accepted drafts) whether its logits are non-finite; the round
    used positions 0..acc (0..acc-1 when it stopped inside the drafts: no next token)."""
    used = jnp.arange(bad_pos.shape[1])[None] < jnp.where(stopped, acc, acc + 1)[:, None]
    bad = bad_pos & used
    return jnp.where(jnp.any(bad, axis=1),
                     pos - prompt_len + 1 + jnp.argmax(bad, axis=1).astype(jnp.int32), -1)


def _init_carry(prompt_len, first, tcache, dstate, stop_ids, prefill_bad, max_new, gen_width):
    """The loop carry both loops start from. ``bad_tok``/``bad_round``: per row the first
    new token decided from non-finite target logits and its round (-1: none / prefill);
    such a row is finished there and the host raises after the loop."""
    b = first.shape[0]
    return dict(i=jnp.int32(0), pos=prompt_len.astype(jnp.int32), cur=first, tcache=tcache,
                dstate=dstate, done=_isin(first, stop_ids) | (max_new <= 0) | prefill_bad,
                rounds=jnp.zeros((b,), jnp.int32),
                gen=jnp.full((b, gen_width), -1, jnp.int32).at[:, 0].set(first),
                acc=jnp.zeros((b, max_new), jnp.int32), prop=jnp.zeros((b, max_new), jnp.int32),
                bad_tok=jnp.where(prefill_bad, 0, -1).astype(jnp.int32),
                bad_round=jnp.full((b,), -1, jnp.int32))


def _next_carry(c, active, new_pos, limit, acc, nxt, stopped, stop_ids, prop_rec, max_new,
                bad_tok):
    """The loop-carry fields both loops update alike (position, current token, done,
    round counters, per-round accepted/proposed records, the non-finite flag from
    ``_first_nonfinite``) and the record index ``r`` (out of range for finished rows, so
    their writes are dropped)."""
    rows = jnp.arange(acc.shape[0])
    r = jnp.where(active, c["rounds"], max_new)
    bad = active & (bad_tok >= 0)
    done = c["done"] | (active & (stopped | _isin(nxt, stop_ids) | (new_pos >= limit) | bad))
    return dict(i=c["i"] + 1, pos=new_pos, cur=jnp.where(active & ~stopped, nxt, c["cur"]),
                done=done, rounds=c["rounds"] + active.astype(jnp.int32),
                acc=c["acc"].at[rows, r].set(jnp.where(stopped, acc, acc + 1), mode="drop"),
                prop=c["prop"].at[rows, r].set(prop_rec, mode="drop"),
                bad_tok=jnp.where(bad, bad_tok, c["bad_tok"]),
                bad_round=jnp.where(bad, c["rounds"], c["bad_round"])), r


POLICIES = ("fixed", "threshold", "scheduler", "production")


def verify_buckets(rows: int, width: int) -> tuple[int, ...]:
    """The packed verify sizes compiled for ``rows`` requests of up to ``width`` tokens
    (current + drafts): powers of two below rows x width, and rows x width itself. A
    round runs the smallest one that holds its tokens (at most 2x padding)."""
    full = rows * width
    return tuple(sorted({1 << k for k in range(full.bit_length()) if (1 << k) < full} | {full}))


def schedule_lengths(conf: jax.Array, active: jax.Array, sps: jax.Array,
                     ranked=None) -> jax.Array:
    """Algorithm 1 of the DSpark paper (SPEC §6): how many drafts [R] each request verifies.

    ``conf`` [R, W]: per-position acceptance probabilities (calibrated confidences);
    ``active`` [R]; ``sps`` [N]: target verify steps/s at B = 1..N verify tokens. Every
    active request verifies its anchor (B = R, expected accepted tokens tau = R); the
    candidates (r, j) are admitted in descending order of their prefix survival
    a_rj = prod_{i<=j} c_ri (ties: earlier position first, so each request's admitted
    candidates form a prefix), each adding 1 to B and a_rj to tau, while tau x SPS(B)
    improves; the first non-improvement stops the search. The stop keeps the decision
    non-anticipating: whether draft j is verified never depends on the draft at j or
    later (a_rj depends on drafts before j only), so rejection sampling stays lossless.
    B past the table's end is clamped to its last entry. ``ranked``: ``_ranked(conf,
    active)`` when the caller already has it."""
    a_sorted, order, n_act = _ranked(conf, active) if ranked is None else ranked
    table = lambda bsz: sps[jnp.clip(bsz - 1, 0, sps.shape[0] - 1)]   # noqa: E731
    k = jnp.arange(1, a_sorted.shape[0] + 1, dtype=jnp.int32)
    obj = (n_act + jnp.cumsum(a_sorted)) * table(n_act + k)
    prev = jnp.concatenate([(n_act * table(n_act))[None], obj[:-1]])
    admit_sorted = jnp.cumprod(((obj > prev) & (a_sorted >= 0)).astype(jnp.int32))
    return _admitted_lengths(admit_sorted, order, conf.shape)


def capacity_lengths(conf: jax.Array, active: jax.Array, capacity: jax.Array,
                     ranked=None) -> jax.Array:
    """The production variant's admission: a verify budget of ``capacity`` tokens (fixed
    before this round's drafts exist) is filled with the anchors, then the candidates
    of highest prefix survival (``schedule_lengths``' order; survival > 0 only). Whether
    draft j is admitted depends on earlier drafts and other requests only."""
    a_sorted, order, n_act = _ranked(conf, active) if ranked is None else ranked
    k = jnp.arange(a_sorted.shape[0], dtype=jnp.int32)
    admit_sorted = ((k < capacity - n_act) & (a_sorted > 0)).astype(jnp.int32)
    return _admitted_lengths(admit_sorted, order, conf.shape)


def _ranked(conf: jax.Array, active: jax.Array):
    """Candidates (r, j) by descending prefix survival (earlier position first on ties;
    finished requests' last, at -1): (survivals, flat indices, active count)."""
    r, w = conf.shape
    a = jnp.where(active[:, None], _survival(conf), -1.0).reshape(-1)
    j = jnp.tile(jnp.arange(w, dtype=jnp.int32), r)
    order = jnp.lexsort((j, -a))
    return a[order], order, jnp.sum(active.astype(jnp.int32))


def _survival(conf: jax.Array) -> jax.Array:
    """Prefix survival a_rj = prod_{i<=j} c_ri of confidences in [0, 1]."""
    return jnp.cumprod(jnp.clip(conf.astype(jnp.float32), 0.0, 1.0), axis=1)


def _admitted_lengths(admit_sorted: jax.Array, order: jax.Array, shape) -> jax.Array:
    """Per request, the length of the admitted prefix of its candidates."""
    admitted = jnp.zeros((shape[0] * shape[1],), jnp.int32).at[order].set(admit_sorted)
    return jnp.sum(jnp.cumprod(admitted.reshape(shape), axis=1), axis=1).astype(jnp.int32)


def _anticipating_lengths(conf: jax.Array, sps: jax.Array) -> jax.Array:
    """Private (tests only): a scheduler that is NOT lossless, the DSpark paper's
    appendix counterexample. Each row alone takes the prefix length l maximising
    (1 + sum_{j<=l} a_j) x SPS(1 + l) over the whole block (``sps``'s first W + 1
    entries), so whether draft j is verified depends on the confidences after it, which
    depend on draft j itself."""
    a = _survival(conf)
    tau = 1.0 + jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.cumsum(a, axis=1)], axis=1)
    return jnp.argmax(tau * sps[None, :a.shape[1] + 1], axis=1).astype(jnp.int32)


def verify_programs(rows: int, width: int) -> tuple[tuple[int, int], ...]:
    """The compiled packed-verify programs, (size, attention grid width) pairs: every
    size of ``verify_buckets`` with the full grid (capped at the size), and the size
    that holds one token per request with a grid one token wide: a round in which no
    request verifies a draft then attends like a plain decode step (and never costs
    more than one in which every request is active)."""
    buckets = verify_buckets(rows, width)
    return tuple(sorted({(s, min(width, s)) for s in buckets} | {(_holding(buckets, rows), 1)}))


def _holding(buckets: tuple[int, ...], n: int) -> int:
    """The smallest of ``buckets`` that holds ``n`` tokens."""
    return next(s for s in buckets if s >= n)


def _packed_verify(target, tcache, ids, counts, layer_ids):
    """``target.extend_packed`` of the ``counts[b]`` real tokens of each row, at the
    smallest compiled size that holds them, or with at most one token per row on the
    one-token grid (``verify_programs``; ``lax.switch``: one program, only the chosen
    branch runs).
    Returns (logits, features) in the [B, T] layout and the cache with the new entries
    written and lengths advanced."""
    b, t = ids.shape
    sizes, progs = verify_buckets(b, t), verify_programs(b, t)
    wide = jnp.asarray([progs.index((s, min(t, s))) for s in sizes], jnp.int32)
    size_idx = jnp.minimum(jnp.sum((jnp.sum(counts) > jnp.asarray(sizes)).astype(jnp.int32)),
                           len(sizes) - 1)
    idx = jnp.where(jnp.max(counts) <= 1, progs.index((_holding(sizes, b), 1)), wide[size_idx])

    # The branches only read the cache; its in-place update happens after the switch
    # (a cache written inside a branch is copied whole: ~5 ms per round per SmolLM2 row).
    def branch(size, grid):
        def run(cache):
            out, (ks, vs) = target.extend_packed(cache, ids, counts, size, layer_ids,
                                                 write=False, grid=grid)
            pad = lambda x, axis: jnp.pad(x, [(0, t - grid if a == axis else 0)  # noqa: E731
                                              for a in range(x.ndim)])
            return out.logits, out.features, ([pad(k, 3) for k in ks], [pad(v, 2) for v in vs])
        return run

    logits, feats, new_kv = jax.lax.switch(idx, [branch(*p) for p in verify_programs(b, t)],
                                           tcache)
    return logits, feats, write_new_kv(tcache, new_kv, counts, logits)


@functools.partial(jax.jit, static_argnums=(0, 2, 4, 9, 10, 11, 12, 13),
                   static_argnames=("policy",))
def _spec_generate(tgraphdef, tstate, dgraphdef, dstate, kind, prompt, prompt_len, stop_ids,
                   gate, max_new, cache_len, sp, layer_ids, rule, key, policy="fixed", sps=None):
    """``gate`` = (confidence threshold [], confidence-logit scale [width]: 1 / the STS
    temperatures, ones without a calibration). ``policy`` (static, ``POLICIES``): how
    many drafts each row verifies. "fixed" runs every row's whole block through the
    target (``extend``); "threshold" (the proposal cut at the confidence threshold) and
    "scheduler" (``schedule_lengths`` over ``sps`` [N], steps/s per verify batch size;
    "production": ``capacity_lengths`` under the budget it chose two rounds earlier)
    verify only the chosen tokens, packed (``_packed_verify``); finished rows cost
    nothing there."""
    threshold, conf_scale = gate
    target = nnx.merge(tgraphdef, tstate)
    draft = nnx.merge(dgraphdef, dstate)
    width = _proposal_width(kind, draft.cfg)
    has_conf = family_for_kind(kind).has_confidence(draft.cfg)
    b = prompt.shape[0]
    rows = jnp.arange(b)

    tcache, first, dstate, prefill_bad = _prefill(target, draft, kind, prompt, prompt_len,
                                                  cache_len, sp, layer_ids, key, max_new)
    carry = dict(_init_carry(prompt_len, first, tcache, dstate, stop_ids, prefill_bad, max_new,
                             max_new + width + 2),
                 conf=jnp.zeros((b, max_new, width), jnp.float32),
                 cap=jnp.full((2,), -1, jnp.int32))   # production: budgets ahead (-1: none yet)
    limit = prompt_len + max_new   # a row runs rounds while its current token's position < limit

    def cond(c):
        return (c["i"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        active = ~c["done"]
        pos, cur = c["pos"], c["cur"]
        k_draft, k_verify = jax.random.split(jax.random.fold_in(key, c["i"]))
        cap = c["cap"]
        drafts, p_d, conf, dstate = _draft_propose(kind, draft, c["dstate"], cur, k_draft, sp)
        n_prop = jnp.full((b,), width, jnp.int32)
        if has_conf:
            prob = jax.nn.sigmoid(conf * conf_scale[None])
            sure = (prob >= threshold).astype(jnp.int32)
            n_prop = jnp.where(threshold > 0, jnp.sum(jnp.cumprod(sure, axis=1), axis=1), n_prop)
            if policy == "scheduler":
                n_prop = schedule_lengths(prob, active, sps)
            elif policy == "production":
                # this round's Algorithm-1 budget (rounded up to its compiled size) is
                # used two rounds later; now, the budget chosen two rounds ago (the first
                # two rounds, without one: Algorithm 1's own choice)
                ranked = _ranked(prob, active)   # one sort for both admissions
                sched = schedule_lengths(prob, active, sps, ranked)
                n_prop = jnp.where(c["cap"][0] < 0, sched,
                                   capacity_lengths(prob, active, c["cap"][0], ranked))
                want = jnp.sum(jnp.where(active, sched + 1, 0))
                sizes = jnp.asarray(verify_buckets(b, width + 1), jnp.int32)
                cap = jnp.stack([c["cap"][1], sizes[jnp.argmax(sizes >= want)]])
            elif policy == "_anticipating":
                n_prop = _anticipating_lengths(prob, sps)

        # Verify [current, d_1..d_W] in one target pass (the padding past n_prop is
        # causal-invisible to the positions that decide the round); packed, only the
        # current token and the n_prop drafts of each active row.
        ids = jnp.concatenate([cur[:, None], drafts], axis=1)
        if policy == "fixed":
            vout, tcache = target.extend(c["tcache"], ids, jnp.full((b,), width + 1, jnp.int32),
                                         layer_ids)
            logits, feats = vout.logits, vout.features
        else:
            logits, feats, tcache = _packed_verify(target, c["tcache"], ids,
                                                   jnp.where(active, n_prop + 1, 0), layer_ids)
        if sp.greedy and rule == "exact":
            acc, nxt, stopped = verify_greedy(jnp.argmax(logits, axis=-1).astype(jnp.int32),
                                              drafts, n_prop, stop_ids)
        else:
            p_t = sampling_probs(logits, sp)
            p_t, p_d = _planted_dists(rule, p_t, logits, p_d, sp)
            acc, nxt, stopped = verify(p_t, p_d, drafts, n_prop, stop_ids, k_verify, sp.greedy,
                                       rule)

        # Commit: the target cache keeps [current, accepted drafts]; the rest rolls back.
        n_commit = jnp.where(active, jnp.where(stopped, acc, acc + 1), 0)
        new_pos = pos + n_commit
        tcache = tcache._replace(lengths=new_pos)
        committed, gen = _commit_tokens(c["gen"], active, pos, prompt_len, drafts, acc, nxt,
                                        stopped)
        dstate = _draft_commit(kind, draft, dstate, feats, committed,
                               jnp.where(active & ~stopped, acc + 1, 0))
        bad_tok = _first_nonfinite(nonfinite_rows(logits), acc, stopped, pos, prompt_len)
        nc, r = _next_carry(c, active, new_pos, limit, acc, nxt, stopped, stop_ids,
                            jnp.where(stopped, acc, n_prop), max_new, bad_tok)
        return dict(nc, tcache=tcache, dstate=dstate, gen=gen,
                    conf=c["conf"].at[rows, r].set(conf, mode="drop"), cap=cap)

    c = jax.lax.while_loop(cond, body, carry)
    n_out = c["pos"] - prompt_len + 1
    return (c["gen"], n_out, c["rounds"], c["acc"], c["prop"], c["conf"], c["bad_tok"],
            c["bad_round"])


# ---------------------------------------------------------------------------
# tree speculation (tree=(topk, num_nodes)); the chain loop above is untouched
# ---------------------------------------------------------------------------

def _tree_depth(kind: str, cfg) -> int:
    """Tree depth limit: the draft's trained horizon (DSpark block slots / Eagle3 TTT)."""
    return _proposal_width(kind, cfg)


def _draft_tree(kind, dmodel, dstate, current, key, sp, topk, num_nodes, gate):
    return family_for_kind(kind).tree(dmodel, dstate, current, key, sp, topk, num_nodes, *gate)


@functools.partial(jax.jit, static_argnums=(0, 2, 4, 9, 10, 11, 12, 13, 15, 16))
def _spec_generate_tree(tgraphdef, tstate, dgraphdef, dstate, kind, prompt, prompt_len, stop_ids,
                        gate, max_new, cache_len, sp, layer_ids, rule, key, topk, num_nodes):
    """``_spec_generate`` with a draft tree per round: build (``tree.build``), one target
    pass over the flattened tree (``CausalLM.extend_tree``), lossless tree verification
    (``tree.verify``), then the target cache is compacted to the accepted path and the
    draft is extended with the path's target features."""
    target = nnx.merge(tgraphdef, tstate)
    draft = nnx.merge(dgraphdef, dstate)
    depth_max = _tree_depth(kind, draft.cfg)
    b = prompt.shape[0]
    rows = jnp.arange(b)

    tcache, first, dstate, prefill_bad = _prefill(target, draft, kind, prompt, prompt_len,
                                                  cache_len, sp, layer_ids, key, max_new)
    carry = dict(_init_carry(prompt_len, first, tcache, dstate, stop_ids, prefill_bad, max_new,
                             max_new + depth_max + 2),
                 nodes=jnp.zeros((b, max_new), jnp.int32))
    limit = prompt_len + max_new

    def cond(c):
        return (c["i"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        active = ~c["done"]
        pos, cur = c["pos"], c["cur"]
        k_draft, k_verify = jax.random.split(jax.random.fold_in(key, c["i"]))
        tree = _draft_tree(kind, draft, c["dstate"], cur, k_draft, sp, topk, num_nodes, gate)

        # Verify: [current, nodes] at positions pos + depth, tree-masked attention.
        ids = jnp.concatenate([cur[:, None], tree.tokens], axis=1)
        depths = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), tree.depth], axis=1)
        parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), tree.parents + 1], axis=1)
        vout, tcache = target.extend_tree(c["tcache"], ids, depths, ancestor_bits(parents),
                                          layer_ids)
        if sp.greedy and rule == "exact":
            verdict = verify_tree_greedy(jnp.argmax(vout.logits, axis=-1).astype(jnp.int32),
                                         tree, stop_ids, topk=topk, max_depth=depth_max)
        else:
            verdict = verify_tree(sampling_probs(vout.logits, sp), tree, stop_ids, k_verify,
                                  greedy=sp.greedy, topk=topk, max_depth=depth_max, rule=rule)
        acc, nxt, stopped = verdict.accepted, verdict.next_token, verdict.stopped

        # Commit: keep [current, accepted path] contiguously in the target cache.
        n_commit = jnp.where(active, jnp.where(stopped, acc, acc + 1), 0)
        new_pos = pos + n_commit
        slots = path_slots(verdict.path)                                   # [B,D+1]
        tcache = compact_kv_cache(tcache._replace(lengths=pos), pos, slots, n_commit)
        committed, gen = _commit_tokens(c["gen"], active, pos, prompt_len, verdict.tokens, acc,
                                        nxt, stopped)
        dstate = _draft_commit(kind, draft, c["dstate"], gather_path(vout.features, slots),
                               committed, jnp.where(active & ~stopped, acc + 1, 0))

        valid = tree.valid
        depth_rec = jnp.max(jnp.where(valid, tree.depth, 0), axis=1)
        bad_tok = _first_nonfinite(gather_path(nonfinite_rows(vout.logits), slots), acc, stopped,
                                   pos, prompt_len)
        nc, r = _next_carry(c, active, new_pos, limit, acc, nxt, stopped, stop_ids,
                            jnp.where(stopped, acc, depth_rec), max_new, bad_tok)
        return dict(nc, tcache=tcache, dstate=dstate, gen=gen,
                    nodes=c["nodes"].at[rows, r].set(jnp.sum(valid, axis=1, dtype=jnp.int32),
                                                     mode="drop"))

    c = jax.lax.while_loop(cond, body, carry)
    n_out = c["pos"] - prompt_len + 1
    return (c["gen"], n_out, c["rounds"], c["acc"], c["prop"], c["nodes"], c["bad_tok"],
            c["bad_round"])


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def check_compatible(target: Target, draft: Any) -> tuple[int, ...]:
    """The one target/draft compatibility check (``speculative_generate`` and the eval
    CLI call it): ConfigError naming the mismatch when ``draft`` was not built for
    ``target``; returns the draft's feature layer ids."""
    cfg, tcfg = draft.config, target.config
    name = draft.source or "draft"
    family = family_for_kind(draft.kind, name)
    if cfg.vocab_size != tcfg.vocab_size:
        raise ConfigError(f"{name}: draft vocab_size {cfg.vocab_size} != target vocab_size "
                          f"{tcfg.vocab_size}; a draft only works with the target (tokenizer) "
                          "it was trained for.")
    if cfg.hidden_size != tcfg.hidden_size:
        raise ConfigError(f"{name}: draft hidden_size {cfg.hidden_size} != target hidden_size "
                          f"{tcfg.hidden_size}; the draft's fc reads target features of that "
                          "width, so it was trained for a different target.")
    n = tcfg.num_hidden_layers
    if cfg.num_target_layers != n:
        raise ConfigError(f"{name}: draft num_target_layers {cfg.num_target_layers} != the "
                          f"target's {n} decoder layers; the draft was trained for a different "
                          "target.")
    ids = tuple(int(i) for i in cfg.target_layer_ids)
    lowest = family.lowest_layer_id
    bad = [i for i in ids if not lowest <= i < n - 1]
    if bad:
        raise ConfigError(f"{name}: draft target_layer_ids {list(ids)} contain {bad}, out of "
                          f"range for a target with {n} decoder layers (allowed: {lowest}.."
                          f"{n - 2}; the last layer is never a feature); the draft was trained "
                          "for a different target.")
    return ids


def parse_tree(tree, vocab_size: int | None = None) -> tuple[int, int]:
    """``(topk, num_nodes)`` from a pair or a "topk,nodes" string; ValueError if invalid."""
    what = f"tree={tree!r}"
    if isinstance(tree, str):
        parts = [p.strip() for p in tree.split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{what}: expected 'topk,nodes', two positive integers such as "
                             "'4,16'.")
        tree = tuple(int(p) for p in parts)
    try:
        topk, num_nodes = (int(x) for x in tree)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (topk, num_nodes), e.g. (4, 16).") from None
    if topk < 1 or num_nodes < 1:
        raise ValueError(f"{what}: topk and num_nodes must be >= 1 (topk=1 is a chain).")
    if vocab_size is not None and topk > vocab_size:
        raise ValueError(f"{what}: topk {topk} exceeds the vocabulary ({vocab_size}).")
    return topk, num_nodes


def _confidence_scale(draft, temperatures: Sequence[float] | None) -> jax.Array:
    """[width] float32 multipliers of the confidence logits: 1 / the STS temperatures."""
    width = _proposal_width(draft.kind, draft.config)
    if temperatures is None:
        return jnp.ones((width,), jnp.float32)
    if not family_for_kind(draft.kind).has_confidence(draft.config):
        raise ValueError(f"confidence_temperatures given, but the {draft.kind} draft "
                         f"{draft.source} has no confidence head.")
    t = np.asarray(temperatures, np.float64).reshape(-1)
    if t.size != width or not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"confidence_temperatures must be {width} positive numbers (one per "
                         f"block position of {draft.source}), got {list(temperatures)}.")
    return jnp.asarray(1.0 / t, jnp.float32)


def _policy_table(policy: str, sps: Any, draft, tree, rows: int) -> jax.Array | None:
    """Checks ``policy``; for the scheduler, the steps/s table [rows x (width + 1)] it
    reads (``sps``: an ``SPSProfile`` or steps/s for B = 1, 2, ...)."""
    if policy not in POLICIES + ("_anticipating",):
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
    if policy == "fixed":
        return None
    if tree is not None:
        raise ValueError(f"policy={policy!r} verifies a chain; tree={tree} verifies every "
                         "node of its tree (use policy='fixed' with a tree).")
    if not family_for_kind(draft.kind).has_confidence(draft.config):
        raise ValueError(f"policy={policy!r} needs a draft with a confidence head; the "
                         f"{draft.kind} draft {draft.source} has none (use policy='fixed').")
    if policy == "threshold":
        return jnp.ones((1,), jnp.float32)   # unread; one pytree structure for the loop
    if sps is None:
        raise ValueError(f"policy={policy!r} needs sps: the target's verify cost profile "
                         "(deepspec_jax.sps.measure / `python -m deepspec_jax.sps`).")
    n = rows * (_proposal_width(draft.kind, draft.config) + 1)
    table = (sps.steps_per_second(n) if hasattr(sps, "steps_per_second")
             else np.asarray(sps, np.float64).reshape(-1))
    if table.size == 0 or not np.all(np.isfinite(table) & (table > 0)):
        raise ValueError(f"sps must be positive steps/s per verify batch size, got {table}.")
    table = np.concatenate([table[:n], np.full(max(n - table.size, 0), table[-1])])
    return jnp.asarray(table, jnp.float32)


def speculative_generate(target: Target, draft: Any, prompt_ids: Sequence[Sequence[int]],
                         max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                         confidence_threshold: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         stop_token_ids: Sequence[int] | None = None, prompt_bucket: int = 64,
                         cache_bucket: int = 256, tree: tuple[int, int] | None = None,
                         confidence_temperatures: Sequence[float] | None = None,
                         policy: str = "fixed", sps: Any = None,
                         _rule: str = "exact") -> list[SpecResult]:
    """Speculative decoding of a batch of prompts with ``draft`` (a ``load_draft`` result,
    or any object with ``config``, ``kind``, ``source``, ``graphdef``, ``state``) against
    ``target``.

    Same contract as ``Target.generate`` for the tokens (greedy output is identical;
    sampled output has the target's distribution), plus per-round statistics. Rows
    finish independently. ``confidence_threshold`` (DSpark with a confidence head)
    proposes only the prefix before the first position whose sigmoid(confidence) is
    below it (0 = off). ``tree=(topk, num_nodes)`` drafts a tree per round instead of
    a chain (EAGLE-2 style: top-k children of the best nodes, the best ``num_nodes``
    kept; depth up to the chain's width) and verifies it losslessly in one target
    pass (see ``deepspec_jax.tree``); ``None`` is the chain. At T=0 children are the
    draft's top-k tokens; at T>0 they are drawn from the draft without replacement
    (lossless multi-candidate rejection sampling needs sampled children). DSpark's
    confidence threshold then prunes branches. ``confidence_temperatures`` (one per
    block position; the STS calibration, ``deepspec_jax.calibrate``) divide the
    confidence logits before the threshold compares them; the recorded confidences stay
    raw. ``policy`` (chain only) says how many drafts the target verifies per row:
    "fixed" (the whole block, ``confidence_threshold`` only ends the acceptance early),
    "threshold" (only the drafts before the confidence threshold, packed: fewer tokens
    cost less) or "scheduler" (DSpark's hardware-aware prefix scheduler over the whole
    batch, ``schedule_lengths``; needs ``sps``, a ``deepspec_jax.sps.SPSProfile`` of the
    target on this machine, or steps/s for B = 1, 2, ... verify tokens) or "production"
    (its production variant: the verify budget comes from the scheduler's choice two
    rounds earlier, rounded up to a compiled size, and is filled by prefix survival,
    ``capacity_lengths``; in the first two rounds the scheduler decides). ``_rule`` is
    private: a deliberately wrong acceptance rule for tests.

    Raises ValueError when a prompt plus ``max_new_tokens`` exceeds the target's context
    (``Target.check_context``), and NonFiniteLogitsError (a FloatingPointError) naming
    the rows, token and round where the target's logits used to decide a token were
    NaN/inf (flagged per row inside the loop, raised after it).
    """
    sp = SamplingParams(float(temperature), int(top_k), float(top_p)).validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}.")
    rules = _RULES if tree is None else _TREE_RULES
    if _rule not in rules:
        raise ValueError(f"_rule must be one of {rules}, got {_rule!r}.")
    layer_ids = check_compatible(target, draft)
    conf_scale = _confidence_scale(draft, confidence_temperatures)
    sps_table = _policy_table(policy, sps, draft, tree, len(prompt_ids))
    prompt, lens = pad_prompts(prompt_ids, prompt_bucket)
    target._check_ids(prompt, "prompt_ids")
    target.check_context(lens, max_new_tokens)
    stop = target.resolve_stop_ids(stop_token_ids)
    args = (target.graphdef, target.state, draft.graphdef, draft.state, draft.kind,
            target._put(prompt), target._put(lens), jnp.asarray(stop),
            (jnp.float32(confidence_threshold), conf_scale), int(max_new_tokens))
    shape = None if tree is None else parse_tree(tree, draft.config.out_vocab_size)
    cache_len = spec_cache_len(draft.kind, draft.config, prompt.shape[1], max_new_tokens, shape,
                               cache_bucket)
    # Traced under the target's mesh: Pallas kernels (tree attention) run per device
    # inside shard_map on it (XLA cannot partition them).
    with jax.set_mesh(target.mesh):
        if shape is None:
            out = _spec_generate(*args, cache_len, sp, layer_ids, _rule, jax.random.key(seed),
                                 policy=policy, sps=sps_table)
        else:
            out = _spec_generate_tree(*args, cache_len, sp, layer_ids, _rule,
                                      jax.random.key(seed), *shape)
    gen, n_out, rounds, acc, prop, extra, bad_tok, bad_round = jax.device_get(out)
    conf, nodes = (extra, None) if shape is None else (None, extra)
    raise_if_nonfinite("speculative_generate" + ("" if tree is None else f"(tree={tree})"),
                       bad_tok, target, bad_round)
    has_conf = tree is None and family_for_kind(draft.kind).has_confidence(draft.config)
    stops = set(int(s) for s in stop)
    results = []
    for r in range(len(prompt_ids)):
        toks = [int(t) for t in gen[r, : min(int(n_out[r]), max_new_tokens)]]
        for i, t in enumerate(toks):
            if t in stops:
                toks = toks[: i + 1]
                break
        n = int(rounds[r])
        results.append(SpecResult(toks, [int(x) for x in acc[r, :n]], [int(x) for x in prop[r, :n]],
                                  np.asarray(conf[r, :n]) if has_conf else None, n,
                                  None if nodes is None else [int(x) for x in nodes[r, :n]]))
    return results


__all__ = ["SpecResult", "speculative_generate", "check_compatible", "verify", "parse_tree",
           "spec_cache_len", "NonFiniteLogitsError", "POLICIES", "schedule_lengths",
           "capacity_lengths", "verify_buckets", "verify_programs"]
