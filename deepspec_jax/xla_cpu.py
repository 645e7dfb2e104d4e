"""Compile options for programs that run on XLA:CPU (the laptop/CI path).

XLA:CPU (jax 0.10) hands matmul, element-wise and reduction fusions to its YNNPACK
library by default. Its matmuls are the fast path, but over vocabulary-wide rows its
reductions and element-wise passes ran 4-7x slower than XLA's own loop fusions on the
2-core EPYC development machine (``sum(|p - q|)`` over [768, 49152] fp32: 431 ms vs
63 ms), and the train step's vocabulary losses are made of such passes. ``"dot"`` keeps
the library for matmuls only; ``"all"`` is XLA's default. Programs for other platforms
get no options (the flag is XLA:CPU's).
"""

from __future__ import annotations

from jax.sharding import Mesh

from deepspec_jax.errors import ConfigError

LIBRARY_FUSION = {"dot": "LIBRARY_FUSION_TYPE_DOT", "all": None}


def compiler_options(mesh: Mesh, library_fusion: str = "dot") -> dict | None:
    """``jax.jit(compiler_options=...)`` for a program compiled for ``mesh``'s devices."""
    if library_fusion not in LIBRARY_FUSION:
        raise ConfigError(f"cpu_library_fusion={library_fusion!r} (train.cpu_library_fusion): "
                          f"must be one of {sorted(LIBRARY_FUSION)}: 'dot' gives XLA:CPU's "
                          "YNNPACK fusions the matmuls only, 'all' is XLA's default.")
    value = LIBRARY_FUSION[library_fusion]
    if value is None or mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": value}
