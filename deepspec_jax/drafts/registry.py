"""The draft families, and the resolution of a checkpoint's ``config.json`` into a
``ModelSpec`` (what to build, how its tensors are named).

The registry imports the family modules (``dspark``, ``eagle3``); they import only
shared pieces (``drafts.common``, layers, weights), never this module, so the table is
complete as soon as it is imported. A new family adds its module's ``FAMILY`` to
``FAMILIES``; loaders, converters and the decoding loop work only through this table.
"""

from __future__ import annotations

from deepspec_jax.checkpoint import ModelSpec
from deepspec_jax.config import target_config_from_dict
from deepspec_jax.drafts import dspark, eagle3
from deepspec_jax.drafts.common import DraftFamily
from deepspec_jax.errors import ConfigError
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.weights.name_map import TARGET_IGNORABLE, target_ignorable, target_rules

FAMILIES: dict[str, DraftFamily] = {f.name: f for f in (dspark.FAMILY, eagle3.FAMILY)}
BY_ARCHITECTURE: dict[str, DraftFamily] = {f.architecture: f for f in FAMILIES.values()}
BY_KIND: dict[str, DraftFamily] = {k: f for f in FAMILIES.values() for k in f.kinds}
KINDS: tuple[str, ...] = tuple(BY_KIND)


def family_for_kind(kind: str, source: str = "draft") -> DraftFamily:
    """The family serving draft kind ``kind`` ("dspark", "dflash", "eagle3")."""
    if kind not in BY_KIND:
        raise ConfigError(f"{source}: draft kind {kind!r} is unknown; expected one of "
                          f"{list(KINDS)}.")
    return BY_KIND[kind]


def family_for(raw: dict, source: str) -> DraftFamily:
    """The family of a draft config dict, from its ``architectures`` field."""
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in BY_ARCHITECTURE:
        raise ConfigError(
            f"{source}: field 'architectures' = {archs!r} is not a known draft architecture; "
            f"expected one of {sorted(BY_ARCHITECTURE)}.")
    return BY_ARCHITECTURE[archs[0]]


def _build_target(config, *, dtype, param_dtype, rngs):
    return CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _is_target_arch(archs: list) -> bool:
    """``*ForCausalLM``, or Gemma-4's multimodal ``*ForConditionalGeneration`` (a text
    target: its towers are not loaded), or no architectures at all."""
    return not archs or (len(archs) == 1 and str(archs[0]).endswith(
        ("ForCausalLM", "ForConditionalGeneration")))


def resolve_spec(raw: dict, source: str) -> ModelSpec:
    """Decide from a config dict whether it describes a target (``*ForCausalLM``, or no
    ``architectures``) or a draft of a registered family, and return its ModelSpec.
    Both are resolved here so a loader can tell a user who passed the wrong one.
    ``source`` (the config file) is named in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: field 'architectures' must be a list of strings, got {archs!r}.")
    if _is_target_arch(archs):
        cfg = target_config_from_dict(raw, source)
        return ModelSpec("target", archs[0] if archs else cfg.model_type, cfg, dict(raw),
                         tuple(target_rules(cfg)), cfg.num_hidden_layers,
                         tuple(target_ignorable(cfg)), _build_target)
    try:
        family = family_for(raw, source)
    except ConfigError:
        raise ConfigError(
            f"{source}: field 'architectures' = {archs!r} is not a known architecture; "
            f"drafts: {sorted(BY_ARCHITECTURE)}, targets: '<Family>ForCausalLM' (model_type "
            "llama/qwen3). Fix the field, or add the draft family to "
            "deepspec_jax/drafts/registry.py.") from None
    cfg = family.config_from_dict(raw, source)
    return ModelSpec("draft", family.architecture, cfg, dict(raw), tuple(family.rules(cfg)),
                     int(family.num_layers(cfg)), tuple(TARGET_IGNORABLE), family.build, family)
