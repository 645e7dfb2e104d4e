"""Gated MLPs: down(act(gate(x)) * up(x)) with SiLU (Llama/Qwen3: SwiGLU) or tanh-GeLU
(Gemma: GeGLU); Gemma's logit softcapping and scaled embedding lookup."""

import jax
import jax.numpy as jnp

from deepspec_jax.layers.linear import linear

ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
              activation: str = "silu") -> jax.Array:
    """``gate``/``up`` are [I, d] and ``down`` is [d, I] ([out, in], ``layers.linear``)."""
    return linear(ACTIVATIONS[activation](linear(x, gate)) * linear(x, up), down)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    return gated_mlp(x, gate, up, down, "silu")


def softcap_and_slope(z: jax.Array, cap: float | None):
    """(cap * tanh(z / cap), its slope 1 - tanh^2): Gemma's final-logit softcap and the
    factor the fused vocabulary-loss gradients multiply by; (z, None) without a cap."""
    if cap is None:
        return z, None
    th = jnp.tanh(z / cap)
    return cap * th, 1.0 - th * th


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma's final-logit softcapping); identity for None."""
    return softcap_and_slope(x, cap)[0]


def embed_lookup(table: jax.Array, ids: jax.Array, dtype, scale: float) -> jax.Array:
    """Rows ``ids`` of the embedding ``table`` in ``dtype``, times ``scale`` (Gemma:
    sqrt(hidden), rounded to that dtype as HF rounds it to the weight dtype)."""
    e = jnp.take(table, ids, axis=0).astype(dtype)
    return e if scale == 1.0 else e * jnp.asarray(scale, dtype)
