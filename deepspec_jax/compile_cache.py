"""Persistent XLA compilation cache for the command-line tools.

The speculative engine and the autoregressive baseline take minutes to compile on a
CPU (a 30-layer target unrolled in several code paths). Compiled executables are keyed
by the program, the jax/jaxlib version and the flags, so reusing them across runs is
safe; a second ``python -m deepspec_jax.eval`` then starts decoding in seconds.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "deepspec_jax", "xla")


def enable(path: str | None = DEFAULT_DIR) -> str | None:
    """Cache every compilation under ``path`` ("" or None: leave jax's setting alone)."""
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
