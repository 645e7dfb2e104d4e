"""DSpark / DFlash training: anchor sampling, block labels, forward, losses, metrics.

Everything is a pure function of arrays with static shapes, so one ``jit`` covers a
whole train step. Loss numerators and denominators are sums over the WHOLE (global)
batch: under ``jit`` with a batch sharded over a mesh, XLA inserts the all-reduce and
the loss does not depend on the sharding (the reference all-reduces its
denominators across data-parallel workers for the same reason).

Vocabulary-sized tensors are produced chunk by chunk over the block slots: the loss never
holds the full ``[tokens, vocab]`` draft/target logits. Two ways to get the gradient
(``vocab_grad``): "fused" (default) computes it in the loss's own chunk pass
(``fused_token_stats``: each vocab matmul once per step, plus [tokens, d] gradients kept
for the backward); "recompute" rematerialises each chunk in the backward (two more
[rows, d] x [d, vocab] matmuls per chunk, nothing vocab-sized kept).

With a reduced draft vocabulary (K of the target's V tokens, ``draft_vocab``) every
vocabulary tensor is over the K draft ids: the target distribution is the target's
logits restricted to them and renormalised (softmax over K, the EAGLE-3 / speculators
convention: the target's mass outside the draft vocabulary is dropped), so TV and the
confidence label compare two distributions over K; a CE label outside the draft
vocabulary gets zero weight (CE is averaged over the in-vocabulary labels). The
training step's vocabulary projection shrinks from V to K columns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from deepspec_jax.draft_vocab import to_draft_ids
from deepspec_jax.drafts.common import vocab_mask_of
from deepspec_jax.drafts.dspark import DSparkDraft, DSparkLossConfig, dspark_rules
from deepspec_jax.errors import ConfigError
from deepspec_jax.layers import softcap_and_slope
from deepspec_jax.weights.loader import export_tensors

VOCAB_GRADS = ("fused", "recompute")  # how the vocabulary losses get their gradient


class DSparkBatch(NamedTuple):
    input_ids: jax.Array           # [B, S] int
    loss_mask: jax.Array           # [B, S] 0/1
    features: jax.Array            # [B, S, n_feat*d] target layer outputs
    target_last_hidden: jax.Array  # [B, S, d] target hidden after the final norm


class BlockTargets(NamedTuple):
    target_ids: jax.Array   # [B,N,K] labels x[a+1+k] (index clamped; 0 for dummy blocks)
    prev_ids: jax.Array     # [B,N,K] x_{k-1} for the Markov head (teacher forcing)
    eval_mask: jax.Array    # [B,N,K] bool, contiguous supervised prefix
    pred_index: jax.Array   # [B,N,K] target position whose hidden state predicts the label


class TrainOutputs(NamedTuple):
    hidden: jax.Array                    # [B,N,K,d] draft hidden states norm(h)
    markov_u: jax.Array | None           # [B,N,K,r] head vectors; bias = u @ W2
    confidence_logits: jax.Array | None  # [B,N,K] fp32
    target_hidden: jax.Array             # [B,N,K,d] aligned target last hidden states
    targets: BlockTargets
    block_keep_mask: jax.Array           # [B,N] bool


class LossOut(NamedTuple):
    total: jax.Array
    terms: dict       # ce/l1/confidence num, den and normalised terms (scalars)
    metrics: dict     # accept_rate@k, tau_probabilistic, confidence errors (scalars)
    per_token: dict   # accept_rate_3d, loss_weight_mask, ce, tv  [B,N,K]


# ---------------------------------------------------------------------------
# anchors and labels
# ---------------------------------------------------------------------------

def anchor_candidates(loss_mask: jax.Array) -> jax.Array:
    """[B, S-1] bool: position i can anchor a block iff loss_mask[i] and loss_mask[i+1]."""
    m = loss_mask > 0
    return m[:, :-1] & m[:, 1:]


def sample_anchors(key: jax.Array, loss_mask: jax.Array, num_anchors: int):
    """Random sorted anchors [B,N] int32 and keep mask [B,N] bool.

    Uniformly picks ``min(count, N)`` distinct valid positions per row (smallest of
    i.i.d. uniforms, as the reference does), sorts them, and pads the row's end with
    dummy anchors at position 0 whose keep flag is 0.
    """
    b, s = loss_mask.shape
    valid = anchor_candidates(loss_mask)
    nc = valid.shape[1]
    if nc == 0:
        return jnp.zeros((b, num_anchors), jnp.int32), jnp.zeros((b, num_anchors), bool)
    r = jnp.where(valid, jax.random.uniform(key, (b, nc)), 2.0)
    take = min(num_anchors, nc)
    _, idx = jax.lax.top_k(-r, take)
    chosen = jnp.where(jnp.take_along_axis(valid, idx, axis=1), idx, s + 1)
    if take < num_anchors:
        chosen = jnp.pad(chosen, ((0, 0), (0, num_anchors - take)), constant_values=s + 1)
    chosen = jnp.sort(chosen, axis=1)
    count = jnp.minimum(jnp.sum(valid, axis=1), num_anchors)
    keep = jnp.arange(num_anchors)[None] < count[:, None]
    return jnp.where(keep, chosen, 0).astype(jnp.int32), keep


def block_targets(input_ids: jax.Array, loss_mask: jax.Array, anchors: jax.Array,
                  keep: jax.Array, block_size: int) -> BlockTargets:
    """Labels, teacher-forced previous tokens and the cumulative eval mask of each block."""
    b, s = input_ids.shape
    n = anchors.shape[1]
    label_idx = anchors[:, :, None] + 1 + jnp.arange(block_size, dtype=jnp.int32)
    safe = jnp.where(keep[:, :, None], jnp.minimum(label_idx, s - 1), 0)
    flat = safe.reshape(b, n * block_size)
    target_ids = jnp.take_along_axis(input_ids, flat, axis=1).reshape(safe.shape).astype(jnp.int32)
    in_mask = jnp.take_along_axis(loss_mask, flat, axis=1).reshape(safe.shape) > 0
    ok = (label_idx < s) & in_mask & keep[:, :, None]
    eval_mask = jnp.cumprod(ok.astype(jnp.int32), axis=-1).astype(bool)
    anchor_tok = jnp.take_along_axis(input_ids, anchors, axis=1).astype(jnp.int32)
    prev_ids = jnp.concatenate([anchor_tok[:, :, None], target_ids[:, :, :-1]], axis=-1)
    return BlockTargets(target_ids, prev_ids, eval_mask, jnp.maximum(safe - 1, 0))


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------

def train_forward(model: DSparkDraft, batch: DSparkBatch, anchors: jax.Array,
                  keep: jax.Array) -> TrainOutputs:
    """One training forward with the given anchors (no vocab-sized outputs)."""
    cfg = model.cfg
    anchors = anchors.astype(jnp.int32)
    keep = keep.astype(bool)
    tg = block_targets(batch.input_ids, batch.loss_mask, anchors, keep, cfg.block_size)
    hidden = model.train_hidden(batch.input_ids, batch.features, anchors, keep)
    u = model.markov_features(hidden, tg.prev_ids) if cfg.markov_rank > 0 else None
    conf = model.confidence(hidden, tg.prev_ids)
    b, n, k = tg.pred_index.shape
    idx = tg.pred_index.reshape(b, n * k)[..., None]
    tgt = jnp.take_along_axis(batch.target_last_hidden, idx, axis=1).reshape(b, n, k, -1)
    return TrainOutputs(hidden, u, conf, tgt.astype(model.dtype), tg, keep)


def draft_logits(model: DSparkDraft, out: TrainOutputs) -> jax.Array:
    """Materialised draft logits U + B, [B,N,K,V] fp32 (evaluation and tests only)."""
    logits = model.logits(out.hidden)
    return logits if out.markov_u is None else logits + model.markov_bias(out.markov_u)


def aligned_target_logits(model: DSparkDraft, out: TrainOutputs) -> jax.Array:
    return model.logits(out.target_hidden)


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------

def _dot(x, y, contract):
    """fp32-accumulated x . y over ``contract`` ((x dims), (y dims)), inputs as they are
    (mixed fp32 cotangent x bf16 weight, as jax's own transpose of the logits einsum)."""
    return jax.lax.dot_general(x, y, (contract, ((), ())), preferred_element_type=jnp.float32)


def _chunk_softmax(lm_head, w2, h, u, t, labels, cap=None):
    """One chunk's draft and target softmax numerators and per-token CE, one exp per logit.

    Returns (e_d, r_d, e_t, r_t, ce, f_d, f_t): e = exp(logits - rowmax) [..., V] and
    r = 1 / sum(e) [..., 1] of the draft and the target rows, so p = e * r. With a
    softcap ``cap`` (Gemma), draft logits are cap * tanh(lm_head(h) / cap) + the Markov
    bias (the reference caps before adding it) and target logits are capped alike;
    f_d / f_t [..., V] are the slopes d cap(z) / d z (None without a cap). Leaving p unformed lets a
    consumer that only needs p up to a per-row factor (the DFlash gradient) read e
    directly; CE is read at the label (logsumexp - logit: one gathered logit per row)
    instead of through a whole [rows, vocab] log-softmax: element-wise work over the
    vocabulary is what the CPU step spends beyond its matmuls. Draft and target rows go
    through one matmul (one read of lm_head, and a taller one: faster on CPU)."""
    both, slope = softcap_and_slope(_dot(jnp.stack([h, t.astype(h.dtype)]), lm_head,
                                         ((h.ndim,), (0,))), cap)
    logits, tlogits = both[0], both[1]
    f_d, f_t = (None, None) if slope is None else (slope[0], slope[1])
    if u is not None:
        logits = logits + _dot(u, w2, ((u.ndim - 1,), (0,)))

    def numerator(x):
        m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        e = jnp.exp(x - m)
        return e, jnp.sum(e, axis=-1, keepdims=True), m

    e_d, s_d, m_d = numerator(logits)
    e_t, s_t, _ = numerator(tlogits)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    ce = (jnp.log(s_d) + m_d - picked)[..., 0]
    return e_d, 1.0 / s_d, e_t, 1.0 / s_t, ce, f_d, f_t


def _chunk_stats(lm_head, w2, h, u, t, labels, cap=None):
    """Per-token CE and TV distance for one chunk; vocab tensors live only here."""
    e_d, r_d, e_t, r_t, ce, _, _ = _chunk_softmax(lm_head, w2, h, u, t, labels, cap)
    return ce, jnp.sum(jnp.abs(e_d * r_d - e_t * r_t), axis=-1)


def _split_chunks(x, B: int, n: int, c: int, nc: int):
    """[B,N,K,...] -> [nc, B, c, ...]: chunks of ``c`` slots of every sequence (zero-padded)."""
    if x is None:
        return None
    x = x.reshape((B, n) + x.shape[3:])
    x = jnp.pad(x, [(0, 0), (0, nc * c - n)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, nc, c) + x.shape[2:]), 1, 0)


def _chunking(labels: jax.Array, token_chunk: int):
    B, N, K = labels.shape
    n = N * K
    c = max(1, min(token_chunk // B, n))
    return B, n, c, -(-n // c)


def _join_chunks(x, B: int, N: int, K: int):
    """[nc, B, c] -> [B, N, K] (padding dropped)."""
    return jnp.moveaxis(x, 0, 1).reshape(B, -1)[:, :N * K].reshape(B, N, K)


def _chunked(model: DSparkDraft, out: TrainOutputs, token_chunk: int):
    """(lm_head, markov_w2 or None, the [nc, B, c, ...] chunks of (hidden, u, target
    hidden, labels), split: [B,N,K,...] -> chunks, join: [nc, B, c] -> [B,N,K]).
    The logit softcap is ``model.cfg.logit_softcap``."""
    h, u, t = out.hidden, out.markov_u, out.target_hidden
    labels = out.targets.target_ids
    B, n, c, nc = _chunking(labels, token_chunk)
    lm_head = model._w("lm_head")
    w2 = model._w("markov_w2") if u is not None else None
    split = lambda x: _split_chunks(x, B, n, c, nc)
    join = lambda x: _join_chunks(x, B, *labels.shape[1:])
    return lm_head, w2, tuple(split(x) for x in (h, u, t, labels)), split, join


def token_stats(model: DSparkDraft, out: TrainOutputs, token_chunk: int = 2048):
    """CE(-log p_d(x*)) and ||p_d - p_t||_1 per slot, [B,N,K] each, chunked over slots.

    Each chunk holds at most ``token_chunk`` rows of the whole batch (``token_chunk // B``
    block slots of every sequence, at least one), so its fp32 ``[rows, vocab]`` logits are
    bounded by the budget whatever the batch, anchors or block size; the batch axis stays
    whole in every chunk, so a batch sharded over devices stays sharded. Differentiable by
    recomputation (each chunk is rematerialised in the backward).
    """
    lm_head, w2, chunks, _, join = _chunked(model, out, token_chunk)
    cap = model.cfg.logit_softcap
    fn = jax.checkpoint(lambda xs: _chunk_stats(lm_head, w2, *xs, cap))
    ce, tv = jax.lax.map(fn, chunks)
    return join(ce), join(tv)


def _chunk_fused(lm_head, w2, h, u, t, labels, a_ce, a_tv, need, cap=None):
    """One chunk [B,c,...]: per-token CE and TV and, in the same pass, the gradients of
    ``sum(a_ce * ce + a_tv * tv)`` w.r.t. the inputs named in ``need`` (a dict of bools
    over lm_head, w2, h, u, t). ``a_tv`` None: TV has no weight (DFlash), so only its
    value (the accept-rate metrics) is formed. Returns (ce, tv, grads dict).

    d S / d logits = a_ce * (p - onehot(label)) + a_tv * (TV terms); the one-hot part is
    linear, so it is applied to the matmul outputs instead (minus the label's column of
    each vocab matrix per row, a gather of [rows, d]) and no [rows, vocab] one-hot exists.
    With a softcap the lm_head side (h, lm_head, t) gets d S / d z = d S / d logits times
    the cap's slope (its label column too); the Markov side (u, W2), added after the
    cap, does not.
    """
    e_d, r_d, e_t, r_t, ce, f_d, f_t = _chunk_softmax(lm_head, w2, h, u, t, labels, cap)
    p, pt = e_d * r_d, e_t * r_t
    diff = p - pt
    tv = jnp.sum(jnp.abs(diff), axis=-1)
    if a_tv is not None:
        # d|x|/dx as jax's abs rule has it (+1 at 0), so the gradients equal autodiff's
        sgn = jnp.where(diff >= 0, 1.0, -1.0)
        dz = p * (a_ce[..., None] + a_tv[..., None] * (sgn - jnp.sum(sgn * p, -1, keepdims=True)))
        scale = lambda y: y
    else:  # dz = a_ce * p = (a_ce * r) * e: the per-row factor goes on the [rows, d] side
        dz = e_d
        scale = lambda y: y * (a_ce[..., None] * r_d)
    g = {}
    lead = tuple(range(h.ndim - 1))
    last = dz.ndim - 1
    # the lm_head side through the cap: slope-weighted dz, and the label term's weight
    # times the slope at the label
    dz_h, a_lab = dz, a_ce
    if f_d is not None:
        dz_h = dz * f_d
        a_lab = a_ce * jnp.take_along_axis(f_d, labels[..., None], axis=-1)[..., 0]

    def label_cols(w, a):  # [.., rows, k]: column label of w [k, V] for each row, times a
        return a[..., None] * jnp.take(w, labels, axis=1).astype(jnp.float32).transpose(
            tuple(range(1, labels.ndim + 1)) + (0,))

    def label_scatter(x, w, a):  # [k, V]: sum over rows of a * x at column label
        rows = (a[..., None] * x.astype(jnp.float32)).reshape(-1, x.shape[-1])
        return jnp.zeros(w.shape[::-1], jnp.float32).at[labels.reshape(-1)].add(rows).T

    if need["h"]:
        g["h"] = (scale(_dot(dz_h, lm_head, ((last,), (1,))))
                  - label_cols(lm_head, a_lab)).astype(h.dtype)
    if u is not None and need["u"]:
        g["u"] = (scale(_dot(dz, w2, ((last,), (1,)))) - label_cols(w2, a_ce)).astype(u.dtype)
    if u is not None and need["w2"]:
        g["w2"] = _dot(scale(u.astype(jnp.float32)), dz, (lead, lead)) - label_scatter(u, w2, a_ce)
    if need["lm_head"]:
        g["lm_head"] = (_dot(scale(h.astype(jnp.float32)), dz_h, (lead, lead))
                        - label_scatter(h, lm_head, a_lab))
    if a_tv is not None and (need["t"] or need["lm_head"]):
        dzt = -a_tv[..., None] * pt * (sgn - jnp.sum(sgn * pt, axis=-1, keepdims=True))
        if f_t is not None:
            dzt = dzt * f_t
        if need["t"]:
            g["t"] = _dot(dzt, lm_head, ((last,), (1,))).astype(t.dtype)
        if need["lm_head"]:
            g["lm_head"] = g["lm_head"] + _dot(t, dzt, (lead, lead))
    elif need["t"]:
        g["t"] = jnp.zeros_like(t)
    return ce, tv, g


def _fused_pass(lm_head, w2, h, u, t, labels, a_ce, a_tv, need, cap=None):
    """All chunks ([nc, B, c, ...] inputs) in one ``lax.scan``: (S, ce, tv, grads), with S =
    sum(a_ce * ce + a_tv * tv) (a_tv None: no TV term); the weight gradients accumulate in
    the carry (fp32)."""
    acc0 = {k: jnp.zeros(w.shape, jnp.float32) for k, w in (("lm_head", lm_head), ("w2", w2))
            if w is not None and need[k]}

    def body(acc, xs):
        ce, tv, g = _chunk_fused(lm_head, w2, *xs, need, cap)
        acc = {k: acc[k] + g.pop(k) for k in acc}
        return acc, (ce, tv, g)

    acc, (ce, tv, g) = jax.lax.scan(body, acc0, (h, u, t, labels, a_ce, a_tv))
    g.update({k: v.astype((lm_head if k == "lm_head" else w2).dtype) for k, v in acc.items()})
    return _weighted_sum(ce, tv, a_ce, a_tv), ce, tv, g


def _weighted_sum(ce, tv, a_ce, a_tv):
    return jnp.sum(a_ce * ce) + (0.0 if a_tv is None else jnp.sum(a_tv * tv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_stats(cap, lm_head, w2, h, u, t, labels, a_ce, a_tv):
    """(S, ce, tv) over chunked inputs; only S is differentiable (see ``fused_token_stats``).
    ``cap``: the logit softcap (static; None = none)."""
    ce, tv = jax.lax.map(lambda xs: _chunk_stats(lm_head, w2, *xs, cap), (h, u, t, labels))
    return _weighted_sum(ce, tv, a_ce, a_tv), ce, tv


def _fused_stats_fwd(cap, lm_head, w2, h, u, t, labels, a_ce, a_tv):
    args = dict(lm_head=lm_head, w2=w2, h=h, u=u, t=t)
    need = {k: v is not None and v.perturbed for k, v in args.items()}
    if a_ce.perturbed or (a_tv is not None and a_tv.perturbed):
        raise ValueError("dspark_train._fused_stats: the per-token loss weights must not be "
                         "differentiated (stop_gradient them: they depend on masks only).")
    val = lambda v: None if v is None else v.value
    s, ce, tv, g = _fused_pass(*(val(v) for v in (lm_head, w2, h, u, t, labels, a_ce, a_tv)),
                               need, cap)
    return (s, ce, tv), g


def _fused_stats_bwd(cap, g, cts):
    ct_s, ct_ce, ct_tv = cts
    if not (isinstance(ct_ce, SymbolicZero) and isinstance(ct_tv, SymbolicZero)):
        raise ValueError("dspark_train._fused_stats: only the weighted sum S is differentiable; "
                         "the per-token ce/tv outputs must be stop_gradient'ed "
                         "(use fused_token_stats, or vocab_grad='recompute').")
    grad = lambda k: None if k not in g else (ct_s * g[k]).astype(g[k].dtype)
    return (*(grad(k) for k in ("lm_head", "w2", "h", "u", "t")), None, None, None)


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd, symbolic_zeros=True)


def fused_token_stats(model: DSparkDraft, out: TrainOutputs, a_ce: jax.Array,
                      a_tv: jax.Array | None, token_chunk: int = 2048):
    """(S, ce, tv): per-slot CE and TV [B,N,K] as ``token_stats`` (not differentiable) and
    S = sum(a_ce * ce + a_tv * tv), whose gradient is computed in the same chunk pass.

    The per-token weights ``a_ce``/``a_tv`` [B,N,K] must not depend on the logits (they are
    the loss's mask/decay/normaliser weights; ``a_tv`` None when TV has no weight, as in
    DFlash, whose TV only feeds the metrics): then the gradient of S w.r.t. the draft
    hidden states, Markov vectors and a trainable vocab matrix is fixed by the forward's
    softmaxes, so the backward only scales it by S's cotangent instead of recomputing
    the [rows, vocab] logits. Memory stays bounded by the chunk; what is kept for the
    backward is [tokens, d] (+ [tokens, r], and [r, vocab] for the Markov W2).
    """
    lm_head, w2, chunks, split, join = _chunked(model, out, token_chunk)
    sg = jax.lax.stop_gradient
    weights = (None if a is None else split(sg(a).astype(jnp.float32)) for a in (a_ce, a_tv))
    s, ce, tv = _fused_stats(model.cfg.logit_softcap, lm_head, w2, *chunks, *weights)
    return s, sg(join(ce)), sg(join(tv))


def loss_weight_mask(eval_mask: jax.Array, gamma: float) -> jax.Array:
    """eval_mask * exp(-k / gamma) (k = 0-based slot); no decay when gamma <= 0."""
    w = eval_mask.astype(jnp.float32)
    if gamma and gamma > 0:
        k = jnp.arange(w.shape[-1], dtype=jnp.float32)
        w = w * jnp.exp(-k / float(gamma))
    return w


def _bce_with_logits(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def check_vocab_grad(vocab_grad: str) -> None:
    if vocab_grad not in VOCAB_GRADS:
        raise ConfigError(f"vocab_grad={vocab_grad!r} (loss.vocab_grad): must be one of "
                          f"{VOCAB_GRADS}: 'fused' computes the vocabulary losses' gradient in "
                          "their own chunk pass, 'recompute' recomputes the chunks in the backward.")


def dspark_loss(model: DSparkDraft, out: TrainOutputs, loss_cfg: DSparkLossConfig,
                token_chunk: int = 2048, vocab_grad: str = "fused") -> LossOut:
    """CE + TV + confidence BCE with position decay, normalised over the whole batch.
    A reduced draft vocabulary: labels outside it carry no CE weight (module docstring).

    ``vocab_grad`` (``VOCAB_GRADS``): "fused" differentiates the CE/TV terms through
    ``fused_token_stats`` (gradient formed in the forward's chunk pass, exact: the
    per-token weights below do not depend on the logits); "recompute" through
    ``token_stats`` (chunks rematerialised in the backward). Same values either way.
    """
    check_vocab_grad(vocab_grad)
    ev = out.targets.eval_mask
    evf = ev.astype(jnp.float32)
    w = loss_weight_mask(ev, loss_cfg.loss_decay_gamma)
    zero = jnp.zeros((), jnp.float32)
    den = jnp.sum(w)
    t2d = vocab_mask_of(model)
    w_ce, den_ce = w, den
    if t2d is not None:  # labels as draft ids; those outside the draft vocabulary weigh 0
        labels, inside = to_draft_ids(out.targets.target_ids, t2d)
        out = out._replace(targets=out.targets._replace(target_ids=labels))
        w_ce = w * inside.astype(jnp.float32)
        den_ce = jnp.sum(w_ce)
    if vocab_grad == "fused":
        # d total / d ce and d total / d tv per token (the normalised CE and L1 terms below)
        a_ce = loss_cfg.ce_alpha * w_ce / (den_ce + 1e-6)
        a_tv = (jnp.where(den > 0, loss_cfg.l1_alpha * w / (den + 1e-6), 0.0)
                if loss_cfg.l1_alpha > 0 else None)
        vocab_s, ce_tok, tv_tok = fused_token_stats(model, out, a_ce, a_tv, token_chunk)
    else:
        ce_tok, tv_tok = token_stats(model, out, token_chunk)
    c_star = jnp.clip(1.0 - 0.5 * tv_tok, 0.0, 1.0)
    terms = {"ce_loss_num": jnp.sum(ce_tok * w_ce), "ce_loss_den": den_ce}
    if loss_cfg.l1_alpha > 0:
        terms["l1_loss_num"], terms["l1_loss_den"] = jnp.sum(tv_tok * w), den
    else:
        terms["l1_loss_num"], terms["l1_loss_den"] = zero, zero
    conf = out.confidence_logits
    if conf is not None:
        bce = _bce_with_logits(conf, jax.lax.stop_gradient(c_star))
        terms["confidence_loss_num"], terms["confidence_loss_den"] = jnp.sum(bce * w), den
    else:
        terms["confidence_loss_num"], terms["confidence_loss_den"] = zero, zero
    terms["ce_loss"] = terms["ce_loss_num"] / (terms["ce_loss_den"] + 1e-6)
    terms["l1_loss"] = jnp.where(terms["l1_loss_den"] > 0,
                                 terms["l1_loss_num"] / (terms["l1_loss_den"] + 1e-6), 0.0)
    terms["confidence_loss"] = (terms["confidence_loss_num"] / (terms["confidence_loss_den"] + 1e-6)
                                if conf is not None else zero)
    total = (loss_cfg.ce_alpha * terms["ce_loss"] + loss_cfg.l1_alpha * terms["l1_loss"]
             + loss_cfg.confidence_alpha * terms["confidence_loss"])
    if vocab_grad == "fused":
        # ce_tok/tv_tok are constants here: the CE/L1 gradient enters through S, whose
        # value S - S = 0 leaves ``total`` exactly as the recompute path computes it
        total = total + (vocab_s - jax.lax.stop_gradient(vocab_s))
    metrics = _metrics(jax.lax.stop_gradient(c_star), evf, out.block_keep_mask, w,
                       None if conf is None else jax.lax.stop_gradient(conf))
    per_token = {"accept_rate_3d": c_star, "loss_weight_mask": w, "ce": ce_tok, "tv": tv_tok}
    return LossOut(total, terms, metrics, per_token)


def _ratio(num, den):
    return num / jnp.maximum(den, 1e-12)


def _metrics(c_star, evf, keep, w, conf) -> dict:
    """accept_rate@k, tau_probabilistic and confidence calibration, as the reference logs."""
    valid = c_star * evf
    pos_den = jnp.sum(evf, axis=(0, 1))
    pos_num = jnp.sum(valid, axis=(0, 1))
    out = {f"accept_rate@{k}": _ratio(pos_num[k], pos_den[k]) for k in range(c_star.shape[-1])}
    blocks = (keep & jnp.any(evf > 0, axis=-1)).astype(jnp.float32)
    tau = 1.0 + jnp.sum(jnp.cumprod(valid, axis=-1), axis=-1)
    out["tau_probabilistic"] = _ratio(jnp.sum(tau * blocks), jnp.sum(blocks))
    if conf is not None:
        probs = jax.nn.sigmoid(conf)
        err = probs - c_star
        den = jnp.sum(w)
        out["confidence_abs_error"] = _ratio(jnp.sum(jnp.abs(err) * w), den)
        out["confidence_bias"] = _ratio(jnp.sum(err * w), den)
        prefix = jnp.cumprod(probs * evf, -1) - jnp.cumprod(valid, -1)
        out["confidence_cumprod_bias"] = _ratio(jnp.sum(prefix * w), den)
    return out


# ---------------------------------------------------------------------------
# gradients (trainable nnx.Param only; Frozen embed/lm_head never differentiated)
# ---------------------------------------------------------------------------

def split_trainable(model: DSparkDraft):
    """(graphdef, trainable nnx.Param state, everything else incl. Frozen)."""
    return nnx.split(model, nnx.Param, ...)


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_cfg", "token_chunk", "vocab_grad"))
def loss_and_grads(graphdef, params, rest, batch: DSparkBatch, anchors, keep,
                   loss_cfg: DSparkLossConfig, token_chunk: int = 2048, vocab_grad: str = "fused"):
    """(LossOut, grads of total w.r.t. ``params``) for one batch with given anchors."""

    def f(p):
        model = nnx.merge(graphdef, p, rest)
        res = dspark_loss(model, train_forward(model, batch, anchors, keep), loss_cfg,
                          token_chunk, vocab_grad)
        return res.total, res

    (_, res), grads = jax.value_and_grad(f, has_aux=True)(params)
    return res, grads


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_cfg", "token_chunk"))
def loss_only(graphdef, params, rest, batch: DSparkBatch, anchors, keep,
              loss_cfg: DSparkLossConfig, token_chunk: int = 2048) -> LossOut:
    model = nnx.merge(graphdef, params, rest)
    return dspark_loss(model, train_forward(model, batch, anchors, keep), loss_cfg, token_chunk)


def grads_to_hf(graphdef, grads, rest) -> dict[str, np.ndarray]:
    """Gradients keyed by the reference's HF parameter names (trainable ones only)."""
    model = nnx.merge(graphdef, grads, rest)
    trainable = {".".join(map(str, p)) for p, _ in grads.flat_state()}
    rules = [r for r in dspark_rules(model.cfg) if r.ours in trainable]
    return export_tensors(model, rules, model.cfg.num_layers)
