"""Cached extend/decode equals the full-sequence forward; no recompilation in loops."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import dot_shapes, fp32_tol, load_manifest, target_fixture_sets
from deepspec_jax import load_target
from deepspec_jax import target as target_mod
from deepspec_jax.layers.linear import padded_rows


def _fixture_target(fs):
    return load_target(os.path.join(fs, load_manifest(fs)["global"]["target_dir"]))


@pytest.fixture(scope="module", params=target_fixture_sets())
def fixture_set(request):
    """Every fixture set with a target: Qwen3 and Gemma-4 (sliding-window layers, KV
    sharing through the cache)."""
    return request.param


@pytest.fixture(scope="module")
def tiny(fixture_set):
    return _fixture_target(fixture_set)


def test_cached_decode_matches_full_forward(tiny):
    """Batch 4, different prompt lengths, 100 single-token steps plus one 3-token extend."""
    rng = np.random.default_rng(0)
    lens = np.array([5, 9, 12, 3], np.int32)
    steps, total = 100, 12 + 100 + 3
    V = tiny.config.vocab_size
    seqs = rng.integers(0, V - 1, size=(4, total)).astype(np.int32)
    full = np.asarray(tiny.forward(seqs, layer_ids=(0, 2)).logits)
    full_feats = np.asarray(tiny.forward(seqs, layer_ids=(0, 2)).features)
    prompt = np.where(np.arange(16)[None] < lens[:, None], seqs[:, :16], 0)
    cache = tiny.init_cache(4, 128)
    out, cache = tiny.extend(cache, prompt, lens)
    logits = np.asarray(out.logits)
    lt, ft = fp32_tol(full, 1e-4), fp32_tol(full_feats, 1e-5)
    for b in range(4):
        np.testing.assert_allclose(logits[b, : lens[b]], full[b, : lens[b]], atol=lt, rtol=0)
    rows = np.arange(4)
    sizes = []
    for t in range(steps):
        pos = lens + t
        out, cache = tiny.extend(cache, seqs[rows, pos][:, None], np.ones(4, np.int32), layer_ids=(0, 2))
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[rows, pos], atol=lt, rtol=0)
        np.testing.assert_allclose(np.asarray(out.features)[:, 0], full_feats[rows, pos], atol=ft, rtol=0)
        sizes.append(target_mod._extend._cache_size())
    assert sizes[-1] == sizes[0], f"decode recompiled: jit cache sizes {sizes[0]} -> {sizes[-1]}"
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens + steps)
    # multi-token extend (speculative verify shape) with per-row valid counts, then rollback
    pos0 = lens + steps
    chunk = np.stack([seqs[b, pos0[b]: pos0[b] + 3] for b in range(4)])
    num_new = np.array([3, 1, 2, 3], np.int32)
    out, cache = tiny.extend(cache, chunk, num_new)
    got = np.asarray(out.logits)
    for b in range(4):
        for j in range(num_new[b]):
            np.testing.assert_allclose(got[b, j], full[b, pos0[b] + j], atol=lt, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos0 + num_new)


def test_rollback_by_lowering_lengths(tiny):
    """After a rejected tail, lowering ``lengths`` makes later logits equal a fresh forward."""
    rng = np.random.default_rng(1)
    V = tiny.config.vocab_size
    seq = rng.integers(0, V - 1, size=(1, 20)).astype(np.int32)
    junk = rng.integers(0, V - 1, size=(1, 4)).astype(np.int32)
    cache = tiny.init_cache(1, 64)
    _, cache = tiny.extend(cache, seq[:, :10], np.array([10]))
    _, cache = tiny.extend(cache, junk, np.array([4]))            # speculative tail
    cache = cache._replace(lengths=cache.lengths - 4)              # rejected: roll back
    out, cache = tiny.extend(cache, seq[:, 10:], np.array([10]))
    full = np.asarray(tiny.forward(seq).logits)
    np.testing.assert_allclose(np.asarray(out.logits)[0], full[0, 10:], atol=fp32_tol(full, 1e-4), rtol=0)


def test_greedy_generate_matches_fixture(fixture_set, tiny):
    g = load_file(os.path.join(fixture_set, "fixtures", "decode_target_greedy.safetensors"))
    n = len([k for k in g if k.startswith("prompt_")])
    prompts = [g[f"prompt_{i}"].astype(int).tolist() for i in range(n)]
    new = [g[f"output_ids_{i}"].size - len(prompts[i]) for i in range(n)]
    outs = tiny.generate(prompts, max_new_tokens=max(new), temperature=0.0)
    for i in range(n):
        assert outs[i][: new[i]] == g[f"output_ids_{i}"][len(prompts[i]):].tolist()
    # batch 1 gives the same tokens as the batch
    assert tiny.generate([prompts[0]], max_new_tokens=new[0]) == [outs[0][: new[0]]]


def test_generate_stop_tokens_and_no_recompile(tiny):
    prompts = [[1, 2, 3, 4], [5, 6]]
    base = tiny.generate(prompts, max_new_tokens=30)
    size = target_mod._generate._cache_size()
    stop = base[0][7]
    cut = tiny.generate(prompts, max_new_tokens=30, stop_token_ids=[stop])
    for full_row, row in zip(base, cut):
        k = full_row.index(stop) + 1 if stop in full_row else len(full_row)
        assert row == full_row[:k]
    tiny.generate([[7, 8, 9], [10, 11, 12, 13, 14]], max_new_tokens=30, stop_token_ids=[stop])
    assert target_mod._generate._cache_size() == size, "same buckets must not recompile"


def test_sampling_is_seeded_and_valid(tiny):
    a = tiny.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=3)
    b = tiny.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=3)
    c = tiny.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=4)
    assert a == b and a != c
    k = tiny.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=3, top_k=1)
    assert k == tiny.generate([[1, 2, 3]], max_new_tokens=20)  # top-k 1 is greedy
    p = tiny.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=3, top_p=1e-6)
    assert p == k  # a tiny nucleus keeps only the argmax


def test_sampled_distribution_matches_softmax():
    """One sampling step at T=0.7, top-k 5, top-p 0.8 matches the processed softmax."""
    from deepspec_jax.sampling import SamplingParams, probs, sample

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 2, jnp.float32)
    sp = SamplingParams(0.7, 5, 0.8)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, sp))(keys))[:, 0]
    p = np.asarray(probs(logits, sp))[0]
    assert (p > 0).sum() <= 5
    freq = np.bincount(draws, minlength=12) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.015)


def _whole_cache_copies(hlo: str, cache) -> list[str]:
    shapes = ["f32[" + ",".join(str(d) for d in x[0].shape) + "]" for x in (cache.k, cache.v)]
    return [line.strip()[:160] for line in hlo.splitlines()
            if " copy(" in line and any(shape in line for shape in shapes)]


@pytest.mark.parametrize("batch,new", [(1, 1), (1, 5), (3, 5)])
def test_extend_updates_cache_in_place(fixture_set, batch, new):
    """The compiled decode/verify step never copies a whole KV buffer: reading the cache
    and then scattering into it made XLA:CPU copy every layer's buffer 2-4 times per
    call (~70% of a SmolLM2 decode step)."""
    target = _fixture_target(fixture_set)
    cache = target.init_cache(batch, 64)
    ids = jnp.zeros((batch, new), jnp.int32)
    compiled = target_mod._extend.lower(target.graphdef, target.state, cache, ids,
                                        jnp.full((batch,), new, jnp.int32), (0,)).compile()
    copies = _whole_cache_copies(compiled.as_text(), cache)
    assert not copies, f"{len(copies)} whole-cache copies, e.g. {copies[:2]}"


def test_extend_tree_updates_cache_in_place(fixture_set):
    """Same for the tree verify pass (the tree's K/V go to the attention separately)."""
    from flax import nnx

    from deepspec_jax.kernels.tree_attention import ancestor_bits

    target = _fixture_target(fixture_set)
    cache = target.init_cache(2, 64)
    parents = jnp.asarray([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]], jnp.int32)
    depths = jnp.asarray([[0, 1, 1, 2, 2], [0, 1, 2, 3, 4]], jnp.int32)

    def run(state, c, ids, d, bits):
        return nnx.merge(target.graphdef, state).extend_tree(c, ids, d, bits, (0,))

    compiled = jax.jit(run, donate_argnums=1).lower(
        target.state, cache, jnp.zeros((2, 5), jnp.int32), depths, ancestor_bits(parents)).compile()
    copies = _whole_cache_copies(compiled.as_text(), cache)
    assert not copies, f"{len(copies)} whole-cache copies, e.g. {copies[:2]}"


def test_nan_in_one_row_does_not_reach_other_rows(tiny):
    """A non-finite value in row 0's cache (so row 0's attention output is NaN) must not
    change row 1: the in-place KV write's read-before-write dependency must stay an
    exact zero (``0 * NaN`` added to every row's new entries poisoned them all)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tiny.config.vocab_size - 1, size=(2, 8)).astype(np.int32)
    lens = np.array([6, 6], np.int32)
    step = ids[:, 6:7]

    def decode(poison: bool):
        _, cache = tiny.extend(tiny.init_cache(2, 32), ids[:, :6], lens)
        if poison:
            cache = cache._replace(k=(cache.k[0].at[0].set(jnp.nan),) + cache.k[1:])
        out1, cache = tiny.extend(cache, step, np.ones(2, np.int32))
        out2, cache = tiny.extend(cache, ids[:, 7:8], np.ones(2, np.int32))
        return np.asarray(out1.logits), np.asarray(out2.logits), cache

    clean1, clean2, clean_cache = decode(False)
    bad1, bad2, bad_cache = decode(True)
    assert np.isnan(bad1[0]).all(), "the poisoned row should produce NaN logits"
    np.testing.assert_array_equal(bad1[1], clean1[1])
    np.testing.assert_array_equal(bad2[1], clean2[1])
    for c, b in zip(clean_cache.k + clean_cache.v, bad_cache.k + bad_cache.v):
        np.testing.assert_array_equal(np.asarray(b)[1], np.asarray(c)[1])


def test_verify_projections_are_weight_first(fixture_set):
    """A 5-token verify multiplies every MLP weight weight-first ([I, 8] products: the
    rows padded to a whole panel, ``layers.linear``), the form whose cost on XLA:CPU stays
    near one token's; with tied embeddings the output projection too ([V, 8]), while one
    token keeps it rows-first."""
    target = _fixture_target(fixture_set)
    cfg = target.config
    cache = target.init_cache(1, 64)
    compiled = target_mod._extend.lower(target.graphdef, target.state, cache,
                                        jnp.zeros((1, 5), jnp.int32),
                                        jnp.full((1,), 5, jnp.int32), (0,)).compile()
    shapes = dot_shapes(compiled.as_text())
    for i in sorted({cfg.layer_intermediate(l) for l in range(cfg.num_hidden_layers)}):
        want = 2 * sum(cfg.layer_intermediate(l) == i for l in range(cfg.num_hidden_layers))
        first = sum(s.startswith(f"f32[{i},{padded_rows(5)}]") for s in shapes)
        assert first >= want, (i, first, want, sorted(set(shapes)))
        assert not any(s.startswith((f"f32[5,{i}]", f"f32[1,5,{i}]")) for s in shapes), shapes
    if cfg.tie_word_embeddings:   # the output projection too, from 2 rows; one row stays [1, V]
        V = cfg.vocab_size
        assert any(s.startswith(f"f32[{V},{padded_rows(5)}]") for s in shapes), sorted(set(shapes))
        assert not any(s.startswith((f"f32[5,{V}]", f"f32[1,5,{V}]")) for s in shapes), shapes
        one = dot_shapes(target_mod._extend.lower(
            target.graphdef, target.state, cache, jnp.zeros((1, 1), jnp.int32),
            jnp.full((1,), 1, jnp.int32), (0,)).compile().as_text())
        assert not any(s.startswith(f"f32[{V},1]") for s in one), sorted(set(one))
