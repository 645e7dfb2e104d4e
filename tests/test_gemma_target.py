"""Gemma-3 / Gemma-4 targets against transformers 5.10 on tiny random checkpoints:
full-forward logits and features, and cached greedy decoding past the sliding window.

The cases cover what the Gemma layers add to Llama/Qwen3: sliding/full layer types
with their own head size and RoPE (proportional partial RoPE, linear scaling), KV
sharing with the double-wide MLP, Gemma-4's k_eq_v full layers, Gemma-3's (1 + w)
norms and query_pre_attn_scalar, final-logit softcapping, tied and untied heads."""

import numpy as np
import pytest

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
        # Gemma's sqrt(hidden) embedding scale and layer scalars make features O(10):
        # fp32 rounding is relative, so the tolerance scales with them.
        np.testing.assert_allclose(feats[..., j * d:(j + 1) * d], want,
                                   atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0,
                                   err_msg=f"layer {lid}")


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
