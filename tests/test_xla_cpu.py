"""The train step's XLA:CPU compile options (deepspec_jax/xla_cpu.py)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspec_jax import xla_cpu
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh


def _mesh_on(platform: str):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_options_by_platform_and_value():
    mesh = make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    assert xla_cpu.compiler_options(mesh) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
    assert xla_cpu.compiler_options(mesh, "all") is None          # XLA's default
    assert xla_cpu.compiler_options(_mesh_on("tpu")) is None       # the flag is XLA:CPU's
    with pytest.raises(ConfigError, match="train.cpu_library_fusion"):
        xla_cpu.compiler_options(mesh, "none")


def test_dot_keeps_reductions_out_of_the_library():
    """The option is accepted by this jaxlib and takes effect: a vocabulary-row reduction
    compiles to XLA's own fusion, a matmul still to a library (YNNPACK) fusion."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    opts = xla_cpu.compiler_options(mesh)
    x = jnp.ones((8, 4096), jnp.float32)
    tv = lambda p, q: jnp.sum(jnp.abs(p - q), axis=-1)
    default = jax.jit(tv).lower(x, x).compile().as_text()
    dot_only = jax.jit(tv, compiler_options=opts).lower(x, x).compile().as_text()
    assert "ynn_fusion" in default and "ynn_fusion" not in dot_only
    mm = jax.jit(lambda a, b: a @ b, compiler_options=opts).lower(x, x.T).compile().as_text()
    assert "ynn_fusion" in mm
    np.testing.assert_allclose(jax.jit(tv, compiler_options=opts)(x, 2 * x), 4096.0)
