"""Pallas TPU span attention: flash-style online softmax that skips masked blocks.

Why a kernel: the jnp reference builds [block_q, S] logits per query block and its
backward rematerialises them; for a span mask (causal, DSpark anchors, sliding window)
many (query block, key block) tiles are entirely hidden. Here the logits exist only as
[block_q, block_kv] tiles in VMEM, and a tile outside every row's span costs neither
compute nor DMA.

Skipping: per (batch, query block) the wrapper computes ``lo`` = min(start) and ``hi`` =
max(stop) over the block's non-empty rows (an empty block: lo = hi = 0) and passes them
as scalar-prefetch operands. Key block j is computed iff ``j*bk < hi`` and
``(j+1)*bk > lo``; the K/V index maps clamp j into the useful range, so the pipeline
re-uses the block it already holds instead of fetching a skipped one. In the dK/dV
kernel (key block outer, query blocks inner) the useful query blocks need not be
contiguous, so a per-(batch, key block, query block) table names the query block to
hold at each step (the nearest useful one). Tiles inside [max start, min stop) of the
block are seen whole by every row and skip the mask.

Layouts (no K/V repeat for GQA: index maps pick KV head h // G):
* D % 128 == 0: q/out [B,T,H*D], k/v [B,S,K*D] -- reshapes of the caller's
  [B,T,H,D] (no transpose in the program; XLA on TPU may still relayout them, as it
  tiles the two minor dims); a head is a 128-lane-aligned column block. Mosaic cannot
  block [B,T,H,D] directly (a squeezed head dim in the second-minor position).
* otherwise: head-major [B,H,T,D] / [B,K,S,D] (transposed in the wrapper), D a full dim.
Per-row values (start, stop, lse, delta) live lane-dense as [.., 1, T] rows in HBM (a
[.., T, 1] column would be padded to 128 lanes); the forward and dQ kernels compute
[bq, bk] tiles and turn them into VMEM columns once per query block, the dK/dV kernel
computes transposed [bk, bq] tiles and uses the rows as they are.

Gradients (``jax.custom_vjp``): residuals are q, k, v, out, lse (no [T, S] tensor);
the cotangent of lse enters as ``delta = rowsum(dO * O) - dlse`` and
``dS = P * (dP - delta)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite init of the running max: exp(m_prev - m_next) stays 0/1 (never NaN) while every
# logit seen so far is masked (-inf).
_M_INIT = -1e30
_LANES = 128
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def block_sizes(t: int, s: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """The tiles used for T queries / S keys: the requested ones, shrunk (to a multiple
    of 128) when the sequence is shorter."""
    return min(block_q, _round_up(t, _LANES)), min(block_kv, _round_up(s, _LANES))


def unsupported_reason(q_shape, k_shape, dtypes, block_q: int, block_kv: int) -> str | None:
    """Why the kernel cannot run these shapes, or None."""
    del q_shape, k_shape
    if any(jnp.dtype(t) != jnp.dtype(dtypes[0]) for t in dtypes):
        return f"q/k/v dtypes {[jnp.dtype(t).name for t in dtypes]} differ; cast them to one"
    if not any(jnp.dtype(dtypes[0]) == jnp.dtype(t) for t in _SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtypes[0]).name} (the kernel supports float32/bfloat16)"
    if block_q % _LANES or block_kv % _LANES or block_q <= 0 or block_kv <= 0:
        return (f"block_q={block_q} / block_kv={block_kv} must be positive multiples of 128 "
                "(TPU lane width)")
    return None


def block_ranges(start: jax.Array, stop: jax.Array, bq: int) -> jax.Array:
    """[B, T/bq, 4] int32 per query block: (lo, hi) = min start / max stop over its
    non-empty rows (0, 0 when every row is empty): key tiles outside [lo, hi) are
    skipped; (full_lo, full_hi) = max start / min stop over all its rows: key tiles
    inside [full_lo, full_hi) are visible to every row and need no mask (an empty row
    makes full_hi <= full_lo). T must be a multiple of bq; start >= 0."""
    b, t = start.shape
    nonempty = start < stop
    blocks = lambda x: x.reshape(b, t // bq, bq)  # noqa: E731
    hi = jnp.max(blocks(jnp.where(nonempty, stop, 0)), axis=-1)
    lo = jnp.where(hi > 0, jnp.min(blocks(jnp.where(nonempty, start, jnp.iinfo(jnp.int32).max)),
                                   axis=-1), 0)
    full_lo, full_hi = jnp.max(blocks(start), axis=-1), jnp.min(blocks(stop), axis=-1)
    return jnp.stack([lo, hi, full_lo, full_hi], axis=-1).astype(jnp.int32)


def block_useful(lo: jax.Array, hi: jax.Array, j, bk: int):
    """Key block j intersects [lo, hi)."""
    return (j * bk < hi) & ((j + 1) * bk > lo)


def _tile(rng_ref, b, i, j, nq: int, bk: int):
    """(useful, unmasked) of tile (batch b, query block i, key block j), from the
    flattened block_ranges in SMEM."""
    base = (b * nq + i) * 4
    lo, hi, full_lo, full_hi = (rng_ref[base + n] for n in range(4))
    useful = block_useful(lo, hi, j, bk)
    return useful, useful & (full_lo <= j * bk) & ((j + 1) * bk <= full_hi)


def _when_tile(useful, unmasked, body):
    """Run body(masked) on a useful tile: without the mask when every pair is visible."""
    pl.when(unmasked)(functools.partial(body, False))
    pl.when(useful & jnp.logical_not(unmasked))(functools.partial(body, True))


def _kv_index(bi, hh, i, j, rng_r, *, nq: int, g: int, bk: int):
    """K/V index map of the forward and dQ kernels (grid (B, H, nq, nk)): KV head
    hh // G, key block clamped to the useful range."""
    base = (bi * nq + i) * 4
    return bi, lax.div(hh, g), _kv_block(j, rng_r[base], rng_r[base + 1], bk)


def _kv_block(j, lo, hi, bk: int):
    """Key block to hold at step j: j clamped to the useful range [lo//bk, cdiv(hi,bk)-1]
    (an unchanged block index is not fetched again). lax.div, not //: both operands are
    >= 0, and floor division lowers through sign, which Mosaic lowers only when it
    knows the TPU generation (not when compiling outside a mesh on a CPU host)."""
    first = lax.div(lo, bk)
    last = jnp.maximum(lax.div(hi + (bk - 1), bk) - 1, first)
    return jnp.minimum(jnp.maximum(j, first), last)


def _q_block_table(ranges: jax.Array, nk: int, bk: int) -> jax.Array:
    """[B, nk, nq] int32: the query block the dK/dV kernel holds at (key block j, query
    step i): i if tile (i, j) is useful, else the last useful one before i, else the
    first after, else 0 (no fetch for skipped tiles)."""
    lo, hi = ranges[..., 0], ranges[..., 1]
    nq = lo.shape[1]
    j = jnp.arange(nk, dtype=jnp.int32)[None, :, None]
    u = block_useful(lo[:, None, :], hi[:, None, :], j, bk)          # [B, nk, nq]
    i = jnp.arange(nq, dtype=jnp.int32)
    before = lax.cummax(jnp.where(u, i, -1), axis=2)
    after = lax.cummin(jnp.where(u, i, nq), axis=2, reverse=True)
    return jnp.where(before >= 0, before, jnp.where(after < nq, after, 0)).astype(jnp.int32)


# ------------------------------------------------------------------------------ layouts

@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration (hashable: the custom_vjp's non-differentiable argument).
    ``packed``: q/out [B,T,H*D], k/v [B,S,K*D] (reshapes; needs D % 128 == 0); else
    head-major [B,H,T,D] / [B,K,S,D]."""
    d: int
    packed: bool
    h: int
    kh: int
    bq: int
    bk: int
    scale: float
    interpret: bool

    def to_kernel(self, x):                      # [B,T,H,D] -> kernel layout
        b, t, h, d = x.shape
        return x.reshape(b, t, h * d) if self.packed else x.transpose(0, 2, 1, 3)

    def from_kernel(self, x):                    # kernel layout -> [B,T,H,D]
        if self.packed:
            return x.reshape(x.shape[0], x.shape[1], self.h, self.d)
        return x.transpose(0, 2, 1, 3)

    def seq_len(self, x) -> int:
        return x.shape[1] if self.packed else x.shape[2]

    def spec(self, blk: int, index):
        """BlockSpec of a [blk, D] tile; index(*grid_and_prefetch) -> (batch, head,
        sequence block)."""
        if self.packed:
            def im(*a):
                bi, hi, si = index(*a)
                return bi, si, hi
            return pl.BlockSpec((None, blk, self.d), im)

        def im4(*a):
            bi, hi, si = index(*a)
            return bi, hi, si, 0
        return pl.BlockSpec((None, None, blk, self.d), im4)


# ------------------------------------------------------------------------------ forward

def _masked_logits(q, k, start, stop, col0, scale, precision, transposed: bool,
                   masked: bool = True):
    """Scaled fp32 logits with hidden pairs at -inf (``masked=False``: a tile every row
    sees whole). Normal: q [bq,D], k [bk,D], start/stop [bq,1] -> [bq,bk]. Transposed:
    q is the key tile [bk,D], k the query tile, start/stop [1,bq] -> [bk,bq]."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=precision)
    s = s * scale
    if not masked:
        return s
    axis = 0 if transposed else 1
    key = col0 + lax.broadcasted_iota(jnp.int32, s.shape, axis)
    return jnp.where((key >= start) & (key < stop), s, -jnp.inf)


def _row_to_col(row):
    """[1, n] -> [n, 128] lane-replicated column (one transpose per query block: per-row
    values live lane-dense in HBM, a [n, 1] array would be padded to 128 lanes)."""
    return jnp.broadcast_to(row, (_LANES, row.shape[1])).T


def _col_to_row(col):
    """[n, 1] -> [1, n]."""
    return jnp.broadcast_to(col, (col.shape[0], _LANES)).T[0:1, :]


def _fwd_kernel(rng_ref, q_ref, k_ref, v_ref, st_ref, sp_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, st_scr, sp_scr, *, nq: int, nk: int, bk: int,
                scale: float, precision):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    useful, unmasked = _tile(rng_ref, b, i, j, nq, bk)

    @pl.when(j == 0)
    def _init():
        st_scr[...] = _row_to_col(st_ref[...])
        sp_scr[...] = _row_to_col(sp_ref[...])
        m_scr[...] = jnp.full(m_scr.shape, _M_INIT, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def _step(masked: bool):
        s = _masked_logits(q_ref[...], k_ref[...], st_scr[:, 0:1], sp_scr[:, 0:1], j * bk,
                           scale, precision, transposed=False, masked=masked)
        m_prev, l_prev = m_scr[:, 0:1], l_scr[:, 0:1]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)
        l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
        acc_scr[...] = alpha * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_next, l_scr.shape)

    _when_tile(useful, unmasked, _step)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[:, 0:1]
        has = l > 0
        safe = jnp.where(has, l, 1.0)
        o_ref[...] = jnp.where(has, acc_scr[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(jnp.where(has, m_scr[:, 0:1] + jnp.log(safe), -jnp.inf))


def _fwd(c: _Cfg, q, k, v, start, stop):
    """Kernel-layout q/k/v, padded start/stop [B,Tp] -> (out fp32 kernel layout,
    lse [B,H,1,Tp])."""
    b, tp = start.shape
    h, bq, bk = c.h, c.bq, c.bk
    nq, nk, g = tp // bq, c.seq_len(k) // bk, c.h // c.kh
    rng = block_ranges(start, stop, bq).reshape(-1)
    kv_index = functools.partial(_kv_index, nq=nq, g=g, bk=bk)

    q_index = lambda bi, hh, i, j, rng_r: (bi, hh, i)  # noqa: E731
    row = pl.BlockSpec((None, 1, bq), lambda bi, hh, i, j, rng_r: (bi, 0, i))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nq, nk),
        in_specs=[c.spec(bq, q_index), c.spec(bk, kv_index), c.spec(bk, kv_index),
                  row, row],
        out_specs=[c.spec(bq, q_index),
                   pl.BlockSpec((None, None, 1, bq),
                                lambda bi, hh, i, j, rng_r: (bi, hh, 0, i))],
        scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, c.d), jnp.float32),
                        pltpu.VMEM((bq, _LANES), jnp.int32),
                        pltpu.VMEM((bq, _LANES), jnp.int32)],
    )
    kernel = functools.partial(_fwd_kernel, nq=nq, nk=nk, bk=bk, scale=c.scale,
                               precision=_precision(q.dtype))
    out_shape = [jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32)]
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=c.interpret, name="span_attention_fwd",
    )(rng, q, k, v, start[:, None, :], stop[:, None, :])


# ----------------------------------------------------------------------------- backward

def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, st_ref, sp_ref, lse_ref, dl_ref, do_ref,
               dq_ref, acc_scr, st_scr, sp_scr, lse_scr, dl_scr, *, nq: int, nk: int, bk: int,
               scale: float, precision):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    useful, unmasked = _tile(rng_ref, b, i, j, nq, bk)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        for src, dst in ((st_ref, st_scr), (sp_ref, sp_scr), (lse_ref, lse_scr),
                         (dl_ref, dl_scr)):
            dst[...] = _row_to_col(src[...])

    def _step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _masked_logits(q, k, st_scr[:, 0:1], sp_scr[:, 0:1], j * bk, scale, precision,
                           transposed=False, masked=masked)
        p = jnp.exp(s - lse_scr[:, 0:1])                     # [bq, bk]; hidden: 0
        do = do_ref[...].astype(v.dtype)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32,
                             precision=precision)
        ds = p * (dp - dl_scr[:, 0:1])
        acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32,
                                precision=precision)

    _when_tile(useful, unmasked, _step)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(rng_ref, tab_ref, q_ref, k_ref, v_ref, st_ref, sp_ref, lse_ref, dl_ref,
                do_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, nq: int, nk: int, g: int, bk: int,
                scale: float, precision):
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    useful, unmasked = _tile(rng_ref, b, i, j, nq, bk)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def _step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        st = _masked_logits(k, q, st_ref[...], sp_ref[...], j * bk, scale, precision,
                            transposed=True, masked=masked)  # [bk, bq]
        pt = jnp.exp(st - lse_ref[...])
        do = do_ref[...].astype(v.dtype)
        dv_scr[...] += jnp.dot(pt.astype(v.dtype), do, preferred_element_type=jnp.float32,
                               precision=precision)
        dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32,
                              precision=precision)
        dst = pt * (dpt - dl_ref[...])
        dk_scr[...] += jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32,
                               precision=precision)

    _when_tile(useful, unmasked, _step)

    @pl.when((gi == g - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _bwd(c: _Cfg, q, k, v, start, stop, out, lse, dout, dlse):
    """(dq, dk, dv) in the kernel layout, from the residuals and (dout, dlse)."""
    b, tp = start.shape
    h, kh, bq, bk, scale, interpret = c.h, c.kh, c.bq, c.bk, c.scale, c.interpret
    nq, nk, g = tp // bq, c.seq_len(k) // bk, h // kh
    ranges = block_ranges(start, stop, bq)
    tab = _q_block_table(ranges, nk, bk).reshape(-1)
    rng = ranges.reshape(-1)
    # delta = rowsum(dO * O) - dlse, as [B,H,Tp]; fully masked rows: lse -inf -> 0 (their
    # logits are all -inf, so P = exp(-inf - 0) = 0).
    d = c.d
    if c.packed:
        rows = jnp.sum((dout * out).reshape(b, tp, h, d), axis=-1).transpose(0, 2, 1)
    else:
        rows = jnp.sum(dout * out, axis=-1)
    delta = rows - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    precision = _precision(q.dtype)
    cparams = lambda n: pltpu.CompilerParams(  # noqa: E731
        dimension_semantics=("parallel",) * (n - 1) + ("arbitrary",))

    # dQ: grid (B, H, nq, nk), key blocks innermost, as in the forward.
    kv_index = functools.partial(_kv_index, nq=nq, g=g, bk=bk)

    q_index = lambda bi, hh, i, j, rng_r: (bi, hh, i)  # noqa: E731
    qrow = pl.BlockSpec((None, 1, bq), lambda bi, hh, i, j, rng_r: (bi, 0, i))
    hqrow = pl.BlockSpec((None, None, 1, bq), lambda bi, hh, i, j, rng_r: (bi, hh, 0, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nq=nq, nk=nk, bk=bk, scale=scale, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, nq, nk),
            in_specs=[c.spec(bq, q_index), c.spec(bk, kv_index), c.spec(bk, kv_index),
                      qrow, qrow, hqrow, hqrow, c.spec(bq, q_index)],
            out_specs=c.spec(bq, q_index),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]
            + [pltpu.VMEM((bq, _LANES), dt) for dt in (jnp.int32, jnp.int32, jnp.float32,
                                                       jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cparams(4), interpret=interpret, name="span_attention_dq",
    )(rng, q, k, v, start[:, None, :], stop[:, None, :], lse[:, :, None, :],
      delta[:, :, None, :], dout)

    # dK/dV: grid (B, K, nk, G, nq); the G query heads of a KV head and the query blocks
    # are the (innermost, "arbitrary") reduction.
    def qb(bi, j, i, tab_r):
        return tab_r[(bi * nk + j) * nq + i]

    def qh_index(bi, kk, j, gi, i, rng_r, tab_r):
        return bi, kk * g + gi, qb(bi, j, i, tab_r)

    k_index = lambda bi, kk, j, gi, i, rng_r, tab_r: (bi, kk, j)  # noqa: E731
    row = pl.BlockSpec((None, 1, bq),
                       lambda bi, kk, j, gi, i, rng_r, tab_r: (bi, 0, qb(bi, j, i, tab_r)))
    hrow = pl.BlockSpec((None, None, 1, bq), lambda bi, kk, j, gi, i, rng_r, tab_r: (
        bi, kk * g + gi, 0, qb(bi, j, i, tab_r)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, nq=nq, nk=nk, g=g, bk=bk, scale=scale,
                          precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kh, nk, g, nq),
            in_specs=[c.spec(bq, qh_index), c.spec(bk, k_index), c.spec(bk, k_index),
                      row, row, hrow, hrow, c.spec(bq, qh_index)],
            out_specs=[c.spec(bk, k_index), c.spec(bk, k_index)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="span_attention_dkv",
    )(rng, tab, q, k, v, start[:, None, :], stop[:, None, :], lse[:, :, None, :],
      delta[:, :, None, :], dout)
    return dq, dk, dv


# ------------------------------------------------------------------------------ custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, start, stop, cfg):
    out, lse = _fwd(cfg, q, k, v, start, stop)
    return out, lse[:, :, 0, :]


def _core_fwd(q, k, v, start, stop, cfg):
    out, lse = _fwd(cfg, q, k, v, start, stop)
    lse = lse[:, :, 0, :]
    return (out, lse), (q, k, v, start, stop, out, lse)


def _core_bwd(cfg, res, cts):
    q, k, v, start, stop, out, lse = res
    dout, dlse = cts
    dq, dk, dv = _bwd(cfg, q, k, v, start, stop, out, lse, dout, dlse)
    return dq, dk, dv, None, None


_core.defvjp(_core_fwd, _core_bwd)


def span_attention_pallas(q, k, v, start, stop, *, scale: float | None = None,
                          block_q: int = 512, block_kv: int = 512, interpret: bool = False,
                          head_major: bool = False):
    """The kernel entry (shapes validated by ``span_attention``): pads T/S to the tiles,
    converts to the kernel layout, returns ``(out [B,T,H,D] f32, lse [B,T,H] f32)``.
    ``head_major`` forces the transposed layout (tests; D % 128 != 0 uses it anyway)."""
    reason = unsupported_reason(q.shape, k.shape, (q.dtype, k.dtype, v.dtype), block_q,
                                block_kv)
    if reason is not None:
        raise ValueError(f"deepspec_jax.kernels.attention (pallas): {reason}")
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    bq, bk = block_sizes(t, s, block_q, block_kv)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    pad_t = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    pad_s = ((0, 0), (0, sp - s), (0, 0), (0, 0))
    # padded queries see nothing (start = stop = 0); padded keys are never visible
    # because stop <= S.
    start = jnp.pad(jnp.maximum(start.astype(jnp.int32), 0), ((0, 0), (0, tp - t)))
    stop = jnp.pad(jnp.minimum(stop.astype(jnp.int32), s), ((0, 0), (0, tp - t)))
    c = _Cfg(d=d, packed=d % _LANES == 0 and not head_major, h=h, kh=kh, bq=bq, bk=bk,
             scale=scale, interpret=interpret)
    out, lse = _core(c.to_kernel(jnp.pad(q, pad_t)), c.to_kernel(jnp.pad(k, pad_s)),
                     c.to_kernel(jnp.pad(v, pad_s)), start, stop, c)
    return c.from_kernel(out)[:, :t], lse.transpose(0, 2, 1)[:, :t]


def span_flops(start, stop, *, num_heads: int, head_dim: int, num_keys: int,
               block_q: int = 512, block_kv: int = 512) -> tuple[float, float]:
    """(dense, computed) forward attention FLOPs (QK^T and PV: 4*D per query-key pair
    and head) of ``span_attention`` over start/stop [B,T]: dense = every pair of the
    [T, S] grid; computed = the (query block, key block) tiles the kernel does not skip
    (the backward skips the same tiles). ``1 - computed / dense`` is the fraction the
    mask saves."""
    start = jnp.maximum(jnp.asarray(start, jnp.int32), 0)
    stop = jnp.minimum(jnp.asarray(stop, jnp.int32), num_keys)
    b, t = start.shape
    bq, bk = block_sizes(t, num_keys, block_q, block_kv)
    tp = _round_up(t, bq)
    nk = _round_up(num_keys, bk) // bk
    ranges = block_ranges(jnp.pad(start, ((0, 0), (0, tp - t))),
                          jnp.pad(stop, ((0, 0), (0, tp - t))), bq)
    lo, hi = ranges[..., 0], ranges[..., 1]
    j = jnp.arange(nk)[None, None, :]
    tiles = int(jnp.sum(block_useful(lo[..., None], hi[..., None], j, bk)))
    per_pair = 4.0 * head_dim * num_heads
    return per_pair * b * t * num_keys, per_pair * tiles * bq * bk
