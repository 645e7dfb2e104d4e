"""``filled_cache_attention`` (extend's decode/verify attention) equals the dense
``segment_attention`` over the whole cache, reads only the filled blocks (slots past the
longest row's length, even NaN garbage, never reach the result), and compiles once for
every filled length."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from deepspec_jax.kernels.attention import filled_cache_attention, segment_attention
from deepspec_jax.kernels.attention.segments import cache_block


def _case(seed, b=2, t=5, h=6, kv=2, d=16, s=96, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    return r(b, t, h, d), r(b, kv, d, s), r(b, kv, s, d), r(b, kv, d, t), r(b, kv, t, d)


def _masks(lengths, t, s, window=None):
    start = jnp.asarray(lengths, jnp.int32)
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    first = None if window is None else jnp.maximum(pos - window + 1, 0)[:, :, None]

    def cache_mask(slots):
        m = jnp.broadcast_to(slots[None, None, :] < start[:, None, None], (len(lengths), t, slots.shape[0]))
        return m if first is None else m & (slots[None, None, :] >= first)

    nm = jnp.tril(jnp.ones((t, t), bool))[None]
    if first is not None:
        nm = nm & (pos[:, None, :] >= first)
    return start, cache_mask, nm


@pytest.mark.parametrize("lengths,window,block", [
    ([0, 0], None, 32), ([7, 50], None, 32), ([96 - 5, 3], None, 32), ([40, 41], 9, 16),
    ([64, 64], None, 128),   # block 128 -> 96 (the largest divisor of the capacity <= 128)
])
def test_matches_dense_segments(lengths, window, block):
    q, ck, cv, kt, vt = _case(0)
    start, cache_mask, nm = _masks(lengths, q.shape[1], ck.shape[-1], window)
    want, _ = segment_attention(q, [(ck, cv, cache_mask(jnp.arange(ck.shape[-1]))), (kt, vt, nm)],
                                scale=0.3)
    got = filled_cache_attention(q, ck, cv, cache_mask, jnp.max(start), (kt, vt, nm), scale=0.3,
                                 block=block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)


def test_slots_past_the_filled_blocks_are_never_read():
    q, ck, cv, kt, vt = _case(1)
    start, cache_mask, nm = _masks([10, 30], q.shape[1], ck.shape[-1])
    f = jax.jit(lambda ck, cv, filled: filled_cache_attention(q, ck, cv, cache_mask, filled,
                                                              (kt, vt, nm), block=32))
    clean = f(ck, cv, jnp.max(start))
    # slots 32.. are past the filled block (30 -> one block of 32): NaN there changes nothing
    poisoned = f(ck.at[..., 32:].set(jnp.nan), cv.at[:, :, 32:].set(jnp.nan), jnp.max(start))
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))
    # and the same NaN inside the filled block (masked slots 30, 31) would be read
    leaky = f(ck, cv.at[:, :, 31].set(jnp.nan), jnp.max(start))
    assert np.isnan(np.asarray(leaky)).any()
    assert f._cache_size() == 1          # one program for every filled length


def test_cache_block():
    assert [cache_block(n, 128) for n in (1024, 96, 100, 7)] == [128, 96, 100, 7]
    assert cache_block(1000, 128) == 125
    assert cache_block(1021, 128) == 1021     # prime: one block, never 1021 blocks of 1
