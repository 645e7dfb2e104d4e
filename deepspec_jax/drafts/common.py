"""Pieces shared by all draft families."""

from __future__ import annotations

from flax import nnx


class Frozen(nnx.Variable):
    """A draft parameter copied from the target and never trained (embed_tokens,
    lm_head). A distinct Variable type lets ``nnx.split(model, nnx.Param, Frozen)``
    separate trainable from frozen state, so optimisers and gradients never see it."""
