"""Eagle3 parity against DeepSpec fixtures: TTT forward, loss, gradients, decoding.

Every fixture set is scanned for ``train_eagle3*`` / ``decode_eagle3*`` files; sizes,
settings and checkpoints come from each manifest.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import fixture_sets, load_manifest
from deepspec_jax import load_target
from deepspec_jax.drafts import eagle3
from deepspec_jax.drafts.eagle3_train import eagle3_loss, ttt_forward
from deepspec_jax.layers import softcap
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.weights.loader import flat_variables

NEAR_TIE = 1e-4  # README: draft argmax gaps below this may legitimately flip


def _cases(prefix: str):
    for fs in fixture_sets():
        for name, entry in load_manifest(fs)["files"].items():
            if name.startswith(prefix):
                yield pytest.param(fs, name, id=f"{os.path.basename(fs)}:{name}")


@functools.lru_cache(maxsize=None)
def _draft(fixture_set: str, checkpoint: str):
    return eagle3.load_eagle3(os.path.join(fixture_set, checkpoint))


def _train_case(fixture_set: str, name: str):
    entry = load_manifest(fixture_set)["files"][name]
    spec = entry["inputs"]
    inputs_path = load_manifest(fixture_set)["files"]["inputs"].get(
        "path", "fixtures/" + spec["inputs_file"])
    inp = load_file(os.path.join(fixture_set, inputs_path))
    ref = load_file(os.path.join(fixture_set, entry["path"]))
    src = lambda ref_name: jnp.asarray(inp[ref_name.split(":", 1)[1]])  # noqa: E731
    args = (jnp.asarray(inp["input_ids"].astype(np.int32)), src(spec["target_hidden_states"]),
            src(spec["target_last_hidden_states"]), jnp.asarray(inp["loss_mask"]),
            jnp.asarray(inp["attention_mask"]))
    model = _draft(fixture_set, spec["checkpoint"])
    assert model.cfg.ttt_length == spec["ttt_length"]
    assert model.cfg.step_loss_decay == pytest.approx(spec["step_loss_decay"])
    return model, args, ref


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("fixture_set,name", list(_cases("train_eagle3")))
def test_ttt_forward_and_loss(fixture_set, name):
    model, args, ref = _train_case(fixture_set, name)
    ids, feats, last_hidden, loss_mask, attn_mask = args
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        logits = m.logits(ttt_forward(m, ids, feats, attn_mask))
        return logits, eagle3_loss(m, ids, feats, last_hidden, loss_mask, attn_mask, vocab_chunk=96)

    logits, out = run(state)
    logits = np.asarray(logits)
    assert logits.shape == ref["draft_logits"].shape
    # Rows past T-k are fully masked queries; we copy the reference's zero attention
    # there, so every entry is compared (position-masked error reported separately).
    assert np.max(np.abs(logits - ref["draft_logits"])) <= 1e-4
    np.testing.assert_array_equal(np.asarray(out.position_masks), ref["position_masks"])
    assert _rel(out.step_losses, ref["step_losses"]) <= 1e-5
    assert _rel(out.loss, ref["total_loss"][0]) <= 1e-5
    # The padded target distribution the reference trains against (fused inside
    # our loss): softmax of softcap(lm_head(target_last_hidden)) shifted by one, then
    # uniform (zero hidden rows past the end give exactly uniform rows, as in
    # eagle3_train; the softcap is Gemma's, none for Qwen3).
    padded = jnp.pad(last_hidden, ((0, 0), (0, model.cfg.ttt_length + 1), (0, 0)))[:, 1:]
    t_probs = np.asarray(jax.nn.softmax(
        softcap(padded @ model.lm_head.get_value(), model.cfg.logit_softcap), axis=-1))
    assert np.max(np.abs(t_probs - ref["target_probs_padded"])) <= 1e-6
    # DeepSpec's logged metrics, where the manifest records them.
    logged = load_manifest(fixture_set)["files"][name].get("deepspec_metrics", {})
    for key, val in logged.items():
        name = key.removeprefix("train/")
        ours = out.metrics.get(name)
        assert ours is not None, key
        if isinstance(val, dict):  # the Gemma-4 set records {num, den}: our sums are num
            step = name.split("@")[1] if "@" in name else "0"
            assert float(out.metrics[f"valid_tokens@{step}"]) == val["den"][0], key
            val = val["num"]
        assert float(ours) == pytest.approx(val[0], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("fixture_set,name", list(_cases("train_eagle3")))
def test_ttt_gradients(fixture_set, name):
    model, args, ref = _train_case(fixture_set, name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        return eagle3_loss(nnx.merge(graphdef, p, rest), *args, vocab_chunk=96).loss

    grads = flat_variables(jax.jit(jax.grad(loss_fn))(params))
    rules = {r.ours: r for r in eagle3.eagle3_rules(model.cfg)}
    seen = set()
    for path, g in grads.items():
        rule = rules[path]
        arr = np.asarray(g.get_value())
        for i, key in enumerate(rule.hf_keys(model.cfg.draft_num_hidden_layers)):
            ours = rule.to_hf(arr[i] if rule.stacked else arr)
            want = ref[f"grad/{key}"]
            assert ours.shape == want.shape, key
            assert _rel(ours, want) <= 1e-4, key
            seen.add(f"grad/{key}")
    # every trainable parameter of the reference has a gradient of ours, and vice versa
    assert seen == {k for k in ref if k.startswith("grad/")}


# ---------------------------------------------------------------------------
# decoding: replay DeepSpec's greedy speculative loop round by round
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _draft_extend(graphdef, state, st, tokens, feats, num_new):
    return eagle3.extend(nnx.merge(graphdef, state), st, tokens, feats, num_new)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draft_propose(graphdef, num_steps, state, st):
    return eagle3.propose(nnx.merge(graphdef, state), st, num_steps, jax.random.key(0),
                          SamplingParams(temperature=0.0))


def _pad(x, n):
    return np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _replay(target, graphdef, state, cfg, prompt, ref, i, bucket=128):
    """Greedy speculative decoding with our draft; verification follows the reference
    proposals so a draft near-tie cannot desynchronise the replay. Returns the number
    of draft decisions compared."""
    gamma = cfg.ttt_length
    margins = ref[f"draft_margins_{i}"]
    proposed = ref[f"proposed_ids_{i}"]
    plen = ref[f"proposal_lengths_{i}"]
    seq = [int(t) for t in prompt]
    n = len(seq)
    out = target.forward(_pad(np.asarray(seq, np.int32), bucket)[None], cfg.target_layer_ids)
    cur = int(np.argmax(np.asarray(out.logits)[0, n - 1]))
    feats = np.asarray(out.features)[0]
    st = eagle3.init_state(cfg, 1, bucket)
    toks = np.asarray(seq[1:] + [cur], np.int32)
    st = _draft_extend(graphdef, state, st, _pad(toks, bucket)[None],
                       _pad(feats[:n], bucket)[None], jnp.asarray([n], jnp.int32))
    compared = 0
    for r in range(len(proposed)):
        assert proposed[r, 0] == cur, f"prompt {i} round {r}: current token"
        prop, st = _draft_propose(graphdef, gamma, state, st)
        ours = np.asarray(prop.tokens)[0]
        theirs = proposed[r, 1:1 + plen[r]]
        for j, t in enumerate(theirs):
            compared += 1
            if ours[j] != t:
                assert margins[r * gamma + j] < NEAR_TIE, (
                    f"prompt {i} round {r} draft token {j}: ours {ours[j]} vs {t}")
                break
        verify = seq + [cur] + [int(t) for t in theirs]
        out = target.forward(_pad(np.asarray(verify, np.int32), bucket)[None], cfg.target_layer_ids)
        greedy = np.argmax(np.asarray(out.logits)[0, len(seq):len(verify)], axis=-1)
        a = 0
        while a < len(theirs) and theirs[a] == greedy[a]:
            a += 1
        assert a + 1 == ref[f"acceptance_lengths_{i}"][r]
        new_feats = np.asarray(out.features)[0, len(seq):len(seq) + a + 1]
        new_toks = np.asarray([int(t) for t in theirs[:a]] + [int(greedy[a])], np.int32)
        seq += [cur] + [int(t) for t in theirs[:a]]
        cur = int(greedy[a])
        st = _draft_extend(graphdef, state, st, _pad(new_toks, gamma + 1)[None],
                           _pad(new_feats, gamma + 1)[None], jnp.asarray([a + 1], jnp.int32))
        assert int(st.lengths[0]) == len(seq)
    full = ref[f"output_ids_{i}"]
    assert (seq + [cur])[:len(full)] == [int(t) for t in full][:len(seq) + 1]
    return compared


@pytest.mark.parametrize("fixture_set,name", list(_cases("decode_eagle3")))
def test_decode_replay(fixture_set, name):
    manifest = load_manifest(fixture_set)
    entry = manifest["files"][name]
    assert entry["inputs"]["temperature"] == 0.0
    target = load_target(os.path.join(fixture_set, manifest["global"]["target_dir"]))
    model = _draft(fixture_set, entry["inputs"]["checkpoint"])
    assert entry["inputs"]["max_proposal_tokens"] == model.cfg.ttt_length
    graphdef, state = nnx.split(model)
    ref = load_file(os.path.join(fixture_set, entry["path"]))
    greedy = load_file(os.path.join(fixture_set, manifest["files"]["decode_target_greedy"]["path"]))
    i = 0
    while f"proposed_ids_{i}" in ref:
        assert _replay(target, graphdef, state, model.cfg, greedy[f"prompt_{i}"], ref, i) > 0
        i += 1
    assert i > 0


@pytest.mark.parametrize("fixture_set,name", list(_cases("decode_eagle3")))
def test_first_round_proposal(fixture_set, name):
    """Prefill + first greedy proposal only (the fast check of the decode layout)."""
    manifest = load_manifest(fixture_set)
    entry = manifest["files"][name]
    target = load_target(os.path.join(fixture_set, manifest["global"]["target_dir"]))
    model = _draft(fixture_set, entry["inputs"]["checkpoint"])
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    bucket = 64
    ref = load_file(os.path.join(fixture_set, entry["path"]))
    greedy = load_file(os.path.join(fixture_set, manifest["files"]["decode_target_greedy"]["path"]))
    i = 0
    while f"proposed_ids_{i}" in ref:
        prompt = greedy[f"prompt_{i}"].astype(np.int32)
        n = len(prompt)
        out = target.forward(_pad(prompt, bucket)[None], cfg.target_layer_ids)
        cur = int(np.argmax(np.asarray(out.logits)[0, n - 1]))
        assert cur == ref[f"proposed_ids_{i}"][0, 0]
        st = eagle3.init_state(cfg, 1, bucket)
        toks = _pad(np.append(prompt[1:], cur).astype(np.int32), bucket)[None]
        st = _draft_extend(graphdef, state, st, toks, _pad(np.asarray(out.features)[0], bucket)[None],
                           jnp.asarray([n], jnp.int32))
        prop, st2 = _draft_propose(graphdef, cfg.ttt_length, state, st)
        assert int(st2.lengths[0]) == n  # proposing commits nothing
        ours = np.asarray(prop.tokens)[0]
        np.testing.assert_array_equal(np.asarray(prop.token_probs), 1.0)  # greedy: one-hot
        theirs = ref[f"proposed_ids_{i}"][0, 1:1 + ref[f"proposal_lengths_{i}"][0]]
        for j, t in enumerate(theirs):
            if ours[j] != t:
                assert ref[f"draft_margins_{i}"][j] < NEAR_TIE, (i, j, ours, theirs)
                break
        i += 1
    assert i > 0


# ---------------------------------------------------------------------------
# building blocks against dense references (the scalable paths the fixture is too
# small to exercise: several row blocks, ragged vocab chunks, query blocks)
# ---------------------------------------------------------------------------


def _dense_soft_ce(xd, xt, w):
    zd, zt = xd @ w, xt @ w
    pt = jax.lax.stop_gradient(jax.nn.softmax(zt, axis=-1))  # the target is data
    ce = -jnp.sum(pt * jax.nn.log_softmax(zd, axis=-1), axis=-1)
    overlap = jnp.sum(jnp.minimum(jax.nn.softmax(zd, axis=-1), pt), axis=-1)
    return ce, overlap, (jnp.argmax(zd, -1) == jnp.argmax(zt, -1)).astype(jnp.float32)


def test_soft_ce_blocks_match_dense():
    from deepspec_jax.drafts.eagle3_train import soft_ce

    kd, kt, kw, kg = jax.random.split(jax.random.key(0), 4)
    xd = jax.random.normal(kd, (37, 8))
    xt = jax.random.normal(kt, (37, 8)).at[-3:].set(0.0)  # zero rows = uniform targets
    w = jax.random.normal(kw, (8, 101))
    g = jax.random.normal(kg, (37,))
    ours = jax.jit(lambda *a: soft_ce(*a, 16, 8, True))(xd, xt, w)
    for a, b in zip(ours, _dense_soft_ce(xd, xt, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    f = lambda fn: lambda xd, w: jnp.sum(g * fn(xd, w)[0])  # noqa: E731
    got = jax.jit(jax.grad(f(lambda xd, w: soft_ce(xd, xt, w, 16, 8, True)), argnums=(0, 1)))(xd, w)
    want = jax.jit(jax.grad(f(lambda xd, w: _dense_soft_ce(xd, xt, w)), argnums=(0, 1)))(xd, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    frozen = jax.jit(jax.grad(f(lambda xd, w: soft_ce(xd, xt, w, 16, 8)), argnums=1))(xd, w)
    assert not np.any(np.asarray(frozen))  # default: frozen lm_head, no gradient


def test_ttt_attention_matches_dense_mask():
    """Causal span + diagonal piece, merged, equals DeepSpec's mask evaluated densely
    over the concatenated keys of all steps, incl. zero rows past seq_len-s."""
    from deepspec_jax.drafts.eagle3_train import ttt_attention
    from deepspec_jax.kernels.attention import dense_attention

    B, T, H, K, D, s = 2, 32, 4, 2, 8, 3

    @jax.jit
    def compare(key):
        keys = jax.random.split(key, 3)
        q = jax.random.normal(keys[0], (B, T, H, D))
        k_all = jax.random.normal(keys[1], (s + 1, B, T, K, D))
        v_all = jax.random.normal(keys[2], (s + 1, B, T, K, D))
        seq_len = jnp.asarray([T, T - 9])
        valid_q = jnp.arange(T)[None] < (seq_len - s)[:, None]
        ours = ttt_attention(q, k_all[0], v_all[0], k_all[1:], v_all[1:], valid_q)
        kv = jnp.arange((s + 1) * T)[None, None]
        qi = jnp.arange(T)[None, :, None]
        sl = (seq_len - s)[:, None, None]
        mask = (qi < sl) & (((qi >= kv) & (kv < sl))
                            | ((kv >= T) & ((kv % T) < sl) & ((kv - qi) % T == 0)))
        cat = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, (s + 1) * T, K, D)  # noqa: E731
        dense, _ = dense_attention(q, cat(k_all), cat(v_all), mask)
        return ours, dense

    ours, dense = compare(jax.random.key(1))
    np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(ours)[1, T - 9 - s:])  # fully masked rows are zero


def test_position_masks_with_padding():
    """Right-padded row: DeepSpec clears the last *real* position of loss_mask, then
    shifts the mask left once per step and multiplies by the attention mask."""
    from deepspec_jax.drafts.eagle3_train import position_masks

    lm = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1]], np.float32)
    attn = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1] * 8], np.float32)
    ttt = 4
    want, mask = [], lm.copy()
    for b in range(2):
        mask[b, int(attn[b].sum()) - 1] = 0
    for s in range(ttt):
        want.append(mask.copy())
        mask = np.concatenate([mask[:, 1:], np.zeros((2, 1), np.float32)], axis=1) * attn
    got = np.asarray(position_masks(jnp.asarray(lm), jnp.asarray(attn), ttt))
    np.testing.assert_array_equal(got, np.stack(want))
    fixed = np.asarray(position_masks(jnp.asarray(lm), jnp.asarray(attn), ttt, corrected=True))
    # corrected: step s, position i is weighted by the mask of token i+s+2
    np.testing.assert_array_equal(fixed[0, 0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(fixed[1, 1], [1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("fixture_set,name", list(_cases("decode_eagle3"))[:1])
def test_propose_sampling_distributions(fixture_set, name):
    """Sampled proposals: full distributions are normalised, probs are those of the
    drawn tokens, and proposing neither advances nor disturbs the committed cache."""
    manifest = load_manifest(fixture_set)
    model = _draft(fixture_set, manifest["files"][name]["inputs"]["checkpoint"])
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    n, bucket = 9, 32
    toks = _pad(rng.integers(0, cfg.vocab_size, n).astype(np.int32), bucket)[None]
    feats = _pad(rng.normal(size=(n, cfg.feature_size)).astype(np.float32), bucket)[None]
    st = _draft_extend(graphdef, state, eagle3.init_state(cfg, 1, bucket), toks, feats,
                       jnp.asarray([n], jnp.int32))

    @jax.jit
    def sampled(state, st, key):
        return eagle3.propose(nnx.merge(graphdef, state), st, cfg.ttt_length, key,
                              SamplingParams(temperature=1.0))

    prop, st2 = sampled(state, st, jax.random.key(3))
    dists = np.asarray(prop.dists)
    assert dists.shape == (1, cfg.ttt_length, cfg.vocab_size)
    np.testing.assert_allclose(dists.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dists, np.asarray(prop.tokens)[..., None], -1)[..., 0],
                               prop.token_probs, rtol=1e-6)
    assert int(st2.lengths[0]) == n
    # re-proposing from the returned state (scratch keys past `lengths`) is unchanged
    again, _ = sampled(state, st2, jax.random.key(3))
    np.testing.assert_array_equal(again.tokens, prop.tokens)
    np.testing.assert_allclose(again.dists, prop.dists, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fixture_set,name", list(_cases("train_eagle3"))[:1])
def test_bfloat16_training_step(fixture_set, name):
    """bf16 parameters and compute: the loss and gradients stay finite and close to
    fp32 (attention softmax and the vocabulary loss run in fp32 inside)."""
    model, args, ref = _train_case(fixture_set, name)
    spec = load_manifest(fixture_set)["files"][name]["inputs"]
    bf = eagle3.load_eagle3(os.path.join(fixture_set, spec["checkpoint"]), dtype=jnp.bfloat16)
    graphdef, params, rest = nnx.split(bf, nnx.Param, ...)

    @jax.jit
    def step(p):
        return jax.value_and_grad(lambda p: eagle3_loss(nnx.merge(graphdef, p, rest), *args).loss)(p)

    loss, grads = step(params)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - float(ref["total_loss"][0])) <= 2e-2 * float(ref["total_loss"][0])
    for path, g in flat_variables(grads).items():
        assert g.get_value().dtype == jnp.bfloat16, path
        assert np.all(np.isfinite(np.asarray(g.get_value(), np.float32))), path
