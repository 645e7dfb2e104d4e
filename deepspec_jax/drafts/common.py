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
  family's checkpoints, e.g. ``"Qwen3DSparkModel"``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def softcap_and_slope(z: jax.Array, cap: float | None):
    """(cap * tanh(z / cap), its slope 1 - tanh^2): Gemma's final-logit softcap and the
    factor the fused vocabulary-loss gradients multiply by; (z, None) without a cap."""
    if cap is None:
        return z, None
    th = jnp.tanh(z / cap)
    return cap * th, 1.0 - th * th


def softcap_logits(z: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(z / cap) (z unchanged when ``cap`` is None): a draft's ``compute_logits``."""
    return softcap_and_slope(z, cap)[0]


class Frozen(nnx.Variable):
    """A draft parameter copied from the target and never trained (embed_tokens,
    lm_head). A distinct Variable type lets ``nnx.split(model, nnx.Param, Frozen)``
    separate trainable from frozen state, so optimisers and gradients never see it."""


class Proposal(NamedTuple):
    """A chain of ``W`` draft tokens per row, as every family's proposer returns it."""

    tokens: jax.Array             # [B, W] int32 draft tokens x_1..x_W
    logits: jax.Array             # [B, W, V] fp32 draft logits (before temperature)
    dists: jax.Array              # [B, W, V] the distributions the tokens were drawn from
    token_probs: jax.Array        # [B, W] dists at the drawn tokens
    confidence_logits: jax.Array  # [B, W] fp32 (zeros for a draft without confidence head)


@dataclasses.dataclass(frozen=True)
class DraftFamily:
    """One draft family: how its checkpoints are read, named and built, and the decode
    interface the speculative-decoding loop drives (the same signatures for every
    family, so the loop never branches on a family)."""

    name: str                  # "dspark" | "eagle3"
    architecture: str          # HF architectures[0] of its checkpoints
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
    tree: Callable             # (model, state, current, key, sp, topk, num_nodes, threshold) -> DraftTree
