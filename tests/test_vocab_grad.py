"""The fused vocabulary-loss gradients (gradient formed in the loss's own chunk pass) equal
the recompute path's (chunks rematerialised in the backward) to fp32 rounding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspec_jax.drafts import dspark_train as T
from deepspec_jax.drafts.dspark import DSparkLossConfig
from deepspec_jax.errors import ConfigError

B, N, K, D, R, V = 2, 3, 4, 16, 4, 40


class _Weights:
    """The two vocab matrices dspark_loss reads (``model._w``), as differentiable inputs."""

    def __init__(self, w: dict):
        self.w = w

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
    # one slot where p_d == p_t exactly (h == t, no Markov bias): |x| at 0
    x["t"] = x["t"].at[1, 1, 0].set(x["h"][1, 1, 0])
    return x, tg, keep


@functools.partial(jax.jit, static_argnames=("vocab_grad", "loss_cfg", "chunk"))
def _value_and_grads(x, tg, keep, vocab_grad, loss_cfg, chunk):
    def f(x):
        out = T.TrainOutputs(x["h"], x.get("u"), x.get("conf"), x["t"], tg, keep)
        model = _Weights({k: x[k] for k in ("lm_head", "markov_w2") if k in x})
        res = T.dspark_loss(model, out, loss_cfg, chunk, vocab_grad)
        return res.total, res
    return jax.value_and_grad(f, has_aux=True)(x)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("markov,loss_cfg", [
    (True, DSparkLossConfig()), (False, DSparkLossConfig(confidence_alpha=0.0))])
def test_dspark_fused_matches_recompute(markov, loss_cfg):
    """Loss, terms and the gradient w.r.t. every input (hidden, Markov u and W2, target
    hidden, even a trainable lm_head) agree; 5 slots per chunk pads the last chunk."""
    x, tg, keep = _case(0, markov)
    (tot_f, res_f), g_f = _value_and_grads(x, tg, keep, "fused", loss_cfg, 2 * 5)
    (tot_r, res_r), g_r = _value_and_grads(x, tg, keep, "recompute", loss_cfg, 2 * 5)
    assert float(tot_f) == float(tot_r)
    for k in res_r.terms:
        assert float(res_f.terms[k]) == float(res_r.terms[k]), k
    for k in ("ce", "tv"):
        np.testing.assert_allclose(res_f.per_token[k], res_r.per_token[k], rtol=1e-6, atol=1e-7)
    assert sorted(g_f) == sorted(g_r)
    for k in g_r:
        assert np.abs(np.asarray(g_r[k])).max() > 0, k  # every input takes part
        assert _rel(g_f[k], g_r[k]) < 1e-5, (k, _rel(g_f[k], g_r[k]))
    # masked slots get no gradient on either path
    ev = np.asarray(tg.eval_mask)
    assert np.abs(np.asarray(g_f["h"])[~ev]).max() == 0.0


def test_dspark_vocab_grad_checked():
    x, tg, keep = _case(1, False)
    with pytest.raises(ConfigError, match="vocab_grad"):
        _value_and_grads(x, tg, keep, "fuse", DSparkLossConfig(), 8)
