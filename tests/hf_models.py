"""Tiny random HF (PyTorch) causal LMs written as safetensors checkpoints, for parity tests."""

from __future__ import annotations

import os


def make_tiny_hf(tmp_dir: str, model_type: str, *, heads: int = 4, kv_heads: int = 2,
                 tie: bool = False, layers: int = 3, seed: int = 0, hidden: int = 64,
                 vocab: int = 256, rope_scaling: dict | None = None, **extra) -> str:
    """Save a random tiny Llama/Qwen3/Gemma-3/Gemma-4 with ``save_pretrained`` and return
    its directory. ``extra``: more config fields (Gemma: layer_types, sliding_window,
    num_kv_shared_layers, attention_k_eq_v, ...)."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    from transformers.models.gemma4 import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if model_type == "llama":
        cfg = LlamaConfig(**common, head_dim=hidden // heads, rope_theta=10000.0,
                          rope_scaling=rope_scaling)
        model = LlamaForCausalLM(cfg)
    elif model_type == "qwen3":
        cfg = Qwen3Config(**common, head_dim=24, rope_theta=1e6)
        model = Qwen3ForCausalLM(cfg)
    elif model_type == "gemma3_text":
        cfg = Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=24,
                               hidden_activation="gelu_pytorch_tanh", **extra)
        model = Gemma3ForCausalLM(cfg)
    elif model_type == "gemma4_unified_text":
        from transformers.models.gemma4_unified import (Gemma4UnifiedForCausalLM,
                                                        Gemma4UnifiedTextConfig)
        cfg = Gemma4UnifiedTextConfig(**common, head_dim=16,
                                      hidden_activation="gelu_pytorch_tanh", **extra)
        model = Gemma4UnifiedForCausalLM(cfg)
    elif model_type == "gemma4_text":
        cfg = Gemma4TextConfig(**common, head_dim=16, hidden_size_per_layer_input=0,
                               hidden_activation="gelu_pytorch_tanh", **extra)
        model = Gemma4ForCausalLM(cfg)
    else:
        raise ValueError(model_type)
    with torch.no_grad():  # HF init leaves norms at 1: perturb everything
        g = torch.Generator().manual_seed(seed + 1)
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("layer_scalar"):   # Gemma-4: a saved buffer, 1 at init
                b.add_(0.1 * torch.randn(b.shape, generator=g))
    model.eval()
    path = os.path.join(tmp_dir, f"{model_type}_h{heads}_kv{kv_heads}_tie{int(tie)}_s{seed}")
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_forward(path: str, ids):
    """(logits, hidden_states tuple) of the saved HF model, fp32 CPU, as numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
