"""The embedded default target (SmolLM2-135M-Instruct GGUF) against transformers' own
GGUF loading: weights, tokenizer/chat template, and 48-token greedy continuations."""

import os

import numpy as np
import pytest

from conftest import hf_greedy
from deepspec_jax import load_target
from deepspec_jax.target import smollm2_gguf_path

PROMPTS = [
    "What is 12*7? Explain briefly.",
    "Write a Python function that reverses a string.",
    "Tell me a fun fact about the ocean.",
]


@pytest.fixture(scope="module")
def smol():
    return load_target()  # no path: the embedded default


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_weights_match_transformers_dequantisation(smol, hf_model):
    """Dequantised + un-permuted q/k weights equal transformers' GGUF conversion."""
    from deepspec_jax.weights.loader import export_tensors
    from deepspec_jax.weights.name_map import target_rules

    ours = export_tensors(smol.model, target_rules(smol.config), smol.config.num_hidden_layers)
    ref = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


@pytest.mark.slow
def test_greedy_matches_transformers(smol, hf_model):
    assert smol.config.tie_word_embeddings and smol.config.num_hidden_layers == 30
    prompts = [smol.apply_chat_template(p) for p in PROMPTS]
    assert smol.tokenizer.decode(prompts[0]).startswith("<|im_start|>system")
    ours = smol.generate(prompts, max_new_tokens=48, temperature=0.0)
    for p, got in zip(prompts, ours):
        ref_new = hf_greedy(hf_model, p, 48)
        assert got == ref_new, (smol.tokenizer.decode(got), smol.tokenizer.decode(ref_new))
    # the stop token (<|im_end|>) ends a row, and generation is batch-independent
    assert smol.stop_token_ids and any(o[-1] in smol.stop_token_ids for o in ours)
    assert smol.generate([prompts[1]], max_new_tokens=48) == [ours[1]]


def test_gguf_tokenizer_matches_transformers(smol):
    """Our torch-free GGUF tokenizer equals transformers' (which needs torch)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = smol.tokenizer
    msgs = [{"role": "user", "content": "Hi! def f(x): return x**2  ünïcode\n\ttabs"}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(msgs, **kw) == ref.apply_chat_template(msgs, **kw)
    text = "  spaces\n\nnewlines <|im_end|> 12345 ✓"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert (ours.eos_token_id, ours.bos_token_id, ours.chat_template) == \
        (ref.eos_token_id, ref.bos_token_id, ref.chat_template)
