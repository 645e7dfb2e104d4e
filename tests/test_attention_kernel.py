"""The Pallas span-attention kernel: interpreted on CPU it matches the jnp reference
(forward out/lse and gradients, through a merge with a dense piece so lse carries a
cotangent) on the project's mask kinds; skipped blocks are really not read; the FLOP
count of the skipped tiles; and the kernel compiles for TPU through Mosaic, forward and
backward, inside shard_map at a realistic size."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepspec_jax.kernels.attention import (causal_span, dense_attention, merge_attention,
                                            span_attention, span_attention_reference, span_flops)
from deepspec_jax.plan.topology import compile_only_devices

BLOCK = 128  # small tiles: several query and key blocks at test sizes


def qkv(seed, b, t, s, h, kh, d, dtype):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def causal_case():
    """Causal over a right-padded batch (ragged lengths), GQA G=2, D=64 (head-major
    layout), T = S = 300 (not a block multiple; tiles below the diagonal take the
    unmasked path)."""
    start, stop = causal_span(jnp.array([300, 131], jnp.int32), 300)
    return qkv(0, 2, 300, 300, 4, 2, 64, jnp.float32), start, stop


def dspark_case():
    """DSpark/DFlash blocks: rows of anchor group a see keys [0, anchor_a); dummy anchors
    (0) make whole groups fully masked. bf16, D=128 (packed layout), S=300."""
    anchors = jnp.array([[17, 0, 250, 129, 0, 300]], jnp.int32)
    stop = jnp.repeat(anchors, 40, axis=1)                           # T = 240
    return qkv(1, 1, 240, 300, 2, 1, 128, jnp.bfloat16), jnp.zeros_like(stop), stop


def window_case():
    """Sliding window of 100 keys (start > 0), fp32, G=1, T = S = 260."""
    t = jnp.arange(260, dtype=jnp.int32)[None]
    return qkv(2, 1, 260, 260, 2, 2, 128, jnp.float32), jnp.maximum(t - 99, 0), t + 1


def with_grads(attn, start, stop, extra_mask):
    """(out, lse, dq, dk, dv) of the span piece, the gradients of a loss through out and
    lse: the span piece merged with a dense piece over the first 8 keys (``extra_mask``
    [B,T,8]; rows False everywhere stay fully masked). One jit: one kernel trace."""
    def loss(q, k, v):
        span = attn(q, k, v, start, stop)
        dense = dense_attention(q, k[:, :8], v[:, :8], extra_mask)
        out, lse = merge_attention([span, dense])
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out * w) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), span

    def f(q, k, v):
        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v)
        return (out, lse) + grads
    return jax.jit(f)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("case", [causal_case, dspark_case, window_case])
def test_kernel_matches_reference(case):
    (q, k, v), start, stop = case()
    kernel = functools.partial(span_attention, impl="pallas", block_q=BLOCK, block_kv=BLOCK,
                               interpret=True)
    ref = span_attention_reference
    # Tolerances (norm-relative; measured errors in brackets): fp32 differs only in
    # summation order, HIGHEST-precision matmuls [<1e-6]. bf16: both paths round p to
    # bf16 before PV, against different running maxima (a few bf16 ulps per element)
    # [out 4e-4; grads 3e-3, as far from an fp32 computation as the reference's own bf16
    # gradients are]. lse is a sum of fp32 exps of the same fp32 logits in both [7e-7].
    f32 = q.dtype == jnp.float32
    rng = np.random.default_rng(5)
    extra = jnp.asarray(rng.random((q.shape[0], q.shape[1], 8)) < 0.5)
    extra = extra.at[:, :80].set(False).at[:, -30:].set(False)  # dense piece empty too
    out, lse, *grads = with_grads(kernel, start, stop, extra)(q, k, v)
    out_r, lse_r, *grads_r = with_grads(ref, start, stop, extra)(q, k, v)
    empty = np.asarray(start >= stop)                                  # [B,T]
    assert rel_err(out, out_r) < (1e-5 if f32 else 2e-3)
    np.testing.assert_array_equal(np.isfinite(lse), ~empty[..., None].repeat(q.shape[2], -1))
    np.testing.assert_allclose(np.where(empty[..., None], 0, lse),
                               np.where(empty[..., None], 0, lse_r), atol=1e-5, rtol=0)
    assert np.all(np.asarray(out)[empty] == 0.0)                      # exactly 0, not ~0
    for name, g, g_r in zip("qkv", grads, grads_r):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, g_r) < (1e-5 if f32 else 1e-2), name
    if empty.any():  # a fully masked row (in both pieces) gets no gradient
        rows = empty & ~np.asarray(extra).any(-1)
        assert rows.any()
        assert np.all(np.asarray(grads[0], np.float32)[rows] == 0.0)


def test_skipped_blocks_are_not_read():
    """Key blocks outside the span range of a (batch, query block) are neither computed
    nor used: NaN there leaves the output and all gradients unchanged (and finite). A
    fully masked query block reads no key at all."""
    (q, k, v) = qkv(3, 2, 256, 512, 2, 1, 128, jnp.float32)
    t = jnp.arange(256, dtype=jnp.int32)[None]
    # batch 0: query block 0 sees keys within [128, 200) (key block 1), query block 1
    # within [300, 384) (key block 2); batch 1: query block 0 sees nothing, query block 1
    # sees [384, 400) (key block 3).
    start = jnp.concatenate([jnp.where(t < 128, 128, 300), jnp.where(t < 128, 0, 384)])
    stop = jnp.concatenate([jnp.where(t < 128, 129 + t % 64, 301 + t % 83),
                            jnp.where(t < 128, 0, 385 + t % 16)])
    key = jnp.arange(512)
    keep = jnp.stack([(key >= 128) & (key < 384), key >= 384])[:, :, None, None]
    kp, vp = jnp.where(keep, k, jnp.nan), jnp.where(keep, v, jnp.nan)

    def loss(q, k, v):
        out, lse = span_attention(q, k, v, start, stop, impl="pallas", block_q=BLOCK,
                                  block_kv=BLOCK, interpret=True)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (out, lse)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (out, lse)), grads = f(q, k, v)
    (_, (out_p, lse_p)), grads_p = f(q, kp, vp)
    np.testing.assert_array_equal(np.asarray(out_p), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(lse_p), np.asarray(lse))
    for g, g_p in zip(grads, grads_p):
        np.testing.assert_array_equal(np.asarray(g_p), np.asarray(g))
    assert np.all(np.isfinite(np.asarray(out_p))) and np.all(np.asarray(out_p)[1, :128] == 0)
    assert np.all(np.asarray(lse_p)[1, :128] == -np.inf)


def test_span_flops_counts_computed_tiles():
    # causal T = S = 1024 in 256-tiles: 10 of the 16 tiles (the lower triangle).
    _, stop = causal_span(jnp.array([1024]), 1024)
    dense, done = span_flops(jnp.zeros_like(stop), stop, num_heads=2, head_dim=64,
                             num_keys=1024, block_q=256, block_kv=256)
    assert dense == 4 * 64 * 2 * 1024 * 1024
    assert done == dense * 10 / 16
    # DSpark-like: two 256-row groups with anchors 300 and 0 over S = 1024 -> the first
    # query block needs key blocks 0-1, the second none: 2 of 8 tiles.
    stop = jnp.repeat(jnp.array([[300, 0]]), 256, axis=1)
    dense, done = span_flops(jnp.zeros_like(stop), stop, num_heads=1, head_dim=128,
                             num_keys=1024, block_q=256, block_kv=256)
    assert done == dense * 2 / 8
    # block-diagonal (segments of 256 aligned with the tiles): only the 4 diagonal tiles.
    t = jnp.arange(1024)[None]
    dense, done = span_flops(t - t % 256, t + 1, num_heads=1, head_dim=128, num_keys=1024,
                             block_q=256, block_kv=256)
    assert done == dense * 4 / 16


@pytest.mark.parametrize("change,match", [
    (dict(block_q=192), "multiples of 128"),
    (dict(k_dtype=jnp.bfloat16), "dtypes .* differ"),
    (dict(dtype=jnp.float16), "float32/bfloat16"),
])
def test_unsupported_inputs_raise(change, match):
    dtype = change.pop("dtype", jnp.float32)
    (q, k, v) = qkv(4, 1, 8, 8, 2, 1, 64, dtype)
    k = k.astype(change.pop("k_dtype", dtype))
    stop = jnp.full((1, 8), 8, jnp.int32)
    with pytest.raises(ValueError, match=match):
        span_attention(q, k, v, jnp.zeros_like(stop), stop, impl="pallas", interpret=True,
                       **change)


def tpu_kernel_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def test_compiles_for_tpu_in_shard_map():
    """Mosaic lowers the forward and backward kernels for v5e inside shard_map (batch
    over "data", heads over "model") at T = S = 4096, H = 32, K = 8, D = 128, bf16. The
    kernel needs no [T, S]-sized temporaries (0 bytes measured, fwd and fwd+bwd), while
    the jnp reference needs [H, block_q, S] fp32 logits per query block (128 MiB per
    device here; 128 / 149 MiB measured fwd / fwd+bwd). Bound: 1/16 of that, which also
    catches per-row values stored as [.., T, 1] columns (padded to 128 lanes: 19 MiB)."""
    devices = compile_only_devices("v5e-4")
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
    b, t, h, kh, d = 2, 4096, 32, 8, 128
    hs, rs = P("data", None, "model", None), P("data", None)
    # impl="auto" picks the kernel: the shard_map's mesh says the target is a TPU
    attn = jax.shard_map(lambda *a: span_attention(*a, impl="auto"), mesh=mesh,
                         in_specs=(hs, hs, hs, rs, rs), out_specs=(hs, P("data", None, "model")),
                         check_vma=False)

    def loss(attn):
        def f(*a):
            out, lse = attn(*a)
            return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return jax.grad(f, argnums=(0, 1, 2))

    def sds(mesh, shapes, dt, specs):
        return tuple(jax.ShapeDtypeStruct(sh, dt if len(sh) == 4 else jnp.int32,
                                          sharding=NamedSharding(mesh, sp))
                     for sh, sp in zip(shapes, specs))

    args = sds(mesh, [(b, t, h, d), (b, t, kh, d), (b, t, kh, d), (b, t), (b, t)],
               jnp.bfloat16, (hs, hs, hs, rs, rs))
    logits_bytes = (h // 2) * 512 * t * 4
    for f, kernels in ((attn, 1), (loss(attn), 3)):          # fwd; fwd + dq + dk/dv
        compiled = jax.jit(f).lower(*args).compile()
        assert tpu_kernel_calls(compiled) == kernels
        assert compiled.memory_analysis().temp_size_in_bytes < logits_bytes // 16
    # Outside shard_map on one device, head-major layout (D = 64), fp32, GQA: Mosaic
    # must not need the chip generation (that happens only inside a mesh context).
    one = Mesh(np.array(devices[:1]), ("x",))
    args = sds(one, [(1, 300, 4, 64), (1, 200, 2, 64), (1, 200, 2, 64), (1, 300), (1, 300)],
               jnp.float32, (P(),) * 5)
    fn = lambda *a: span_attention(*a, impl="pallas", block_q=128, block_kv=128)  # noqa: E731
    assert tpu_kernel_calls(jax.jit(loss(fn)).lower(*args).compile()) == 3
