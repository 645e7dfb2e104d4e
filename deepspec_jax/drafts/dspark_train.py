"""DSpark / DFlash training: anchor sampling, block labels, forward, losses, metrics.

Everything is a pure function of arrays with static shapes, so one ``jit`` covers a
whole train step. Loss numerators and denominators are sums over the WHOLE (global)
batch: under ``jit`` with a batch sharded over a mesh, XLA inserts the all-reduce and
the loss does not depend on the sharding (the reference all-reduces its
denominators across data-parallel workers for the same reason).

Vocabulary-sized tensors are produced chunk by chunk over the block slots inside a
rematerialised ``lax.map`` (``token_stats``): the loss never holds the full
``[tokens, vocab]`` draft/target logits, and the backward recomputes each chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepspec_jax.drafts.dspark import DSparkDraft, DSparkLossConfig, dspark_rules
from deepspec_jax.weights.loader import export_tensors


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

def _chunk_stats(lm_head, w2, h, u, t, labels):
    """Per-token CE and TV distance for one chunk; vocab tensors live only here."""
    logits = jnp.einsum("...d,dv->...v", h, lm_head, preferred_element_type=jnp.float32)
    if u is not None:
        logits = logits + jnp.einsum("...r,rv->...v", u, w2, preferred_element_type=jnp.float32)
    tlogits = jnp.einsum("...d,dv->...v", t, lm_head, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    tv = jnp.sum(jnp.abs(jnp.exp(logp) - jax.nn.softmax(tlogits, axis=-1)), axis=-1)
    return ce, tv


def token_stats(model: DSparkDraft, out: TrainOutputs, token_chunk: int = 2048):
    """CE(-log p_d(x*)) and ||p_d - p_t||_1 per slot, [B,N,K] each, chunked over slots.

    Each chunk holds at most ``token_chunk`` rows of the whole batch (``token_chunk // B``
    block slots of every sequence, at least one), so its fp32 ``[rows, vocab]`` logits are
    bounded by the budget whatever the batch, anchors or block size; the batch axis stays
    whole in every chunk, so a batch sharded over devices stays sharded.
    """
    h, u, t = out.hidden, out.markov_u, out.target_hidden
    labels = out.targets.target_ids
    B, N, K = labels.shape
    n = N * K
    c = max(1, min(token_chunk // B, n))
    nc = -(-n // c)
    lm_head = model._w("lm_head")
    w2 = model._w("markov_w2") if u is not None else None

    def split(x):
        if x is None:
            return None
        x = x.reshape((B, n) + x.shape[3:])
        x = jnp.pad(x, [(0, 0), (0, nc * c - n)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, nc, c) + x.shape[2:]), 1, 0)

    fn = jax.checkpoint(lambda xs: _chunk_stats(lm_head, w2, *xs))
    ce, tv = jax.lax.map(fn, (split(h), split(u), split(t), split(labels)))

    def join(x):
        return jnp.moveaxis(x, 0, 1).reshape(B, nc * c)[:, :n].reshape(B, N, K)

    return join(ce), join(tv)


def loss_weight_mask(eval_mask: jax.Array, gamma: float) -> jax.Array:
    """eval_mask * exp(-k / gamma) (k = 0-based slot); no decay when gamma <= 0."""
    w = eval_mask.astype(jnp.float32)
    if gamma and gamma > 0:
        k = jnp.arange(w.shape[-1], dtype=jnp.float32)
        w = w * jnp.exp(-k / float(gamma))
    return w


def _bce_with_logits(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def dspark_loss(model: DSparkDraft, out: TrainOutputs, loss_cfg: DSparkLossConfig,
                token_chunk: int = 2048) -> LossOut:
    """CE + TV + confidence BCE with position decay, normalised over the whole batch."""
    ce_tok, tv_tok = token_stats(model, out, token_chunk)
    ev = out.targets.eval_mask
    evf = ev.astype(jnp.float32)
    w = loss_weight_mask(ev, loss_cfg.loss_decay_gamma)
    c_star = jnp.clip(1.0 - 0.5 * tv_tok, 0.0, 1.0)
    zero = jnp.zeros((), jnp.float32)
    den = jnp.sum(w)
    terms = {"ce_loss_num": jnp.sum(ce_tok * w), "ce_loss_den": den}
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


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_cfg", "token_chunk"))
def loss_and_grads(graphdef, params, rest, batch: DSparkBatch, anchors, keep,
                   loss_cfg: DSparkLossConfig, token_chunk: int = 2048):
    """(LossOut, grads of total w.r.t. ``params``) for one batch with given anchors."""

    def f(p):
        model = nnx.merge(graphdef, p, rest)
        res = dspark_loss(model, train_forward(model, batch, anchors, keep), loss_cfg,
                          token_chunk)
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
    rules = [r for r in dspark_rules(model.cfg) if r.ours not in ("embed", "lm_head")]
    return export_tensors(model, rules, model.cfg.num_layers)
