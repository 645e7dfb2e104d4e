"""The fused vocabulary-loss gradients (gradient formed in the loss's own chunk pass) equal
the recompute path's (chunks rematerialised in the backward) to fp32 rounding."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspec_jax.drafts import dspark_train as T
from deepspec_jax.drafts import eagle3_train as E
from deepspec_jax.drafts.dspark import DSparkLossConfig
from deepspec_jax.errors import ConfigError

B, N, K, D, R, V = 2, 3, 4, 16, 4, 40


class _Weights:
    """The two vocab matrices dspark_loss reads (``model._w``), as differentiable inputs,
    and the config's logit softcap."""

    def __init__(self, w: dict, cap=None):
        self.w = w
        self.cfg = types.SimpleNamespace(logit_softcap=cap)

    def _w(self, name):
        return self.w[name]


def _case(seed: int, markov: bool):
    ks = jax.random.split(jax.random.key(seed), 8)
    x = {"h": jax.random.normal(ks[0], (B, N, K, D)),
         "t": jax.random.normal(ks[1], (B, N, K, D)),
         "lm_head": jax.random.normal(ks[2], (D, V)) * 0.5}
    if markov:  # DSpark: Markov head and confidence head; else DFlash (neither)
        x["conf"] = jax.random.normal(ks[3], (B, N, K))
        x["u"] = jax.random.normal(ks[4], (B, N, K, R))
        x["markov_w2"] = jax.random.normal(ks[5], (R, V)) * 0.5
    labels = jax.random.randint(ks[6], (B, N, K), 0, V)
    # masked rows: a dummy block, a block with a 2-slot prefix, one fully supervised
    ev = np.ones((B, N, K), bool)
    ev[0, 2] = False
    ev[1, 0, 2:] = False
    keep = jnp.asarray(ev.any(-1))
    tg = T.BlockTargets(labels, labels, jnp.asarray(ev), jnp.zeros_like(labels))
    # no slot with h == t: an exact p_d == p_t tie does not survive XLA:CPU (a row's
    # elements fall in vector or scalar-tail exp lanes by their offset), so TV's
    # subgradient at 0 would be rounding noise on either path, not a property to compare
    return x, tg, keep


@functools.partial(jax.jit, static_argnames=("vocab_grad", "loss_cfg", "chunk", "cap"))
def _value_and_grads(x, tg, keep, vocab_grad, loss_cfg, chunk, cap=None):
    def f(x):
        out = T.TrainOutputs(x["h"], x.get("u"), x.get("conf"), x["t"], tg, keep)
        model = _Weights({k: x[k] for k in ("lm_head", "markov_w2") if k in x}, cap)
        res = T.dspark_loss(model, out, loss_cfg, chunk, vocab_grad)
        return res.total, res
    return jax.value_and_grad(f, has_aux=True)(x)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("markov,loss_cfg,cap", [
    (True, DSparkLossConfig(), None), (False, DSparkLossConfig(confidence_alpha=0.0), None),
    (False, DSparkLossConfig.dflash(), None),  # DFlash: TV unweighted, only its value is formed
    # Gemma's final-logit softcap (logits ~N(0, 2^2), so tanh(z / 3) is far from linear)
    (True, DSparkLossConfig(), 3.0), (False, DSparkLossConfig.dflash(), 3.0)])
def test_dspark_fused_matches_recompute(markov, loss_cfg, cap):
    """Loss, terms and the gradient w.r.t. every input (hidden, Markov u and W2, target
    hidden, even a trainable lm_head) agree; 5 slots per chunk pads the last chunk. The
    recompute path is jax's autodiff of the plain chunk (through the softcap's tanh too)."""
    x, tg, keep = _case(0, markov)
    (tot_f, res_f), g_f = _value_and_grads(x, tg, keep, "fused", loss_cfg, 2 * 5, cap)
    (tot_r, res_r), g_r = _value_and_grads(x, tg, keep, "recompute", loss_cfg, 2 * 5, cap)
    assert float(tot_f) == float(tot_r)
    for k in res_r.terms:
        assert float(res_f.terms[k]) == float(res_r.terms[k]), k
    for k in ("ce", "tv"):
        np.testing.assert_allclose(res_f.per_token[k], res_r.per_token[k], rtol=1e-6, atol=1e-7)
    assert sorted(g_f) == sorted(g_r)
    for k in g_r:
        if k == "t" and loss_cfg.l1_alpha == 0:  # the target enters through TV only
            assert not np.any(np.asarray(g_f[k])) and not np.any(np.asarray(g_r[k]))
            continue
        assert np.abs(np.asarray(g_r[k])).max() > 0, k  # every input takes part
        assert _rel(g_f[k], g_r[k]) < 1e-5, (k, _rel(g_f[k], g_r[k]))
    # masked slots get no gradient on either path
    ev = np.asarray(tg.eval_mask)
    assert np.abs(np.asarray(g_f["h"])[~ev]).max() == 0.0


def test_dspark_vocab_grad_checked():
    x, tg, keep = _case(1, False)
    with pytest.raises(ConfigError, match="vocab_grad"):
        _value_and_grads(x, tg, keep, "fuse", DSparkLossConfig(), 8)


@pytest.mark.parametrize("chunk,rows", [(16, 8), (101, 8)])  # ragged vocab chunks; one chunk
def test_eagle3_weighted_soft_ce_matches_recompute(chunk, rows):
    """S = sum(a * ce) by weighted_soft_ce (gradient in the forward pass) equals the same
    sum over soft_ce (logits recomputed in the backward): values, d/dxd and a trainable
    lm_head's d/dw; rows with a = 0 (masked) get no gradient; the target none."""
    kd, kt, kw, ka = jax.random.split(jax.random.key(2), 4)
    xd = jax.random.normal(kd, (37, 8))
    xt = jax.random.normal(kt, (37, 8)).at[-3:].set(0.0)
    w = jax.random.normal(kw, (8, 101))
    a = jax.random.uniform(ka, (37,)).at[:5].set(0.0)

    def fused(xd, xt, w):
        return E.weighted_soft_ce(xd, xt, w, a, chunk, rows, True)[0]

    def recompute(xd, xt, w):
        return jnp.sum(a * E.soft_ce(xd, xt, w, chunk, rows, True)[0])

    (s_f, g_f), (s_r, g_r) = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(xd, xt, w)
                              for fn in (fused, recompute))
    np.testing.assert_allclose(s_f, s_r, rtol=1e-6)
    stats_f = jax.jit(lambda *x: E.weighted_soft_ce(*x, a, chunk, rows)[1:])(xd, xt, w)
    stats_r = jax.jit(lambda *x: E.soft_ce(*x, chunk, rows))(xd, xt, w)
    for x, y in zip(stats_f, stats_r):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    for k in (0, 2):
        assert np.abs(np.asarray(g_r[k])).max() > 0
        assert _rel(g_f[k], g_r[k]) < 1e-5, (k, _rel(g_f[k], g_r[k]))
    assert not np.any(np.asarray(g_f[0])[:5]) and not np.any(np.asarray(g_f[1]))
    frozen = jax.jit(jax.grad(lambda w: E.weighted_soft_ce(xd, xt, w, a, chunk, rows)[0]))(w)
    assert not np.any(np.asarray(frozen))  # default: frozen lm_head, no gradient


@pytest.mark.parametrize("chunk", [16, 101])  # ragged vocab chunks (-inf padding); one chunk
def test_eagle3_softcap_matches_autodiff(chunk):
    """With Gemma's logit softcap c * tanh(z / c) on draft and target logits, the fused
    (weighted_soft_ce), recompute (soft_ce) and TTT-layout soft CEs equal jax's autodiff of
    the plain dense loss: values, d/dxd, a trainable lm_head's d/dw, argmax agreement."""
    cap, rows = 2.5, 8
    kd, kt, kw, ka = jax.random.split(jax.random.key(4), 4)
    xd = jax.random.normal(kd, (37, 8))
    xt = jax.random.normal(kt, (37, 8)).at[-3:].set(0.0)
    w = jax.random.normal(kw, (8, 101))
    a = jax.random.uniform(ka, (37,)).at[:5].set(0.0)

    def dense(xd, w):
        zd, zt = cap * jnp.tanh(xd @ w / cap), cap * jnp.tanh(xt @ w / cap)
        pt = jax.lax.stop_gradient(jax.nn.softmax(zt, axis=-1))
        ce = -jnp.sum(pt * jax.nn.log_softmax(zd, axis=-1), axis=-1)
        return jnp.sum(a * ce), (ce, (jnp.argmax(zd, -1) == jnp.argmax(zt, -1)).astype(jnp.float32))

    def fused(xd, w):
        s, ce, _, agree = E.weighted_soft_ce(xd, xt, w, a, chunk, rows, True, cap)
        return s, (ce, agree)

    def recompute(xd, w):
        ce, _, agree = E.soft_ce(xd, xt, w, chunk, rows, True, cap)
        return jnp.sum(a * ce), (jax.lax.stop_gradient(ce), agree)

    (s_w, (ce_w, ag_w)), g_w = jax.jit(jax.value_and_grad(dense, (0, 1), has_aux=True))(xd, w)
    assert np.abs(np.asarray(g_w[1])).max() > 0
    for fn in (fused, recompute):
        (s, (ce, ag)), g = jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(xd, w)
        np.testing.assert_allclose(s, s_w, rtol=1e-6)
        np.testing.assert_allclose(ce, ce_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ag, ag_w)
        for k in (0, 1):
            assert _rel(g[k], g_w[k]) < 1e-5, (fn.__name__, k, _rel(g[k], g_w[k]))
    # the TTT layout (targets shared across steps) with the cap: d S / d xd as the dense path
    ttt, b, t = 2, 2, 5
    xs = jax.random.normal(kd, (ttt, b, t, 8))
    last = jax.random.normal(kt, (b, t, 8))
    at = jax.random.uniform(ka, (ttt, b, t))

    def ttt_dense(xs):
        zt = cap * jnp.tanh(E.target_inputs(last, ttt) @ w / cap)
        ce = -jnp.sum(jax.nn.softmax(zt, -1) * jax.nn.log_softmax(cap * jnp.tanh(xs @ w / cap), -1), -1)
        return jnp.sum(at * ce)

    s_f, g_f = jax.jit(jax.value_and_grad(
        lambda xs: E.ttt_weighted_soft_ce(xs, last, w, at, chunk, ttt * b * 2, cap=cap)[0]))(xs)
    s_d, g_d = jax.jit(jax.value_and_grad(ttt_dense))(xs)
    np.testing.assert_allclose(s_f, s_d, rtol=1e-6)
    assert _rel(g_f, g_d) < 1e-5, _rel(g_f, g_d)


def test_eagle3_logit_tile():
    assert E.logit_tile(49152) == (49152, 680)           # whole vocabulary, 128 MiB tile
    assert E.logit_tile(96) == (96, E.TILE_ELEMS // 96 // 8 * 8)
    assert E.logit_tile(49152, 8192) == (8192, 4096)     # explicit chunk: the old tiles
    assert E.logit_tile(151936, None, 64) == (151936, 64)
    assert [E._balanced_rows(n, r) for n, r in ((4096, 680), (37, 8), (37, 10), (5, 680))] == \
        [592, 8, 10, 5]


@pytest.mark.parametrize("chunk", [16, 101])
def test_eagle3_ttt_blocks_match_recompute(chunk):
    """The TTT layout (position blocks sharing each target row's logits across steps)
    equals soft_ce over the materialised shifted targets (``target_inputs``): per-row
    stats, S and d S / d xd; 11 positions in blocks of 4 pad the last block, and the
    last positions' targets lie past the end (uniform)."""
    ttt, b, t = 3, 2, 11
    kd, kt, kw, ka = jax.random.split(jax.random.key(3), 4)
    xd = jax.random.normal(kd, (ttt, b, t, 8))
    last = jax.random.normal(kt, (b, t, 8))
    w = jax.random.normal(kw, (8, 101))
    a = jax.random.uniform(ka, (ttt, b, t)).at[:, 0, :3].set(0.0)
    rows = ttt * b * 4

    def fused(xd):
        s, *stats = E.ttt_weighted_soft_ce(xd, last, w, a, chunk, rows)
        return s, stats

    def recompute(xd):
        xt = E.target_inputs(last, ttt).reshape(ttt * b * t, -1)
        stats = [x.reshape(ttt, b, t) for x in E.soft_ce(xd.reshape(ttt * b * t, -1), xt, w,
                                                         chunk, rows)]
        return jnp.sum(a * stats[0]), stats

    (s_f, st_f), g_f = jax.jit(jax.value_and_grad(fused, has_aux=True))(xd)
    (s_r, st_r), g_r = jax.jit(jax.value_and_grad(recompute, has_aux=True))(xd)
    np.testing.assert_allclose(s_f, s_r, rtol=1e-6)
    for x, y in zip(st_f, st_r):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert _rel(g_f, g_r) < 1e-5, _rel(g_f, g_r)
