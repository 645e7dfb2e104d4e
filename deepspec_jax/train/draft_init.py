"""Build a fresh (or warm-started) draft for a target from the run config.

The draft's HF config is derived from the target's the way DeepSpec derives it (a
Qwen3 layer config with the target's width, heads and rope, plus the draft fields),
so the trained draft exports to a checkpoint in DeepSpec's HF format.
Embeddings and lm_head are copied from the target and stay frozen; with a reduced
draft vocabulary (``draft.draft_vocab_size`` = K > 0) the lm_head is the target's at
the K most frequent target tokens of the training data (``draft_vocab``).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepspec_jax.checkpoint import ModelSpec
from deepspec_jax.config import TargetConfig
from deepspec_jax.data.token_store import TokenStore, token_counts
from deepspec_jax.draft_vocab import D2T, FIELD, T2D, select_draft_vocab, selected_ids
from deepspec_jax.drafts.common import GEMMA4_TEXT_TYPES
from deepspec_jax.drafts.registry import family_for_kind, resolve_spec
from deepspec_jax.errors import ConfigError


def reserved_mask_token(tokenizer, vocab_size: int) -> int:
    """A token id the target never produces in text, for DSpark's mask embedding.

    Prefers an added special token that is not BOS/EOS/PAD/chat markup; errors if the
    tokenizer has none (set draft.mask_token_id explicitly then)."""
    if tokenizer is None:
        raise ConfigError("draft.mask_token_id = -1 needs the target tokenizer to pick a reserved "
                          "token; set --config.draft.mask_token_id=<id> explicitly.")
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            tokenizer.unk_token_id}
    template = getattr(tokenizer, "chat_template", None) or ""
    for tid in sorted(getattr(tokenizer, "added_tokens_decoder", {}) or {}, reverse=True):
        tok = tokenizer.added_tokens_decoder[tid]
        content = getattr(tok, "content", str(tok))
        if tid in used or tid >= vocab_size or content in template:
            continue
        return int(tid)
    raise ConfigError("the target tokenizer has no spare special token for DSpark's mask; set "
                      "--config.draft.mask_token_id=<id> to an id the target never generates.")


def draft_hf_config(c, tcfg: TargetConfig, tokenizer=None, target_name: str = "") -> dict:
    """The draft's HF config.json dict for run config ``c`` and target config ``tcfg``."""
    raw = _draft_hf_config(c, tcfg, tokenizer, target_name)
    k = int(c.draft.draft_vocab_size)
    if k < 0:
        raise ConfigError(f"config field draft.draft_vocab_size = {k} must be >= 0 (0 = the full "
                          "vocabulary, K > 0 = a reduced draft vocabulary of K tokens).")
    return {**raw, FIELD: k} if k else raw


def _draft_hf_config(c, tcfg: TargetConfig, tokenizer=None, target_name: str = "") -> dict:
    d = c.draft
    kind = d.kind
    ids = [int(i) for i in d.target_layer_ids]
    if ids == [-1]:
        raise ConfigError("config field draft.target_layer_ids is not set; list the target layers "
                          f"to read features from (the target has {tcfg.num_hidden_layers} layers, "
                          "the last one may not be used).")
    family = family_for_kind(kind, "config field draft.kind")
    if tcfg.model_type in GEMMA4_TEXT_TYPES:
        return _gemma4_draft_config(c, tcfg, family, ids, tokenizer, target_name)
    if tcfg.model_type not in ("llama", "qwen3", "gemma3_text"):
        raise ConfigError(f"draft_init: deriving a {kind} draft config from a {tcfg.model_type!r} "
                          "target is not implemented (DeepSpec builds drafts for Qwen3 and "
                          "Gemma-4 targets; llama and Gemma-3 targets get Qwen3 draft layers).")
    arch = family.architecture_for("qwen3", "config field draft.kind")
    rope = (tcfg.raw or {}).get("rope_parameters") or {"rope_type": "default", "rope_theta": tcfg.rope_theta}
    if tcfg.model_type == "gemma3_text":
        # Gemma-3's RoPE is per layer type; the draft's full-attention layers take the
        # target's full-attention base and scaling (the local base is for windows).
        rope = {"rope_type": tcfg.rope_scaling.kind, "rope_theta": tcfg.rope_theta}
        if tcfg.rope_scaling.kind == "linear":
            rope["factor"] = tcfg.rope_scaling.factor
    n_layers = int(d.num_hidden_layers)
    raw = {
        "architectures": [arch], "model_type": "qwen3",
        "hidden_size": tcfg.hidden_size, "num_attention_heads": tcfg.num_attention_heads,
        "num_key_value_heads": tcfg.num_key_value_heads, "head_dim": tcfg.head_dim,
        "intermediate_size": int(d.intermediate_size) if d.intermediate_size > 0 else tcfg.intermediate_size,
        "vocab_size": tcfg.vocab_size, "rms_norm_eps": tcfg.rms_norm_eps,
        "rope_parameters": dict(rope), "max_position_embeddings": tcfg.max_position_embeddings,
        "num_hidden_layers": n_layers, "layer_types": ["full_attention"] * n_layers,
        "num_target_layers": tcfg.num_hidden_layers, "target_layer_ids": ids,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": n_layers,
        "bos_token_id": tcfg.bos_token_id,
        "eos_token_id": list(tcfg.eos_token_ids) if tcfg.eos_token_ids else None,
        "pad_token_id": None, "dtype": "float32",
    }
    if kind == "eagle3":
        raw.update(draft_num_hidden_layers=n_layers, ttt_length=int(d.ttt_length),
                   step_loss_decay=float(d.step_loss_decay),
                   target_model_name_or_path=target_name)
    else:
        mask = int(d.mask_token_id)
        if mask < 0:
            mask = reserved_mask_token(tokenizer, tcfg.vocab_size)
        rank = 0 if kind == "dflash" else int(d.markov_rank)
        raw.update(block_size=int(d.block_size), num_anchors=int(d.num_anchors), mask_token_id=mask,
                   markov_rank=rank, markov_head_type=(d.markov_head_type or None) if rank else None,
                   enable_confidence_head=bool(d.enable_confidence_head) and kind == "dspark",
                   confidence_head_with_markov=bool(d.confidence_head_with_markov) and rank > 0)
    return raw


def _gemma4_draft_config(c, tcfg: TargetConfig, family, ids, tokenizer, target_name) -> dict:
    """DeepSpec's Gemma-4 draft config (``modeling/{dspark,eagle3}/gemma4/config.py``): a
    copy of the target's text config with the draft's layer count, full-attention
    layers, untied embeddings and the draft fields (set only where DeepSpec sets them).
    The draft layers keep the target's MLP width (DeepSpec has no override)."""
    d = c.draft
    kind = d.kind
    outer = tcfg.raw or {}
    wrapped = outer.get("model_type") in ("gemma4", "gemma4_unified")
    text = outer.get("text_config") if wrapped else outer
    text_type = (text or {}).get("model_type", tcfg.model_type) if isinstance(text, dict) else None
    if text_type not in GEMMA4_TEXT_TYPES:
        raise ConfigError("draft_init: the Gemma-4 target's config.json has no gemma4_text / "
                          "gemma4_unified_text text config to copy for the draft.")
    if int(d.intermediate_size) > 0 and int(d.intermediate_size) != tcfg.intermediate_size:
        raise ConfigError(f"config field draft.intermediate_size = {d.intermediate_size}: "
                          "DeepSpec's Gemma-4 drafts use the target's intermediate_size "
                          f"({tcfg.intermediate_size}); set it to -1.")
    n_layers = int(d.num_hidden_layers)
    raw = json.loads(json.dumps(text))  # a deep copy, as DeepSpec's copy.deepcopy
    raw.update({"architectures": [family.architecture_for(text_type, "config field draft.kind")],
                "model_type": text_type, "target_model_type": str(outer.get("model_type")),
                "target_text_model_type": text_type, "num_target_layers": tcfg.num_hidden_layers,
                "num_hidden_layers": n_layers, "layer_types": ["full_attention"] * n_layers,
                "tie_word_embeddings": False, "target_layer_ids": ids, "dtype": "float32"})
    if kind == "eagle3":
        raw.update(draft_num_hidden_layers=n_layers, ttt_length=int(d.ttt_length),
                   step_loss_decay=float(d.step_loss_decay),
                   target_model_name_or_path=target_name)
        return raw
    mask = int(d.mask_token_id)
    if mask < 0:
        mask = reserved_mask_token(tokenizer, tcfg.vocab_size)
    rank = 0 if kind == "dflash" else int(d.markov_rank)
    conf = bool(d.enable_confidence_head) and kind == "dspark"
    raw.update(block_size=int(d.block_size), mask_token_id=mask, num_anchors=int(d.num_anchors),
               enable_confidence_head=conf, markov_rank=rank)
    if conf:
        raw["confidence_head_with_markov"] = bool(d.confidence_head_with_markov)
    if rank > 0:
        raw["markov_head_type"] = d.markov_head_type
    return raw


def build_draft(spec: ModelSpec, *, compute_dtype, seed: int, embed, lm_head, vocab=None):
    """A randomly initialised draft (fp32 master weights) whose frozen embed [V, d] and
    lm_head [d, V] are the target's, stored in ``compute_dtype``: the draft casts them
    to it at every use, so a float32 copy would only double their memory. ``vocab``
    (d2t, t2d) of a reduced draft vocabulary: the lm_head keeps the target's columns at
    the draft's K ids and the maps are set (None with one: the abstract build)."""
    model = spec.build_fn(spec.config, dtype=compute_dtype, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(seed))
    model.embed.set_value(jnp.asarray(embed, compute_dtype))
    if getattr(spec.config, "draft_vocab_size", None) is not None and vocab is not None:
        d2t, t2d = vocab
        lm_head = jnp.take(lm_head, jnp.asarray(selected_ids(d2t), jnp.int32), axis=1)
        getattr(model, D2T).set_value(jnp.asarray(d2t, jnp.int32))
        getattr(model, T2D).set_value(jnp.asarray(t2d, bool))
    elif getattr(spec.config, "draft_vocab_size", None) is not None:
        lm_head = lm_head[:, :spec.config.draft_vocab_size]
    model.lm_head.set_value(jnp.asarray(lm_head, compute_dtype))
    return model


def draft_vocab_for_run(c, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """(d2t, t2d) of the run's reduced draft vocabulary: the ``draft.draft_vocab_size``
    most frequent target tokens at loss-mask positions of ``data.train`` (the stores'
    token counts, summed), selected as vLLM's speculators does; None without one."""
    k = getattr(spec.config, "draft_vocab_size", None)
    if k is None:
        return None
    if not c.data.train:
        raise ConfigError("config field draft.draft_vocab_size needs data.train: the draft "
                          "vocabulary is selected from the training data's token counts.")
    total: dict[int, int] = {}
    for path in c.data.train:
        for t, n in token_counts(TokenStore(path)).items():
            total[t] = total.get(t, 0) + n
    return select_draft_vocab(total, k, spec.config.vocab_size)


def spec_for_run(c, tcfg: TargetConfig, tokenizer=None, target_name: str = "") -> ModelSpec:
    raw = draft_hf_config(c, tcfg, tokenizer, target_name)
    return resolve_spec(raw, f"run config '{c.name}' (draft section)")


__all__ = ["draft_hf_config", "build_draft", "spec_for_run", "reserved_mask_token",
           "draft_vocab_for_run"]
