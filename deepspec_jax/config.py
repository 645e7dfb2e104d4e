"""Target-model configuration, read from an HF ``config.json`` (or GGUF metadata).

One frozen dataclass describes every supported decoder family; family-specific
switches (q/k norms, tied embeddings, RoPE scaling, Gemma's norms, sliding-window
layers, KV sharing, logit softcapping) are plain fields so that the layer code
branches on data, not on class names. Per-layer geometry (head size, KV heads, MLP
width, window, RoPE) comes from the ``layer_*`` methods, never from the fields
directly, because Gemma layers differ by type.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepspec_jax.errors import ConfigError
from deepspec_jax.layers.rope import rope_inv_freq
from deepspec_jax.models.registry import family_for


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` in HF configs). ``kind`` is
    ``default`` (none), ``linear`` or ``llama3``."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # ---- Gemma-3 / Gemma-4 (defaults: Llama/Qwen3 behaviour) ----
    norm_offset: float = 0.0          # RMSNorm scale is (offset + w): Gemma-3's (1 + w)
    attn_scale: float | None = None   # softmax scale; None = head_dim ** -0.5 (Gemma-4: 1.0)
    v_norm: bool = False              # scale-free RMSNorm on v per head (Gemma-4)
    sandwich_norm: bool = False       # post-attention / pre- and post-feed-forward norms
    layer_scalar: bool = False        # a learned [1] scale of each layer's output (Gemma-4)
    activation: str = "silu"          # MLP gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0          # embeddings times sqrt(hidden) (Gemma)
    final_logit_softcap: float | None = None  # logits = c * tanh(logits / c)
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention"; () = all full
    sliding_window: int | None = None  # keys a sliding layer sees, the query's own included
    global_head_dim: int | None = None  # head size of full layers (Gemma-4); None = head_dim
    num_global_key_value_heads: int | None = None  # KV heads of full k_eq_v layers
    attention_k_eq_v: bool = False    # full layers use the key projection as values
    rope_partial: float = 1.0         # "proportional" RoPE of full layers: rotated fraction
    local_rope_theta: float | None = None  # RoPE base of sliding layers (default RoPE)
    num_kv_shared_layers: int = 0     # the last N layers reuse an earlier layer's K/V
    double_wide_mlp: bool = False     # KV-shared layers have a 2x wide MLP (Gemma-4)
    hf_prefix: str = "model."         # HF key prefix of the decoder (Gemma-4: model.language_model.)
    # The HF config dict this was parsed from (kept for exports and drafts, which
    # copy the target config with a few changes).
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- per-layer geometry ----
    def is_sliding(self, i: int) -> bool:
        return bool(self.layer_types) and self.layer_types[i] == "sliding_attention"

    def layer_window(self, i: int) -> int | None:
        """Keys a query of layer ``i`` sees (its own included), None = all before it."""
        return self.sliding_window if self.is_sliding(i) else None

    def layer_head_dim(self, i: int) -> int:
        if not self.is_sliding(i) and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_k_eq_v(i) and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(i)

    @property
    def first_kv_shared(self) -> int:
        """Index of the first layer without its own keys/values (= num layers if none)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose keys/values layer ``i`` attends to: itself, or for a
        KV-shared layer the last earlier non-shared layer of the same type."""
        first = self.first_kv_shared
        if i < first:
            return i
        kind = self.is_sliding(i)
        for j in range(first - 1, -1, -1):
            if self.is_sliding(j) == kind:
                return j
        raise ConfigError(f"layer {i} shares keys/values but no earlier layer has its type.")

    def layer_intermediate(self, i: int) -> int:
        wide = self.double_wide_mlp and i >= self.first_kv_shared > 0
        return self.intermediate_size * (2 if wide else 1)

    def layer_inv_freq(self, i: int) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] of layer ``i`` (sliding layers: the local
        base; full layers: ``rope_theta``/``rope_scaling``, with proportional partial
        RoPE as zero frequencies past the rotated fraction)."""
        d = self.layer_head_dim(i)
        if self.is_sliding(i) and self.local_rope_theta is not None:
            return rope_inv_freq(d, self.local_rope_theta)
        inv = rope_inv_freq(d, self.rope_theta, self.rope_scaling)
        if self.rope_partial < 1.0:
            inv[int(self.rope_partial * d // 2):] = 0.0
        return inv

    def attention_scale(self, head_dim: int) -> float:
        return head_dim ** -0.5 if self.attn_scale is None else self.attn_scale

    @property
    def uniform_layers(self) -> bool:
        """Every layer has the same geometry (stacked draft layers need it)."""
        sig = {(self.layer_head_dim(i), self.layer_kv_heads(i), self.layer_intermediate(i),
                self.layer_window(i), self.layer_k_eq_v(i))
               for i in range(self.num_hidden_layers)}
        return len(sig) == 1 and self.num_kv_shared_layers == 0


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _parse_rope_scaling(raw: dict, source: str) -> tuple[RopeScaling, float]:
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")  # transformers >= 5 layout
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return RopeScaling(), theta
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeScaling(), theta
    if kind not in ("linear", "llama3"):
        raise ConfigError(
            f"{source}: field 'rope_scaling.rope_type' = {kind!r} is not supported; "
            "supported: default, linear, llama3. Remove the field or convert the model "
            "to one of these.")
    return RopeScaling(
        kind=kind,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)),
    ), theta


# Every gemma3_text / gemma4_text config field; anything else is refused by name (a
# field we do not know may change the model). Fields whose non-default values we do
# not implement are checked in ``_gemma_fields``.
_HF_COMMON = {"architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
              "_name_or_path", "initializer_range", "attention_dropout", "use_cache",
              "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings",
              "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "rms_norm_eps", "attention_bias", "hidden_activation", "hidden_act",
              "rope_parameters", "rope_theta", "rope_scaling", "layer_types",
              "sliding_window", "final_logit_softcapping", "use_bidirectional_attention",
              "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
              "output_attentions", "output_hidden_states", "problem_type", "return_dict"}
_GEMMA_FIELDS = {
    3: _HF_COMMON | {"query_pre_attn_scalar", "attn_logit_softcapping", "rope_local_base_freq",
                     "sliding_window_pattern", "_sliding_window_pattern", "cache_implementation"},
    4: _HF_COMMON | {"global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
                     "num_kv_shared_layers", "use_double_wide_mlp", "enable_moe_block",
                     "num_experts", "top_k_experts", "moe_intermediate_size",
                     "hidden_size_per_layer_input", "vocab_size_per_layer_input"},
}
# Multimodal wrapper fields around a Gemma-4 text_config (towers are not used).
_GEMMA4_WRAPPER = {"architectures", "model_type", "text_config", "vision_config", "audio_config",
                   "dtype", "torch_dtype", "transformers_version", "initializer_range",
                   "tie_word_embeddings", "_name_or_path"}


def _gemma_rope(raw: dict, source: str) -> dict:
    """Per-layer-type RoPE of a Gemma config -> TargetConfig fields. transformers 5
    writes ``rope_parameters = {layer_type: {...}}``; older Gemma-3 configs a flat
    ``rope_theta`` / ``rope_scaling`` and ``rope_local_base_freq``."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full = dict(raw.get("rope_scaling") or {}, rope_theta=raw.get("rope_theta", 1e6))
        local = {"rope_type": "default", "rope_theta": raw.get("rope_local_base_freq", 1e4)}
    if local.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: field 'rope_parameters.sliding_attention.rope_type' = "
                          f"{local.get('rope_type')!r} is not supported; sliding layers need "
                          "'default' RoPE.")
    kind = full.get("rope_type", full.get("type", "default"))
    out = {"rope_theta": float(full.get("rope_theta", 1e6)),
           "local_rope_theta": float(local.get("rope_theta", 1e4))}
    if kind == "proportional":
        factor = float(full.get("factor", 1.0))
        out["rope_partial"] = float(full.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            out["rope_scaling"] = RopeScaling(kind="linear", factor=factor)
    elif kind != "default":
        out["rope_scaling"], _ = _parse_rope_scaling({"rope_scaling": full}, source)
    return out


def _gemma_fields(raw: dict, family, source: str, allow=()) -> dict:
    """The Gemma-specific TargetConfig fields of a gemma3_text / gemma4_text config;
    refuses unknown fields (other than ``allow``) and features not implemented here,
    by name."""
    known = _GEMMA_FIELDS[family.gemma] | set(allow)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"{source}: field(s) {unknown} are not known for model_type {raw.get('model_type')!r}; "
            "deepspec_jax implements the transformers 5.10 Gemma config and refuses fields it "
            "does not know rather than ignore them. Remove them if they do not change the model.")

    def refuse(field, value, want):
        if raw.get(field) not in want:
            raise ConfigError(f"{source}: field {field!r} = {raw.get(field)!r} is not supported "
                              f"(deepspec_jax needs {value}).")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{source}: field 'hidden_activation' = {act!r} is not supported; "
                          "Gemma models use 'gelu_pytorch_tanh'.")
    # "vision": image tokens attend both ways, text stays causal (a text target here).
    refuse("use_bidirectional_attention", "causal text attention: null, false or 'vision'",
           (None, False, "vision"))
    layers = int(raw["num_hidden_layers"])
    types = tuple(raw.get("layer_types") or ())
    if not types and (raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")):
        n = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern"))
        types = tuple("full_attention" if (i + 1) % n == 0 else "sliding_attention"
                      for i in range(layers))
    bad = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if len(types) not in (0, layers) or bad:
        raise ConfigError(f"{source}: field 'layer_types' must list 'full_attention' / "
                          f"'sliding_attention' once per layer ({layers}); got {list(types)}.")
    hidden = int(raw["hidden_size"])
    out = dict(norm_offset=1.0 if family.gemma == 3 else 0.0, sandwich_norm=True,
               activation="gelu_tanh", embed_scale=float(hidden ** 0.5), layer_types=types,
               sliding_window=raw.get("sliding_window"),
               final_logit_softcap=raw.get("final_logit_softcapping"),
               **_gemma_rope(raw, source))
    if family.gemma == 3:
        refuse("attn_logit_softcapping", "null (no attention-logit softcapping)", (None,))
        out["attn_scale"] = float(raw.get("query_pre_attn_scalar") or raw.get("head_dim", 256)) ** -0.5
        return out
    refuse("enable_moe_block", "false (no MoE block)", (None, False))
    refuse("hidden_size_per_layer_input", "0 (no per-layer inputs)", (None, 0))
    for f in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        refuse(f, "null without a MoE block", (None,))
    out.update(attn_scale=1.0, v_norm=True, layer_scalar=True,
               global_head_dim=raw.get("global_head_dim"),
               num_global_key_value_heads=raw.get("num_global_key_value_heads"),
               attention_k_eq_v=bool(raw.get("attention_k_eq_v", False)),
               num_kv_shared_layers=int(raw.get("num_kv_shared_layers") or 0),
               double_wide_mlp=bool(raw.get("use_double_wide_mlp", False)))
    if out["num_kv_shared_layers"] >= layers:
        raise ConfigError(f"{source}: num_kv_shared_layers={out['num_kv_shared_layers']} leaves "
                          f"no layer of the {layers} with its own keys/values.")
    return out


def _gemma4_text(raw: dict, source: str) -> tuple[dict, str]:
    """The text config of a ``gemma4`` / ``gemma4_unified`` (multimodal wrapper)
    config.json, and the HF prefix of its decoder tensors."""
    unknown = sorted(k for k in raw if k not in _GEMMA4_WRAPPER and not k.endswith("token_id")
                     and not k.endswith("token_index"))
    if unknown:
        raise ConfigError(f"{source}: field(s) {unknown} are not known for model_type "
                          f"{raw['model_type']!r}.")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type {raw['model_type']!r} needs a 'text_config' object.")
    text = dict(text)
    text.setdefault("model_type", raw["model_type"] + "_text")
    if "tie_word_embeddings" in raw:
        text.setdefault("tie_word_embeddings", raw["tie_word_embeddings"])
    return text, "model.language_model."


def target_config_from_dict(raw: dict, source: str = "config.json", allow=()) -> TargetConfig:
    """Build a TargetConfig from an HF config dict; ``source`` names the file in errors.
    ``allow``: extra field names the caller reads itself (a draft's config.json is the
    target's text config plus the draft's fields); Gemma configs refuse other unknown
    fields."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing field 'model_type'; add e.g. \"model_type\": \"llama\".")
    family = family_for(model_type, source)
    outer, prefix = raw, "model."
    if model_type in ("gemma4", "gemma4_unified"):
        raw, prefix = _gemma4_text(raw, source)
        model_type = raw["model_type"]
        family = family_for(model_type, source + " text_config")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing} for model_type {model_type!r}.")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}; fix one of the two fields.")
    head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // heads
    if family.gemma:
        rope_scaling, theta = RopeScaling(), 0.0  # from _gemma_fields
        extra = _gemma_fields(raw, family, source, allow)
        extra["hf_prefix"] = prefix
    else:
        rope_scaling, theta = _parse_rope_scaling(raw, source)
        extra = {}
    eos = _as_int_tuple(raw.get("eos_token_id"))
    fields = dict(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", family.default_tie)),
        qk_norm=family.qk_norm,
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        raw=dict(outer),
    )
    fields.update(extra)
    return TargetConfig(**fields)


def load_config_json(path: str) -> dict:
    """Read a JSON config file with an error that names the file."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found; a model directory needs a config.json.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); fix or re-export the file.") from e
