"""Token sampling shared by plain generation and speculative decoding.

``SamplingParams`` is static (hashable) so that greedy/top-k/top-p choose the code
path at trace time; the temperature value itself only scales logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GREEDY_EPS = 1e-5  # temperatures below this are greedy (the reference's rule)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0       # 0 = off
    top_p: float = 1.0   # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self) -> "SamplingParams":
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        return self


def processed_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature-scaled fp32 logits with top-k/top-p filtered entries at -inf."""
    x = logits.astype(jnp.float32) / max(sp.temperature, GREEDY_EPS)
    if sp.top_k > 0 and sp.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sp.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        drop_sorted = before >= sp.top_p
        drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(drop, -jnp.inf, x)
    return x


def probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """The sampling distribution; one-hot on the argmax when greedy."""
    if sp.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(processed_logits(logits, sp), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """One token per row of ``logits`` [..., V] (int32)."""
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logits(logits, sp), axis=-1).astype(jnp.int32)
