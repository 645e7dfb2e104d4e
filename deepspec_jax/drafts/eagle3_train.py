"""Eagle3 training-time test (TTT): the unrolled forward, its attention, and the loss.

Step s (0..ttt-1) feeds token x[i+s+1] (0 past the end) at RoPE position i+s with
the previous step's output hidden state (step 0: ``fc(features)``). A query at
position i of step s sees the step-0 keys <= i and, in each step s' in 1..s, only
the key at the same position i. That mask is causal-plus-diagonals, so instead of a
dense [T, ttt*T] mask we run causal attention over the step-0 keys (returning its
log-sum-exp) and merge the s diagonal scores into the same softmax.

Loss (DeepSpec ``compute_eagle3_loss``): step s at position i is a soft
cross-entropy against the target distribution at position i+s+1 (uniform past the
end), weighted by ``loss_mask[i+s]`` (see ``position_masks``), summed and divided by B*T
(masked positions included), then weighted ``step_loss_decay**s``. The vocabulary
projection is fused into the loss and tiled ([rows, vocab chunk] logits), so no
[tokens, V] float32 tensor is materialised, forward or backward; by default
(``vocab_grad="fused"``) the gradient is formed in the loss's own pass and each target
logit is computed about once per position (``ttt_weighted_soft_ce``).

With a reduced draft vocabulary (K of the target's V tokens, ``draft_vocab``) the
lm_head is the target's at the K draft ids, so both sides are over K: the target
distribution is the target's logits restricted to the draft vocabulary and
renormalised (softmax over K, the EAGLE-3 / speculators convention; the target's mass
outside it is dropped), and the vocabulary projection costs K instead of V columns.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from deepspec_jax.drafts.dspark_train import check_vocab_grad
from deepspec_jax.drafts.eagle3 import Eagle3Draft
from deepspec_jax.kernels.attention import merge_attention, span_attention
from deepspec_jax.layers import softcap

NEG_INF = -jnp.inf


# ---------------------------------------------------------------------------
# attention: causal over step-0 keys + one diagonal key per earlier step
# ---------------------------------------------------------------------------


def diagonal_attention(q, diag_k, diag_v, scale=None):
    """Query t of q [B,T,H,D] over exactly one key per earlier TTT step, the key at its
    own position: diag_k/diag_v [n,B,T,K,D] (n >= 1). Elementwise over t (no [T, n*T]
    logits), as ``(out [B,T,H,D] fp32, lse [B,T,H])`` of that piece, for
    ``merge_attention``."""
    B, T, H, D = q.shape
    K = diag_k.shape[3]
    qg = q.reshape(B, T, K, H // K, D)
    ds = jnp.einsum("btkgd,nbtkd->nbtkg", qg, diag_k,
                    preferred_element_type=jnp.float32) * (D ** -0.5 if scale is None else scale)
    lse = jax.nn.logsumexp(ds, axis=0)                                      # [B,T,K,G]
    out = jnp.einsum("nbtkg,nbtkd->btkgd", jnp.exp(ds - lse), diag_v.astype(jnp.float32))
    return out.reshape(B, T, H, D), lse.reshape(B, T, H)


def ttt_attention(q, k0, v0, diag_k, diag_v, valid_q, scale=None):
    """One TTT step's attention. q [B,T,H,D]; k0/v0 [B,T,K,D] are the step-0 keys;
    diag_k/diag_v [n,B,T,K,D] the keys of steps 1..s (n = s, may be 0); valid_q [B,T]
    bool. A causal span over the step-0 keys (``span_attention``: query-blocked, or the
    flash kernel on TPU) merged with the diagonal keys into one softmax. Invalid
    queries get a zero output (the reference's fully masked rows). ``scale``: softmax
    scale (None = D**-0.5; Gemma-4: 1)."""
    T = q.shape[1]
    stop = jnp.where(valid_q, jnp.arange(1, T + 1, dtype=jnp.int32)[None], 0)
    out, lse = span_attention(q, k0, v0, jnp.zeros_like(stop), stop, scale=scale)
    if diag_k.shape[0]:
        out, _ = merge_attention([(out, lse), diagonal_attention(q, diag_k, diag_v, scale)])
    out = jnp.where(valid_q[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------
# the unrolled forward
# ---------------------------------------------------------------------------


def shift_left(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """x[i+n] along ``axis`` with zeros past the end."""
    t = x.shape[axis]
    body = jax.lax.slice_in_dim(x, min(n, t), t, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, min(n, t))
    return jnp.pad(body, pad)


def ttt_forward(model: Eagle3Draft, input_ids: jax.Array, features: jax.Array,
                attention_mask: jax.Array | None = None, ttt_length: int | None = None,
                constrain: Callable[[jax.Array], jax.Array] | None = None):
    """Unrolled draft forward. input_ids [B,T], features [B,T,5d], attention_mask
    [B,T] (right padding; default all ones). Returns the per-step layer outputs
    [ttt,B,T,d] (before the final norm; logits = ``model.logits``).

    ``constrain`` (e.g. a batch-sharding constraint) is applied to every step's
    activations [B,T,...]: without it XLA on a batch-sharded fsdp mesh gathered the
    whole micro-batch onto each device for the layer (Qwen3-4B on v5e-8, 1 sequence per
    chip: dozens of bf16 [8,4096,9728] MLP buffers per chip instead of [1,4096,9728]).
    """
    fix = constrain or (lambda x: x)
    # the MLP (and o_proj) of each step is recomputed in the backward from the step's input
    # and attention output: saving it costs three [B,T,intermediate] buffers per TTT step
    # (Qwen3-4B, 1 sequence of 4096: ~1.6 GB per chip over 7 steps)
    finish = jax.checkpoint(lambda h, attn: model.finish(h, attn),
                            policy=jax.checkpoint_policies.nothing_saveable)
    ttt = model.cfg.ttt_length if ttt_length is None else ttt_length
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    seq_len = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    h = fix(model.project_features(features))
    k0 = v0 = None
    diag_k, diag_v, outs = [], [], []
    for s in range(ttt):
        ids = shift_left(input_ids, s + 1)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + s, (B, T))
        q, k, v = (fix(a) for a in model.qkv(ids, h, positions))
        if s == 0:
            k0, v0 = k, v
        else:
            diag_k.append(k)
            diag_v.append(v)
        empty = jnp.zeros((0,) + k.shape, k.dtype)
        dk = jnp.stack(diag_k) if diag_k else empty
        dv = jnp.stack(diag_v) if diag_v else empty
        valid_q = jnp.arange(T)[None, :] < (seq_len - s)[:, None]
        h = fix(finish(h, ttt_attention(q, k0, v0, dk, dv, valid_q, model.attn_scale)))
        outs.append(h)
    return jnp.stack(outs)


# ---------------------------------------------------------------------------
# vocabulary-chunked soft cross-entropy (fused lm_head)
# ---------------------------------------------------------------------------


TILE_ELEMS = 4096 * 8192  # fp32 logits per [rows, chunk] tile by default (128 MiB)


def logit_tile(vocab: int, vocab_chunk: int | None = None, row_chunk: int | None = None):
    """(vocab_chunk, row_chunk) of the soft CE's logit tiles. Default: the whole vocabulary
    in one chunk (one pass computes each logit once) and ``TILE_ELEMS // vocab`` rows
    (a multiple of 8, at least 8); an explicit vocab_chunk keeps 4096 rows by default.
    Rows count the whole batch: the train step multiplies them by its batch shards, so
    each device's tile keeps about ``TILE_ELEMS`` logits."""
    chunk = vocab if vocab_chunk is None else min(vocab_chunk, vocab)
    if row_chunk is not None:
        return chunk, row_chunk
    return chunk, (max(8, TILE_ELEMS // vocab // 8 * 8) if vocab_chunk is None else 4096)


def _chunks(w: jax.Array, chunk: int):
    """lm_head [d,V] -> ([n,d,chunk] zero-padded, [n,chunk] column-valid mask, or None
    when the chunks tile V exactly: no padded columns to mask)."""
    d, V = w.shape
    chunk = min(chunk, V)
    n = -(-V // chunk)
    wp = jnp.pad(w, ((0, 0), (0, n * chunk - V)))
    valid = (jnp.arange(n * chunk) < V).reshape(n, chunk) if n * chunk != V else None
    return jnp.moveaxis(wp.reshape(d, n, chunk), 1, 0), valid


def _logits(x, wc, valid, cap=None):
    """x @ wc in fp32, softcapped (``cap``: Gemma's final_logit_softcapping, None = none),
    padding columns -inf."""
    z = softcap(jnp.einsum("nd,dv->nv", x, wc, preferred_element_type=jnp.float32), cap)
    return z if valid is None else jnp.where(valid[None], z, NEG_INF)


def _cap_slope(dz, z, cap):
    """dz [rows, V] (d / d capped logits z) -> d / d the uncapped ones: times
    1 - tanh^2 = 1 - (z / cap)^2 (clipped, so a -inf padding column gives 0, not NaN)."""
    if cap is None:
        return dz
    return dz * (1.0 - jnp.square(jnp.clip(z / cap, -1.0, 1.0)))


def _lse_argmax(x, wcs, valids, cap=None):
    """Online log-sum-exp and first-index argmax of x @ W over vocab chunks."""
    N = x.shape[0]
    chunk = wcs.shape[-1]

    def body(c, xs):
        m, s, best, arg = c
        wc, valid, i = xs
        z = _logits(x, wc, valid, cap)
        zm = jnp.max(z, axis=-1)
        m2 = jnp.maximum(m, zm)
        s = s * jnp.exp(m - m2) + jnp.sum(jnp.exp(z - m2[:, None]), axis=-1)
        better = zm > best  # strict: earlier chunks win ties, like torch argmax
        arg = jnp.where(better, i * chunk + _first_argmax(z, zm), arg)
        return (m2, s, jnp.maximum(best, zm), arg), None

    init = (jnp.full((N,), NEG_INF), jnp.zeros((N,)), jnp.full((N,), NEG_INF),
            jnp.zeros((N,), jnp.int32))
    (m, s, _, arg), _ = jax.lax.scan(body, init, (wcs, valids, jnp.arange(wcs.shape[0])))
    return m + jnp.log(s), arg


def _block_fwd(xd, xt, wcs, valids, a=None, grad_w: bool = False, t_index=None, cap=None):
    """Loss pieces for one block of rows: (ce, overlap, agree, lse_d, lse_t, grads).

    ``t_index`` [rows] (static numpy): draft row r's target is xt[t_index[r]], so target
    rows shared by several draft rows (the TTT steps' shifted targets) get their logits
    once (their log-sum-exps, argmaxes and probabilities too, before the rows are
    repeated); None: xt is row-aligned with xd.

    Over several vocabulary chunks: two passes (log-sum-exps and argmaxes first, then
    the cross term and the overlap); over one chunk (the whole vocabulary), one pass on
    the same logits. With per-row weights ``a``, the second pass also forms
    grads = (d sum(a * ce) / d xd [rows, d] fp32, per-chunk d / d w when ``grad_w``)
    from the logits it already has; otherwise grads = None.
    """

    take = (lambda z: z) if t_index is None else (lambda z: _take_rows(z, t_index))

    def piece(zd, zt, wc, valid, lse_d, lse_t):  # zt, lse_t: the target's own rows
        pt = take(jnp.exp(zt - lse_t[:, None]))
        pd = jnp.exp(zd - lse_d[:, None])
        cross = jnp.sum(pt * zd if valid is None else jnp.where(valid[None], pt * zd, 0.0),
                        axis=-1)
        overlap = jnp.sum(jnp.minimum(pd, pt), axis=-1)
        if a is None:
            return (cross, overlap), None
        dz = _cap_slope(a[:, None] * (pd - pt), zd, cap)
        dxd = jnp.einsum("nv,dv->nd", dz, wc, preferred_element_type=jnp.float32)
        dwc = jnp.einsum("nd,nv->dv", xd.astype(jnp.float32), dz) if grad_w else None
        return (cross, overlap), (dxd, dwc)

    at = lambda i: None if valids is None else valids[i]
    if wcs.shape[0] == 1:
        zd, zt = _logits(xd, wcs[0], at(0), cap), _logits(xt, wcs[0], at(0), cap)
        (lse_d, arg_d), (lse_t, arg_t) = (_lse_argmax_dense(z) for z in (zd, zt))
        (cross, overlap), grads = piece(zd, zt, wcs[0], at(0), lse_d, lse_t)
        if grads is not None:
            grads = (grads[0], None if grads[1] is None else grads[1][None])
    else:
        lse_d, arg_d = _lse_argmax(xd, wcs, valids, cap)
        lse_t, arg_t = _lse_argmax(xt, wcs, valids, cap)

        def body(c, xs):
            wc, valid = xs
            zd, zt = _logits(xd, wc, valid, cap), _logits(xt, wc, valid, cap)
            (cr, ov), g = piece(zd, zt, wc, valid, lse_d, lse_t)
            c = (c[0] + cr, c[1] + ov, None if g is None else c[2] + g[0])
            return c, (None if g is None else g[1])

        N = xd.shape[0]
        init = (jnp.zeros((N,)), jnp.zeros((N,)),
                None if a is None else jnp.zeros(xd.shape, jnp.float32))
        (cross, overlap, dxd), dwc = jax.lax.scan(body, init, (wcs, valids))
        grads = None if a is None else (dxd, dwc)
    ce = lse_d - cross  # sum_v p_t = 1
    return ce, overlap, (arg_d == take(arg_t)).astype(jnp.float32), lse_d, take(lse_t), grads


def _first_argmax(z, m):
    """argmax of z [rows, V] given its row max m: the first column equal to the max
    (``jnp.argmax``'s tie rule) by a plain min-reduction; XLA:CPU runs argmax's (value,
    index) pair reduction several times slower over 49k+ columns."""
    cols = jnp.arange(z.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(z == m[:, None], cols[None], z.shape[-1]), axis=-1)


def _lse_argmax_dense(z):
    """``_lse_argmax`` of one whole-vocabulary logit tile [rows, V] (same formula)."""
    m = jnp.max(z, axis=-1)
    return m + jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=-1)), _first_argmax(z, m)


def _take_rows(z, index: np.ndarray):
    """``z[index]`` for a static row index, as static slices of its consecutive runs
    (the TTT layout's index is B * ttt runs of r rows), which XLA fuses into the
    consumers; a gather would copy [rows, V] first."""
    index = np.asarray(index)
    cuts = np.flatnonzero(np.diff(index) != 1) + 1
    runs = np.split(index, cuts)
    if len(runs) > 64:
        return jnp.take(z, index, axis=0)
    return jnp.concatenate([z[int(r[0]):int(r[0]) + len(r)] for r in runs], axis=0)


def _block_bwd(xd, xt, wcs, valids, lse_d, lse_t, g, grad_w, cap=None):
    """d ce / d xd (and per-chunk d ce / d w when ``grad_w``) for one block of rows."""

    def body(dxd, xs):
        wc, valid = xs
        zd, zt = _logits(xd, wc, valid, cap), _logits(xt, wc, valid, cap)
        dz = _cap_slope(g[:, None] * (jnp.exp(zd - lse_d[:, None]) - jnp.exp(zt - lse_t[:, None])),
                        zd, cap)
        dxd = dxd + jnp.einsum("nv,dv->nd", dz, wc, preferred_element_type=jnp.float32)
        dwc = jnp.einsum("nd,nv->dv", xd.astype(jnp.float32), dz) if grad_w else None
        return dxd, dwc

    return jax.lax.scan(body, jnp.zeros(xd.shape, jnp.float32), (wcs, valids))


def _balanced_rows(N: int, rows: int) -> int:
    """Rows per block: the fewest blocks of at most ``rows`` rows, split evenly (a multiple
    of 8 when that stays within ``rows``), so the zero padding of the last block is small
    (4096 rows in blocks of 680: 7 x 592 = 4144 rows computed, not 7 x 680 = 4760)."""
    if N <= rows:
        return N
    n = -(-N // rows)
    even = -(-N // n)
    return min(rows, -(-even // 8) * 8)


def _row_blocks(x, rows: int):
    """[N,...] -> [n, rows, ...] zero-padded (zero rows are harmless, then dropped)."""
    n = -(-x.shape[0] // rows)
    x = jnp.pad(x, [(0, n * rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n, rows, *x.shape[1:])


def _unblock(x, N):
    return x.reshape(-1, *x.shape[2:])[:N]


def _soft_ce_fwd(xd, xt, w, chunk, rows, grad_w, cap):
    N = xd.shape[0]
    rows = _balanced_rows(N, rows)
    wcs, valids = _chunks(w, chunk)
    outs = jax.lax.map(lambda b: _block_fwd(b[0], b[1], wcs, valids, cap=cap)[:5],
                       (_row_blocks(xd, rows), _row_blocks(xt, rows)))
    ce, overlap, agree, lse_d, lse_t = (_unblock(o, N) for o in outs)
    return (ce, overlap, agree), (xd, xt, w, lse_d, lse_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def soft_ce(xd: jax.Array, xt: jax.Array, w: jax.Array, chunk: int = 8192, rows: int = 4096,
            grad_w: bool = False, cap: float | None = None):
    """Per-row soft CE of softmax(xt @ w) against log_softmax(xd @ w), plus metrics.

    xd/xt [N,d] (draft / target lm_head inputs), w [d,V]. Returns (ce [N],
    overlap [N] = sum_v min(p_d, p_t), agree [N] = argmax equality as 0/1). Work is
    blocked into [rows, chunk] logit tiles, so memory does not grow with N*V. Only
    ``ce`` is differentiated: w.r.t. xd, and w.r.t. w only when ``grad_w`` (the
    Eagle3 lm_head is frozen). The target side is data and gets a zero gradient.
    ``cap``: both logits are cap * tanh(z / cap) (Gemma's final_logit_softcapping).
    """
    return _soft_ce_fwd(xd, xt, w, chunk, rows, grad_w, cap)[0]


def _soft_ce_bwd(chunk, rows, grad_w, cap, res, cts):
    xd, xt, w, lse_d, lse_t = res
    g = cts[0]  # metrics carry no gradient
    N = xd.shape[0]
    rows = _balanced_rows(N, rows)
    wcs, valids = _chunks(w, chunk)
    blocks = tuple(_row_blocks(a, rows) for a in (xd, xt, lse_d, lse_t, g))

    def body(dw, b):
        dxd, dwc = _block_bwd(*b[:2], wcs, valids, *b[2:], grad_w, cap)
        return (dw + dwc if grad_w else dw), dxd

    dw0 = jnp.zeros(wcs.shape, jnp.float32) if grad_w else jnp.zeros((), jnp.float32)
    dw, dxd = jax.lax.scan(body, dw0, blocks)
    if grad_w:
        d, V = w.shape
        dw = jnp.moveaxis(dw, 0, 1).reshape(d, -1)[:, :V].astype(w.dtype)
    else:
        dw = jnp.zeros_like(w)
    return _unblock(dxd, N).astype(xd.dtype), jnp.zeros_like(xt), dw


soft_ce.defvjp(_soft_ce_fwd, _soft_ce_bwd)


def _dw_full(dw, w):
    """Per-chunk [n, d, chunk] fp32 -> [d, V] in w's dtype (padding columns dropped)."""
    d, V = w.shape
    return jnp.moveaxis(dw, 0, 1).reshape(d, -1)[:, :V].astype(w.dtype)


def _weighted_pass(xd, xt, w, a, chunk, grad_w, t_index, cap):
    """All blocks (xd [n, R, d], xt [n, U, d], a [n, R]): ((S, ce, overlap, agree) per
    block row, (d S / d xd [n, R, d], d S / d w or None))."""
    wcs, valids = _chunks(w, chunk)

    def body(dw, b):
        bd, bt, ba = b
        ce, overlap, agree, _, _, (dxd, dwc) = _block_fwd(bd, bt, wcs, valids, ba, grad_w,
                                                          t_index, cap)
        return (dw + dwc if grad_w else dw), (ce, overlap, agree, dxd.astype(xd.dtype))

    dw0 = jnp.zeros(wcs.shape, jnp.float32) if grad_w else jnp.zeros((), jnp.float32)
    dw, (ce, overlap, agree, dxd) = jax.lax.scan(body, dw0, (xd, xt, a))
    return (jnp.sum(a * ce), ce, overlap, agree), (dxd, _dw_full(dw, w) if grad_w else None)


@functools.lru_cache(maxsize=None)
def _weighted_soft_ce(chunk: int, grad_w: bool, layout: tuple | None, cap: float | None):
    """The custom_vjp of the weighted soft CE over blocked rows, for one static chunk,
    grad_w, target layout (None: row-aligned; (ttt, B, r): ``_ttt_index``) and softcap."""
    t_index = None if layout is None else _ttt_index(*layout)

    @jax.custom_vjp
    def f(xd, xt, w, a):
        wcs, valids = _chunks(w, chunk)
        ce, overlap, agree = jax.lax.map(
            lambda b: _block_fwd(b[0], b[1], wcs, valids, t_index=t_index, cap=cap)[:3], (xd, xt))
        return jnp.sum(a * ce), ce, overlap, agree

    def fwd(xd, xt, w, a):
        out, (dxd, dw) = _weighted_pass(xd.value, xt.value, w.value, a.value, chunk, grad_w,
                                        t_index, cap)
        return out, (dxd, dw, xt.value, w.value, a.value)

    def bwd(res, cts):
        dxd, dw, xt, w, a = res
        ct_s, ct_ce = cts[0], cts[1]
        if not isinstance(ct_ce, SymbolicZero):
            raise ValueError("eagle3_train.weighted_soft_ce: only S = sum(a * ce) is "
                             "differentiable; stop_gradient the per-row ce (or use soft_ce).")
        dw = (ct_s * dw).astype(w.dtype) if grad_w else jnp.zeros_like(w)
        return (ct_s * dxd).astype(dxd.dtype), jnp.zeros_like(xt), dw, jnp.zeros_like(a)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def weighted_soft_ce(xd: jax.Array, xt: jax.Array, w: jax.Array, a: jax.Array,
                     chunk: int = 8192, rows: int = 4096, grad_w: bool = False,
                     cap: float | None = None):
    """(S, ce, overlap, agree): ``soft_ce``'s per-row outputs (not differentiable) and
    S = sum(a * ce) for per-row weights ``a`` [N] that do not depend on the logits.

    S's gradient (w.r.t. xd, and w when ``grad_w``) is formed in the forward's own pass
    over the [rows, chunk] logit tiles (one extra [rows, V] x [V, d] matmul there), so
    the backward only scales it: no logits are recomputed. What it keeps for the
    backward is [N, d] (+ [d, V] when ``grad_w``). ``xt`` (the target) gets a zero
    gradient, as in ``soft_ce``.
    """
    N = xd.shape[0]
    rows = _balanced_rows(N, rows)
    sg = jax.lax.stop_gradient
    s, *stats = _weighted_soft_ce(chunk, grad_w, None, cap)(
        *(_row_blocks(v, rows) for v in (xd, xt)), w, _row_blocks(sg(a).astype(jnp.float32), rows))
    return (s, *(sg(_unblock(x, N)) for x in stats))


def _ttt_index(ttt: int, B: int, r: int) -> np.ndarray:
    """Target row of draft row (b, s, i) of a position block: b * (r + ttt - 1) + i + s
    (the block's target rows are positions p0+1 .. p0+r+ttt-1 of each sequence)."""
    b, s, i = np.meshgrid(np.arange(B), np.arange(ttt), np.arange(r), indexing="ij")
    return (b * (r + ttt - 1) + i + s).reshape(-1).astype(np.int32)


def ttt_weighted_soft_ce(xd: jax.Array, target_last_hidden: jax.Array, w: jax.Array,
                         a: jax.Array, chunk: int, rows: int, grad_w: bool = False,
                         cap: float | None = None):
    """``weighted_soft_ce`` of the TTT steps, xd [ttt,B,T,d] and a [ttt,B,T], against the
    targets of ``target_inputs(target_last_hidden, ttt)`` without materialising them:
    blocks of r positions of every sequence hold all ttt steps (B*ttt*r <= ``rows``
    draft rows) and share the block's r+ttt-1 target rows, so each target logit is
    computed about once per position instead of once per step (ttt times).
    Returns (S, ce, overlap, agree [ttt,B,T])."""
    ttt, B, T, d = xd.shape
    nb = -(-T // max(1, rows // (ttt * B)))
    r = -(-T // nb)  # blocks split evenly: little padding past T
    sg = jax.lax.stop_gradient

    def blocks(x):  # [ttt,B,T,...] -> [nb, B*ttt*r, ...] (B major: a batch sharding stays)
        x = jnp.pad(x, [(0, 0), (0, 0), (0, nb * r - T)] + [(0, 0)] * (x.ndim - 3))
        x = jnp.moveaxis(x.reshape((ttt, B, nb, r) + x.shape[3:]), (2, 1), (0, 1))
        return x.reshape((nb, B * ttt * r) + x.shape[4:])

    # target rows p0+1 .. p0+r+ttt-1 of each block (zero past T: uniform targets)
    ext = jnp.pad(target_last_hidden[:, 1:], ((0, 0), (0, nb * r + ttt - T), (0, 0)))
    idx = (np.arange(nb)[:, None] * r + np.arange(r + ttt - 1)[None]).reshape(-1)
    xt = jnp.take(ext, idx, axis=1).reshape(B, nb, r + ttt - 1, d)
    xt = jnp.moveaxis(xt, 1, 0).reshape(nb, B * (r + ttt - 1), d)
    s, *stats = _weighted_soft_ce(chunk, grad_w, (ttt, B, r), cap)(
        blocks(xd), xt, w, blocks(sg(a).astype(jnp.float32)))

    def unblock(x):  # [nb, B*ttt*r] -> [ttt,B,T]
        x = jnp.moveaxis(x.reshape(nb, B, ttt, r), (0, 1), (2, 1)).reshape(ttt, B, nb * r)
        return sg(x[:, :, :T])

    return (s, *(unblock(x) for x in stats))


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------


class Eagle3LossOut(NamedTuple):
    loss: jax.Array              # scalar: sum_s decay**s * step_losses[s]
    step_losses: jax.Array       # [ttt]
    position_masks: jax.Array    # [ttt, B, T] float32
    metrics: dict                # DeepSpec's train/* numbers (sums, see eagle3_loss)


def position_masks(loss_mask: jax.Array, attention_mask: jax.Array | None, ttt: int,
                   corrected: bool = False) -> jax.Array:
    """[ttt,B,T] float loss weights.

    Reference: mask0 = loss_mask with each row's last real position (seq_len-1)
    cleared; step 0 uses mask0, step s uses mask0[i+s] * attention_mask[i], so the
    weight belongs to the *input* position, not to the supervised token.
    ``corrected``: weight step s, position i by the mask of the token it predicts,
    x[i+s+2] (zero when that lies past the real sequence).
    """
    lm = loss_mask.astype(jnp.float32)
    B, T = lm.shape
    attn = (jnp.ones((B, T), jnp.float32) if attention_mask is None
            else attention_mask.astype(jnp.float32))
    if corrected:
        return jnp.stack([shift_left(lm * attn, s + 2) for s in range(ttt)])
    seq_len = jnp.sum(attn, axis=-1).astype(jnp.int32)
    mask0 = lm * (jnp.arange(T)[None] != (seq_len - 1)[:, None])
    return jnp.stack([mask0] + [shift_left(mask0, s) * attn for s in range(1, ttt)])


def target_inputs(target_last_hidden: jax.Array, ttt: int) -> jax.Array:
    """[ttt,B,T,d] target lm_head inputs per step: row i of step s is position i+s+1;
    zero rows past the end give exactly uniform target distributions, as the
    reference's padding does."""
    return jnp.stack([shift_left(target_last_hidden, s + 1) for s in range(ttt)])


def eagle3_loss(model: Eagle3Draft, input_ids, features, target_last_hidden, loss_mask,
                attention_mask=None, *, ttt_length: int | None = None,
                step_loss_decay: float | None = None, corrected: bool = False,
                vocab_chunk: int | None = None, row_chunk: int | None = None,
                constrain: Callable[[jax.Array], jax.Array] | None = None,
                vocab_grad: str = "fused") -> Eagle3LossOut:
    """DeepSpec's Eagle3 TTT loss (``corrected=False`` reproduces it exactly).

    ``corrected=True`` weights each position by the loss mask of the token it is
    trained to predict (see ``position_masks``). Both divide by B*T ("local mean"):
    DeepSpec reports that dividing by the valid-token count degrades acceptance.
    Metrics follow DeepSpec's names and are per-batch sums (divide by valid_tokens):
    ``accuracy@s`` (argmax matches), ``accept_rate@s`` (sum of
    min(p_d, p_t) = 1 - TV(p_d, p_t)),
    ``valid_tokens@s``, ``ploss_s``, ``tau_greedy`` / ``tau_probabilistic`` (sum over
    positions of 1 + expected accepted chain length), ``loss``.
    """
    check_vocab_grad(vocab_grad)
    cfg = model.cfg
    ttt = cfg.ttt_length if ttt_length is None else ttt_length
    decay = cfg.step_loss_decay if step_loss_decay is None else step_loss_decay
    B, T = input_ids.shape
    hs = ttt_forward(model, input_ids, features, attention_mask, ttt, constrain)
    xd = model.final_hidden(hs).reshape(ttt * B * T, -1)
    last = target_last_hidden.astype(model.dtype)
    w = model.lm_head.get_value().astype(model.dtype)
    vocab_chunk, row_chunk = logit_tile(w.shape[1], vocab_chunk, row_chunk)
    pm = position_masks(loss_mask, attention_mask, ttt, corrected)
    weights = decay ** jnp.arange(ttt, dtype=jnp.float32)
    if vocab_grad == "fused":
        # d loss / d ce per row: the step weight times the position mask over B*T
        a = weights[:, None, None] * pm / (B * T)
        s_ce, ce, overlap, agree = ttt_weighted_soft_ce(xd.reshape(ttt, B, T, -1), last, w, a,
                                                        vocab_chunk, row_chunk,
                                                        cap=cfg.logit_softcap)
    else:
        xt = target_inputs(last, ttt).reshape(ttt * B * T, -1)
        ce, overlap, agree = (x.reshape(ttt, B, T) for x in
                              soft_ce(xd, xt, w, vocab_chunk, row_chunk, False,
                                      cfg.logit_softcap))
    valid = jnp.sum(pm, axis=(1, 2))
    step_losses = jnp.sum(pm * ce, axis=(1, 2)) / (B * T)
    loss = jnp.sum(weights * step_losses)
    if vocab_grad == "fused":
        # ce is a constant here: the gradient enters through S, whose value S - S = 0
        # leaves ``loss`` exactly as the recompute path computes it
        loss = loss + (s_ce - jax.lax.stop_gradient(s_ce))
    overlap, agree = jax.lax.stop_gradient(overlap * pm), jax.lax.stop_gradient(agree * pm)
    metrics = {"loss": loss}
    for s in range(ttt):
        metrics[f"accuracy@{s}"] = jnp.sum(agree[s])
        metrics[f"accept_rate@{s}"] = jnp.sum(overlap[s])
        metrics[f"valid_tokens@{s}"] = valid[s]
        metrics[f"ploss_{s}"] = step_losses[s]
    metrics["tau_greedy"] = valid[0] + jnp.sum(jnp.cumprod(agree, axis=0))
    metrics["tau_probabilistic"] = valid[0] + jnp.sum(jnp.cumprod(overlap, axis=0))
    return Eagle3LossOut(loss, step_losses, pm, metrics)
