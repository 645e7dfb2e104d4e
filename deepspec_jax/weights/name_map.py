"""Declarative maps between HF checkpoint keys and our parameter paths.

One ``Rule`` list per architecture drives both loading (HF -> JAX, ``loader``) and
exporting (JAX -> HF, ``convert``), so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from deepspec_jax.config import TargetConfig
from deepspec_jax.models.transformer import layer_param_layers


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str              # dotted path in our param tree, e.g. "layers.q_proj"
    hf: str                # HF key; "{i}" stands for the layer index of stacked params
    transpose: bool = False  # HF Linear [out, in] <-> ours [in, out]
    layers: tuple[int, ...] | None = None  # the layers that have it (None: all; Gemma-4 KV sharing)
    hf_dtype: str | None = None  # fixed on-disk dtype of an integer/bool buffer (a draft's
                                 # d2t: int64, t2d: bool); such tensors are never cast

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_keys(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf]
        idx = range(num_layers) if self.layers is None else self.layers
        return [self.hf.format(i=i) for i in idx]

    def to_ours(self, t: np.ndarray) -> np.ndarray:
        return t.T if self.transpose else t

    def to_hf(self, t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.T if self.transpose else t)


def layer_rules(prefix: str, ours_prefix: str, *, qk_norm: bool, attention_bias: bool,
                cfg: TargetConfig | None = None) -> list[Rule]:
    """Rules for a stack of decoder layers under HF ``prefix``: Llama/Qwen3, or with
    ``cfg`` of a Gemma family its extra norms/scalars and the layers each parameter
    exists in (``models.transformer.layer_param_layers``)."""
    p = f"{prefix}layers.{{i}}."
    o = f"{ours_prefix}"
    rules = [
        Rule(o + "input_norm", p + "input_layernorm.weight"),
        Rule(o + "post_attn_norm", p + "post_attention_layernorm.weight"),
        Rule(o + "q_proj", p + "self_attn.q_proj.weight"),
        Rule(o + "k_proj", p + "self_attn.k_proj.weight"),
        Rule(o + "v_proj", p + "self_attn.v_proj.weight"),
        Rule(o + "o_proj", p + "self_attn.o_proj.weight"),
        Rule(o + "gate_proj", p + "mlp.gate_proj.weight"),
        Rule(o + "up_proj", p + "mlp.up_proj.weight"),
        Rule(o + "down_proj", p + "mlp.down_proj.weight"),
    ]
    if attention_bias:
        rules += [Rule(o + f"{n}_bias", p + f"self_attn.{n}_proj.bias") for n in "qkv"]
    if qk_norm:
        rules += [Rule(o + "q_norm", p + "self_attn.q_norm.weight"),
                  Rule(o + "k_norm", p + "self_attn.k_norm.weight")]
    if cfg is None:
        return rules
    if cfg.sandwich_norm:
        rules += [Rule(o + "pre_ff_norm", p + "pre_feedforward_layernorm.weight"),
                  Rule(o + "post_ff_norm", p + "post_feedforward_layernorm.weight")]
    if cfg.layer_scalar:
        rules.append(Rule(o + "layer_scalar", p + "layer_scalar"))
    have = layer_param_layers(cfg)
    full = tuple(range(cfg.num_hidden_layers))
    return [dataclasses.replace(r, layers=None if have[n] == full else have[n])
            for r in rules if (n := r.ours[len(o):]) in have]


def target_rules(cfg: TargetConfig) -> list[Rule]:
    m = cfg.hf_prefix
    rules = [Rule("embed", m + "embed_tokens.weight"), Rule("final_norm", m + "norm.weight")]
    rules += layer_rules(m, "layers.", qk_norm=cfg.qk_norm, attention_bias=cfg.attention_bias,
                         cfg=cfg)
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head", "lm_head.weight", True))
    return rules


# HF keys that carry no parameters of ours and may be present in a checkpoint.
TARGET_IGNORABLE = (re.compile(r".*rotary_emb\.inv_freq$"),)
# A Gemma-4 (multimodal) checkpoint's vision/audio towers: a text target never runs them.
_GEMMA4_TOWERS = re.compile(r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.")


def target_ignorable(cfg: TargetConfig) -> tuple[re.Pattern, ...]:
    extra = (re.compile(r"^lm_head\.weight$"),) if cfg.tie_word_embeddings else ()
    if cfg.hf_prefix == "model.language_model.":
        extra += (_GEMMA4_TOWERS,)
    return TARGET_IGNORABLE + extra
