"""Target families keyed by HF ``model_type``.

A family is data: which optional parts its layers have and how its HF checkpoint
keys map onto our parameter tree (``weights.name_map``). Adding a family (e.g. Gemma)
means adding one ``Family`` here plus any new layer switches it needs.
"""

from __future__ import annotations

import dataclasses

from deepspec_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    qk_norm: bool          # per-head RMSNorm on q and k before RoPE (Qwen3)
    default_tie: bool      # tie_word_embeddings when config.json omits the field
    hf_architecture: str   # the ``architectures`` entry HF writes for this family
    gemma: int = 0         # Gemma generation (3, 4): its layer conventions; 0 = Llama-style


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", qk_norm=False, default_tie=False,
                    hf_architecture="LlamaForCausalLM"),
    "qwen3": Family("qwen3", qk_norm=True, default_tie=False,
                    hf_architecture="Qwen3ForCausalLM"),
    "gemma3_text": Family("gemma3_text", qk_norm=True, default_tie=True,
                          hf_architecture="Gemma3ForCausalLM", gemma=3),
    "gemma4_text": Family("gemma4_text", qk_norm=True, default_tie=True,
                          hf_architecture="Gemma4ForCausalLM", gemma=4),
    # The multimodal wrapper (text_config inside; vision/audio towers unused here).
    "gemma4": Family("gemma4", qk_norm=True, default_tie=True,
                     hf_architecture="Gemma4ForConditionalGeneration", gemma=4),
    # Gemma-4 "unified" (e.g. google/gemma-4-12B-it): the same text decoder without
    # per-layer inputs or MoE fields.
    "gemma4_unified_text": Family("gemma4_unified_text", qk_norm=True, default_tie=True,
                                  hf_architecture="Gemma4UnifiedForCausalLM", gemma=4),
    "gemma4_unified": Family("gemma4_unified", qk_norm=True, default_tie=True,
                             hf_architecture="Gemma4UnifiedForConditionalGeneration", gemma=4),
}


def family_for(model_type: str, source: str = "config.json") -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ConfigError(
            f"{source}: field 'model_type' = {model_type!r} is not a supported target "
            f"architecture; supported: {sorted(FAMILIES)}. Convert the model to one of "
            "these or add a Family in deepspec_jax/models/registry.py.") from None
