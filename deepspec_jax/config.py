"""Target-model configuration, read from an HF ``config.json`` (or GGUF metadata).

One frozen dataclass describes every supported decoder family; family-specific
switches (q/k norms, tied embeddings, RoPE scaling) are plain fields so that the
layer code branches on data, not on class names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from deepspec_jax.errors import ConfigError
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
    # The HF config dict this was parsed from (kept for exports and drafts, which
    # copy the target config with a few changes).
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


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


def target_config_from_dict(raw: dict, source: str = "config.json") -> TargetConfig:
    """Build a TargetConfig from an HF config dict; ``source`` names the file in errors."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing field 'model_type'; add e.g. \"model_type\": \"llama\".")
    family = family_for(model_type, source)
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
    rope_scaling, theta = _parse_rope_scaling(raw, source)
    eos = _as_int_tuple(raw.get("eos_token_id"))
    return TargetConfig(
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
        raw=dict(raw),
    )


def load_config_json(path: str) -> dict:
    """Read a JSON config file with an error that names the file."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found; a model directory needs a config.json.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); fix or re-export the file.") from e
