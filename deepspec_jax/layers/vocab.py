"""The output projection of a few rows (decode, verify, a draft's block).

XLA:CPU runs ``hidden [M, d] @ W`` through different matmul paths depending on which
operand is the weight and how it is laid out; for 4-8 rows the product with the weight
stored ``[V, d]`` as the *first* operand (``[V, M]``, then a small transpose) costs
~1.5-2x one row, where ``[M, d] x [d, V]`` costs 3.5-5x (``benchmarks/lm_head.py``).
On an accelerator every form reads the weight once; the transpose of a ``[V, M]``
result is a small copy there too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Calls of up to this many rows (tokens x batch) use the rows-first form: decode and
# verify steps and a draft's block at small batch. Longer calls (prefill, training)
# keep ``[M, V]`` from the start, whose result needs no transpose copy.
ROWS_FIRST_MAX_TOKENS = 16


def rows_first_ok(hidden: jax.Array) -> bool:
    """Whether ``hidden`` [..., d] has few enough rows for :func:`project_rows_first`."""
    n = 1
    for s in hidden.shape[:-1]:
        n *= s
    return n <= ROWS_FIRST_MAX_TOKENS


def project_rows_first(hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """float32 ``hidden [..., d] @ rows.T`` for ``rows`` [V, d] (a tied embedding, or a
    transposed lm_head), computed as ``rows @ hidden^T`` then transposed."""
    lead = hidden.shape[:-1]
    z = jnp.einsum("vd,nd->vn", rows, hidden.reshape(-1, hidden.shape[-1]),
                   preferred_element_type=jnp.float32)
    return z.T.reshape(*lead, rows.shape[0])
