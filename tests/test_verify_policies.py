"""Verification policies (``speculative_generate(policy=...)``): how many drafts the
target verifies per request each round.

* T=0: every policy's output is token-identical to plain greedy decoding, on a ragged
  batch, with scheduler cost tables that admit everything, nothing, or some of it.
* ``schedule_lengths`` (DSpark's Algorithm 1) picks the brute-force optimum of
  tau x SPS(B) whenever that objective is unimodal along the admission order, admits
  prefixes only, and stops at the first non-improvement.
* Variable-length verification compiles once: new prompts, tables and thresholds reuse
  the program.
The T=1 distribution tests of every policy (and the detection of an anticipating
scheduler) are in tests/test_spec_decode_sampled.py.
"""

from __future__ import annotations

import ast
import functools
import itertools
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from deepspec_jax.drafts.registry import FAMILIES, KINDS
from deepspec_jax.spec_decode import (_spec_generate, capacity_lengths, schedule_lengths,
                                      speculative_generate, verify_buckets, verify_programs)
from test_spec_decode_lossless import _tiny_pair

VOCAB = 64
MAX_NEW = 20


@functools.lru_cache(maxsize=None)
def _pair():
    return _tiny_pair("dspark", vocab=VOCAB, confidence=300.0)


def _prompts(seed=0, lengths=(5, 9, 3)):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(0, VOCAB - 4, n)] for n in lengths]


DECAY = [1.0 / (1.0 + 0.1 * b) for b in range(12)]   # cost grows with B: partial admission


@pytest.mark.parametrize("policy,kw", [
    ("threshold", dict(confidence_threshold=0.5)),
    ("threshold", dict(confidence_threshold=0.0)),
    ("scheduler", dict(sps=DECAY)),
    ("scheduler", dict(sps=[1.0] * 12)),                 # verifying is free: all drafts
    ("scheduler", dict(sps=[1.0, 0.5, 0.34, 0.1])),      # B = 3 anchors only... then less
    ("production", dict(sps=DECAY)),
], ids=["threshold0.5", "threshold0", "scheduler-decay", "scheduler-free", "scheduler-steep",
        "production-decay"])
def test_greedy_identical_for_every_policy(policy, kw):
    target, draft = _pair()
    prompts = _prompts()
    want = target.generate(prompts, max_new_tokens=MAX_NEW)
    res = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, policy=policy, **kw)
    assert [r.tokens for r in res] == [list(w) for w in want]
    lengths = np.concatenate([r.proposal_lengths for r in res])
    if policy == "scheduler" and kw["sps"] == [1.0] * 12:
        # free verification admits every draft of positive survival (a stop token
        # accepted inside the drafts records a shorter round)
        assert np.mean(lengths == 3) > 0.8, lengths
    if kw.get("sps") == DECAY or kw.get("confidence_threshold") == 0.5:
        assert len(set(lengths.tolist())) >= 2, f"verified lengths do not vary: {lengths}"


def test_no_drafts_verified_is_plain_decoding():
    """A cost table under which no draft is worth verifying: every round verifies the
    anchor alone (l_r = 0): one token per round, the target's greedy output."""
    target, draft = _pair()
    prompts = _prompts(1)
    res = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, policy="scheduler",
                               sps=[1.0, 0.5, 1.0 / 3, 0.25, 0.2, 1 / 6] + [0.1] * 6)
    assert [r.tokens for r in res] == [list(w) for w in target.generate(prompts, max_new_tokens=MAX_NEW)]
    for r in res:
        assert set(r.proposal_lengths) == {0} and set(r.accepted_lengths) == {1}


def _objective(a, lengths, sps):
    r = a.shape[0]
    tau = r + sum(float(np.sum(a[i, :l])) for i, l in enumerate(lengths))
    b = r + int(sum(lengths))
    return tau * sps[min(b, len(sps)) - 1]


def test_scheduler_matches_brute_force_when_unimodal():
    rng = np.random.default_rng(0)
    checked = 0
    for case in range(300):
        r, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        conf = rng.uniform(0.05, 1.0, (r, w)).astype(np.float32)
        a = np.cumprod(conf.astype(np.float64), axis=1)
        cost = np.cumsum(rng.uniform(0.05, 1.0, r * w + 1)) + rng.uniform(0, 3)
        sps = (1.0 / cost).astype(np.float32)
        got = np.asarray(schedule_lengths(jnp.asarray(conf), jnp.ones((r,), bool), jnp.asarray(sps)))
        assert np.all((got >= 0) & (got <= w))
        # the objective along the admission order (descending a, earlier position first)
        order = sorted(((-a[i, j], j, i) for i in range(r) for j in range(w)))
        objs, lens = [_objective(a, [0] * r, sps)], [0] * r
        for _, j, i in order:
            lens[i] = j + 1
            objs.append(_objective(a, lens, sps))
        diffs = np.diff(objs)
        m = int(np.argmax(diffs <= 0)) if np.any(diffs <= 0) else len(diffs)
        # Algorithm 1 stops at the first non-improvement ...
        assert int(got.sum()) == m, (case, got, objs)
        # ... which is the optimum over all prefix choices when the path is unimodal.
        if np.all(diffs[m:] <= 0):
            best = max(_objective(a, ls, sps) for ls in itertools.product(range(w + 1), repeat=r))
            assert _objective(a, got, sps) == pytest.approx(best, rel=1e-5), (case, got)
            checked += 1
    assert checked >= 100


def test_scheduler_ignores_finished_requests():
    conf = jnp.asarray([[0.9, 0.9], [0.99, 0.99]], jnp.float32)
    sps = jnp.asarray([1.0, 1.0, 1.0, 1.0], jnp.float32)
    got = schedule_lengths(conf, jnp.asarray([True, False]), sps)
    np.testing.assert_array_equal(got, [2, 0])


def test_capacity_admission_fills_the_budget_by_survival():
    conf = jnp.asarray([[0.9, 0.5, 0.9], [0.8, 0.99, 0.0], [0.7, 0.7, 0.7]], jnp.float32)
    active = jnp.ones((3,), bool)
    # survivals: r0 .9 .45 .405 / r1 .8 .792 0 / r2 .7 .49 .343
    for cap, want in [(3, [0, 0, 0]), (4, [1, 0, 0]), (6, [1, 2, 0]), (8, [1, 2, 2]), (10, [3, 2, 2]),
                      (20, [3, 2, 3])]:      # survival 0 is never admitted
        got = capacity_lengths(conf, active, jnp.int32(cap))
        np.testing.assert_array_equal(got, want, err_msg=f"capacity {cap}")


def test_verify_buckets():
    assert verify_buckets(1, 5) == (1, 2, 4, 5)
    assert verify_buckets(4, 5) == (1, 2, 4, 8, 16, 20)
    assert verify_buckets(1, 1) == (1,)


def test_verify_programs():
    # every size with the full grid (capped at the size); the size that holds one token
    # per request also with a one-token grid
    assert verify_programs(1, 5) == ((1, 1), (2, 2), (4, 4), (5, 5))
    assert verify_programs(4, 5) == ((1, 1), (2, 2), (4, 1), (4, 4), (8, 5), (16, 5), (20, 5))
    assert verify_programs(3, 5) == ((1, 1), (2, 2), (4, 1), (4, 4), (8, 5), (15, 5))


def test_one_program_across_rounds_prompts_and_tables():
    target, draft = _pair()
    speculative_generate(target, draft, _prompts(2), max_new_tokens=MAX_NEW, policy="scheduler",
                         sps=DECAY)
    before = _spec_generate._cache_size()
    for seed, sps in [(3, [1.0] * 12), (4, DECAY[::-1]), (5, [0.5] * 12)]:
        speculative_generate(target, draft, _prompts(seed, (4, 2, 8)), max_new_tokens=MAX_NEW,
                             policy="scheduler", sps=sps)
    assert _spec_generate._cache_size() == before


def test_policy_errors():
    target, draft = _pair()
    with pytest.raises(ValueError, match="policy must be one of"):
        speculative_generate(target, draft, _prompts(), policy="greedy")
    with pytest.raises(ValueError, match="needs sps"):
        speculative_generate(target, draft, _prompts(), policy="scheduler")
    with pytest.raises(ValueError, match="verifies a chain"):
        speculative_generate(target, draft, _prompts(), policy="threshold", tree=(2, 4))
    plain_target, plain = _tiny_pair("eagle3", vocab=VOCAB)
    with pytest.raises(ValueError, match="confidence head"):
        speculative_generate(plain_target, plain, _prompts(), policy="threshold")


def test_decoding_engine_names_no_draft_kind():
    """Drafts plug into the engine through ``drafts.common.DraftFamily``'s decode
    interface (init / propose / commit / tree), which every family implements: the
    engine modules never branch on a kind or family name."""
    names = set(KINDS) | set(FAMILIES)
    engine = ["deepspec_jax/spec_decode.py", "deepspec_jax/sps.py", "deepspec_jax/simulate.py",
              "deepspec_jax/evaluation/runner.py"]
    engine += [os.path.join("deepspec_jax/tree", f)
               for f in sorted(os.listdir(os.path.join(REPO, "deepspec_jax/tree")))
               if f.endswith(".py")]
    for rel in engine:
        tree = ast.parse(open(os.path.join(REPO, rel)).read())
        found = sorted({n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and n.value in names})
        assert not found, f"{rel} names draft kinds {found}: go through the DraftFamily interface"
