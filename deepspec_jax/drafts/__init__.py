"""Draft models (Eagle3, DFlash/DSpark) and their public loader.

``load_draft`` accepts every checkpoint format users hold -- an HF directory as
DeepSpec's trainer writes it (config.json + safetensors), a JAX dir written by
``convert.torch_to_jax`` / ``Draft.save``, or a vLLM ``speculators`` directory
(``drafts.speculators``) -- and returns a ``Draft`` handle. The
family is chosen from config.json's ``architectures`` through the registry, so this
module never names a family. Kind, family and architecture are defined in
``drafts.common``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.checkpoint import (Loaded, ModelSpec, is_jax_dir, load_hf_dir, load_jax_dir,
                                     read_config, save_jax_dir)
from deepspec_jax.drafts.common import DraftFamily
from deepspec_jax.drafts.registry import resolve_spec
from deepspec_jax.drafts.speculators import is_speculators_config, load_speculators_dir
from deepspec_jax.dtypes import dtype_name
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh

SHARED_WITH_TARGET = ("embed", "lm_head")


@dataclasses.dataclass
class Draft:
    """A loaded draft: its config (the family's dataclass, reference field names), its
    family (``drafts.common.DraftFamily``), and the NNX model split into (graphdef,
    state) for ``jit``.

    ``hf_dtypes`` remembers the dtype of every HF tensor of the source so that
    ``save`` -> ``convert.jax_to_hf`` reproduces the original release exactly."""

    config: Any
    family: DraftFamily
    graphdef: Any
    state: nnx.State
    mesh: Mesh
    spec: ModelSpec
    source: str = ""
    dtype: str = "float32"         # compute dtype the module was built with
    hf_dtypes: dict = dataclasses.field(default_factory=dict, repr=False)
    hf_metadata: dict = dataclasses.field(default_factory=dict, repr=False)
    from_target: tuple = ()        # parameters the target supplied at load (speculators)

    @property
    def kind(self) -> str:
        """"dspark", "dflash" (a DSpark-architecture draft without heads) or "eagle3"."""
        return self.family.kind_of(self.config)

    @property
    def raw_config(self) -> dict:
        """The HF config dict, unchanged (for exports)."""
        return self.spec.raw

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)

    def save(self, path: str, share_with_target: bool = False) -> dict:
        """Write this draft (its current ``state``) as a JAX dir; returns the manifest.
        HF tensors keep the dtypes recorded at load (the release's), so a later export
        matches the release layout. ``share_with_target=True`` leaves out the frozen
        embed/lm_head (copies of the target's: most of a small draft's bytes); such a
        dir loads only with ``load_draft(path, target=...)``; parameters the target
        supplied at load (``from_target``) are always left out."""
        shared = set(SHARED_WITH_TARGET if share_with_target else ()) | set(self.from_target)
        return save_jax_dir(os.fspath(path), self.spec, self.state, self.hf_dtypes,
                            self.hf_metadata, source=self.source,
                            shared_from_target=tuple(p for p in SHARED_WITH_TARGET if p in shared))


def target_shared_params(target) -> dict:
    """The draft parameters a target provides: embed [V, d] and lm_head [d, V]."""
    m = target.model
    return {"embed": m.embed.get_value(), "lm_head": m.lm_head_weight()}


def load_draft(path: str, dtype=None, mesh: Mesh | None = None, target=None) -> Draft:
    """Load a draft from an HF directory, a JAX dir or a speculators directory.

    ``dtype``: None/"keep" keeps the stored dtypes (a bf16 release stays bf16); a name
    ("float32", "bfloat16") or dtype casts every parameter. Parameters are placed
    directly into their shardings on ``mesh`` (default: all devices, FSDP).
    ``target``: needed for JAX dirs saved with ``share_with_target`` and for speculators
    DFlash/DSpark dirs (their embed and lm_head come from the target; a speculators
    draft also takes the target's depth from it). A speculators draft loaded this way
    remembers which parameters came from the target: ``save`` then leaves them out."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such checkpoint directory; pass a draft directory "
                          "(HF: config.json + model.safetensors, or a JAX dir from "
                          "convert.torch_to_jax).")
    mesh = mesh if mesh is not None else make_mesh()
    if is_jax_dir(path):
        loaded, _ = load_jax_dir(path, resolve_spec, dtype, mesh, want_role="draft",
                                 shared=None if target is None else target_shared_params(target))
    else:
        raw, cfg_path = read_config(path)
        if is_speculators_config(raw):
            shared = None if target is None else target_shared_params(target)
            depth = None if target is None else target.config.num_hidden_layers
            sp = load_speculators_dir(path, shared, depth, dtype, mesh)
            return _draft_from(sp.loaded, mesh, path, sp.from_target)
        loaded = load_hf_dir(path, resolve_spec(raw, cfg_path), dtype, mesh, want_role="draft")
    return _draft_from(loaded, mesh, path)


def _draft_from(loaded: Loaded, mesh: Mesh, path: str, from_target: tuple = ()) -> Draft:
    spec = loaded.spec
    return Draft(spec.config, spec.family, loaded.graphdef, loaded.state, mesh, spec,
                 path, dtype_name(loaded.compute_dtype), loaded.hf_dtypes, loaded.hf_metadata,
                 from_target)


__all__ = ["Draft", "load_draft"]
