"""The target's architecture without its weights: config resolution and an abstract model.

The reference run configs name placeholder target paths (``/path/to/Qwen3-4B``), so a
plan cannot read the target's ``config.json`` from disk. In order of precedence the
plan reads: ``--target_config=<file>``; ``<target.path>/config.json`` when that is a
real model directory; the HF ``config.json`` shipped in
``deepspec_jax/assets/target_configs/<org>/<name>.json`` whose ``<name>`` is the
basename of ``target.path`` (``smollm2-135m``, the embedded GGUF, is
``HuggingFaceTB/SmolLM2-135M-Instruct``). Shipped: Qwen/Qwen3-4B, Qwen/Qwen3-8B,
Qwen/Qwen3-14B (their HF config.json, transformers 4.51), SmolLM2-135M-Instruct,
google/gemma-4-12B (its config.json at revision 56820d7d, transformers 5.10.0.dev0),
which ``gemma-4-12B-it`` also names: instruction tuning keeps the architecture.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable

import jax
from flax import nnx

from deepspec_jax.config import TargetConfig, load_config_json, target_config_from_dict
from deepspec_jax.dtypes import COMPUTE_DTYPES, DTYPES
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import shardings_of
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.target import DEFAULT_TARGET, NAMED_TARGETS, Target, resolve_target_path
from deepspec_jax.weights.gguf_loader import read_gguf

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                      "target_configs")
_ALIASES = {DEFAULT_TARGET: "SmolLM2-135M-Instruct"}
# Checkpoints whose architecture is a shipped one's (lower-cased model names).
_SAME_ARCH = {"gemma-4-12b-it": "gemma-4-12b"}


@dataclasses.dataclass(frozen=True)
class TargetArch:
    config: TargetConfig
    source: str          # the file the architecture was read from


def shipped_configs() -> dict[str, str]:
    """Lower-cased model name -> shipped config file."""
    return {os.path.splitext(os.path.basename(p))[0].lower(): p
            for p in sorted(glob.glob(os.path.join(ASSETS, "*", "*.json")))}


def resolve_target_arch(path: str, override: str = "") -> TargetArch:
    """The target's TargetConfig for run-config ``target.path`` (see the module doc)."""
    if override:
        return TargetArch(target_config_from_dict(load_config_json(override), override), override)
    path = os.fspath(path or DEFAULT_TARGET)
    # a hub cache repo root -> its snapshot (a named target's file is not needed here)
    local = path if path in NAMED_TARGETS else resolve_target_path(path)
    cfg = os.path.join(local, "config.json")
    if os.path.isfile(cfg):
        return TargetArch(target_config_from_dict(load_config_json(cfg), cfg), cfg)
    if local.endswith(".gguf") and os.path.isfile(local):
        raw, _ = read_gguf(local)
        return TargetArch(target_config_from_dict(raw, local), local)
    name = _ALIASES.get(path, os.path.basename(os.path.normpath(path)))
    shipped = shipped_configs()
    key = _SAME_ARCH.get(name.lower(), name.lower())
    if key in shipped:
        f = shipped[key]
        return TargetArch(target_config_from_dict(load_config_json(f), f), f)
    raise ConfigError(
        f"config field target.path={path!r}: no config.json there and no shipped architecture "
        f"named {name!r} (shipped: {sorted(shipped)} in {ASSETS}); pass --target_config=<the "
        "target's HF config.json> or point --config.target.path at the model directory.")


def abstract_model(build: Callable[[], nnx.Module], mesh):
    """(graphdef, state) of ``build()`` holding ShapeDtypeStructs, each parameter with
    the NamedSharding of its logical axes on ``mesh`` (as the loaders place weights)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    values = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state.to_pure_dict(), shardings_of(state, mesh))
    nnx.replace_by_pure_dict(state, values)
    return graphdef, state


def abstract_target(arch: TargetArch, dtype: str, mesh) -> Target:
    """The frozen target as load_target builds it (``dtype`` weights, each parameter
    sharded by its logical axes on ``mesh``), holding ShapeDtypeStructs: no weights."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config field target.dtype={dtype!r}: use one of {list(COMPUTE_DTYPES)}.")
    jdt = DTYPES[dtype]
    graphdef, state = abstract_model(
        lambda: CausalLM(arch.config, dtype=jdt, param_dtype=jdt, rngs=nnx.Rngs(0)), mesh)
    return Target(arch.config, graphdef, state, mesh, None, arch.source, dtype,
                  tuple(arch.config.eos_token_ids))


__all__ = ["TargetArch", "resolve_target_arch", "abstract_model", "abstract_target", "shipped_configs", "ASSETS"]
