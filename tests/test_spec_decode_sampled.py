"""Sampled speculative decoding (chain) has exactly the target's JOINT distribution.

Engine level (``speculative_generate``): a tiny random target (vocab 8) and a random
draft that disagrees with it; ``ROWS`` rows with one prompt in one batched call. A row's
6 new tokens are y1 (prefill, target alone), y2..y4 (round 1's three draft positions),
y5 (round 1's bonus when all three drafts are accepted, else a round-2 token) and y6
(a later round). Round 1 ends at every possible place in a sizeable share of rows
(checked), so every draft position's acceptance and residual and the bonus are observed.

The reference is EXACT, not a second sample: the target's joint over (y1..y6),
enumerated over all 8^5 prefixes in one target forward, with an independent numpy
implementation of temperature / top-k / top-p (``_ref_probs``). One-sample chi-square
goodness-of-fit (cells with expected count < 5 pooled) of all 6 marginals, the 5
adjacent pairs and the triples (y2,y3,y4) and (y4,y5,y6); plus independence of the rows
(agreement of disjoint row pairs, per position and over the whole sequence, against the
exact collision probabilities) and zero counts outside the top-k/top-p support. The
family (``N_TESTS`` tests) is Bonferroni-corrected at family-wise ``ALPHA`` = 1e-4, so
the correct rule's false-alarm rate per setting is <= 1e-4 (seeds are fixed).

Planted wrong rules (``spec_decode._RULES``) must be rejected at the same threshold,
and with margin: the power at ``RULE_ROWS``, from the observed chi-square
noncentrality of the deciding test, must be >= 0.99 (``_power``). The measured
deviations and the rows each rule needs for power 0.99 are listed above
``RULE_CASES``: the bonus rule is caught by the (y4, y5) pair at ~4k rows but would
need ~150k rows from the y5 marginal alone, which is why joints are tested.

The same family also runs on sampled trees (``tree=``) under temperature / top-k /
top-p: chain and tree draw from one draft distribution (``sampling.log_probs``,
checked directly by ``test_chain_and_tree_share_the_draft_distribution``).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from deepspec_jax.sampling import SamplingParams
from deepspec_jax.spec_decode import _draft_propose, _draft_tree, _prefill, speculative_generate
from test_spec_decode_lossless import _tiny_pair

VOCAB = 8
PROMPT = [3, 7, 1, 2, 5]
N_TOK = 6                 # y1 .. y6
WIDTH = 3                 # draft positions per round (DSpark block_size / Eagle3 ttt_length)
ROWS = 16384
ALPHA = 1e-4              # family-wise
PAIRS = [(t, t + 1) for t in range(N_TOK - 1)]
TRIPLES = [(1, 2, 3), (3, 4, 5)]   # round-1 drafts; last draft + bonus + later round
N_TESTS = N_TOK + len(PAIRS) + len(TRIPLES) + N_TOK + 1   # GOF + row-agreement tests
MIN_EXPECTED = 5.0
TARGET_SCALE, DRAFT_SCALE = 8.0, 0.5    # target logits std ~0.8, draft flatter: see _check_coverage
CONFIDENCE = 300.0        # confidence-head weight scale of the policy tests' draft


@functools.lru_cache(maxsize=None)
def _pair(kind: str):
    return _tiny_pair(kind, VOCAB, TARGET_SCALE, DRAFT_SCALE)


# ---------------------------------------------------------------------------
# exact reference
# ---------------------------------------------------------------------------

def _ref_probs(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Sampling distribution [..., V] in float64, by sorting (independent of the
    bisection in ``sampling.processed_logits``): temperature, then top-k (keep logits
    >= the k-th largest), then top-p (keep a token iff the mass strictly above it in
    the sorted distribution is < top_p)."""
    x = logits.astype(np.float64) / sp.temperature
    if 0 < sp.top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[..., -sp.top_k][..., None]
        x = np.where(x >= kth, x, -np.inf)
    if sp.top_p < 1.0:
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1, kind="stable")
        ps = np.take_along_axis(p, order, axis=-1)
        above = np.cumsum(ps, axis=-1) - ps
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, order, above < sp.top_p, axis=-1)
        x = np.where(keep, x, -np.inf)
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _prefix_logits(kind: str) -> tuple[np.ndarray, ...]:
    """Target logits after PROMPT + every prefix of length 0..N_TOK-1 (one forward:
    all prefixes right-padded to one length; causal attention ignores the padding)."""
    target, _ = _pair(kind)
    prefixes = [p for n in range(N_TOK) for p in itertools.product(range(VOCAB), repeat=n)]
    s = len(PROMPT) + N_TOK - 1
    ids = np.zeros((len(prefixes), s), np.int32)
    for i, p in enumerate(prefixes):
        ids[i, : len(PROMPT) + len(p)] = PROMPT + list(p)
    logits = np.asarray(target.forward(ids).logits)
    out, i = [], 0
    for n in range(N_TOK):
        m = VOCAB ** n
        out.append(logits[i:i + m, len(PROMPT) + n - 1])
        i += m
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _exact_joint(kind: str, sp: SamplingParams) -> np.ndarray:
    """P(y1..y6) as an array of shape (VOCAB,)*N_TOK."""
    joint = np.ones(())
    for n, lg in enumerate(_prefix_logits(kind)):
        joint = joint[..., None] * _ref_probs(lg, sp).reshape((VOCAB,) * n + (VOCAB,))
    assert abs(joint.sum() - 1) < 1e-9
    return joint


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def _gof(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float, int]:
    """(p-value, statistic, df) of a one-sample chi-square test against exact cell
    probabilities; cells with expected count < MIN_EXPECTED are pooled (the pool joins
    the smallest kept cell if it is itself too small). A count in a cell of probability
    0 gives p = 0."""
    counts, probs = counts.ravel().astype(np.float64), probs.ravel()
    n = counts.sum()
    if np.any(counts[probs <= 0] > 0):
        return 0.0, np.inf, 0
    e = n * probs
    keep = e >= MIN_EXPECTED
    o2, e2 = list(counts[keep]), list(e[keep])
    rest_o, rest_e = counts[~keep].sum(), e[~keep].sum()
    if rest_e >= MIN_EXPECTED:
        o2.append(rest_o)
        e2.append(rest_e)
    elif rest_e > 0:
        j = int(np.argmin(e2))
        o2[j] += rest_o
        e2[j] += rest_e
    o2, e2 = np.asarray(o2), np.asarray(e2)
    df = len(o2) - 1
    if df < 1:
        return 1.0, 0.0, 0
    stat = float(np.sum((o2 - e2) ** 2 / e2))
    return float(stats.chi2.sf(stat, df)), stat, df


def _tests(seqs: np.ndarray, joint: np.ndarray) -> dict[str, tuple[float, float, int]]:
    """Every test of the family: name -> (p, statistic, df)."""
    n = len(seqs)
    out = {}
    axes = tuple(range(N_TOK))
    for cols in [(t,) for t in range(N_TOK)] + PAIRS + TRIPLES:
        probs = joint.sum(axis=tuple(a for a in axes if a not in cols))
        flat = np.ravel_multi_index(tuple(seqs[:, c] for c in cols), (VOCAB,) * len(cols))
        counts = np.bincount(flat, minlength=VOCAB ** len(cols))
        out["y" + "".join(str(c + 1) for c in cols)] = _gof(counts, probs)
    # Rows are independent: disjoint row pairs agree as often as two independent draws.
    a, b = seqs[0:n - 1:2], seqs[1:n:2]
    for t in range(N_TOK):
        marg = joint.sum(axis=tuple(x for x in axes if x != t))
        hits = int(np.sum(a[:, t] == b[:, t]))
        out[f"agree_y{t + 1}"] = (stats.binomtest(hits, len(a), float(np.sum(marg ** 2))).pvalue,
                                  float(hits), 1)
    hits = int(np.sum(np.all(a == b, axis=1)))
    out["agree_all"] = (stats.binomtest(hits, len(a), float(np.sum(joint ** 2))).pvalue,
                        float(hits), 1)
    assert len(out) == N_TESTS
    return out


def _power(stat: float, df: int, n_rows: int, n_used: int) -> float:
    """Power at ``n_rows`` of a chi-square test with ``df`` degrees of freedom at the
    Bonferroni threshold, for the deviation observed (``stat`` at ``n_used`` rows):
    noncentrality lambda = (stat - df) * n_rows / n_used."""
    lam = max(stat - df, 0.0) * n_rows / n_used
    crit = stats.chi2.isf(ALPHA / N_TESTS, df)
    return float(stats.ncx2.sf(crit, df, lam)) if lam > 0 else ALPHA / N_TESTS


def _rows_for_power(stat: float, df: int, n_used: int, power: float = 0.99) -> int:
    """Smallest row count whose power (``_power``) reaches ``power``."""
    lo, hi = 1, 1 << 40
    if _power(stat, df, hi, n_used) < power:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _power(stat, df, mid, n_used) < power else (lo, mid)
    return lo


# ---------------------------------------------------------------------------
# engine samples
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _confident_pair():
    """The dspark pair's target (the same weights: the same exact joint) with a draft
    whose confidence head reads the previous token (sigmoid spread ~0.04..1)."""
    return _tiny_pair("dspark", VOCAB, TARGET_SCALE, DRAFT_SCALE, confidence=CONFIDENCE)


def _sample(kind: str, sp: SamplingParams, rule: str = "exact", rows: int = ROWS, seed: int = 1,
            tree=None, policy: str = "fixed", **policy_kw):
    target, draft = _pair(kind) if policy == "fixed" else _confident_pair()
    res = speculative_generate(target, draft, [PROMPT] * rows, max_new_tokens=N_TOK,
                               temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                               seed=seed, prompt_bucket=8, cache_bucket=16, tree=tree,
                               _rule=rule, policy=policy, **policy_kw)
    if policy != "fixed":
        return (np.asarray([r.tokens for r in res]),
                np.concatenate([r.proposal_lengths for r in res]))
    seqs = np.asarray([r.tokens for r in res])
    assert seqs.shape == (rows, N_TOK)
    return seqs, np.asarray([r.accepted_lengths[0] for r in res])


def _check_coverage(first_round: np.ndarray):
    """Round 1 ends at each of its possible places (rejection at draft 1, 2, 3, or all
    accepted + bonus) in >= 3% of rows: every draft position and the bonus are tested."""
    share = np.bincount(first_round, minlength=WIDTH + 2)[1:] / len(first_round)
    assert share.min() >= 0.03, f"first-round accepted-length shares {share.round(3)}"


# Every temperature and both filters, on both draft families (all in CI).
SETTINGS = [
    pytest.param("dspark", SamplingParams(0.6), id="dspark-T0.6"),
    pytest.param("dspark", SamplingParams(1.0, top_k=3), id="dspark-T1-topk3"),
    pytest.param("dspark", SamplingParams(1.5, top_p=0.7), id="dspark-T1.5-topp0.7"),
    pytest.param("eagle3", SamplingParams(0.6, top_k=5, top_p=0.9), id="eagle3-T0.6-topk5-topp0.9"),
    pytest.param("dspark", SamplingParams(1.0), id="dspark-T1"),
    pytest.param("dspark", SamplingParams(1.5), id="dspark-T1.5"),
    pytest.param("eagle3", SamplingParams(1.0), id="eagle3-T1"),
    pytest.param("eagle3", SamplingParams(1.5, top_p=0.7), id="eagle3-T1.5-topp0.7"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,sp", SETTINGS)
def test_chain_sampling_has_target_joint_distribution(kind, sp):
    _assert_target_joint(kind, sp, *_sample(kind, sp))


def _assert_target_joint(kind, sp, seqs, first_round=None):
    """No test of the family rejects (Bonferroni); round 1 is fully exercised."""
    if first_round is not None:
        _check_coverage(first_round)
    res = _tests(seqs, _exact_joint(kind, sp))
    bad = {k: v for k, v in res.items() if v[0] < ALPHA / N_TESTS}
    assert not bad, f"{kind} {sp}: tests below {ALPHA}/{N_TESTS}: {bad}"


TREE_SETTINGS = [
    pytest.param("dspark", SamplingParams(0.6, top_k=5, top_p=0.9), (2, 4),
                 id="dspark-T0.6-topk5-topp0.9-tree2,4"),
    pytest.param("eagle3", SamplingParams(1.5, top_k=3), (3, 6), id="eagle3-T1.5-topk3-tree3,6"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,sp,tree", TREE_SETTINGS)
def test_tree_sampling_has_target_joint_distribution(kind, sp, tree):
    """The same family for sampled trees: children drawn from the draft distribution
    under temperature / top-k / top-p, multi-candidate verification."""
    _assert_target_joint(kind, sp, *_sample(kind, sp, seed=2, tree=tree))


@pytest.mark.slow
def test_reference_matches_plain_target_sampling():
    """The exact reference is the distribution ``Target.generate`` samples from."""
    sp = SamplingParams(1.5, top_p=0.7)
    target, _ = _pair("dspark")
    seqs = np.asarray(target.generate([PROMPT] * ROWS, max_new_tokens=N_TOK, temperature=1.5,
                                      top_p=0.7, seed=3, prompt_bucket=8, cache_bucket=16))
    _assert_target_joint("dspark", sp, seqs)


# Wrong rules, at T=0.6 (the temperature rules need T != 1). Deviation measured on a
# 32768-row run (deciding test, noncentrality per row w2, rows for power 0.99 at
# ALPHA/N_TESTS):
#   bonus_wrong_position   pair (y4,y5) w2=0.026 -> 4.2k rows  (marginal y5 alone: w2=4e-4
#                          -> 150k rows: the joint test is what catches it)
#   draft_no_temperature   pair (y3,y4) w2=0.12  -> 0.9k rows
#   target_no_temperature  marginal y2  w2=0.15  -> 0.4k rows
#   residual_unnormalised  marginal y2  w2=3.4   -> 19 rows
#   residual_no_subtract   marginal y2  w2=0.10  -> 0.7k rows
#   always_accept          (gross)
RULE_ROWS = 8192   # ~2x the hardest rule's need; the test also asserts power >= 0.99 here
RULE_CASES = [
    pytest.param("bonus_wrong_position", id="bonus_wrong_position"),
    pytest.param("draft_no_temperature", id="draft_no_temperature"),
    pytest.param("target_no_temperature", id="target_no_temperature"),
    pytest.param("residual_unnormalised", id="residual_unnormalised"),
    pytest.param("residual_no_subtract", id="residual_no_subtract"),
    pytest.param("always_accept", id="always_accept"),
]


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULE_CASES)
def test_wrong_rule_is_rejected(rule):
    sp = SamplingParams(0.6)
    seqs, _ = _sample("dspark", sp, rule, rows=RULE_ROWS)
    res = _tests(seqs, _exact_joint("dspark", sp))
    gof = {k: v for k, v in res.items() if not k.startswith("agree")}
    name, (p, stat, df) = min(gof.items(), key=lambda kv: kv[1][0])
    assert p < ALPHA / N_TESTS, f"{rule}: not rejected (best {name}: p={p:.3g})"
    power = _power(stat, df, len(seqs), len(seqs))
    assert power >= 0.99, (f"{rule}: {name} rejects, but the deviation gives power {power:.3f} "
                           f"< 0.99 at {len(seqs)} rows (needs "
                           f"{_rows_for_power(stat, df, len(seqs))}): raise RULE_ROWS")


# ---------------------------------------------------------------------------
# one draft distribution for chain and tree
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 2, 4, 5))
def _root_dists(tgraph, tstate, dgraph, dstate, kind, sp, prompt, key):
    """(chain's first draft distribution, tree's root distribution, chain tokens) after
    prefilling ``prompt``: both are the draft's distribution of the first token."""
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    b = prompt.shape[0]
    lens = jnp.full((b,), prompt.shape[1], jnp.int32)
    layer_ids = tuple(int(i) for i in draft.cfg.target_layer_ids)
    _, first, ds, _ = _prefill(target, draft, kind, prompt, lens, 16, sp, layer_ids, key, 4)
    toks, p_d, _, _ = _draft_propose(kind, draft, ds, first, key, sp)
    tree = _draft_tree(kind, draft, ds, first, key, sp, 2, 4, (jnp.float32(0), None))
    return p_d[:, 0], jnp.exp(tree.logq[:, 0]), toks[:, 0]


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_chain_and_tree_share_the_draft_distribution(kind):
    """The chain's p_d (what the acceptance ratio divides by) and the tree's q (what its
    children are drawn from) are one function of the draft logits under temperature,
    top-k and top-p (``sampling.log_probs``); and the chain's tokens lie in it."""
    target, draft = _pair(kind)
    sp = SamplingParams(0.6, top_k=4, top_p=0.8)
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (64, 5)), jnp.int32)
    chain, tree, toks = jax.device_get(_root_dists(
        target.graphdef, target.state, draft.graphdef, draft.state, kind, sp, prompts,
        jax.random.key(0)))
    assert (chain == 0).sum(axis=1).min() >= VOCAB - 4, "top-k must cut the draft's support"
    np.testing.assert_allclose(chain, tree, atol=1e-6)
    assert np.all(chain[np.arange(len(toks)), toks] > 0)


# ---------------------------------------------------------------------------
# verification policies: each row verifies a variable number of drafts
# ---------------------------------------------------------------------------

POLICY_CASES = [
    pytest.param("threshold", dict(confidence_threshold=0.5), id="threshold0.5"),
    # steps/s 1 / (R + B/2) at B verify tokens over the batch of R rows: admits
    # candidates down to a prefix survival of ~0.5
    pytest.param("scheduler", dict(sps=[1.0 / (ROWS + 0.5 * b) for b in range(1, ROWS * (WIDTH + 1) + 1)]),
                 id="scheduler"),
    pytest.param("production", dict(sps=[1.0 / (ROWS + 0.5 * b) for b in range(1, ROWS * (WIDTH + 1) + 1)]),
                 id="production"),
]


@pytest.mark.slow
@pytest.mark.parametrize("policy,kw", POLICY_CASES)
def test_policy_sampling_has_target_joint_distribution(policy, kw):
    """Variable-length verification keeps the target's joint distribution: the number
    of drafts verified (each of 0..WIDTH in >= 5% of rounds) is decided from confidences
    that depend on earlier drafts only."""
    sp = SamplingParams(1.0)
    seqs, verified = _sample("dspark", sp, rows=ROWS, seed=4, policy=policy, **kw)
    share = np.bincount(verified, minlength=WIDTH + 1) / len(verified)
    assert share.min() >= 0.05, f"verified-length shares {share.round(3)}"
    _assert_target_joint("dspark", sp, seqs)


@pytest.mark.slow
def test_anticipating_scheduler_is_rejected():
    """The DSpark paper's counterexample: a scheduler that picks a request's length
    after looking at the confidences of later drafts (``_anticipating``: the best
    prefix of the whole block under a staircase cost) verifies draft 1 mostly when draft
    2's confidence -- a function of draft 1 -- is high, which biases draft 1's
    acceptance. Measured: (y1, y2) pair, needs ~2.6k rows for power 0.99."""
    sp = SamplingParams(1.0)
    seqs, verified = _sample("dspark", sp, rows=RULE_ROWS, seed=4, policy="_anticipating",
                             sps=[1.0, 0.4, 0.55, 0.55])
    assert set(np.unique(verified)) == {0, WIDTH}
    res = _tests(seqs, _exact_joint("dspark", sp))
    gof = {k: v for k, v in res.items() if not k.startswith("agree")}
    name, (p, stat, df) = min(gof.items(), key=lambda kv: kv[1][0])
    assert p < ALPHA / N_TESTS, f"anticipating scheduler not rejected (best {name}: p={p:.3g})"
    assert _power(stat, df, len(seqs), len(seqs)) >= 0.99
