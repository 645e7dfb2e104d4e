"""Draft architectures keyed by the HF ``architectures[0]`` string.

Each draft family module (``dspark``, ``eagle3``) registers one ``DraftArch`` per
architecture name it reads and writes. Converters and ``load_draft`` work only
through this table, so a new family plugs in without touching them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from deepspec_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DraftArch:
    architecture: str                  # e.g. "Qwen3DSparkModel"
    kind: str                          # "dspark" (DFlash = DSpark without heads) | "eagle3"
    config_from_dict: Callable         # (raw HF config dict, source str) -> draft config
    build: Callable                    # (config, *, dtype, param_dtype, rngs) -> nnx.Module
    rules: Callable                    # (config) -> list[weights.name_map.Rule]
    num_layers: Callable               # (config) -> int, for "{i}" rules


DRAFT_ARCHS: dict[str, DraftArch] = {}


def register(arch: DraftArch) -> DraftArch:
    DRAFT_ARCHS[arch.architecture] = arch
    return arch


def arch_for(raw: dict, source: str) -> DraftArch:
    # Importing the families fills the table.
    from deepspec_jax.drafts import dspark, eagle3  # noqa: F401

    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in DRAFT_ARCHS:
        raise ConfigError(
            f"{source}: field 'architectures' = {archs!r} is not a known draft architecture; "
            f"expected one of {sorted(DRAFT_ARCHS)}.")
    return DRAFT_ARCHS[archs[0]]
