"""Pure-function building blocks shared by the target and draft models."""

from deepspec_jax.layers.linear import linear
from deepspec_jax.layers.mlp import embed_lookup, gated_mlp, softcap, softcap_and_slope, swiglu
from deepspec_jax.layers.norms import rms_norm
from deepspec_jax.layers.rope import apply_rope, rope_inv_freq

__all__ = ["embed_lookup", "gated_mlp", "linear", "softcap", "softcap_and_slope", "swiglu", "rms_norm", "apply_rope", "rope_inv_freq"]
