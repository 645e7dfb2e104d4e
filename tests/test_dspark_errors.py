"""User-facing errors of DSpark configs/checkpoints name the field or tensor at fault,
and the anchor sampler keeps the reference's layout (runs without any compile-heavy model)."""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_sets, gemma4_fixture_set, load_manifest
from deepspec_jax.config import target_config_from_dict
from deepspec_jax.drafts.registry import resolve_spec
from deepspec_jax.train.draft_init import draft_hf_config
from deepspec_jax.drafts.dspark import (ARCHITECTURES, dspark_config_from_dict, dspark_rules,
                                        load_dspark_checkpoint)
from deepspec_jax.drafts.dspark_train import block_targets, sample_anchors
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.weights.loader import DictSource
from deepspec_jax.weights.safetensors_io import TensorSource


def _draft_dirs() -> list[str]:
    out = []
    for fs in fixture_sets():
        for name in sorted(os.listdir(fs)):
            cfg = os.path.join(fs, name, "config.json")
            if os.path.exists(cfg):
                with open(cfg, encoding="utf-8") as f:
                    if (json.load(f).get("architectures") or [None])[0] in ARCHITECTURES.values():
                        out.append(os.path.join(fs, name))
    return out


def _with_markov(dirs):
    for d in dirs:
        with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
            if json.load(f).get("markov_rank", 0) > 0:
                return d
    pytest.skip("no DSpark draft with a Markov head in the fixtures")


@pytest.fixture(scope="module")
def draft_dir():
    dirs = _draft_dirs()
    assert dirs, "no DSpark/DFlash draft checkpoint found in any fixture set"
    return _with_markov(dirs)


@pytest.fixture()
def raw(draft_dir):
    with open(os.path.join(draft_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _config_error(raw: dict, *needles: str):
    with pytest.raises(ConfigError) as e:
        dspark_config_from_dict(raw, "draft/config.json")
    msg = str(e.value)
    assert "draft/config.json" in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_valid_config_parses(raw):
    cfg = dspark_config_from_dict(raw, "config.json")
    assert cfg.block_size == raw["block_size"] and cfg.target_layer_ids == tuple(raw["target_layer_ids"])
    assert cfg.raw == raw


@pytest.mark.parametrize("value", ["vocab", -1])
def test_mask_token_outside_vocab(raw, value):
    raw["mask_token_id"] = raw["vocab_size"] if value == "vocab" else value
    _config_error(raw, "mask_token_id", str(raw["vocab_size"]))


def test_target_layer_ids_contains_last_layer(raw):
    last = raw["num_target_layers"] - 1
    raw["target_layer_ids"] = [0, last]
    _config_error(raw, "target_layer_ids", "last decoder layer", str(last))


@pytest.mark.parametrize("bad", [-2, "beyond"])
def test_target_layer_ids_out_of_range(raw, bad):
    bad = raw["num_target_layers"] + 3 if bad == "beyond" else bad
    raw["target_layer_ids"] = [bad]
    _config_error(raw, "target_layer_ids", "out of range", str(bad))


def test_target_layer_ids_not_increasing(raw):
    raw["target_layer_ids"] = [2, 0]
    _config_error(raw, "target_layer_ids", "strictly increasing")


def test_unknown_markov_head_type(raw):
    raw["markov_head_type"] = "lstm"
    _config_error(raw, "markov_head_type", "lstm")


@pytest.mark.parametrize("field", ["block_size", "mask_token_id", "target_layer_ids",
                                   "num_target_layers", "markov_rank"])
def test_missing_field(raw, field):
    del raw[field]
    _config_error(raw, field)


def _source(draft_dir):
    src = TensorSource.from_dir(draft_dir)
    return {k: np.asarray(src.get(k)) for k in src.keys()}


def test_missing_tensor(draft_dir):
    tensors = _source(draft_dir)
    key = "markov_head.markov_w2.weight"
    del tensors[key]
    with pytest.raises(CheckpointError, match="missing") as e:
        load_dspark_checkpoint(draft_dir, source=DictSource(tensors, draft_dir))
    assert key in str(e.value)


@pytest.mark.parametrize("key", ["fc.weight", "layers.1.self_attn.k_proj.weight"])
def test_misshaped_tensor(draft_dir, key):
    tensors = _source(draft_dir)
    tensors[key] = tensors[key][:-1]
    with pytest.raises(CheckpointError) as e:
        load_dspark_checkpoint(draft_dir, source=DictSource(tensors, draft_dir))
    assert key in str(e.value) and "shape" in str(e.value)


def test_unused_tensor(draft_dir):
    tensors = _source(draft_dir)
    tensors["markov_head.extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CheckpointError, match="markov_head.extra.weight"):
        load_dspark_checkpoint(draft_dir, source=DictSource(tensors, draft_dir))


def test_rules_cover_checkpoint(draft_dir, raw):
    cfg = dspark_config_from_dict(raw)
    keys = {k for r in dspark_rules(cfg) for k in r.hf_keys(cfg.num_layers)}
    assert keys == set(TensorSource.from_dir(draft_dir).keys())


# ---------------------------------------------------------------------------
# anchors (pure functions, no model)
# ---------------------------------------------------------------------------

def test_sample_anchors_layout():
    s, n = 24, 6
    loss_mask = np.zeros((3, s), np.int32)
    loss_mask[0, 5:] = 1            # plenty of candidates
    loss_mask[1, 20:] = 1           # 3 candidates (20, 21, 22) < n
    loss_mask[1, 10] = 1            # isolated: not a candidate (next token unsupervised)
    # row 2: no candidates at all
    for seed in range(5):
        anchors, keep = map(np.asarray, sample_anchors(jax.random.key(seed), jnp.asarray(loss_mask), n))
        assert keep[0].all() and keep[2].sum() == 0
        np.testing.assert_array_equal(keep[1], [1, 1, 1, 0, 0, 0])
        np.testing.assert_array_equal(anchors[1], [20, 21, 22, 0, 0, 0])
        a0 = anchors[0]
        assert (np.diff(a0) > 0).all() and (loss_mask[0, a0] == 1).all() and (loss_mask[0, a0 + 1] == 1).all()
        assert (anchors[2] == 0).all()
    draws = {tuple(np.asarray(sample_anchors(jax.random.key(k), jnp.asarray(loss_mask), n)[0][0]))
             for k in range(5)}
    assert len(draws) > 1, "anchors do not depend on the PRNG key"


def test_block_targets_truncation():
    ids = jnp.arange(10, dtype=jnp.int32)[None] + 100
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
    anchors = jnp.asarray([[2, 7, 0]])
    keep = jnp.asarray([[True, True, False]])
    t = block_targets(ids, mask, anchors, keep, 4)
    np.testing.assert_array_equal(t.eval_mask, [[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(t.target_ids[0, 0], [103, 104, 105, 106])
    np.testing.assert_array_equal(t.target_ids[0, 1], [108, 109, 109, 109])
    np.testing.assert_array_equal(t.prev_ids[0, 0], [102, 103, 104, 105])
    np.testing.assert_array_equal(t.pred_index[0, 1], [7, 8, 8, 8])


# ---------------------------------------------------------------------------
# Gemma-4 drafts (DeepSpec's Gemma4DSparkModel): the layer config derived from the
# copied target text config
# ---------------------------------------------------------------------------

def _gemma4_raw() -> dict:
    with open(os.path.join(gemma4_fixture_set(), "dspark_vanilla", "config.json"),
              encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["architectures"] == ["Gemma4DSparkModel"] and raw["markov_rank"] > 0
    return raw


def test_gemma4_layer_config():
    """Full-attention layers with the target's global head size, proportional RoPE,
    attention scale 1, Gemma norms/MLP/softcap, and no KV sharing (DeepSpec's draft
    attention always has its own k/v projections, whatever the copied field says)."""
    raw = _gemma4_raw()
    assert raw["num_kv_shared_layers"] > 0   # copied from the target
    cfg = dspark_config_from_dict(raw, "config.json")
    lc = cfg.layer
    assert lc.num_kv_shared_layers == 0 and lc.uniform_layers
    assert lc.layer_head_dim(0) == raw["global_head_dim"] != raw["head_dim"]
    assert lc.attention_scale(lc.layer_head_dim(0)) == 1.0 and lc.v_norm and lc.layer_scalar
    assert cfg.logit_softcap == raw["final_logit_softcapping"]
    inv = lc.layer_inv_freq(0)
    rotated = int(raw["rope_parameters"]["full_attention"]["partial_rotary_factor"]
                  * raw["global_head_dim"] // 2)
    assert np.all(inv[:rotated] > 0) and not np.any(inv[rotated:])
    keys = {k for r in dspark_rules(cfg) for k in r.hf_keys(cfg.num_layers)}
    assert {"layers.0.layer_scalar", "layers.1.pre_feedforward_layernorm.weight",
            "layers.1.self_attn.v_proj.weight"} <= keys


def test_gemma4_double_wide_mlp_quirk_refused():
    """DeepSpec's Gemma4TextMLP widens draft layers i >= L - num_kv_shared_layers > 0
    when use_double_wide_mlp: refused by name rather than built differently."""
    raw = _gemma4_raw()
    raw["num_hidden_layers"], raw["layer_types"] = 3, ["full_attention"] * 3
    raw["num_kv_shared_layers"], raw["use_double_wide_mlp"] = 2, True
    _config_error(raw, "use_double_wide_mlp", "num_kv_shared_layers", "[1, 2]")
    raw["use_double_wide_mlp"] = False  # no quirk without the flag
    assert dspark_config_from_dict(raw, "draft/config.json").layer.num_kv_shared_layers == 0


@pytest.mark.parametrize("field,value,needles", [
    ("layer_types", ["full_attention", "sliding_attention"], ("layer_types", "full_attention")),
    ("architectures", ["Qwen3DSparkModel"], ("architectures", "Gemma4DSparkModel")),
    ("final_logit_softcapping", 0.0, ("final_logit_softcapping", "positive")),
    ("model_type", "gemma3_text", ("model_type", "gemma4_text")),
    ("use_some_new_gemma_feature", True, ("use_some_new_gemma_feature",)),
])
def test_gemma4_config_errors(field, value, needles):
    raw = _gemma4_raw()
    raw[field] = value
    _config_error(raw, *needles)


@pytest.mark.parametrize("name", ["dspark_gated", "dflash", "eagle3"])
def test_gemma4_draft_config_derived_as_deepspec(name):
    """train.draft_init derives a Gemma-4 draft's config.json from the target's the way
    DeepSpec's gemma4 ``build_draft_config`` did for the fixture drafts (same fields and
    values; transformers adds two null keys to rope_parameters and its version on save)."""
    fs = gemma4_fixture_set()
    with open(os.path.join(fs, name, "config.json"), encoding="utf-8") as f:
        want = json.load(f)
    with open(os.path.join(fs, name, "deepspec_model_args.json"), encoding="utf-8") as f:
        args = json.load(f)["model_args"]
    tdir = os.path.join(fs, load_manifest(fs)["global"]["target_dir"])
    with open(os.path.join(tdir, "config.json"), encoding="utf-8") as f:
        tcfg = target_config_from_dict(json.load(f))
    kind = "eagle3" if "ttt_length" in args else "dspark" if args["markov_rank"] else "dflash"
    draft = types.SimpleNamespace(
        draft_vocab_size=0, kind=kind, target_layer_ids=args["target_layer_ids"], intermediate_size=-1,
        num_hidden_layers=args.get("num_draft_layers", args.get("draft_num_hidden_layers")),
        ttt_length=args.get("ttt_length"), step_loss_decay=args.get("step_loss_decay"),
        block_size=args.get("block_size"), num_anchors=args.get("num_anchors"),
        mask_token_id=args.get("mask_token_id"), markov_rank=args.get("markov_rank"),
        markov_head_type=args.get("markov_head_type"),
        enable_confidence_head=float(args.get("confidence_head_alpha", 0)) > 0,
        confidence_head_with_markov=args.get("confidence_head_with_markov"))
    got = draft_hf_config(types.SimpleNamespace(draft=draft), tcfg,
                          target_name=args.get("target_model_name_or_path", ""))
    strip = lambda r: {k: v for k, v in r.items()  # noqa: E731
                       if k not in ("transformers_version", "rope_parameters")}
    assert strip(got) == strip(want)
    rope = {k: v for k, v in want["rope_parameters"].items() if isinstance(v, dict)}
    assert got["rope_parameters"] == rope
    spec = resolve_spec(got, "derived")
    assert spec.architecture == want["architectures"][0] and spec.family.kind_of(spec.config) == kind


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_gemma4_unified_target_gets_the_same_draft_layers(kind):
    """DeepSpec builds Gemma-4 drafts for gemma4 and gemma4_unified targets (the 12B is
    unified): the draft keeps the unified text model type, gets the Gemma-4 draft
    architecture, and its layers equal the gemma4_text derivation's."""
    fs = gemma4_fixture_set()
    tdir = os.path.join(fs, load_manifest(fs)["global"]["target_dir"])
    with open(os.path.join(tdir, "config.json"), encoding="utf-8") as f:
        plain = json.load(f)
    unified = json.loads(json.dumps(plain))
    unified["model_type"] = "gemma4_unified"
    text = unified["text_config"]
    text["model_type"] = "gemma4_unified_text"
    for k in ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
              "hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        text.pop(k)
    draft = types.SimpleNamespace(
        draft_vocab_size=0, kind=kind, target_layer_ids=[0, 2, 4] if kind == "dspark" else [0, 1, 2, 3, 4],
        intermediate_size=-1, num_hidden_layers=2 if kind == "dspark" else 1,
        ttt_length=3, step_loss_decay=0.8, block_size=4, num_anchors=6, mask_token_id=511,
        markov_rank=8, markov_head_type="vanilla", enable_confidence_head=True,
        confidence_head_with_markov=True)
    c = types.SimpleNamespace(draft=draft)
    got = {n: resolve_spec(draft_hf_config(c, target_config_from_dict(raw)), n)
           for n, raw in (("plain", plain), ("unified", unified))}
    assert got["unified"].raw["model_type"] == "gemma4_unified_text"
    assert got["unified"].architecture == got["plain"].architecture
    lay = lambda s: s.config.layer if kind == "dspark" else s.config.backbone  # noqa: E731
    a, b = lay(got["plain"]), lay(got["unified"])
    for i in range(a.num_hidden_layers):
        assert (a.layer_head_dim(i), a.layer_kv_heads(i), list(a.layer_inv_freq(i))) == \
               (b.layer_head_dim(i), b.layer_kv_heads(i), list(b.layer_inv_freq(i)))
    assert (a.embed_scale, a.final_logit_softcap, a.attn_scale) == \
           (b.embed_scale, b.final_logit_softcap, b.attn_scale)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 8.0}])
def test_gemma3_target_gets_qwen3_draft_layers(scaling):
    """A Gemma-3 target (the CPU pipeline's gemma3-270m) gets Qwen3 draft layers with the
    target's widths and its full-attention RoPE (base and linear scaling), not the
    sliding layers' local base."""
    full = {"rope_type": "default", "rope_theta": 1e6, **(scaling or {})}
    raw = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16,
           "sliding_window": 8, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
           "rope_parameters": {"full_attention": full,
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    tcfg = target_config_from_dict(raw)
    draft = types.SimpleNamespace(
        draft_vocab_size=0, kind="dspark", target_layer_ids=[1, 3, 4], intermediate_size=-1, num_hidden_layers=1,
        block_size=4, num_anchors=6, mask_token_id=4, markov_rank=8, markov_head_type="gated",
        enable_confidence_head=True, confidence_head_with_markov=True)
    spec = resolve_spec(draft_hf_config(types.SimpleNamespace(draft=draft), tcfg), "derived")
    lc = spec.config.layer
    assert spec.architecture == ARCHITECTURES["qwen3"]
    assert (lc.hidden_size, lc.num_key_value_heads, lc.head_dim) == (64, 1, 16)
    np.testing.assert_array_equal(lc.layer_inv_freq(0), tcfg.layer_inv_freq(5))
