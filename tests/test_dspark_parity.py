"""DSpark/DFlash parity with the reference's golden fixtures (every fixture set).

Training: the reference checkpoint is loaded through ``dspark_rules`` + stream_params,
the forward runs with the fixture's fixed anchors in fp32, and every recorded output,
loss piece and gradient is compared. Decoding: the draft's greedy proposals and
confidence logits are replayed round by round against the reference evaluator's
record (the target's output fixes the committed text, so rounds are independent of
our own proposals). All sizes and settings come from each set's manifest.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_sets, load_manifest
from deepspec_jax.drafts import dspark_train as T
from deepspec_jax.drafts.dspark import ARCHITECTURES, DSparkLossConfig, load_dspark_checkpoint
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.weights.safetensors_io import SafetensorsFile

ATOL = 1e-4        # max-abs for logits / confidences
RTOL_LOSS = 1e-5   # relative, loss pieces
RTOL_GRAD = 1e-4   # ||g - g_ref|| / ||g_ref||


def _is_dspark_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return (json.load(f).get("architectures") or [None])[0] in ARCHITECTURES.values()


def _cases(prefix: str):
    out = []
    for fs in fixture_sets():
        files = load_manifest(fs)["files"]
        for name, entry in sorted(files.items()):
            ck = (entry.get("inputs") or {}).get("checkpoint")
            if name.startswith(prefix) and ck and _is_dspark_dir(os.path.join(fs, ck)):
                out.append(pytest.param(fs, name, id=f"{os.path.basename(fs)}-{name}"))
    return out


def _array(fs: str, entry: dict, ref: str) -> np.ndarray:
    """``"file:key"`` references as used in the manifest (file = a manifest files entry)."""
    fname, key = ref.split(":")
    return SafetensorsFile(os.path.join(fs, load_manifest(fs)["files"][fname]["path"])).get(key)


@functools.lru_cache(maxsize=None)
def _draft(ck_dir: str):
    return load_dspark_checkpoint(ck_dir)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_outputs(graphdef, state, batch, anchors, keep):
    model = nnx.merge(graphdef, state)
    out = T.train_forward(model, batch, anchors, keep)
    return out, T.draft_logits(model, out), T.aligned_target_logits(model, out)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("fs,name", _cases("train_"))
def test_train_parity(fs, name):
    entry = load_manifest(fs)["files"][name]
    inp = entry["inputs"]
    fx = SafetensorsFile(os.path.join(fs, entry["path"]))
    model = _draft(os.path.join(fs, inp["checkpoint"]))
    src = SafetensorsFile(os.path.join(fs, load_manifest(fs)["files"]["inputs"]["path"]))
    batch = T.DSparkBatch(jnp.asarray(src.get("input_ids"), jnp.int32),
                          jnp.asarray(src.get("loss_mask"), jnp.int32),
                          jnp.asarray(_array(fs, entry, inp["target_hidden_states"])),
                          jnp.asarray(_array(fs, entry, inp["target_last_hidden_states"])))
    anchors = jnp.asarray(np.asarray(inp["anchor_positions"]), jnp.int32)
    keep = jnp.asarray(np.asarray(inp["block_keep_mask"]) > 0)
    np.testing.assert_array_equal(np.asarray(anchors), fx.get("anchor_positions"))
    kw = inp["loss_kwargs"]
    loss_cfg = DSparkLossConfig(float(kw["ce_loss_alpha"]), float(kw["l1_loss_alpha"]),
                                float(kw["confidence_head_alpha"]), float(kw["loss_decay_gamma"]))

    graphdef, state = nnx.split(model)
    out, logits, aligned = _forward_outputs(graphdef, state, batch, anchors, keep)
    kept = np.asarray(keep)
    # Dummy blocks are compared too: we reproduce the zero attention output there.
    assert np.abs(np.asarray(logits) - fx.get("draft_logits")).max() <= ATOL
    assert np.abs(np.asarray(aligned) - fx.get("aligned_target_logits"))[kept].max() <= ATOL
    np.testing.assert_array_equal(np.asarray(out.targets.target_ids), fx.get("target_ids"))
    np.testing.assert_array_equal(np.asarray(out.targets.eval_mask), fx.get("eval_mask") > 0)
    np.testing.assert_array_equal(np.asarray(out.block_keep_mask), fx.get("block_keep_mask") > 0)
    if "confidence_pred" in fx.keys():
        assert out.confidence_logits is not None
        assert np.abs(np.asarray(out.confidence_logits) - fx.get("confidence_pred")).max() <= ATOL
    else:
        assert out.confidence_logits is None

    g, params, rest = T.split_trainable(model)
    # A small anchor chunk exercises the chunked (padded) vocab pass.
    res, grads = T.loss_and_grads(g, params, rest, batch, anchors, keep, loss_cfg, 4)
    np.testing.assert_allclose(np.asarray(res.per_token["loss_weight_mask"]),
                               fx.get("loss_weight_mask"), rtol=RTOL_LOSS, atol=1e-7)
    assert np.abs(np.asarray(res.per_token["accept_rate_3d"]) - fx.get("accept_rate_3d")).max() <= ATOL
    for key, value in res.terms.items():
        np.testing.assert_allclose(float(value), float(fx.get(key)[0]), rtol=RTOL_LOSS, atol=1e-7,
                                   err_msg=key)
    np.testing.assert_allclose(float(res.total), float(fx.get("total_loss")[0]), rtol=RTOL_LOSS)

    ours = T.grads_to_hf(g, grads, rest)
    ref = {k[len("grad/"):]: fx.get(k) for k in fx.keys() if k.startswith("grad/")}
    assert sorted(ours) == sorted(ref), "trainable parameter sets differ"
    worst = max((_rel(ours[k], ref[k]), k) for k in ref)
    assert worst[0] <= RTOL_GRAD, worst
    frozen = {".".join(map(str, p)) for p, _ in rest.flat_state()}
    assert {"embed", "lm_head"} <= frozen and not ({"embed", "lm_head"} & set(
        ".".join(map(str, p)) for p, _ in grads.flat_state()))


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _extend(graphdef, state, cache, features, num_new):
    return nnx.merge(graphdef, state).extend_context(cache, features, num_new)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _propose(graphdef, state, cache, current):
    return nnx.merge(graphdef, state).propose(cache, current, jax.random.key(0),
                                               SamplingParams())


def _margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0])


@pytest.mark.slow
@pytest.mark.parametrize("fs,name", _cases("decode_"))
def test_decode_proposals(fs, name):
    """Every round: features of the verified tokens extend the draft cache, the
    rejected tail is rolled back by lowering ``lengths``, and the greedy proposal and
    confidence logits must match the reference evaluator's."""
    from deepspec_jax.target import load_target

    man = load_manifest(fs)
    entry = man["files"][name]
    fx = SafetensorsFile(os.path.join(fs, entry["path"]))
    greedy = SafetensorsFile(os.path.join(fs, man["files"]["decode_target_greedy"]["path"]))
    target = load_target(os.path.join(fs, man["global"]["target_dir"]))
    model = _draft(os.path.join(fs, entry["inputs"]["checkpoint"]))
    graphdef, state = nnx.split(model)
    ids_of = model.cfg.target_layer_ids
    near_tie = float(man["global"]["near_tie_threshold"])
    summary = man["decode_summary"][name]
    k = model.cfg.block_size
    # One width for every prompt so each compiled function is traced once.
    width = max(len(fx.get(f"output_ids_{i}")) for i in range(len(summary))) + k + 1
    for i, info in enumerate(summary):
        out_ids = fx.get(f"output_ids_{i}")
        p_len = len(greedy.get(f"prompt_{i}"))
        proposed = fx.get(f"proposed_ids_{i}")
        acc = fx.get(f"acceptance_lengths_{i}")
        prop_len = fx.get(f"proposal_lengths_{i}")
        conf_ref = fx.get(f"confidence_logits_{i}") if f"confidence_logits_{i}" in fx.keys() else None
        cache = model.init_cache(1, width)
        padded = np.zeros((1, width), np.int32)
        padded[0, :p_len] = out_ids[:p_len]
        feats = np.asarray(target.forward(padded, ids_of).features)  # numpy: no per-slice compiles
        cache = _extend(graphdef, state, cache, feats[:, :p_len], jnp.asarray([p_len]))
        pos, excused = p_len, 0
        for r in range(len(acc)):
            assert int(cache.lengths[0]) == pos and proposed[r, 0] == out_ids[pos]
            prop = _propose(graphdef, state, cache, jnp.asarray([out_ids[pos]], jnp.int32))
            toks, logits = np.asarray(prop.tokens[0]), np.asarray(prop.logits[0])
            n = int(prop_len[r])
            ref = proposed[r, 1:1 + n]
            bad = np.nonzero(toks[:n] != ref)[0]
            upto = n if bad.size == 0 else int(bad[0])
            if bad.size:
                m = _margin(logits[upto])
                assert m < near_tie, (name, i, r, toks, ref, m)
                excused += 1
            if conf_ref is not None:
                c = np.asarray(prop.confidence_logits[0])
                j = min(upto + 1, k)  # confidence at slot j uses token j-1, which matched
                assert np.abs(c[:j] - conf_ref[r, :j]).max() <= ATOL, (name, i, r)
            # Verify pass: features of [current, drafts]; keep only the accepted prefix.
            padded[0, :pos + 1 + n] = np.concatenate([out_ids[:pos + 1], ref])
            feats = np.asarray(target.forward(padded, ids_of).features)
            cache = _extend(graphdef, state, cache, feats[:, pos:pos + 1 + k],
                            jnp.asarray([1 + n]))
            cache = cache._replace(lengths=jnp.asarray([pos + int(acc[r])], jnp.int32))
            pos += int(acc[r])
        assert excused <= info["draft_near_ties"], (name, i, excused)
