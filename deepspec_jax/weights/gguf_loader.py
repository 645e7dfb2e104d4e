"""GGUF (llama.cpp) checkpoints -> HF-named fp32 tensors + HF config + tokenizer.

Only the ``llama`` GGUF architecture is read (it covers SmolLM2 and other Llama
models). Quantised tensors are dequantised with the ``gguf`` package; llama.cpp's
converter permutes q/k rows for its interleaved RoPE, which is undone here so the
result equals the HF checkpoint the GGUF was made from.
"""

from __future__ import annotations

import os

import numpy as np

from deepspec_jax.errors import CheckpointError, ConfigError

SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
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


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` for q/k weights ([out, in])."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (HF-style config dict, HF-named float32 tensors)."""
    import gguf  # imported lazily: only GGUF users need it

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: GGUF file not found.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueErrors on malformed files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}).") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(
            f"{path}: field 'general.architecture' = {arch!r} is not supported for GGUF "
            "loading (only 'llama'); convert the model to an HF safetensors directory instead.")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
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
            if rest not in _LAYER:
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a llama GGUF.")
            hf = f"model.layers.{idx}.{_LAYER[rest]}"
        elif t.name == "rope_freqs.weight":
            continue  # llama3 scaling factors; recomputed from the config
        else:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a llama GGUF.")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if hf.endswith("q_proj.weight"):
            w = _unpermute(w, n_head)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute(w, n_kv)
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


def gguf_tokenizer(path: str):
    """HF fast tokenizer (with chat template) built from the GGUF metadata, offline and
    without torch: ``AutoTokenizer.from_pretrained(gguf_file=...)`` insists on torch,
    which deepspec_jax never needs at run time, so the metadata is read with ``gguf``
    and handed to transformers' torch-free GGUF tokenizer converter."""
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer

    reader = gguf.GGUFReader(path)
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
    fast, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tok)
    return PreTrainedTokenizerFast(tokenizer_object=fast, **init, **extra)
