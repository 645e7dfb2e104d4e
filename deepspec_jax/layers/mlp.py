"""Gated MLPs: down(act(gate(x)) * up(x)) with SiLU (Llama/Qwen3: SwiGLU) or tanh-GeLU
(Gemma: GeGLU); and logit softcapping (Gemma)."""

import jax
import jax.numpy as jnp

ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
              activation: str = "silu") -> jax.Array:
    """``gate``/``up`` are [d, I] and ``down`` is [I, d] (input-major, x @ W)."""
    return (ACTIVATIONS[activation](x @ gate) * (x @ up)) @ down


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    return gated_mlp(x, gate, up, down, "silu")


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma's final-logit softcapping); identity for None."""
    return x if cap is None else jnp.tanh(x / cap) * cap
