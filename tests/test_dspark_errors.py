"""User-facing errors of DSpark configs/checkpoints name the field or tensor at fault,
and the anchor sampler keeps the reference's layout (runs without any compile-heavy model)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_sets
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
