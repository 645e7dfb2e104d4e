"""Pieces shared by all draft families: the frozen-parameter type, the one ``Proposal``
every family's chain proposer returns, and ``DraftFamily``, the record through which
checkpoints, loaders and the decoding loop use a family without naming it.

Names (one meaning each):

* **kind** -- what a draft is: ``"dspark"``, ``"dflash"`` or ``"eagle3"`` (DFlash is a
  DSpark-architecture draft without Markov and confidence heads). ``Draft.kind``,
  evaluation reports and training configs use it.
* **family** -- the code that serves one or more kinds (``DraftFamily.name``:
  ``"dspark"`` serves dspark and dflash, ``"eagle3"`` serves eagle3).
* **architecture** -- only the HF ``config.json`` string (``architectures[0]``) of a
  family's checkpoints. A family serves one architecture per layer flavour (the
  ``model_type`` of the draft's layer config, a copy of the target's text config):
  ``"Qwen3DSparkModel"`` (qwen3) and ``"Gemma4DSparkModel"`` (gemma4_text).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepspec_jax.config import TargetConfig, target_config_from_dict
from deepspec_jax import draft_vocab as vocab
from deepspec_jax.errors import ConfigError
from deepspec_jax.models.transformer import _layer_params, _param
from deepspec_jax.weights.name_map import Rule


class Frozen(nnx.Variable):
    """A draft parameter copied from the target and never trained (embed_tokens,
    lm_head). A distinct Variable type lets ``nnx.split(model, nnx.Param, Frozen)``
    separate trainable from frozen state, so optimisers and gradients never see it."""


def add_vocab_map(module: nnx.Module, draft_vocab_size: int | None, vocab_size: int) -> None:
    """Give a reduced-vocabulary draft its frozen ``d2t`` [K] int32 / ``t2d`` [V] bool
    buffers (``draft_vocab``; filled by loading or ``train.draft_init``). The initial
    map is the first K ids. Not floating, so checkpoint loading never casts them."""
    if draft_vocab_size is None:
        return
    K, V = int(draft_vocab_size), int(vocab_size)
    module.d2t = Frozen(jnp.zeros((K,), jnp.int32), logical_axes=(None,))
    module.t2d = Frozen(jnp.arange(V) < K, logical_axes=(None,))


def vocab_map_of(module: nnx.Module) -> jax.Array | None:
    """A draft's d2t offsets (int32 [K]), None for a full-vocabulary draft."""
    d2t = getattr(module, vocab.D2T, None)
    return None if d2t is None else d2t.get_value()


def vocab_mask_of(module: nnx.Module) -> jax.Array | None:
    """A draft's t2d mask (bool [V]), None for a full-vocabulary draft."""
    t2d = getattr(module, vocab.T2D, None)
    return None if t2d is None else t2d.get_value()


def vocab_rules(draft_vocab_size: int | None) -> list[Rule]:
    """Name-map rules of the reduced-vocabulary buffers (HF names = ours, speculators'
    on-disk dtypes)."""
    if draft_vocab_size is None:
        return []
    return [Rule(vocab.D2T, vocab.D2T, hf_dtype=vocab.D2T_HF_DTYPE),
            Rule(vocab.T2D, vocab.T2D, hf_dtype=vocab.T2D_HF_DTYPE)]


# per-layer tensors DeepSpec registers as buffers (saved, never trained): Gemma-4's
# ``layer_scalar`` (1.0 in its drafts)
LAYER_BUFFERS = frozenset({"layer_scalar"})


class DraftLayers(nnx.Module):
    """A draft's decoder layers: the target layer parameters of ``cfg``
    (``models.transformer._layer_params``) stacked on a leading ``layers`` axis, for a
    ``lax.scan`` over layers (DSpark) or layer 0 (Eagle3). ``in_width`` overrides the
    q/k/v input width (Eagle3's 2d-wide concatenated input); ``extra`` adds per-layer
    params (name, shape, axes, init). ``LAYER_BUFFERS`` become ``Frozen`` (no gradient,
    as in the reference)."""

    def __init__(self, cfg: TargetConfig, *, param_dtype, rngs: nnx.Rngs, in_width: int = 0,
                 extra: tuple = ()):
        if not cfg.uniform_layers:
            raise ConfigError("draft layers must share one geometry (full attention, no KV "
                              "sharing, one MLP width); the draft config describes others.")
        L = cfg.num_hidden_layers
        for name, shape, axes, init in tuple(extra) + tuple(_layer_params(cfg, 0)):
            if in_width and name in ("q_proj", "k_proj", "v_proj"):
                shape = tuple(shape[:-1]) + (in_width,)
            p = _param(rngs, (L,) + tuple(shape), ("layers",) + tuple(axes), param_dtype, init)
            if name in LAYER_BUFFERS:
                p = Frozen(p.get_value(), logical_axes=("layers",) + tuple(axes))
            setattr(self, name, p)

    def stacked(self, dtype) -> dict[str, jax.Array]:
        """name -> [L, ...] array in ``dtype``."""
        return {k: v.get_value().astype(dtype) for k, v in vars(self).items()
                if isinstance(v, nnx.Variable)}

    def layer(self, i: int, dtype) -> dict[str, jax.Array]:
        """name -> layer ``i``'s array in ``dtype``."""
        return {k: v[i] for k, v in self.stacked(dtype).items()}


class Proposal(NamedTuple):
    """A chain of ``W`` draft tokens per row, as every family's proposer returns it.
    With a reduced draft vocabulary (K of the target's V tokens, ``draft_vocab``) the
    tokens are already target ids and ``dists`` the K probabilities scattered into V;
    ``logits`` stay over the draft vocabulary."""

    tokens: jax.Array             # [B, W] int32 draft tokens x_1..x_W (target ids)
    logits: jax.Array             # [B, W, K] fp32 draft logits (before temperature)
    dists: jax.Array              # [B, W, V] the distributions the tokens were drawn from
    token_probs: jax.Array        # [B, W] dists at the drawn tokens
    confidence_logits: jax.Array  # [B, W] fp32 (zeros for a draft without confidence head)


@dataclasses.dataclass(frozen=True)
class DraftFamily:
    """One draft family: how its checkpoints are read, named and built, and the decode
    interface the speculative-decoding loop drives (the same signatures for every
    family, so the loop never branches on a family)."""

    name: str                  # "dspark" | "eagle3"
    architectures: Mapping[str, str]  # layer model_type -> HF architectures[0]
    kinds: tuple[str, ...]     # the kinds it serves
    kind_of: Callable          # (config) -> kind
    config_from_dict: Callable  # (raw HF config dict, source str) -> config
    build: Callable            # (config, *, dtype, param_dtype, rngs) -> nnx.Module
    rules: Callable            # (config) -> list[weights.name_map.Rule]
    num_layers: Callable       # (config) -> int, for "{i}" rules
    lowest_layer_id: int       # smallest target layer id it may read (-1 = embeddings)
    width: Callable            # (config) -> tokens per chain proposal = tree depth limit
    has_confidence: Callable   # (config) -> bool
    # decode interface (pure, jit-traceable; ``state`` is the family's own pytree)
    init: Callable             # (model, batch, cache_len, prompt, prompt_len, first, feats) -> state
    propose: Callable          # (model, state, current, key, sp) -> (Proposal, state)
    commit: Callable           # (model, state, feats, committed, num_new) -> state
    tree: Callable             # (model, state, current, key, sp, topk, num_nodes, threshold, conf_scale) -> DraftTree

    def architecture_for(self, model_type: str, source: str) -> str:
        """The HF architecture of this family's drafts whose layers are ``model_type``
        (the target's text model type): what exports write into config.json."""
        if model_type not in self.architectures:
            raise ConfigError(f"{source}: a {self.name} draft for a {model_type!r} target is not "
                              f"supported; supported layer model types: {list(self.architectures)}.")
        return self.architectures[model_type]


# text model types of Gemma-4 targets (DeepSpec builds drafts for both)
GEMMA4_TEXT_TYPES = ("gemma4_text", "gemma4_unified_text")

# config.json fields of DeepSpec's drafts that are not the layers' (text) config
DRAFT_ONLY_FIELDS = frozenset({
    "architectures", "block_size", "num_target_layers", "target_layer_ids", "mask_token_id",
    "num_anchors", "enable_confidence_head", "confidence_head_with_markov", "markov_rank",
    "markov_head_type", "target_model_type", "target_text_model_type", "ttt_length",
    "step_loss_decay", "draft_num_hidden_layers", "target_model_name_or_path",
    vocab.FIELD})


def _gemma4_draft_layer_fields(raw: dict, source: str) -> dict:
    """Check what DeepSpec's Gemma-4 draft modules assume of the copied text config
    (MoE and per-layer inputs are refused by the config parser), and return the fields
    that differ for the draft's own layers: they never share KV (the reference's draft
    attention always projects its own keys/values), so ``num_kv_shared_layers`` = 0."""
    n = int(raw.get("num_hidden_layers", 0))
    types = raw.get("layer_types")
    if types is not None and list(types) != ["full_attention"] * n:
        raise ConfigError(f"{source}: field 'layer_types' = {types!r}; DeepSpec's Gemma-4 drafts "
                          f"have {n} 'full_attention' layers (num_hidden_layers = {n}).")
    shared = int(raw.get("num_kv_shared_layers") or 0)
    if raw.get("use_double_wide_mlp") and 0 < n - shared < n:
        raise ConfigError(
            f"{source}: fields 'use_double_wide_mlp' = true and 'num_kv_shared_layers' = {shared} "
            f"with num_hidden_layers = {n}: DeepSpec's Gemma-4 draft MLP (Gemma4TextMLP) then "
            f"doubles the width of draft layers {list(range(n - shared, n))}, a quirk this "
            "implementation does not reproduce; set use_double_wide_mlp false or "
            "num_kv_shared_layers to 0 or >= num_hidden_layers.")
    return {"num_kv_shared_layers": 0}


def draft_layer_config(family: DraftFamily, raw: dict, source: str, **overrides) -> TargetConfig:
    """The draft's decoder-layer config: ``raw`` (DeepSpec's draft config.json, a copy of
    the target's text config plus draft fields) without the draft fields, with
    ``overrides``. Checks that ``architectures`` is the family's for the layers'
    ``model_type``."""
    model_type = raw.get("model_type")
    want = family.architecture_for(model_type, f"{source}: field 'model_type'")
    archs = raw.get("architectures")
    if archs != [want]:
        raise ConfigError(f"{source}: field 'architectures' = {archs!r}; a {family.name} draft "
                          f"with model_type {model_type!r} has [\"{want}\"].")
    cap = raw.get("final_logit_softcapping")
    if cap is not None and not float(cap) > 0:  # the reference asserts it
        raise ConfigError(f"{source}: field 'final_logit_softcapping' = {cap!r} must be positive "
                          "(or null for no softcap).")
    layer = {k: v for k, v in raw.items() if k not in DRAFT_ONLY_FIELDS}
    layer.update(overrides)
    if model_type in GEMMA4_TEXT_TYPES:
        layer.update(_gemma4_draft_layer_fields(layer, source))
    return target_config_from_dict(layer, source)
