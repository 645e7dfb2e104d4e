"""Linear layers with PyTorch's weight layout: ``w`` is [out, in], ``y = x @ w.T``.

How the product is formed depends on its (static) shape and dtype. A float32 product of
up to ``WEIGHT_FIRST_MAX_ROWS`` rows (decoding and verification on CPU: a few tokens, or
a batch of single tokens) runs weight-first, ``w @ x.T`` -> [out, rows], and transposes
the small result back: on XLA:CPU that is the fast form for a few rows (a 30-layer
SmolLM2-shaped chain costs 1.5-1.7x / 1.3-1.5x its one-row time at 5 / 8 rows, against
1.9-2.3x / 2.1-2.5x as ``x @ w.T``: docs/BENCHMARKS.md, "Weight-first products for a few
rows"). The
optimization barrier keeps XLA from folding the transpose back into the dot, which
restores the slow form. Everything else is an ordinary ``x @ w.T``: past that many rows
(prefill, training) the transposes cost more than they save, and in bf16 (the
accelerator dtype, where a few rows cost one weight read in either form) the two forms
round differently, so a bf16 verify pass would no longer round as plain decoding does.
The forms differ by float32 rounding only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WEIGHT_FIRST_MAX_ROWS = 32


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x`` [..., in] times ``w`` [out, in] transposed -> [..., out]."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if rows > WEIGHT_FIRST_MAX_ROWS or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return jnp.einsum("...i,oi->...o", x, w)
    y = jnp.einsum("oi,ri->or", w, x.reshape(rows, x.shape[-1]))
    return jax.lax.optimization_barrier(y).T.reshape(*lead, w.shape[0])
