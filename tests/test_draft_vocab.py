"""Reduced draft vocabulary (``deepspec_jax.draft_vocab``): selection as vLLM's
speculators does it, lossless decoding (T=0 identity, T=1 joint distribution), the
training losses' convention, and bit-exact JAX-dir round trips."""

from __future__ import annotations

import ast
import collections
import functools
import importlib.util
import itertools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_sets
from deepspec_jax import load_draft
from deepspec_jax.draft_vocab import (check_vocab_map, parse_draft_vocab_size,
                                      scatter_to_target, select_draft_vocab, selected_ids,
                                      to_draft_ids, to_target_ids)
from deepspec_jax.drafts import restrict_vocab
from deepspec_jax.errors import ConfigError
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.spec_decode import speculative_generate
from test_spec_decode_lossless import _prompts, _target
from test_spec_decode_sampled import PROMPT, VOCAB, _gof, _pair, _ref_probs


def _speculators_selection():
    """speculators' ``build_vocab_mappings_from_distribution``, compiled from the installed
    package's source with only torch: importing ``speculators.train.vocab_mapping`` pulls
    in datasets and transformers (~14 s here) for a 20-line function."""
    spec = importlib.util.find_spec("speculators")   # locates, does not import
    path = os.path.join(spec.submodule_search_locations[0], "train", "vocab_mapping.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef)
          and n.name == "build_vocab_mappings_from_distribution"]
    assert fn, f"{path}: build_vocab_mappings_from_distribution not found"
    fn[0].returns = None
    for a in fn[0].args.args:
        a.annotation = None
    scope = {"torch": pytest.importorskip("torch")}
    exec(compile(ast.Module(fn, []), path, "exec"), scope)
    return scope["build_vocab_mappings_from_distribution"]


def test_selection_matches_speculators():
    build_vocab_mappings_from_distribution = _speculators_selection()

    rng = np.random.default_rng(0)
    ids = rng.choice(300, 120, replace=False)
    counts = {int(t): int(c) for t, c in zip(ids, rng.integers(1, 6, 120))}  # many ties
    for K, V in ((40, 300), (150, 300), (7, 64)):
        cnt = {t: c for t, c in counts.items() if t < V}
        d2t, t2d = select_draft_vocab(cnt, K, V)
        ref_d2t, ref_t2d = build_vocab_mappings_from_distribution(cnt, K, V)
        assert d2t.dtype == np.int64 and t2d.dtype == np.bool_
        np.testing.assert_array_equal(d2t, ref_d2t.numpy())
        np.testing.assert_array_equal(t2d, ref_t2d.numpy())
        check_vocab_map(d2t, t2d, K, V, "test")


def test_mapping_helpers():
    d2t, t2d = select_draft_vocab({5: 3, 2: 3, 9: 1, 0: 2}, 3, 12)
    np.testing.assert_array_equal(selected_ids(d2t), [0, 2, 5])
    dj = jax.numpy.asarray(d2t, jax.numpy.int32)
    np.testing.assert_array_equal(to_target_ids(jax.numpy.asarray([2, 0, 1]), dj), [5, 0, 2])
    ids, inside = to_draft_ids(jax.numpy.asarray([5, 3, 0, 2]), jax.numpy.asarray(t2d))
    np.testing.assert_array_equal(ids, [2, 0, 0, 1])
    np.testing.assert_array_equal(inside, [True, False, True, True])
    out = scatter_to_target(jax.numpy.asarray([[0.5, 0.25, 0.25]]), dj, 12)
    np.testing.assert_array_equal(out[0, [0, 2, 5]], [0.5, 0.25, 0.25])
    assert float(out.sum()) == 1.0


@pytest.mark.parametrize("value,match", [(0, r"\[1, 511\]"), (512, r"\[1, 511\]"),
                                         ("64", "integer"), (True, "integer")])
def test_config_field_validated(value, match):
    fs = fixture_sets()[0]
    with open(os.path.join(fs, "dspark_vanilla", "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ConfigError, match=f"'draft_vocab_size'.*{match}"):
        parse_draft_vocab_size({**raw, "draft_vocab_size": value}, raw["vocab_size"], "cfg")
    assert parse_draft_vocab_size(raw, raw["vocab_size"], "cfg") is None


GREEDY_LENGTHS, GREEDY_NEW = (5, 12, 23), 20


@functools.lru_cache(maxsize=None)
def _greedy() -> tuple[list, list]:
    """(prompts, the fixture target's greedy continuations): what the T=0 tests compare
    against, and (their token counts) the data a draft for it would be trained on."""
    target = _target(fixture_sets()[0])
    prompts = _prompts(target.config.vocab_size, GREEDY_LENGTHS, seed=4)
    return prompts, target.generate(prompts, max_new_tokens=GREEDY_NEW)


def _greedy_counts() -> dict[int, int]:
    return dict(collections.Counter(t for g in _greedy()[1] for t in g))


def _reduced(name: str, K: int = 64):
    """A fixture draft restricted to the K tokens the target generates most often."""
    fs = fixture_sets()[0]
    target = _target(fs)
    d2t, t2d = select_draft_vocab(_greedy_counts(), K, target.config.vocab_size)
    return target, restrict_vocab(load_draft(os.path.join(fs, name)), d2t, t2d)


# CI time: the fast set runs the DSpark chain here and an Eagle3 tree at T=1 below
@pytest.mark.parametrize("name,tree", [("dspark_gated_distilled", None),
                                       pytest.param("eagle3_distilled", (3, 8),
                                                    marks=pytest.mark.slow),
                                       pytest.param("dspark_gated_distilled", (2, 6),
                                                    marks=pytest.mark.slow),
                                       pytest.param("eagle3_distilled", None,
                                                    marks=pytest.mark.slow)])
def test_greedy_identity(name, tree):
    """T=0: a reduced-vocabulary draft's speculative output is the target's greedy output,
    and it still gets drafts accepted."""
    target, draft = _reduced(name)
    assert draft.config.draft_vocab_size == 64
    prompts, ref = _greedy()
    res = speculative_generate(target, draft, prompts, max_new_tokens=GREEDY_NEW, tree=tree)
    assert [r.tokens for r in res] == ref
    assert any(a > 1 for r in res for a in r.accepted_lengths)


N_NEW = 4   # y1 (prefill) and y2..y4 (round 1's three draft positions, or later rounds)


def _exact_joint4(kind: str, sp: SamplingParams) -> np.ndarray:
    """The target's exact P(y1..y4) after PROMPT: one forward over all 585 prefixes,
    test_spec_decode_sampled's independent numpy sampling distribution (``_ref_probs``)."""
    target, _ = _pair(kind)
    prefixes = [p for n in range(N_NEW) for p in itertools.product(range(VOCAB), repeat=n)]
    ids = np.zeros((len(prefixes), len(PROMPT) + N_NEW - 1), np.int32)
    for i, p in enumerate(prefixes):
        ids[i, : len(PROMPT) + len(p)] = PROMPT + list(p)
    logits = np.asarray(target.forward(ids).logits)
    joint, i = np.ones(()), 0
    for n in range(N_NEW):
        lg = logits[i:i + VOCAB ** n, len(PROMPT) + n - 1]
        joint = joint[..., None] * _ref_probs(lg, sp).reshape((VOCAB,) * n + (VOCAB,))
        i += VOCAB ** n
    return joint


@pytest.mark.parametrize("kind,sp,tree", [
    ("eagle3", SamplingParams(1.0, top_k=3), (2, 4)),
    pytest.param("dspark", SamplingParams(1.0), None, marks=pytest.mark.slow)])
def test_sampled_joint_distribution(kind, sp, tree):
    """T>0: with a draft over 5 of the 8 target tokens the output keeps the target's
    exact joint distribution: chi-square goodness of fit (test_spec_decode_sampled's
    ``_gof``) of every marginal, adjacent pair and the triple of round 1's drafts,
    Bonferroni at family-wise 1e-4."""
    target, draft = _pair(kind)
    d2t, t2d = select_draft_vocab({1: 5, 2: 4, 4: 3, 5: 2, 7: 1}, 5, VOCAB)
    draft = restrict_vocab(draft, d2t, t2d)
    rows = 4096
    res = speculative_generate(target, draft, [PROMPT] * rows, max_new_tokens=N_NEW,
                               temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                               seed=5, prompt_bucket=8, cache_bucket=16, tree=tree)
    seqs = np.asarray([r.tokens for r in res])
    assert seqs.shape == (rows, N_NEW)
    assert np.mean([r.accepted_lengths[0] > 1 for r in res]) > 0.2   # drafts get accepted
    joint = _exact_joint4(kind, sp)
    groups = [(t,) for t in range(N_NEW)] + [(t, t + 1) for t in range(N_NEW - 1)] + [(1, 2, 3)]
    for cols in groups:
        probs = joint.sum(axis=tuple(a for a in range(N_NEW) if a not in cols))
        flat = np.ravel_multi_index(tuple(seqs[:, c] for c in cols), (VOCAB,) * len(cols))
        p, _, _ = _gof(np.bincount(flat, minlength=VOCAB ** len(cols)), probs)
        assert p >= 1e-4 / len(groups), f"{kind} {sp}: y{cols} p={p:.3g}"


def _flat(draft) -> dict[str, np.ndarray]:
    from deepspec_jax.weights.loader import flat_variables

    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in
            flat_variables(draft.state).items()}


def test_save_load_round_trip_and_export_refusal(tmp_path):
    """A reduced draft's JAX dir reloads bit-exactly (d2t/t2d never cast, on disk as
    speculators stores them), also with share_with_target (its lm_head is not the
    target's, so it is stored), and the DeepSpec HF export refuses it."""
    from convert.common import jax_to_hf

    target, draft = _reduced("dspark_gated_distilled")
    want = _flat(draft)
    assert want["d2t"].dtype == np.int32 and want["t2d"].dtype == np.bool_
    assert want["lm_head"].shape == (64, 64) and want["markov_w2"].shape[1] == 64
    manifest = draft.save(tmp_path / "d")
    assert manifest["hf"]["tensors"]["d2t"] == "int64"
    assert manifest["hf"]["tensors"]["t2d"] == "bool"
    got = _flat(load_draft(tmp_path / "d"))
    assert set(got) == set(want)
    for p in want:
        assert got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]), p
    bf16 = _flat(load_draft(tmp_path / "d", dtype="bfloat16"))
    assert bf16["d2t"].dtype == np.int32 and np.array_equal(bf16["d2t"], want["d2t"])
    assert bf16["t2d"].dtype == np.bool_ and str(bf16["lm_head"].dtype) == "bfloat16"

    manifest = draft.save(tmp_path / "s", share_with_target=True)
    assert manifest["shared_from_target"] == ["embed"]
    shared = _flat(load_draft(tmp_path / "s", target=target))
    for p in want:
        assert shared[p].dtype == want[p].dtype and np.array_equal(shared[p], want[p]), p

    with pytest.raises(ConfigError, match="draft_vocab_size.*convert.to_speculators"):
        jax_to_hf(str(tmp_path / "d"), str(tmp_path / "hf"))

    bad = dict(want)
    with pytest.raises(ConfigError, match="t2d"):
        check_vocab_map(bad["d2t"], ~bad["t2d"], 64, 512, "bad")


def _batch(draft, seed: int = 0, S: int = 24):
    rng = np.random.default_rng(seed)
    cfg = draft.config
    d = cfg.hidden_size
    ids = jax.numpy.asarray(rng.integers(0, cfg.vocab_size - 1, (2, S)), jax.numpy.int32)
    mask = np.ones((2, S), np.int32)
    mask[:, :4] = 0
    feats = jax.numpy.asarray(rng.normal(size=(2, S, len(cfg.target_layer_ids) * d)),
                              jax.numpy.float32)
    last = jax.numpy.asarray(rng.normal(size=(2, S, d)), jax.numpy.float32)
    return ids, jax.numpy.asarray(mask), feats, last


def test_dspark_loss_follows_the_reduced_vocabulary_convention():
    """CE/TV/confidence over K: the target distribution is softmax of the FULL lm_head's
    logits at the draft ids; CE labels outside the draft vocabulary weigh nothing."""
    from deepspec_jax.drafts import dspark_train as dt
    from deepspec_jax.drafts.dspark import DSparkLossConfig

    jnp = jax.numpy
    _, draft = _reduced("dspark_gated_distilled", K=128)
    full = load_draft(os.path.join(fixture_sets()[0], "dspark_gated_distilled"))
    ids, mask, feats, last = _batch(draft)
    batch = dt.DSparkBatch(ids, mask, feats, last)
    model = draft.model
    anchors, keep = dt.sample_anchors(jax.random.key(0), mask, model.cfg.num_anchors)
    lc = DSparkLossConfig()

    @jax.jit   # one program: eager dispatch of the loss' ops costs several seconds
    def run(state, full_head):
        m = nnx.merge(draft.graphdef, state)
        out = dt.train_forward(m, batch, anchors, keep)
        # direct: draft logits over K; target: the FULL lm_head's logits at the draft ids
        pt = jax.nn.softmax(jnp.einsum("...d,dv->...v", out.target_hidden,
                                       full_head)[..., sel], -1)
        return dt.dspark_loss(m, out, lc).total, out, dt.draft_logits(m, out), pt

    sel = jnp.asarray(selected_ids(np.asarray(model.d2t.get_value())))
    total, out, logits, pt = run(draft.state, full.model.lm_head.get_value())
    logp = jax.nn.log_softmax(logits, -1)
    t2d = np.asarray(model.t2d.get_value())
    labels = np.asarray(out.targets.target_ids)
    inside = t2d[labels]
    assert 0 < inside.mean() < 1          # both kinds of labels occur
    lab = np.cumsum(t2d)[labels] - 1
    ce = -np.take_along_axis(np.asarray(logp), np.where(inside, lab, 0)[..., None], -1)[..., 0]
    tv = np.abs(np.exp(np.asarray(logp)) - np.asarray(pt)).sum(-1)
    w = np.asarray(dt.loss_weight_mask(out.targets.eval_mask, lc.loss_decay_gamma))
    wc = w * inside
    conf = np.asarray(out.confidence_logits)
    c_star = np.clip(1 - 0.5 * tv, 0, 1)
    bce = np.maximum(conf, 0) - conf * c_star + np.log1p(np.exp(-np.abs(conf)))
    want = (lc.ce_alpha * (ce * wc).sum() / (wc.sum() + 1e-6)
            + lc.l1_alpha * (tv * w).sum() / (w.sum() + 1e-6)
            + lc.confidence_alpha * (bce * w).sum() / (w.sum() + 1e-6))
    np.testing.assert_allclose(float(total), want, rtol=2e-5)


@pytest.mark.slow
def test_eagle3_loss_follows_the_reduced_vocabulary_convention():
    from deepspec_jax.drafts import eagle3_train as et

    _, draft = _reduced("eagle3_distilled", K=128)
    full = load_draft(os.path.join(fixture_sets()[0], "eagle3_distilled"))
    ids, mask, feats, last = _batch(draft, seed=1)
    model = draft.model
    res = et.eagle3_loss(model, ids, feats, last, mask)
    ttt = model.cfg.ttt_length
    hs = et.ttt_forward(model, ids, feats, None, ttt)
    sel = jax.numpy.asarray(selected_ids(np.asarray(model.d2t.get_value())))
    logp = jax.nn.log_softmax(model.logits(hs), -1)                       # [ttt,B,T,K]
    pt = jax.nn.softmax((et.target_inputs(last, ttt) @ full.model.lm_head.get_value())[..., sel],
                        -1)
    ce = -(pt * logp).sum(-1)
    pm = et.position_masks(mask, None, ttt)
    B, T = ids.shape
    want = sum(model.cfg.step_loss_decay ** s * float((pm[s] * ce[s]).sum()) / (B * T)
               for s in range(ttt))
    np.testing.assert_allclose(float(res.loss), want, rtol=2e-5)


@pytest.mark.parametrize("arch", ["dspark", pytest.param("eagle3", marks=pytest.mark.slow)])
def test_train_with_reduced_vocabulary(tmp_path, arch):
    """draft.draft_vocab_size: the token store's counts (token_counts.json, written with
    the store) select the vocabulary, the step trains over K columns, and the exported
    JAX dir reloads as a reduced draft."""
    from deepspec_jax.data.token_store import COUNTS, TokenStore, token_counts
    from deepspec_jax.train.trainer import export, exports_hf, setup, train
    from train_helpers import TINY_TARGET, make_store, tiny_config

    store = make_store(str(tmp_path / "tok"))
    assert os.path.exists(os.path.join(store, COUNTS))
    counts = token_counts(TokenStore(store))
    os.remove(os.path.join(store, COUNTS))           # an older store: counted, then cached
    assert token_counts(TokenStore(store)) == counts and os.path.exists(os.path.join(store, COUNTS))
    c = tiny_config(arch, store, str(tmp_path / "run"), max_steps=1)
    c.draft.draft_vocab_size = 96
    c.train.export_hf = True
    run = setup(c)
    m = train(run)
    assert m["step"] == 1 and np.isfinite(m["total_loss"])
    d = load_draft(export(run))
    want_d2t, want_t2d = select_draft_vocab(counts, 96, 512)
    got = _flat(d)
    np.testing.assert_array_equal(got["d2t"], want_d2t)
    np.testing.assert_array_equal(got["t2d"], want_t2d)
    target_head = np.asarray(run.target.model.lm_head_weight())
    np.testing.assert_array_equal(got["lm_head"], target_head[:, selected_ids(want_d2t)])
    assert not os.path.exists(tmp_path / "run" / "hf")   # DeepSpec's format cannot hold it
    assert not exports_hf(run)                          # and the CLI does not claim it
    # the trained reduced draft -> vLLM's speculators format -> back: bit-exact
    from convert.speculators_format import to_speculators

    spec_dir = str(tmp_path / "speculators")
    to_speculators(export(run), spec_dir, target=TINY_TARGET)
    back = _flat(load_draft(spec_dir, target=run.target))
    assert back.keys() == got.keys()
    for name, value in got.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_warm_start_from_a_draft_saved_without_the_targets_weights(tmp_path):
    """draft.init_from a JAX dir saved with share_with_target (how the default draft ships:
    no embed/lm_head) into a reduced-vocabulary run: the run's target supplies what the dir
    leaves out, and every trainable parameter is the source's restricted to the K ids."""
    from deepspec_jax.data.token_store import TokenStore, token_counts
    from deepspec_jax.train.trainer import export, setup, train
    from train_helpers import make_store, tiny_config

    store = make_store(str(tmp_path / "tok"))
    first = setup(tiny_config("dspark", store, str(tmp_path / "run0"), max_steps=1))
    train(first)
    shipped = str(tmp_path / "shipped")
    load_draft(export(first)).save(shipped, share_with_target=True)
    c = tiny_config("dspark", store, str(tmp_path / "run1"), max_steps=1)
    c.draft.draft_vocab_size = 96
    c.draft.init_from = shipped
    run = setup(c)
    vocab = select_draft_vocab(token_counts(TokenStore(store)), 96, 512)
    want = restrict_vocab(load_draft(shipped, dtype="float32", target=run.target), *vocab)
    want = nnx.split(want.model, nnx.Param, ...)[1].to_pure_dict()
    got, want = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (run.state.params, want))
    assert got.keys() == want.keys() and len(got) > 5
    for path, value in want.items():
        assert np.array_equal(np.asarray(got[path]), np.asarray(value)), path


def test_warm_start_from_a_reduced_draft_keeps_its_vocabulary(tmp_path):
    """Fine-tuning a reduced-vocabulary draft on more (differently counted) data keeps the
    draft's own vocabulary and weights instead of re-selecting K ids from the new data
    (which would change the output space under the trained lm_head); a different K is
    refused with the fix named. With draft.init_reselect_vocab the run selects its own ids
    (any K) from the new data: a token both vocabularies hold keeps its trained markov_w2
    column, a new one starts at zero, every other parameter is the source's."""
    from deepspec_jax.data.token_store import TokenStore, token_counts
    from deepspec_jax.errors import ConfigError
    from deepspec_jax.train.trainer import export, setup, train
    from train_helpers import make_store, tiny_config

    first_store = make_store(str(tmp_path / "tok0"), seed=0)
    c0 = tiny_config("dspark", first_store, str(tmp_path / "run0"), max_steps=1)
    c0.draft.draft_vocab_size = 96
    first = setup(c0)
    train(first)
    shipped = str(tmp_path / "shipped")
    load_draft(export(first)).save(shipped, share_with_target=True)
    more = make_store(str(tmp_path / "tok1"), seed=1)
    reselected = select_draft_vocab(token_counts(TokenStore(more)), 96, 512)[0]
    source = _flat(load_draft(shipped, dtype="float32", target=first.target))
    assert not np.array_equal(reselected, source["d2t"])   # the new data would pick others
    c1 = tiny_config("dspark", more, str(tmp_path / "run1"), max_steps=1)
    c1.draft.draft_vocab_size = 96
    c1.draft.init_from = shipped
    run = setup(c1)
    got = _flat(load_draft(export(run), dtype="float32"))      # step 0: the warm start
    assert got.keys() == source.keys() and len(got) > 5
    for name, value in source.items():
        assert np.array_equal(got[name], value), name
    c2 = tiny_config("dspark", more, str(tmp_path / "run2"), max_steps=1)
    c2.draft.draft_vocab_size = 64
    c2.draft.init_from = shipped
    with pytest.raises(ConfigError, match="reduced vocabulary of 96 tokens.*is 64.*init_reselect"):
        setup(c2)
    c3 = tiny_config("dspark", more, str(tmp_path / "run3"), max_steps=1)
    c3.draft.draft_vocab_size = 128
    c3.draft.init_from = shipped
    c3.draft.init_reselect_vocab = True
    got = _flat(load_draft(export(setup(c3)), dtype="float32"))
    want_d2t, want_t2d = select_draft_vocab(token_counts(TokenStore(more)), 128, 512)
    assert np.array_equal(got["d2t"], want_d2t) and np.array_equal(got["t2d"], want_t2d)
    old_ids, new_ids = (np.arange(len(d)) + d for d in (source["d2t"], want_d2t))
    shared = np.isin(new_ids, old_ids)
    assert 0 < shared.sum() < 128
    w2, w2_src = got["markov_w2"], source["markov_w2"]
    assert w2.shape == (w2_src.shape[0], 128)
    assert np.array_equal(w2[:, shared], w2_src[:, np.searchsorted(old_ids, new_ids[shared])])
    assert not np.any(w2[:, ~shared]) and np.any(w2_src)
    assert np.array_equal(got["lm_head"][:, shared],     # the target's columns, frozen
                          source["lm_head"][:, np.searchsorted(old_ids, new_ids[shared])])
    assert got.keys() == source.keys()
    for name in source.keys() - {"d2t", "t2d", "markov_w2", "lm_head"}:
        assert np.array_equal(got[name], source[name]), name
