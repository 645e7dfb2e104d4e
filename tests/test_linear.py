"""``layers.linear``: [out, in] weights; a few rows are multiplied weight-first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_shapes
from deepspec_jax.layers import linear
from deepspec_jax.layers.linear import WEIGHT_FIRST_MAX_ROWS, padded_rows


def test_padded_rows_are_whole_panels():
    assert [padded_rows(r) for r in range(1, 10)] == [1, 2, 3, 4, 8, 8, 8, 8, 16]
    assert padded_rows(WEIGHT_FIRST_MAX_ROWS) == WEIGHT_FIRST_MAX_ROWS


@pytest.mark.parametrize("lead", [(1,), (2, 3), (5,), (WEIGHT_FIRST_MAX_ROWS,),
                                  (1, WEIGHT_FIRST_MAX_ROWS + 1), (0, 4)])
def test_linear_is_x_times_w_transposed(lead):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 12)).astype(np.float32)
    x = rng.standard_normal(lead + (12,)).astype(np.float32)
    got = jax.jit(linear)(jnp.asarray(x), jnp.asarray(w))
    assert got.shape == lead + (7,)
    np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x, w: jnp.sum(jnp.sin(linear(x, w))), (0, 1))(jnp.asarray(x), jnp.asarray(w))
    dy = np.cos(x @ w.T)
    np.testing.assert_allclose(np.asarray(g[0]), dy @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g[1]), dy.reshape(-1, 7).T @ x.reshape(-1, 12),
                               rtol=1e-4, atol=1e-4)


def test_few_rows_stay_weight_first_after_optimization():
    """XLA folds a transpose of a dot's result back into the dot; the barrier must keep
    the [out, rows] product (the fast form on XLA:CPU) in the optimized program; many
    rows, and bf16, stay an ordinary [rows, out] product."""
    w = jnp.ones((96, 40), jnp.float32)
    f = jax.jit(lambda x, w: linear(jnp.tanh(linear(x, w)), w.T * 2.0))
    few = dot_shapes(f.lower(jnp.ones((1, 5, 96)), w.T).compile().as_text())
    assert few and all(s.startswith(("f32[40,8]", "f32[96,8]")) for s in few), few  # 5 -> 8
    many = dot_shapes(f.lower(jnp.ones((1, 100, 96)), w.T).compile().as_text())
    assert many and all(s.startswith(("f32[100,40]", "f32[100,96]")) for s in many), many
    bf16 = dot_shapes(f.lower(jnp.ones((1, 5, 96), jnp.bfloat16),
                               w.T.astype(jnp.bfloat16)).compile().as_text())
    assert bf16 and not any(s.startswith(("bf16[40,5]", "bf16[96,5]", "f32[40,5]", "f32[96,5]"))
                            for s in bf16), bf16


def test_min_rows_keeps_fewer_rows_rows_first():
    """``min_rows`` (the tied output projection's 2): one row stays [1, out], two go
    weight-first; both give x @ w.T."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 16)), jnp.float32)
    f = jax.jit(lambda x, w: linear(x, w, min_rows=2))
    for rows, form in ((1, "f32[1,64]"), (2, "f32[64,2]")):
        x = jnp.ones((rows, 16), jnp.float32)
        shapes = dot_shapes(f.lower(x, w).compile().as_text())
        assert shapes and all(s.startswith(form) for s in shapes), (rows, shapes)
        np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(x) @ np.asarray(w).T,
                                   rtol=1e-5, atol=1e-5)
