"""``CausalLM.extend_packed`` (variable-length verification): packing the real tokens of
a ragged [B, T] batch into one sequence gives, at every real position, the logits,
features and cache entries of ``extend`` over the padded batch -- rows of 0 tokens,
sliding-window layers (Gemma), every packed size from the tight one up and an
attention grid as narrow as the widest row included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepspec_jax.config import target_config_from_dict
from deepspec_jax.models.transformer import CausalLM, init_cache, packed_layout

LLAMA = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rope_theta=10000.0, tie_word_embeddings=False)
GEMMA = dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rope_theta=10000.0, rope_local_base_freq=10000.0, sliding_window=4,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             query_pre_attn_scalar=8, tie_word_embeddings=True)


def _model(raw):
    return CausalLM(target_config_from_dict(raw, "tiny"), rngs=nnx.Rngs(0))


def _prefilled(model, lengths, cap=32, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    prompt = jnp.asarray(rng.integers(0, 60, (b, max(lengths))), jnp.int32)
    cache = init_cache(model.cfg, b, cap)
    _, cache = model.extend(cache, prompt, jnp.asarray(lengths, jnp.int32), fresh=True)
    return cache


def test_packed_layout():
    row, slot, gather = packed_layout(jnp.asarray([2, 0, 3], jnp.int32), 4, 7)
    np.testing.assert_array_equal(row, [0, 0, 2, 2, 2, 3, 3])   # 3 = padding (dropped)
    np.testing.assert_array_equal(slot[:5], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(gather, [[0, 1, 2, 3], [2, 3, 4, 5], [2, 3, 4, 5]])


@pytest.mark.parametrize("raw", [LLAMA, GEMMA], ids=["qwen3", "gemma3-sliding"])
@pytest.mark.parametrize("num_new", [[5, 1, 3], [0, 5, 2], [1, 1, 1]])
def test_matches_extend_at_real_positions(raw, num_new):
    model = _model(raw)
    lengths = [7, 3, 11]
    t = 5
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 60, (3, t)), jnp.int32)
    n = jnp.asarray(num_new, jnp.int32)
    want, wcache = model.extend(_prefilled(model, lengths), ids, n, layer_ids=(0, 2))
    for size, grid in [(sum(num_new), None), (15, None), (15, max(num_new))]:
        got, gcache = model.extend_packed(_prefilled(model, lengths), ids, n, size,
                                          layer_ids=(0, 2), grid=grid)
        np.testing.assert_array_equal(gcache.lengths, wcache.lengths)
        for b, k in enumerate(num_new):
            for name in ("logits", "features", "last_hidden"):
                np.testing.assert_allclose(getattr(got, name)[b, :k], getattr(want, name)[b, :k],
                                           rtol=2e-5, atol=2e-5, err_msg=f"{name} row {b}")
            assert np.all(np.isfinite(np.asarray(got.logits[b])))
            hi = lengths[b] + k
            for wk, gk in zip(wcache.k, gcache.k):
                np.testing.assert_allclose(gk[b, ..., :hi], wk[b, ..., :hi], rtol=2e-5, atol=2e-5)
            for wv, gv in zip(wcache.v, gcache.v):
                np.testing.assert_allclose(gv[b, :, :hi], wv[b, :, :hi], rtol=2e-5, atol=2e-5)


def test_one_compile_for_every_ragged_count():
    model = _model(LLAMA)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, cache, ids, n):
        return nnx.merge(graphdef, state).extend_packed(cache, ids, n, 8)[0].logits

    ids = jnp.zeros((3, 5), jnp.int32)
    for n in ([1, 2, 3], [0, 0, 1], [5, 3, 0]):
        f(state, _prefilled(model, [4, 5, 6]), ids, jnp.asarray(n, jnp.int32))
    assert f._cache_size() == 1


def test_grid_must_hold_the_row_width():
    model = _model(LLAMA)
    ids = jnp.zeros((3, 5), jnp.int32)
    for grid in (0, 6):
        with pytest.raises(ValueError, match="grid"):
            model.extend_packed(_prefilled(model, [4, 5, 6]), ids, jnp.ones(3, jnp.int32), 3,
                                grid=grid)
