"""Linear layers with PyTorch's weight layout: ``w`` is [out, in], ``y = x @ w.T``.

How the product is formed depends on its (static) shape and dtype. A float32 product of
up to ``WEIGHT_FIRST_MAX_ROWS`` rows (decoding and verification on CPU: a few tokens, or
a batch of single tokens) runs weight-first, ``w @ x.T`` -> [out, rows], and transposes
the small result back: on XLA:CPU that is the fast form for a few rows. Past 4 rows the
rows are zero-padded to a multiple of 8 (``padded_rows``): the kernel runs whole column
panels fast and a remainder slowly, so 5 rows cost more than 8. A 30-layer SmolLM2-shaped
chain then costs 1.13x / 1.27x / 1.31x its one-row time at 4 / 5 / 8 rows, against 1.85x /
1.90x / 2.15x as ``x @ w.T`` (docs/BENCHMARKS.md, "Weight-first products for a few
rows"). The optimization barrier keeps XLA from folding the transpose back into the dot,
which restores the slow form. Everything else is an ordinary ``x @ w.T``: past that many
rows (prefill, training) the transposes cost more than they save, and in bf16 (the
accelerator dtype, where a few rows cost one weight read in either form) the two forms
round differently, so a bf16 verify pass would no longer round as plain decoding does.
The forms differ by float32 rounding only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WEIGHT_FIRST_MAX_ROWS = 32


def padded_rows(rows: int) -> int:
    """Columns of the weight-first product: up to 4 rows as they are, more rounded up to a
    multiple of 8 (unpadded, the chain above cost 1.58x at 5 rows and 1.29x at 8)."""
    return rows if rows <= 4 else -(-rows // 8) * 8


def weight_first(x: jax.Array, w: jax.Array, min_rows: int = 1) -> bool:
    """Whether ``linear(x, w)`` takes the weight-first form: float32, and between
    ``min_rows`` and ``WEIGHT_FIRST_MAX_ROWS`` rows."""
    rows = math.prod(x.shape[:-1])
    return (min_rows <= rows <= WEIGHT_FIRST_MAX_ROWS and x.dtype == jnp.float32
            and w.dtype == jnp.float32)


def linear(x: jax.Array, w: jax.Array, *, min_rows: int = 1) -> jax.Array:
    """``x`` [..., in] times ``w`` [out, in] transposed -> [..., out]. ``min_rows`` > 1
    keeps fewer rows rows-first (the tied output projection: over a vocabulary-sized
    ``out`` a single row is faster as ``x @ w.T``)."""
    if not weight_first(x, w, min_rows):
        return jnp.einsum("...i,oi->...o", x, w)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, x.shape[-1])
    padded = padded_rows(rows)
    if padded > rows:
        x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
    y = jnp.einsum("oi,ri->or", w, x2)
    return jax.lax.optimization_barrier(y)[:, :rows].T.reshape(*lead, w.shape[0])
