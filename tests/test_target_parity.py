"""Target forward parity: HF transformers (PyTorch fp32) and the DeepSpec fixture target."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import fp32_tol, load_manifest, target_fixture_sets
from deepspec_jax import load_target
from hf_models import hf_forward, make_tiny_hf

CASES = [  # (model_type, heads, kv_heads, tie): GQA ratios 1, 2, 3; tied and untied
    ("llama", 4, 4, False), ("llama", 4, 2, True), ("llama", 6, 2, False),
    ("qwen3", 4, 4, True), ("qwen3", 4, 2, False), ("qwen3", 6, 2, True),
]


@pytest.mark.parametrize("model_type,heads,kv,tie", CASES)
def test_hf_parity(tmp_path, model_type, heads, kv, tie):
    path = make_tiny_hf(str(tmp_path), model_type, heads=heads, kv_heads=kv, tie=tie, hidden=48 if heads == 6 else 64)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 17)).astype(np.int32)
    ref_logits, ref_hidden = hf_forward(path, ids)
    target = load_target(path)
    assert target.config.tie_word_embeddings == tie
    layer_ids = (-1, 0, 1)  # raw outputs; HF's last hidden state is post-norm, so not compared
    out = target.forward(ids, layer_ids=layer_ids)
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    d = target.config.hidden_size
    feats = np.asarray(out.features)
    for j, lid in enumerate(layer_ids):
        np.testing.assert_allclose(feats[..., j * d:(j + 1) * d], ref_hidden[lid + 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.last_hidden), ref_hidden[-1], atol=1e-5, rtol=0)


def test_llama3_rope_scaling_parity(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_tiny_hf(str(tmp_path), "llama", rope_scaling=scaling)
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 96)).astype(np.int32)
    ref_logits, _ = hf_forward(path, ids)
    out = load_target(path).forward(ids)
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture_set", target_fixture_sets())
def test_fixture_target_features(fixture_set):
    manifest = load_manifest(fixture_set)
    target = load_target(os.path.join(fixture_set, manifest["global"]["target_dir"]))
    inp_file = manifest["files"]["inputs"]
    inputs = load_file(os.path.join(fixture_set, inp_file.get("path", "fixtures/inputs.safetensors")))
    ids = inputs["input_ids"].astype(np.int32)
    out = target.forward(ids)
    ref = inputs["target_logits"]
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=fp32_tol(ref, 1e-4), rtol=0)
    ref = inputs["target_last_hidden_states"]
    np.testing.assert_allclose(np.asarray(out.last_hidden), ref, atol=fp32_tol(ref, 1e-4), rtol=0)
    # Every captured feature set: layer ids come from the draft configs in the manifest.
    for name, draft in manifest["global"]["drafts"].items():
        key = f"target_hidden_states_{draft['kind']}"
        if key not in inputs:
            continue
        ids_ = tuple(draft["args"]["target_layer_ids"])
        feats = np.asarray(target.forward(ids, layer_ids=ids_).features)
        np.testing.assert_allclose(feats, inputs[key], atol=fp32_tol(inputs[key], 1e-5), rtol=0,
                                   err_msg=name)
