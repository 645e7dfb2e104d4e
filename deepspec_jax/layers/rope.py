"""Rotary position embeddings, HF "rotate_half" layout (first/second half pairs)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), with linear or llama3 scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if scaling is None or scaling.kind == "default":
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.kind == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wl = old_ctx / scaling.low_freq_factor
        high_wl = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / scaling.factor, inv)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * out / scaling.factor + smooth * out
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(f"unknown rope scaling kind {scaling.kind!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotate ``x`` [..., T, H, D] by ``positions`` [..., T] (int)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos = jnp.cos(emb).astype(x.dtype)
    sin = jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
