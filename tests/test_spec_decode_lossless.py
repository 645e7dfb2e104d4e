"""Speculative decoding is lossless, against the target's own generation.

* T=0: token-identical to ``Target.generate`` for every fixture draft (DSpark,
  DFlash, Eagle3, random and distilled), batch 1 and a batch of 4 prompts of
  different lengths, with and without stop tokens, with a confidence threshold.
* Sampled decoding (T in {0.6, 1, 1.5}, top-k, top-p; joint distributions against
  the exact target distribution; subtle wrong rules): tests/test_spec_decode_sampled.py.
  This file keeps the tiny-vocabulary pair and the plain-sampling reference helpers
  that the tree tests (tests/test_tree_decode.py) use.
* No recompilation across repeated 256-token generations after warm-up.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from conftest import fixture_sets, gemma4_fixture_sets, load_manifest
from deepspec_jax import load_draft, load_target
from deepspec_jax.config import target_config_from_dict
from deepspec_jax.drafts import Draft
from deepspec_jax.drafts.registry import family_for
from deepspec_jax.errors import ConfigError
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.sharding import make_mesh
from deepspec_jax.spec_decode import _spec_generate, speculative_generate, verify, verify_greedy
from deepspec_jax.target import Target


def _draft_cases():
    out = []
    for fs in fixture_sets():
        drafts = load_manifest(fs)["global"].get("drafts", {})
        names = sorted(set(drafts) | {n + "_distilled" for n in drafts})
        for name in names:
            if os.path.isdir(os.path.join(fs, name)):
                out.append(pytest.param(fs, name, id=f"{os.path.basename(fs)}-{name}"))
    return out


@functools.lru_cache(maxsize=None)
def _target(fs: str) -> Target:
    return load_target(os.path.join(fs, load_manifest(fs)["global"]["target_dir"]))


def _prompts(vocab: int, lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 1, n).tolist() for n in lengths]


def _greedy_cases():
    """Every draft of the Qwen3 set; on a Gemma-4 set (CI time: one compile per kind)
    one draft per kind, the DSpark one with a confidence head (the Markov head types
    are each checked lossless by test_spec_decode_fixtures' recorded greedy outputs)."""
    gemma = set(gemma4_fixture_sets())
    return [c for c in _draft_cases() if c.values[0] not in gemma or c.values[1] in
            ("dspark_gated", "dspark_gated_distilled", "dflash_distilled", "eagle3_distilled")]


@pytest.mark.slow
@pytest.mark.parametrize("fs,name", _greedy_cases())
def test_greedy_matches_target(fs, name):
    target = _target(fs)
    draft = load_draft(os.path.join(fs, name))
    max_new = 40
    prompts = _prompts(target.config.vocab_size, [5, 12, 23, 40])
    ref = target.generate(prompts, max_new_tokens=max_new)
    ours = speculative_generate(target, draft, prompts, max_new_tokens=max_new)
    assert [r.tokens for r in ours] == ref
    for r in ours:  # every committed token is accounted for by the round statistics
        assert r.num_rounds == len(r.accepted_lengths) == len(r.proposal_lengths) > 0
        assert 1 + sum(r.accepted_lengths) >= max_new
        assert all(1 <= a <= p + 1 for a, p in zip(r.accepted_lengths, r.proposal_lengths))

    # Stop tokens taken from the greedy text: rows end at different rounds.
    stop = [ref[0][9], ref[2][20]]
    ref_stop = target.generate(prompts, max_new_tokens=max_new, stop_token_ids=stop)
    assert any(len(t) < max_new for t in ref_stop)
    ours_stop = speculative_generate(target, draft, prompts, max_new_tokens=max_new,
                                     stop_token_ids=stop)
    assert [r.tokens for r in ours_stop] == ref_stop

    if draft.kind == "dspark" and draft.config.enable_confidence_head:
        conf = speculative_generate(target, draft, prompts, max_new_tokens=max_new,
                                    confidence_threshold=0.5)
        assert [r.tokens for r in conf] == ref
        assert all(r.confidences.shape == (r.num_rounds, draft.config.block_size) for r in conf)
        # Truncation: exactly the leading positions with sigmoid(conf) >= 0.5 are proposed.
        for r in conf:
            sure = 1 / (1 + np.exp(-r.confidences)) >= 0.5
            assert r.proposal_lengths == np.cumprod(sure, axis=1).sum(axis=1).tolist()
        # STS temperatures (calibration.json) divide the logits before the threshold;
        # the recorded confidences stay raw. Same compiled program.
        temps = np.resize([0.25, 4.0], draft.config.block_size)
        gated = speculative_generate(target, draft, prompts, max_new_tokens=max_new,
                                     confidence_threshold=0.7, confidence_temperatures=temps)
        assert [r.tokens for r in gated] == ref
        differs = False
        for r in gated:
            sure = 1 / (1 + np.exp(-r.confidences / temps)) >= 0.7
            assert r.proposal_lengths == np.cumprod(sure, axis=1).sum(axis=1).tolist()
            raw = np.cumprod(1 / (1 + np.exp(-r.confidences)) >= 0.7, axis=1).sum(axis=1)
            differs |= raw.tolist() != r.proposal_lengths
        assert differs        # the temperatures changed some proposal
        with pytest.raises(ValueError, match="confidence_temperatures must be"):
            speculative_generate(target, draft, prompts, max_new_tokens=max_new,
                                 confidence_temperatures=temps[:-1])
    else:
        assert ours[0].confidences is None


def test_greedy_quick():
    """The fast (not slow) lossless check: one distilled draft, stop tokens included."""
    fs = fixture_sets()[0]
    target = _target(fs)
    draft = load_draft(os.path.join(fs, "dspark_gated_distilled"))
    prompts = _prompts(target.config.vocab_size, [4, 9, 15, 30], seed=5)
    ref = target.generate(prompts, max_new_tokens=24)
    stop = [ref[1][6]]
    ref_stop = target.generate(prompts, max_new_tokens=24, stop_token_ids=stop)
    res = speculative_generate(target, draft, prompts, max_new_tokens=24, stop_token_ids=stop)
    assert [r.tokens for r in res] == ref_stop and ref_stop != ref
    assert any(a > 1 for r in res for a in r.accepted_lengths)


def _batch1_cases():
    """Every draft of the Qwen3 set; on a Gemma-4 set (CI time) one draft per family:
    row independence is the decode loop's and the target's, not a Markov head's."""
    gemma = set(gemma4_fixture_sets())
    return [c for c in _draft_cases() if c.values[0] not in gemma
            or c.values[1] in ("dspark_gated_distilled", "eagle3_distilled")]


@pytest.mark.slow
@pytest.mark.parametrize("fs,name", _batch1_cases())
def test_greedy_batch1_matches_batch(fs, name):
    """Batch 1 (its own compiled shape) gives the same tokens and rounds as that
    prompt's row in a batch: rows are independent."""
    target = _target(fs)
    draft = load_draft(os.path.join(fs, name))
    prompts = _prompts(target.config.vocab_size, [5, 12, 23, 40])
    ref = target.generate(prompts[2:3], max_new_tokens=40)
    single = speculative_generate(target, draft, prompts[2:3], max_new_tokens=40)
    batch = speculative_generate(target, draft, prompts, max_new_tokens=40)
    assert single[0].tokens == ref[0] == batch[2].tokens
    assert single[0].accepted_lengths == batch[2].accepted_lengths


def test_greedy_verify_equals_rejection_sampling_on_one_hots():
    """The T=0 fast path (argmax tokens only) decides every round as ``verify`` does on
    the one-hot distributions T=0 sampling produces: all match / mismatch patterns of a
    4-token block over a 3-token vocabulary, every proposal length, stop tokens."""
    v, w = 3, 4
    rng = np.random.default_rng(0)
    drafts = jnp.asarray(rng.integers(0, v, (512, w)), jnp.int32)
    target = jnp.asarray(rng.integers(0, v, (512, w + 1)), jnp.int32)
    n_prop = jnp.asarray(rng.integers(0, w + 1, 512), jnp.int32)
    stop = jnp.asarray([2], jnp.int32)
    want = verify(jax.nn.one_hot(target, v), jax.nn.one_hot(drafts, v), drafts, n_prop, stop,
                  jax.random.key(0), True)
    got = verify_greedy(target, drafts, n_prop, stop)
    for name, a, b in zip(("accepted", "next", "stopped"), got, want):
        stopped = np.asarray(want[2])
        if name == "next":          # no next token is committed after an accepted stop
            a, b = np.asarray(a)[~stopped], np.asarray(b)[~stopped]
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert 0 < int(np.sum(want[2])) < 512 and len(set(np.asarray(want[0]).tolist())) == w + 1


def test_incompatible_draft_errors():
    fs = fixture_sets()[0]
    target = _target(fs)
    draft = load_draft(os.path.join(fs, "dspark_vanilla"))
    cfg = draft.config
    bad_vocab = Draft(_replace_layer(cfg, vocab_size=cfg.vocab_size + 1), draft.family,
                      draft.graphdef, draft.state, draft.mesh, draft.spec)
    with pytest.raises(ConfigError, match="vocab_size"):
        speculative_generate(target, bad_vocab, [[1, 2, 3]], max_new_tokens=4)
    bad_hidden = Draft(_replace_layer(cfg, hidden_size=cfg.hidden_size * 2), draft.family,
                       draft.graphdef, draft.state, draft.mesh, draft.spec)
    with pytest.raises(ConfigError, match="hidden_size"):
        speculative_generate(target, bad_hidden, [[1, 2, 3]], max_new_tokens=4)
    import dataclasses

    n = target.config.num_hidden_layers
    bad_ids = Draft(dataclasses.replace(cfg, target_layer_ids=(0, n + 3)), draft.family,
                    draft.graphdef, draft.state, draft.mesh, draft.spec)
    with pytest.raises(ConfigError, match="target_layer_ids"):
        speculative_generate(target, bad_ids, [[1, 2, 3]], max_new_tokens=4)


def _replace_layer(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, **kw))


# ---------------------------------------------------------------------------
# tiny-vocabulary pair and T=1 reference samples (used by tests/test_tree_decode.py)
# ---------------------------------------------------------------------------

VOCAB = 16
CHUNK = 8192          # rows per call (one compiled shape)
N_CHUNKS = 4          # 32768 samples per side
K_TOKENS = 3
MIN_CELL = 50         # cells rarer than this (pooled) are merged into one bin


def _tiny_pair(kind: str, vocab: int = VOCAB, target_scale: float = 40.0,
               draft_scale: float = 1.0, confidence: float = 0.0):
    """A random Qwen3 target (default vocab 16) with peaked distributions (lm_head x
    ``target_scale``: logits std ~4 at 40) and a random draft that shares its
    embeddings / lm_head (as DeepSpec's drafts do), the latter x ``draft_scale``.
    ``confidence`` > 0 (DSpark): a confidence head reading the Markov embedding of the
    previous token only, its weights x ``confidence`` (confidences that depend on the
    drafted tokens: what a non-anticipating scheduler must not look ahead at)."""
    raw = dict(model_type="qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=64,
               num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               rope_theta=10000.0, tie_word_embeddings=False)
    tcfg = target_config_from_dict(raw, "tiny")
    model = CausalLM(tcfg, rngs=nnx.Rngs(0))
    model.lm_head.set_value(model.lm_head.get_value() * target_scale)
    graphdef, state = nnx.split(model)
    target = Target(tcfg, graphdef, state, make_mesh())
    if kind == "dspark":
        draw = dict(raw, num_hidden_layers=1, block_size=3, num_target_layers=6,
                    target_layer_ids=[0, 2, 4], mask_token_id=vocab - 1, num_anchors=4,
                    markov_rank=4, markov_head_type="gated",
                    enable_confidence_head=confidence > 0,
                    confidence_head_with_markov=confidence > 0,
                    architectures=["Qwen3DSparkModel"])
    else:
        draw = dict(raw, num_hidden_layers=1, num_target_layers=6, target_layer_ids=[0, 1, 2, 3, 4],
                    ttt_length=3, architectures=["Qwen3Eagle3Model"])
    family = family_for(draw, "tiny draft")
    dcfg = family.config_from_dict(draw, "tiny draft")
    dmodel = family.build(dcfg, rngs=nnx.Rngs(1))
    dmodel.embed.set_value(model.embed.get_value())
    dmodel.lm_head.set_value(model.lm_head.get_value() * draft_scale)
    if confidence > 0:
        w = np.zeros((dcfg.conf_in, 1), np.float32)
        w[dcfg.hidden_size:, 0] = np.random.default_rng(7).standard_normal(dcfg.markov_rank)
        dmodel.conf_w.set_value(jnp.asarray(w * confidence, dmodel.conf_w.get_value().dtype))
    dgraph, dstate = nnx.split(dmodel)
    return target, Draft(dcfg, family, dgraph, dstate, target.mesh, None)


PROMPT = [3, 7, 1, 12, 5]


def _counts(seqs: np.ndarray, pos: int) -> np.ndarray:
    return np.bincount(seqs[:, pos], minlength=VOCAB)


def _chi2_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square homogeneity test on count vectors; rare cells pooled."""
    pooled = a + b
    keep = pooled >= MIN_CELL
    a2 = np.append(a[keep], a[~keep].sum())
    b2 = np.append(b[keep], b[~keep].sum())
    nz = (a2 + b2) > 0
    if nz.sum() < 2:
        return 1.0
    return float(stats.chi2_contingency(np.stack([a2[nz], b2[nz]]))[1])


@functools.lru_cache(maxsize=None)
def _reference_samples(kind: str):
    target, draft = _tiny_pair(kind)
    ref = [target.generate([PROMPT] * CHUNK, max_new_tokens=K_TOKENS, temperature=1.0, seed=s,
                           prompt_bucket=8, cache_bucket=16) for s in range(N_CHUNKS)]
    return target, draft, np.concatenate([np.asarray(r) for r in ref])


# ---------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_no_recompilation_after_warmup():
    fs = fixture_sets()[0]
    target = _target(fs)
    draft = load_draft(os.path.join(fs, "dspark_gated_distilled"))
    speculative_generate(target, draft, _prompts(target.config.vocab_size, [9]), max_new_tokens=256)
    before = _spec_generate._cache_size()
    for seed, n in enumerate([3, 17, 30]):  # other prompts, lengths in the same bucket
        res = speculative_generate(target, draft, _prompts(target.config.vocab_size, [n], seed + 1),
                                   max_new_tokens=256, stop_token_ids=[seed])
        assert res[0].num_rounds > 0
    res = speculative_generate(target, draft, _prompts(target.config.vocab_size, [20], 9),
                               max_new_tokens=256, confidence_threshold=0.3)
    assert _spec_generate._cache_size() == before
