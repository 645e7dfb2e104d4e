"""Gemma-3 / Gemma-4 targets against transformers 5.10 on tiny random checkpoints:
full-forward logits and features, and cached greedy decoding past the sliding window.

The cases cover what the Gemma layers add to Llama/Qwen3: sliding/full layer types
with their own head size and RoPE (proportional partial RoPE, linear scaling), KV
sharing with the double-wide MLP, Gemma-4's k_eq_v full layers, Gemma-3's (1 + w)
norms and query_pre_attn_scalar, final-logit softcapping, tied and untied heads."""

import numpy as np
import pytest

from conftest import fp32_tol
from deepspec_jax import load_target
from hf_models import make_tiny_hf

_ROPE4 = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                             "rope_theta": 1e6},
          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
_S, _F = "sliding_attention", "full_attention"
CASES = {
    # SSFSF, window 4, last two layers reuse layers 3 (S) / 2 (F), 2x MLP there, softcap.
    "gemma4-kvshare-tied": ("gemma4_text", dict(
        layers=5, tie=True, layer_types=[_S, _S, _F, _S, _F], sliding_window=4,
        global_head_dim=32, num_kv_shared_layers=2, use_double_wide_mlp=True,
        final_logit_softcapping=15.0, rope_parameters=_ROPE4)),
    # full layers with values = keys and one global KV head; untied head.
    "gemma4-k_eq_v-untied": ("gemma4_text", dict(
        layers=4, tie=False, layer_types=[_S, _S, _F, _F], sliding_window=5,
        global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1,
        rope_parameters={**_ROPE4, _F: {**_ROPE4[_F], "partial_rotary_factor": 0.5}})),
    # Gemma-4 "unified" (the 12B's family): k_eq_v with 2 global KV heads, window 3.
    "gemma4-unified": ("gemma4_unified_text", dict(
        layers=3, tie=True, layer_types=[_S, _S, _F], sliding_window=3, global_head_dim=32,
        attention_k_eq_v=True, num_global_key_value_heads=2, final_logit_softcapping=30.0,
        rope_parameters=_ROPE4)),
    "gemma3-linear-rope": ("gemma3_text", dict(
        layers=4, tie=True, layer_types=[_S, _S, _F, _F], sliding_window=4,
        rope_parameters={_F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         _S: {"rope_type": "default", "rope_theta": 1e4}})),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    model_type, kw = CASES[request.param]
    path = make_tiny_hf(str(tmp_path_factory.mktemp(request.param)), model_type, **kw)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, load_target(path), kw["layers"]


def test_forward_matches_transformers(case):
    import torch

    hf, target, layers = case
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 17)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    layer_ids = tuple(range(-1, layers - 1))   # HF's last hidden state is post-norm
    out = target.forward(ids, layer_ids=layer_ids)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-4, rtol=0)
    d = target.config.hidden_size
    feats = np.asarray(out.features)
    for j, lid in enumerate(layer_ids):
        want = ref.hidden_states[lid + 1].numpy()
        np.testing.assert_allclose(feats[..., j * d:(j + 1) * d], want,
                                   atol=fp32_tol(want, 1e-5), rtol=0, err_msg=f"layer {lid}")


def test_cached_greedy_matches_transformers_past_the_window(case):
    """Prompts of 3 and 6 tokens, 20 greedy tokens through the KV cache: far past
    windows of 4-5 keys, through the KV-shared layers' borrowed caches."""
    import torch

    hf, target, _ = case
    prompts = [[5, 17, 42], [7, 7, 100, 3, 250, 9]]
    ours = target.generate(prompts, max_new_tokens=20, temperature=0.0)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor([p]), max_new_tokens=20, do_sample=False,
                              min_new_tokens=20, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()


def _fixture_text_config():
    """The Gemma-4 fixture target's config.json (a gemma4 wrapper around gemma4_text)."""
    import json
    import os

    from conftest import REPO
    path = os.path.join(REPO, "..", "shared", "fixtures-next", "deepspec_gemma4_v1",
                        "target_gemma4_tiny", "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update(new_gemma_knob=1), "new_gemma_knob"),
    (lambda t: t.update(enable_moe_block=True), "enable_moe_block"),
    (lambda t: t.update(hidden_size_per_layer_input=256), "hidden_size_per_layer_input"),
    (lambda t: t.update(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    (lambda t: t.update(hidden_activation="silu"), "hidden_activation"),
    (lambda t: t.update(layer_types=[_S]), "layer_types"),
])
def test_unsupported_gemma_fields_are_refused_by_name(edit, match):
    """A Gemma config field we do not implement (or do not know) is an error naming it,
    not silently ignored; the multimodal wrapper's text_config is what is checked."""
    from deepspec_jax.config import target_config_from_dict
    from deepspec_jax.errors import ConfigError

    raw = _fixture_text_config()
    cfg = target_config_from_dict(raw, "config.json")
    assert cfg.hf_prefix == "model.language_model." and cfg.model_type == "gemma4_text"
    edit(raw["text_config"])
    with pytest.raises(ConfigError, match=match):
        target_config_from_dict(raw, "config.json")
