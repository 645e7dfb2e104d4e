"""Gated-SiLU MLP (Llama/Qwen3): down(silu(gate(x)) * up(x))."""

import jax


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """``gate``/``up`` are [d, I] and ``down`` is [I, d] (input-major, x @ W)."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down
