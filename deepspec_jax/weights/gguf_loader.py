"""GGUF (llama.cpp) checkpoints -> HF-named fp32 tensors + HF config + tokenizer.

Two GGUF architectures are read: ``llama`` (SmolLM2 and other Llama models) and
``gemma3`` (Gemma-3 text models, e.g. Gemma-3-270M). Quantised tensors are dequantised
with the ``gguf`` package. What llama.cpp's converter changed is undone so the result
equals transformers' own GGUF loading: for llama it permutes q/k rows for its
interleaved RoPE; for gemma3 it stores every ``*norm.weight`` as ``w + 1`` (llama.cpp's
RMSNorm multiplies by the weight, Gemma's by ``1 + w``) and leaves q/k unpermuted.
"""

from __future__ import annotations

import os

import numpy as np

from deepspec_jax.errors import CheckpointError, ConfigError

SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# gguf's MODEL_TENSORS for GEMMA3 (llama.cpp's names for the HF Gemma-3 layer): the
# four sandwich norms and the per-head q/k norms.
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# gemma3.* metadata read below; any other gemma3 key is refused by name (it may change
# the model and would otherwise be ignored).
_GEMMA3_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "attention.layer_norm_rms_epsilon",
                "attention.sliding_window", "attention.sliding_window_pattern",
                "attention.scale", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
                "rope.scaling.factor", "rope.dimension_count", "vocab_size",
                "final_logit_softcapping", "attn_logit_softcapping"}
# llama.cpp's Gemma-3 constants where the GGUF carries no field (src/llama-model.cpp,
# LLM_ARCH_GEMMA3): every 6th layer global, local RoPE base 10000, and the attention
# scale 1/sqrt(head_dim) except the 62-layer 27B, where it is 1/sqrt(hidden/heads).
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA, _GEMMA3_27B_LAYERS = 6, 10000.0, 62


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` for q/k weights ([out, in])."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` of ``path``. Parsing the metadata of a large vocabulary is
    slow (Gemma-3's 262k tokens: ~10-20 s), so callers that need both the weights and
    the tokenizer open the file once and pass the reader to both."""
    import gguf  # imported lazily: only GGUF users need it

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: GGUF file not found.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueErrors on malformed files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}).") from e


def _vocab_size(reader, arch: str) -> int:
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return int(vocab)


def _llama_config(reader, path: str, names: set) -> dict:
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(reader, "llama"),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "head_dim": int(g("rope.dimension_count", hidden // n_head)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scale_type = g("rope.scaling.type")
    if scale_type and scale_type != "none":
        config["rope_scaling"] = {"rope_type": scale_type, "factor": float(g("rope.scaling.factor", 1.0))}
    return config


def _gemma3_config(reader, path: str, names: set) -> dict:
    """The HF ``gemma3_text`` config (transformers 5 layout) of a gemma3 GGUF: the fields
    transformers' GGUF mapping reads, plus those it leaves at Gemma3TextConfig's
    defaults, here taken from the GGUF where it has them and from llama.cpp's constants
    where it does not (for Gemma-3-270M both give the same values)."""
    unknown = sorted(k for k in reader.fields
                     if k.startswith("gemma3.") and k[len("gemma3."):] not in _GEMMA3_KEYS)
    if unknown:
        raise ConfigError(f"{path}: GGUF field(s) {unknown} are not known for architecture "
                          f"'gemma3' (known: {sorted(_GEMMA3_KEYS)}); they may change the model.")
    g = lambda k, d=None: _field(reader, f"gemma3.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    layers = int(g("block_count"))
    head_dim = int(g("attention.key_length", 256))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{path}: GGUF field 'gemma3.attention.value_length' = "
                          f"{g('attention.value_length')} differs from 'attention.key_length' = "
                          f"{head_dim}; Gemma-3 has one head_dim for keys and values.")
    pattern = g("attention.sliding_window_pattern", _GEMMA3_PATTERN)
    if isinstance(pattern, list):  # per layer: True = sliding
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
                       for i in range(layers)]
    theta = float(g("rope.freq_base", 1e6))
    full_rope = {"rope_type": "default", "rope_theta": theta}
    scale_type = g("rope.scaling.type")
    if scale_type and scale_type != "none":
        full_rope = {"rope_type": scale_type, "rope_theta": theta,
                     "factor": float(g("rope.scaling.factor", 1.0))}
    scale = g("attention.scale")
    if scale is not None:
        qpas = float(scale) ** -2
    else:
        qpas = hidden // n_head if layers == _GEMMA3_27B_LAYERS else head_dim
    tok = lambda k, d: int(_field(reader, f"tokenizer.ggml.{k}", d))  # noqa: E731
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": _vocab_size(reader, "gemma3"),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(g("context_length", 131072)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "pad_token_id": tok("padding_token_id", 0),
        "eos_token_id": tok("eos_token_id", 1),
        "bos_token_id": tok("bos_token_id", 2),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(g("rope.freq_base_swa", _GEMMA3_LOCAL_THETA))},
            "full_attention": full_rope},
        "attention_bias": False,
        "query_pre_attn_scalar": qpas,
        "sliding_window": int(g("attention.sliding_window", 4096)),
        "layer_types": layer_types,
        "final_logit_softcapping": g("final_logit_softcapping"),
        "attn_logit_softcapping": g("attn_logit_softcapping"),
    }


# architecture -> (config builder, per-layer tensor names, q/k permuted by llama.cpp,
# norm weights stored as w + 1 by llama.cpp)
_ARCHS = {
    "llama": (_llama_config, _LLAMA_LAYER, True, False),
    "gemma3": (_gemma3_config, _GEMMA3_LAYER, False, True),
}


def read_gguf(path: str, reader=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (HF-style config dict, HF-named float32 tensors); ``reader``: an
    ``open_gguf(path)`` result to reuse."""
    import gguf

    reader = reader if reader is not None else open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ConfigError(
            f"{path}: field 'general.architecture' = {arch!r} is not supported for GGUF "
            f"loading (only {sorted(_ARCHS)}); convert the model to an HF safetensors "
            "directory instead.")
    build_config, layer_names, permuted_qk, norm_plus_one = _ARCHS[arch]
    config = build_config(reader, path, {t.name for t in reader.tensors})
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        qname = t.tensor_type.name
        if qname not in SUPPORTED_QUANTS:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} uses quantisation {qname}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_QUANTS)}); re-quantise the GGUF to one of "
                "these or use the HF safetensors checkpoint.")
        if t.name in _GLOBAL:
            hf = _GLOBAL[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in layer_names:
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} GGUF.")
            hf = f"model.layers.{idx}.{layer_names[rest]}"
        elif t.name == "rope_freqs.weight" and arch == "llama":
            continue  # llama3 scaling factors; recomputed from the config
        else:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} GGUF.")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if permuted_qk and hf.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted_qk and hf.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        elif norm_plus_one and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        tensors[hf] = w
    return config, tensors


# GGUF ``tokenizer.ggml.*`` metadata -> the keyword names transformers' GGUF tokenizer
# converter expects (tokenizer dict) and the tokenizer's own init kwargs.
_TOKENIZER_KEYS = {"model": "tokenizer_type", "tokens": "tokens", "scores": "scores",
                   "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
                   "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                   "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}
_TOKENIZER_INIT_KEYS = {"model": "model_type", "bos_token_id": "bos_token_id",
                        "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                        "padding_token_id": "pad_token_id"}
# GGUF architecture -> transformers' name for its tokenizer converter (the model_type
# transformers gives the GGUF's config).
_TOKENIZER_ARCH = {"gemma3": "gemma3_text"}


def gguf_tokenizer(path: str, reader=None):
    """HF fast tokenizer (with chat template) built from the GGUF metadata, offline and
    without torch: ``AutoTokenizer.from_pretrained(gguf_file=...)`` insists on torch,
    which deepspec_jax never needs at run time, so the metadata is read with ``gguf``
    and handed to transformers' torch-free GGUF tokenizer converter, in the tokenizer
    class AutoTokenizer picks (Gemma's adds its special tokens)."""
    from transformers import GemmaTokenizer, PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer

    reader = reader if reader is not None else open_gguf(path)
    tok, init = {}, {}
    for key, field in reader.fields.items():
        if key == "tokenizer.chat_template":
            init["chat_template"] = field.contents()
        elif key.startswith("tokenizer.ggml."):
            name = key[len("tokenizer.ggml."):]
            if name in _TOKENIZER_KEYS:
                tok[_TOKENIZER_KEYS[name]] = field.contents()
            if name in _TOKENIZER_INIT_KEYS:
                init[_TOKENIZER_INIT_KEYS[name]] = field.contents()
    if "tokens" not in tok:
        raise CheckpointError(f"{path}: no tokenizer.ggml.tokens metadata; this GGUF carries no "
                              "tokenizer. Pass an HF checkpoint directory with tokenizer files.")
    arch = _field(reader, "general.architecture")
    fast, extra = convert_gguf_tokenizer(_TOKENIZER_ARCH.get(arch, arch), tok)
    cls = GemmaTokenizer if arch == "gemma3" else PreTrainedTokenizerFast
    return cls(tokenizer_object=fast, **init, **extra)
