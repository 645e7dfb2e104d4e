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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.checkpoint import (Loaded, ModelSpec, is_jax_dir, load_hf_dir, load_jax_dir,
                                     read_config, save_jax_dir)
from deepspec_jax.draft_vocab import (D2T, D2T_HF_DTYPE, FIELD, T2D, T2D_HF_DTYPE,
                                      check_vocab_map, selected_ids)
from deepspec_jax.drafts.common import DraftFamily
from deepspec_jax.drafts.registry import resolve_spec
from deepspec_jax.drafts.speculators import is_speculators_config, load_speculators_dir

# The project's shipped DSpark draft for the embedded SmolLM2 target (the tools' default).
DEFAULT_DRAFT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "assets", "default_draft")
from deepspec_jax.dtypes import dtype_name
from deepspec_jax.errors import ConfigError
from deepspec_jax.hub_cache import resolve_checkpoint_path
from deepspec_jax.sharding import make_mesh, named_sharding

SHARED_WITH_TARGET = ("embed", "lm_head")
# parameters whose last axis is the output vocabulary (K columns with a reduced one)
OUTPUT_VOCAB_PARAMS = ("lm_head", "markov_w2")


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
        dir loads only with ``load_draft(path, target=...)``. A reduced-vocabulary
        draft's lm_head is the target's at K columns, not a copy of it: it is stored.
        Parameters the target supplied at load (``from_target``) are always left out."""
        shared = set(shared_with_target(self.config) if share_with_target else ())
        shared |= set(self.from_target)
        return save_jax_dir(os.fspath(path), self.spec, self.state, self.hf_dtypes,
                            self.hf_metadata, source=self.source,
                            shared_from_target=tuple(p for p in SHARED_WITH_TARGET if p in shared))


def shared_with_target(config) -> tuple[str, ...]:
    """The draft parameters that are exact copies of the target's: embed, and lm_head
    unless the draft has a reduced vocabulary (``draft_vocab``)."""
    if getattr(config, "draft_vocab_size", None) is None:
        return SHARED_WITH_TARGET
    return tuple(p for p in SHARED_WITH_TARGET if p != "lm_head")


def target_shared_params(target) -> dict:
    """The draft parameters a target provides: embed [V, d] and lm_head [d, V]."""
    m = target.model
    return {"embed": m.embed.get_value(), "lm_head": m.lm_head_weight()}


def load_draft(path: str, dtype=None, mesh: Mesh | None = None, target=None) -> Draft:
    """Load a draft from an HF directory, a JAX dir or a speculators directory (each also
    as a Hugging Face hub cache snapshot, or the cache's ``models--org--name`` root).

    ``dtype``: None/"keep" keeps the stored dtypes (a bf16 release stays bf16); a name
    ("float32", "bfloat16") or dtype casts every floating parameter (a reduced
    vocabulary's d2t/t2d index buffers keep their integer/bool dtypes). Parameters are placed
    directly into their shardings on ``mesh`` (default: all devices, FSDP).
    ``target``: needed for JAX dirs saved with ``share_with_target`` and for speculators
    DFlash/DSpark dirs (their embed and lm_head come from the target; a speculators
    draft also takes the target's depth from it). A speculators draft loaded this way
    remembers which parameters came from the target: ``save`` then leaves them out."""
    path = resolve_checkpoint_path(path)
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


def restrict_vocab(draft: Draft, d2t, t2d) -> Draft:
    """``draft`` with a reduced draft vocabulary (``draft_vocab``): config field
    ``draft_vocab_size`` = K, the output-vocabulary parameters (lm_head, DSpark's
    markov_w2) restricted to the K target ids of ``d2t``, the d2t/t2d buffers set;
    every other parameter unchanged. ``draft`` must have the full vocabulary (warm
    starts, tests and benchmarks build reduced drafts from full ones this way)."""
    cfg = draft.config
    if getattr(cfg, "draft_vocab_size", None) is not None:
        raise ConfigError(f"{draft.source or 'draft'}: already has a reduced vocabulary "
                          f"({FIELD} = {cfg.draft_vocab_size}); restrict a full-vocabulary draft.")
    d2t, t2d = np.asarray(d2t, np.int64), np.asarray(t2d, np.bool_)
    K = int(d2t.shape[0])
    check_vocab_map(d2t, t2d, K, cfg.vocab_size, draft.source or "restrict_vocab")
    spec = resolve_spec({**cfg.raw, FIELD: K}, draft.source or "restrict_vocab")
    old = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(draft.state)}
    ids = jnp.asarray(selected_ids(d2t), jnp.int32)
    graphdef, state = spec.abstract(np.dtype(draft.dtype))
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name == D2T:
            value = jnp.asarray(d2t, jnp.int32)
        elif name == T2D:
            value = jnp.asarray(t2d)
        elif name in OUTPUT_VOCAB_PARAMS:
            value = jnp.take(old[name], ids, axis=-1)
        else:
            value = old[name]
        axes = var.get_metadata().get("logical_axes", (None,) * value.ndim)
        var.set_value(jax.device_put(value, named_sharding(axes, value.shape, draft.mesh)))
    hf_dtypes = {**draft.hf_dtypes, D2T: D2T_HF_DTYPE, T2D: T2D_HF_DTYPE}
    return Draft(spec.config, spec.family, graphdef, state, draft.mesh, spec, draft.source,
                 draft.dtype, hf_dtypes, dict(draft.hf_metadata))


def _draft_from(loaded: Loaded, mesh: Mesh, path: str, from_target: tuple = ()) -> Draft:
    spec = loaded.spec
    k = getattr(spec.config, "draft_vocab_size", None)
    if k is not None:  # a reduced vocabulary: its d2t/t2d must describe one and the same map
        flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(loaded.state)}
        check_vocab_map(jax.device_get(flat[D2T].get_value()),
                        jax.device_get(flat[T2D].get_value()), k, spec.config.vocab_size, path)
    return Draft(spec.config, spec.family, loaded.graphdef, loaded.state, mesh, spec,
                 path, dtype_name(loaded.compute_dtype), loaded.hf_dtypes, loaded.hf_metadata,
                 from_target)


__all__ = ["Draft", "load_draft", "shared_with_target", "restrict_vocab", "DEFAULT_DRAFT_DIR",
           "OUTPUT_VOCAB_PARAMS"]
