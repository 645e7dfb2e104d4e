"""Pallas tree attention: flash-style online softmax over KV-cache blocks.

Why a kernel: a dense-mask verify pass reads the whole [B,K,S,D] cache and builds
[B,H,N,S] logits; this kernel reads only the cache blocks below prefix_len, once per KV
head (the G query heads sharing a KV head are stacked into the rows of one tile, so a
KV block feeds G*N queries), then one tree tile ([D,N] keys, [N,D] values) masked by
the ancestor bits.

Row layout (both bodies): the tile for (batch b, KV head k) has rows r = n*G + g
(node n, query head k*G + g), padded with zero-bit rows to the backend's row multiple.
Prefix blocks entirely below prefix_len need no mask, the block holding prefix_len is
masked by slot < prefix_len, blocks beyond it are skipped; the tree tile is masked by
bit j of the row's ancestor words.

Two bodies share the mask and online-softmax helpers:
* TPU (Mosaic): grid (B, K, cdiv(S, block_kv) + 1) with the last axis "arbitrary" (its
  final step is the tree tile); prefix_len is scalar-prefetched into SMEM and the
  cache index maps clamp the block index to the last prefix block, so skipped blocks
  cost neither DMA nor compute. Running max/sum live in lane-replicated VMEM scratch.
* GPU (Triton): grid (B, K, row blocks); each program loops over the prefix blocks
  with dynamic trip counts (prefix_len passed as an input, masked loads at the edge),
  then does the tree tile.

Inference only: no custom_vjp (nothing differentiates through verification).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepspec_jax.kernels.tree_attention.reference import num_words, tree_kv_from_cache

# Finite init of the running max: exp(m_prev - m_next) stays 0 (not NaN) while every
# logit seen so far is masked (-inf).
_M_INIT = -1e30
_LANES = 128  # TPU lane width: m/l scratch is replicated across lanes
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tpu_block_kv(block_kv: int, s: int) -> int:
    """A block covering the whole cache may be any size (full-dim block); otherwise the
    K block's lane dimension must be a multiple of 128."""
    return s if block_kv >= s else block_kv


def unsupported_reason(backend: str, q_shape, dtype, k_shape, block_kv: int,
                       kv_dtypes=()) -> str | None:
    """Why the kernel cannot run these shapes on ``backend`` ("tpu"/"gpu"), or None."""
    _, n, h, d = q_shape
    _, kh, _, s = k_shape
    if not any(jnp.dtype(dtype) == jnp.dtype(t) for t in _SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (kernel supports float32/bfloat16/float16)"
    if any(jnp.dtype(t) != jnp.dtype(dtype) for t in kv_dtypes):
        return (f"k_cache/v_cache (and k_tree/v_tree) dtypes "
                f"{[jnp.dtype(t).name for t in kv_dtypes]} must equal q's "
                f"{jnp.dtype(dtype).name}; cast q or the cache")
    if backend == "tpu":
        if jnp.dtype(dtype) == jnp.float16:  # Mosaic: "Invalid vector type for load"
            return "float16 is not supported by Mosaic on TPU; use bfloat16 or float32"
        bk = _tpu_block_kv(block_kv, s)
        if bk != s and bk % 128:
            return (f"block_kv={block_kv} must be a multiple of 128 on TPU (the key block's "
                    f"lane dim) unless it covers the whole cache S={s}")
        if d % 8:
            return f"head dim D={d} must be a multiple of 8 on TPU"
        return None
    if backend == "gpu":
        if block_kv < 16 or block_kv & (block_kv - 1):
            return f"block_kv={block_kv} must be a power of 2 >= 16 for the Triton lowering"
        if d < 16 or d & (d - 1):
            return f"head dim D={d} must be a power of 2 >= 16 for the Triton lowering"
        return None
    return f"unknown kernel backend {backend!r}"


def _tree_visibility(j, n: int, word):
    """Visible [R, Nt] bool for tree columns ``j`` ([1, Nt] int32): j < n and bit j set
    in the row's ancestor words; ``word(w)`` returns word w of every row as [R, 1]
    int32. The static loop over words avoids a lane gather (W = ceil(N/32) is small)."""
    widx = jnp.right_shift(j, 5)
    shift = jnp.bitwise_and(j, 31)
    bit = None
    for w in range(num_words(n)):
        b_w = jnp.bitwise_and(jnp.right_shift(word(w), shift), 1)  # [R, Nt]
        sel = jnp.where(widx == w, b_w, 0)
        bit = sel if bit is None else bit + sel
    return (j < n) & (bit == 1)


def _online_update(s, v, m_prev, l_prev, acc_prev, precision):
    """One flash step. s: masked, scaled fp32 logits [R, bk]; v [bk, D]; m/l are [R, 1]
    (TPU) or [R] (Triton); acc [R, D] fp32 (unnormalised)."""
    two_d = m_prev.ndim == 2
    col = (lambda x: x) if two_d else (lambda x: x[:, None])
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=two_d))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - col(m_next))
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=two_d)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return m_next, l_next, col(alpha) * acc_prev + pv


def _precision(dtype):
    # fp32 inputs: full-precision matmuls (Triton would otherwise use TF32).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _pack_rows(q, tree_bits, kh: int, rows: int, words: int):
    """q [B,N,H,D] -> [B,K,rows,D] with row n*G+g; bits -> per-row int32 [B,rows,words]."""
    b, n, h, d = q.shape
    g = h // kh
    qr = q.reshape(b, n, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, n * g, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - n * g), (0, 0)))
    bits = lax.bitcast_convert_type(tree_bits, jnp.int32)
    bits = jnp.repeat(bits, g, axis=1)
    bits = jnp.pad(bits, ((0, 0), (0, rows - n * g), (0, words - bits.shape[2])))
    return qr, bits


def _unpack_rows(out, n: int, g: int):
    b, kh, _, d = out.shape
    return out[:, :, :n * g].reshape(b, kh, n, g, d).transpose(0, 2, 1, 3, 4).reshape(
        b, n, kh * g, d)


# ----------------------------------------------------------------------------- TPU

def _tpu_kernel(plen_ref, q_ref, k_ref, v_ref, kt_ref, vt_ref, bits_ref, o_ref, m_scr, l_scr,
                acc_scr, *, n: int, nb: int, bk: int, scale: float, precision):
    b, j = pl.program_id(0), pl.program_id(2)
    plen = plen_ref[b]
    start = j * bk

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _M_INIT, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(k, v, vis, vrow_ok):
        s = jnp.dot(q_ref[...], k, preferred_element_type=jnp.float32, precision=precision)
        s = s * scale
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
            # Masked slots may be stale or (edge block) out of bounds: p is 0 there, but
            # 0 * NaN would still poison the value sum.
            v = jnp.where(vrow_ok, v, jnp.zeros_like(v))
        m, l, acc = _online_update(s, v, m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...], precision)
        m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
        acc_scr[...] = acc

    @pl.when((j < nb) & (start + bk <= plen))
    def _full_block():
        update(k_ref[...], v_ref[...], None, None)

    @pl.when((j < nb) & (start < plen) & (start + bk > plen))
    def _edge_block():
        col = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        row = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        update(k_ref[...], v_ref[...], col < plen, row < plen)

    @pl.when(j == nb)
    def _tree_and_finish():
        nt = kt_ref.shape[-1]
        vis = _tree_visibility(lax.broadcasted_iota(jnp.int32, (1, nt), 1), n,
                               lambda w: bits_ref[:, pl.ds(w, 1)])
        update(kt_ref[...], vt_ref[...], vis, lax.broadcasted_iota(jnp.int32, (nt, 1), 0) < n)
        l = l_scr[:, 0:1]
        o_ref[...] = (acc_scr[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _tpu_call(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree, *, scale, block_kv,
              interpret):
    from jax.experimental.pallas import tpu as pltpu

    b, n, h, d = q.shape
    _, kh, _, s = k_cache.shape
    g = h // kh
    row_mult = 8 * max(1, 4 // jnp.dtype(q.dtype).itemsize)  # sublane packing
    rows = _round_up(n * g, row_mult)
    words = num_words(n)
    bk = _tpu_block_kv(block_kv, s)
    nb = pl.cdiv(s, bk)
    qr, bits = _pack_rows(q, tree_bits, kh, rows, words)

    def kv_block(bi, ji, plen_ref):
        # Clamp to the last block holding a prefix slot: repeated block indices are not
        # re-fetched, so the skipped tail (and the tree step) cost no cache DMA.
        last = jnp.maximum(lax.div(plen_ref[bi] + (bk - 1), bk) - 1, 0)  # >= 0: no sign fixup
        return jnp.minimum(ji, last)

    per_bk = lambda *shape: pl.BlockSpec((None, None) + shape,  # noqa: E731
                                         lambda bi, ki, ji, p: (bi, ki, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kh, nb + 1),
        in_specs=[
            per_bk(rows, d),
            pl.BlockSpec((None, None, d, bk), lambda bi, ki, ji, p: (bi, ki, 0, kv_block(bi, ji, p))),
            pl.BlockSpec((None, None, bk, d), lambda bi, ki, ji, p: (bi, ki, kv_block(bi, ji, p), 0)),
            per_bk(d, n),
            per_bk(n, d),
            pl.BlockSpec((None, rows, words), lambda bi, ki, ji, p: (bi, 0, 0)),
        ],
        out_specs=per_bk(rows, d),
        scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                        pltpu.VMEM((rows, _LANES), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    kernel = functools.partial(_tpu_kernel, n=n, nb=nb, bk=bk, scale=scale,
                               precision=_precision(q.dtype))
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="tree_attention_tpu",
    )(prefix_len.astype(jnp.int32), qr, k_cache, v_cache, k_tree, v_tree, bits)
    return _unpack_rows(out, n, g)


# -------------------------------------------------------------------------- Triton

def _gpu_kernel(plen_ref, q_ref, k_ref, v_ref, kt_ref, vt_ref, bits_ref, o_ref, *, n: int,
                bk: int, scale: float, precision):
    from jax.experimental.pallas import triton as plgpu

    plen = plen_ref[()]
    q = q_ref[...]  # [R, D]
    r, d = q.shape

    def update(carry, k, v, vis):
        sc = jnp.dot(q, k, preferred_element_type=jnp.float32, precision=precision) * scale
        if vis is not None:
            sc = jnp.where(vis, sc, -jnp.inf)
        return _online_update(sc, v, *carry, precision)

    def block(i, carry, masked: bool):
        start = pl.multiple_of(i * bk, bk)
        if not masked:
            return update(carry, k_ref[:, pl.ds(start, bk)], v_ref[pl.ds(start, bk), :], None)
        ok = start + jnp.arange(bk, dtype=jnp.int32) < plen  # never reads past the prefix
        k = plgpu.load(k_ref.at[:, pl.ds(start, bk)],
                       mask=jnp.broadcast_to(ok[None, :], (d, bk)), other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(start, bk), :],
                       mask=jnp.broadcast_to(ok[:, None], (bk, d)), other=0.0)
        return update(carry, k, v, ok[None, :])

    carry = (jnp.full((r,), _M_INIT, jnp.float32), jnp.zeros((r,), jnp.float32),
             jnp.zeros((r, d), jnp.float32))
    n_full = plen // bk  # blocks entirely inside the committed prefix: no mask
    carry = lax.fori_loop(0, n_full, functools.partial(block, masked=False), carry)
    carry = lax.fori_loop(n_full, pl.cdiv(plen, bk), functools.partial(block, masked=True), carry)
    nt = kt_ref.shape[-1]  # tree arrays are zero-padded to a power of 2 by the wrapper
    vis = _tree_visibility(jnp.arange(nt, dtype=jnp.int32)[None, :], n,
                           lambda w: bits_ref[:, w][:, None])
    m, l, acc = update(carry, kt_ref[...], vt_ref[...], vis)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def _gpu_call(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree, *, scale, block_kv,
              interpret):
    from jax.experimental.pallas import triton as plgpu

    b, n, h, d = q.shape
    _, kh, _, s = k_cache.shape
    g = h // kh
    rows = _next_pow2(max(16, n * g))  # Triton tensors: power-of-2 sizes, dot dims >= 16
    block_r = min(rows, 64)  # bound the fp32 accumulator's register footprint
    words = _next_pow2(num_words(n))
    nt = _next_pow2(max(16, n))
    qr, bits = _pack_rows(q, tree_bits, kh, rows, words)
    k_tree = jnp.pad(k_tree, ((0, 0), (0, 0), (0, 0), (0, nt - n)))
    v_tree = jnp.pad(v_tree, ((0, 0), (0, 0), (0, nt - n), (0, 0)))
    per_bk = lambda *shape: pl.BlockSpec((None, None) + shape,  # noqa: E731
                                         lambda bi, ki, ri: (bi, ki, 0, 0))
    kernel = functools.partial(_gpu_kernel, n=n, bk=block_kv, scale=scale,
                               precision=_precision(q.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(b, kh, rows // block_r),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, ki, ri: (bi,)),
            pl.BlockSpec((None, None, block_r, d), lambda bi, ki, ri: (bi, ki, ri, 0)),
            per_bk(d, s),
            per_bk(s, d),
            per_bk(d, nt),
            per_bk(nt, d),
            pl.BlockSpec((None, block_r, words), lambda bi, ki, ri: (bi, ri, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_r, d), lambda bi, ki, ri: (bi, ki, ri, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, rows, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4 if block_r * d <= 4096 else 8,
                                             num_stages=2),
        interpret=interpret,
        name="tree_attention_gpu",
    )(prefix_len.astype(jnp.int32), qr, k_cache, v_cache, k_tree, v_tree, bits)
    return _unpack_rows(out, n, g)


@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "interpret", "backend"))
def tree_attention_pallas(q, k_cache, v_cache, prefix_len, tree_bits, k_tree=None, v_tree=None,
                          *, scale=None, block_kv: int = 128, interpret: bool = False,
                          backend: str = "tpu"):
    """The kernel entry (inputs already validated by tree_attention). Without
    k_tree/v_tree the tree's keys/values are gathered from the cache at prefix_len."""
    if k_tree is None:
        k_tree, v_tree = tree_kv_from_cache(k_cache, v_cache, prefix_len, q.shape[1])
    reason = unsupported_reason(backend, q.shape, q.dtype, k_cache.shape, block_kv,
                                (k_cache.dtype, v_cache.dtype, k_tree.dtype, v_tree.dtype))
    if reason is not None:
        raise ValueError(f"deepspec_jax.kernels.tree_attention: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    call = _tpu_call if backend == "tpu" else _gpu_call
    return call(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree, scale=scale,
                block_kv=block_kv, interpret=interpret)
