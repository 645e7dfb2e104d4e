"""Tree speculative decoding end to end (``speculative_generate(..., tree=(k, n))``).

* T=0: token-identical to ``Target.generate`` for every draft kind, batch of 4 prompts
  of different lengths, stop tokens; ``tree=(1, width)`` reproduces the chain's rounds.
* Draft conditioning: every expanded node's draft distribution equals the chain
  drafter's distribution teacher-forced along that node's path (DSpark RNN head,
  Eagle3 draft layer), so children really are conditioned on their parents.
* T=1: the two-sample chi-square test of the chain engine passes with trees, and a
  deliberately wrong residual update fails it.
* No recompilation after warm-up.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_sets, gemma4_fixture_sets
from deepspec_jax import load_draft
from deepspec_jax.drafts import eagle3
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.spec_decode import _spec_generate_tree, parse_tree, speculative_generate
from test_spec_decode_lossless import (CHUNK, K_TOKENS, N_CHUNKS, PROMPT, _chi2_p, _counts,
                                       _prompts, _reference_samples, _target)

MAX_NEW = 24
LENGTHS = [5, 12, 23, 40]


def _fixture():
    return fixture_sets()[0]


def _check_rounds(res, n_nodes: int, width: int):
    for r in res:
        assert r.num_rounds == len(r.accepted_lengths) == len(r.proposal_lengths) > 0
        assert len(r.tree_nodes) == r.num_rounds and r.confidences is None
        assert all(1 <= a <= p + 1 for a, p in zip(r.accepted_lengths, r.proposal_lengths))
        assert all(1 <= p <= width for p in r.proposal_lengths)
        assert all(0 <= m <= n_nodes for m in r.tree_nodes)


def _gemma4_tree_cases():
    """Every draft kind on the Gemma-4 set (distilled drafts: trees that accept; prompts
    and outputs run past the target's sliding window), lean: one tree shape each."""
    return [pytest.param(fs, name, tree, id=f"{os.path.basename(fs)}-{name}")
            for fs in gemma4_fixture_sets()
            for name, tree in (("eagle3_distilled", (3, 10)), ("dspark_gated_distilled", (4, 24)),
                               ("dflash_distilled", (2, 7)))]


@pytest.mark.parametrize("fs,name,tree", [
    (None, "eagle3_distilled", (3, 10)),
    (None, "dspark_rnn_distilled", (3, 10)),
    pytest.param(None, "dflash_distilled", (2, 7), marks=pytest.mark.slow),
    pytest.param(None, "dspark_gated_distilled", (4, 24), marks=pytest.mark.slow),
    pytest.param(None, "dspark_vanilla", (2, 5), marks=pytest.mark.slow),
    pytest.param(None, "eagle3", (4, 6), marks=pytest.mark.slow),
] + _gemma4_tree_cases())
def test_tree_greedy_matches_target(fs, name, tree):
    """``fs`` None: the first fixture set (Qwen3 deepspec_v1)."""
    fs = fs or _fixture()
    target = _target(fs)
    draft = load_draft(os.path.join(fs, name))
    prompts = _prompts(target.config.vocab_size, LENGTHS, seed=5)
    ref = target.generate(prompts, max_new_tokens=MAX_NEW)
    res = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, tree=tree)
    assert [r.tokens for r in res] == ref
    width = draft.family.width(draft.config)
    _check_rounds(res, tree[1], width)
    if name.endswith("distilled"):
        assert any(a > 1 for r in res for a in r.accepted_lengths)
    # stop tokens end rows at different rounds (same compiled program)
    stop = [ref[1][6]]
    ref_stop = target.generate(prompts, max_new_tokens=MAX_NEW, stop_token_ids=stop)
    res = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, tree=tree,
                               stop_token_ids=stop)
    assert [r.tokens for r in res] == ref_stop != ref
    if draft.kind == "dspark" and draft.config.enable_confidence_head:
        # the confidence threshold prunes branches (same compiled program); at 1.0 every
        # node is pruned and each round is one plain target step
        for threshold in (0.5, 1.0):
            pruned = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW,
                                          tree=tree, confidence_threshold=threshold)
            assert [r.tokens for r in pruned] == ref
        assert all(set(r.tree_nodes) == {0} and set(r.accepted_lengths) == {1} for r in pruned)
        temps = np.resize([0.25, 4.0], draft.config.block_size)    # STS temperatures
        gated = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, tree=tree,
                                     confidence_threshold=0.7, confidence_temperatures=temps)
        assert [r.tokens for r in gated] == ref


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dspark_gated_distilled", "eagle3_distilled"])
def test_tree_topk1_is_the_chain(name):
    """k=1 with the chain's width: same tokens and the same per-round statistics."""
    fs = _fixture()
    target = _target(fs)
    draft = load_draft(os.path.join(fs, name))
    width = draft.family.width(draft.config)
    prompts = _prompts(target.config.vocab_size, LENGTHS, seed=5)
    chain = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW)
    tree = speculative_generate(target, draft, prompts, max_new_tokens=MAX_NEW, tree=(1, width))
    for c, t in zip(chain, tree):
        assert c.tokens == t.tokens
        assert c.accepted_lengths == t.accepted_lengths
        assert c.proposal_lengths == t.proposal_lengths
        assert set(t.tree_nodes) == {width}


def test_no_recompilation_after_warmup():
    fs = _fixture()
    target = _target(fs)
    draft = load_draft(os.path.join(fs, "eagle3_distilled"))
    vocab = target.config.vocab_size
    speculative_generate(target, draft, _prompts(vocab, LENGTHS, seed=5), max_new_tokens=MAX_NEW,
                         tree=(3, 10))
    before = _spec_generate_tree._cache_size()
    for seed, lens in enumerate([[3, 17, 30, 9], [60, 1, 2, 33]]):   # same prompt bucket
        res = speculative_generate(target, draft, _prompts(vocab, lens, seed + 11),
                                   max_new_tokens=MAX_NEW, tree=(3, 10), seed=seed,
                                   stop_token_ids=[seed])
        assert all(r.num_rounds > 0 for r in res)
    assert _spec_generate_tree._cache_size() == before


def test_parse_tree_errors():
    assert parse_tree("4,16") == (4, 16) and parse_tree((1, 3)) == (1, 3)
    for bad in ("4", "4,x", (0, 3), (2, 0), "1,2,3"):
        with pytest.raises(ValueError, match="tree="):
            parse_tree(bad)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        parse_tree((600, 5), vocab_size=512)


# ---------------------------------------------------------------------------
# draft conditioning: tree distributions = the chain drafter teacher-forced
# ---------------------------------------------------------------------------

def _expanded_paths(tree):
    """Every expanded node (and each row's root): (row, dist id, path tokens from the
    root's child down to the node), paths padded with 0 to the tree depth."""
    par, dist, toks = (np.asarray(x) for x in (tree.parents, tree.dist_id, tree.tokens))
    out = []
    for r in range(par.shape[0]):
        paths = {}
        out.append((r, 0, []))
        for i in range(par.shape[1]):
            paths[i] = (paths[par[r, i]] if par[r, i] >= 0 else []) + [i]
            if dist[r, i] >= 0:
                out.append((r, int(dist[r, i]), toks[r, paths[i]].tolist()))
    return out


def _check_dists(tree, entries, ref_logq, b):
    """ref_logq [len(entries), V]: reference children log-probs of each entry."""
    logq = np.asarray(tree.logq)
    got = np.stack([logq[r, e] for r, e, _ in entries])
    np.testing.assert_allclose(got, ref_logq, atol=1e-4)
    assert len(entries) > 2 * b and max(len(p) for _, _, p in entries) >= 2


def _padded(entries, width):
    paths = np.zeros((len(entries), width), np.int32)
    for n, (_, _, p) in enumerate(entries):
        paths[n, :len(p)] = p
    return (np.asarray([r for r, _, _ in entries]), paths,
            np.asarray([len(p) for _, _, p in entries]))


def test_dspark_tree_children_follow_the_markov_head():
    fs = _fixture()
    draft = load_draft(os.path.join(fs, "dspark_rnn_distilled"))
    model = nnx.merge(draft.graphdef, draft.state)
    cfg = model.cfg
    b, t, K = 2, 9, cfg.block_size
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(0, 1, (b, t, cfg.num_features)), jnp.float32)
    cur = jnp.asarray([17, 301], jnp.int32)

    @jax.jit
    def run(feats, cur):
        cache = model.extend_context(model.init_cache(b, 32), feats,
                                     jnp.asarray([9, 6], jnp.int32))
        tree = model.tree_propose(cache, cur, jax.random.key(0), SamplingParams(0.0), 2, 12)
        hidden = model.propose_hidden(cache, cur)
        return tree, hidden, model.logits(hidden)

    tree, hidden, base = run(feats, cur)
    entries = _expanded_paths(tree)
    rows, paths, lens = _padded(entries, K)

    @jax.jit
    def teacher_forced(hidden, base, prev, lens):
        """Children log-probs after [current, x_1..x_j]: the chain's Markov head run
        teacher-forced over the block (causal, so padding after slot j is harmless)."""
        u = model.markov_features(hidden, prev)                         # [P,K,r]
        logits = base + model.markov_bias(u)
        return jax.nn.log_softmax(jnp.take_along_axis(logits, lens[:, None, None], 1)[:, 0])

    prev = np.concatenate([np.asarray(cur)[rows][:, None], paths[:, :K - 1]], axis=1)
    ref = teacher_forced(hidden[rows], base[rows], jnp.asarray(prev), jnp.asarray(lens))
    _check_dists(tree, entries, np.asarray(ref), b)


def test_eagle3_tree_children_follow_the_draft_layer():
    fs = _fixture()
    draft = load_draft(os.path.join(fs, "eagle3_distilled"))
    model = nnx.merge(draft.graphdef, draft.state)
    cfg = model.cfg
    b, t, D = 2, 7, cfg.ttt_length
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(0, 1, (b, t, cfg.feature_size)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)

    @jax.jit
    def run(feats, toks):
        state = eagle3.init_state(cfg, b, 32)
        state = eagle3.extend(model, state, toks, feats, jnp.asarray([7, 4], jnp.int32))
        return eagle3.tree_propose(model, state, jax.random.key(0), SamplingParams(0.0), 3,
                                   10), state

    tree, state = run(feats, toks)
    entries = _expanded_paths(tree)
    rows, paths, lens = _padded(entries, D)

    @jax.jit
    def teacher_forced(st, paths, lens):
        """The chain proposer's steps with the path tokens forced; the log-probs after
        step len(path) (later padded steps cannot affect earlier positions)."""
        h, ck, cv = st.hidden, st.k, st.v
        outs = [jax.nn.log_softmax(model.logits(h))]
        for j in range(D - 1):
            cur = eagle3.Eagle3State(ck, cv, st.lengths, h)
            out, ck, cv = eagle3._cached_step(model, cur, paths[:, j:j + 1], h[:, None],
                                              st.lengths + j)
            h = out[:, 0]
            outs.append(jax.nn.log_softmax(model.logits(h)))
        return jnp.take_along_axis(jnp.stack(outs, 1), lens[:, None, None], 1)[:, 0]

    st = jax.tree.map(lambda x: x[rows], state)
    ref = teacher_forced(st, jnp.asarray(paths), jnp.asarray(lens))
    _check_dists(tree, entries, np.asarray(ref), b)


# ---------------------------------------------------------------------------
# T=1: distribution test (tiny vocabulary; helpers shared with the chain test)
# ---------------------------------------------------------------------------

def _tree_samples(kind: str, tree, rule: str):
    target, draft, ref = _reference_samples(kind)
    res = []
    for s in range(N_CHUNKS):
        res += speculative_generate(target, draft, [PROMPT] * CHUNK, max_new_tokens=K_TOKENS,
                                    temperature=1.0, seed=200 + s, prompt_bucket=8,
                                    cache_bucket=16, tree=tree, _rule=rule)
    return ref, np.asarray([r.tokens[:K_TOKENS] for r in res]), res


@pytest.mark.slow
@pytest.mark.parametrize("kind,tree", [("dspark", (3, 6)), ("eagle3", (2, 5))])
def test_tree_sampling_matches_target_distribution(kind, tree):
    ref, ours, res = _tree_samples(kind, tree, "exact")
    assert ours.shape == ref.shape == (CHUNK * N_CHUNKS, K_TOKENS)
    taus = np.concatenate([r.accepted_lengths for r in res])
    assert np.mean(taus > 1) > 0.05, "the test needs accepted draft tokens"
    assert np.mean(taus == 1) > 0.05, "the test needs rejected trees (residual draws)"
    for pos in range(K_TOKENS):
        p = _chi2_p(_counts(ref, pos), _counts(ours, pos))
        assert p > 0.01, (kind, pos, p)


@pytest.mark.slow
def test_tree_wrong_residual_is_detected():
    ref, ours, _ = _tree_samples("dspark", (3, 6), "residual_no_subtract")
    worst = min(_chi2_p(_counts(ref, pos), _counts(ours, pos)) for pos in range(K_TOKENS))
    assert worst < 0.01, worst
