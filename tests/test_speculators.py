"""vLLM ``speculators`` format: export, import, and agreement with the real library.

Our fixture drafts are exported with ``convert.to_speculators`` and loaded by
speculators' own model classes (``from_pretrained``, the verifier weights from the
fixture target directory); the same weights then give the same logits (DSpark:
Markov-corrected, and confidence logits) on the same ids and target features, fp32.
Speculators' training forward samples anchors at random: its ``select_anchors`` is
replaced by fixed anchors. Drafts built and saved by speculators itself load here and
decode losslessly. Round trips are bit-exact; what one format cannot express is refused.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("speculators")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import fixture_sets, fp32_tol, load_manifest  # noqa: E402
from convert.speculators_format import from_speculators, to_speculators  # noqa: E402
from deepspec_jax import load_draft, load_target, speculative_generate  # noqa: E402
from deepspec_jax.draft_vocab import select_draft_vocab  # noqa: E402
from deepspec_jax.drafts import restrict_vocab  # noqa: E402
from deepspec_jax.drafts.dspark_train import DSparkBatch, draft_logits, train_forward  # noqa: E402
from deepspec_jax.drafts.eagle3_train import ttt_forward  # noqa: E402
from deepspec_jax.checkpoint import params_to_hf  # noqa: E402
from deepspec_jax.drafts.speculators import deepspec_config  # noqa: E402
from deepspec_jax.errors import CheckpointError, ConfigError  # noqa: E402
from deepspec_jax.weights.loader import flat_variables  # noqa: E402

FS = fixture_sets()[0]   # the Qwen3 set (speculators has no Gemma-4 draft layers)
TARGET_DIR = os.path.join(FS, load_manifest(FS)["global"]["target_dir"])
ANCHORS = [9, 14, 22, 30, 36]        # row 0 of the fixture inputs; blocks end inside it


@functools.lru_cache(maxsize=None)
def _target():
    return load_target(TARGET_DIR)


@functools.lru_cache(maxsize=None)
def _inputs():
    return load_file(os.path.join(FS, "fixtures", "inputs.safetensors"))


def _params(draft) -> dict[str, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in flat_variables(draft.state).items()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for p in pa:
        assert pa[p].dtype == pb[p].dtype and np.array_equal(pa[p], pb[p]), p


K = 96   # reduced draft vocabulary of the tests (of the target's 512)


def _reduced(name: str, tmp_path) -> str:
    """The fixture draft restricted to K tokens (``restrict_vocab``, speculators' selection
    from seeded counts), saved as a JAX dir shared with the target (lm_head stored)."""
    rng = np.random.default_rng(7)
    d2t, t2d = select_draft_vocab(dict(enumerate(rng.integers(0, 1000, 512).tolist())), K, 512)
    out = str(tmp_path / f"{name}_k{K}")
    restrict_vocab(load_draft(os.path.join(FS, name)), d2t, t2d).save(out, share_with_target=True)
    return out


def _src(name: str, tmp_path) -> str:
    """A fixture draft dir; ``<name>@K``: its reduced-vocabulary JAX dir."""
    return _reduced(name[:-2], tmp_path) if name.endswith("@K") else os.path.join(FS, name)


def _load_src(name: str, tmp_path):
    return load_draft(_src(name, tmp_path), target=_target())


def _export(name: str, tmp_path) -> str:
    dst = str(tmp_path / f"spec_{name}")
    to_speculators(_src(name, tmp_path), dst, target=TARGET_DIR)
    return dst


def _eager(model):
    """Dense float masks instead of flex attention (CPU, no torch.compile)."""
    from speculators.models.attention import create_float_mask

    model.config.transformer_layer_config._attn_implementation = "eager"
    model._attn_impl, model._create_mask_fn = "eager", create_float_mask
    return model.eval()


# ---------------------------------------------------------------------------
# export -> speculators' own classes: same logits
# ---------------------------------------------------------------------------

def _spec_block_logits(model, monkeypatch):
    """speculators' DFlash/DSpark logits (Markov-corrected) and confidence logits for row 0
    of the fixture inputs at ``ANCHORS``, through its own ``_backbone_forward`` and heads
    exactly as ``DSparkDraftModel.forward`` combines them."""
    import speculators.models.dflash.core as dcore

    x = _inputs()
    anchors = torch.tensor(ANCHORS)
    monkeypatch.setattr(dcore, "select_anchors",
                        lambda mask, n, k: (anchors, torch.ones(len(ANCHORS), dtype=torch.bool)))
    ids = torch.from_numpy(x["input_ids"][:1])
    T = ids.shape[1]
    with torch.no_grad():
        hidden, logits, _, _, idx = model._backbone_forward(
            torch.from_numpy(x["target_hidden_states_dspark"][:1]), ids, torch.ones(1, T),
            torch.from_numpy(x["target_last_hidden_states"][:1]), torch.zeros(1, T, dtype=torch.long),
            max_anchors=len(ANCHORS))
        n, k = len(ANCHORS), model.block_size
        hidden = hidden.view(n, k, -1)
        logits = logits.view(n, k, -1)
        prev = ids[0, idx].view(n, k)           # sample_from_anchor: slot k's prev = x[a+k]
        conf = None
        head = getattr(model, "markov_head", None)
        if head is not None:
            emb = head.prev_embeddings(prev)
            logits = logits + head.block_bias(prev_token_ids=prev, hidden_states=hidden, prev_emb=emb)
        if getattr(model, "confidence_head", None) is not None:
            feats = torch.cat([hidden, emb], -1) if model.config.confidence_head_with_markov else hidden
            conf = model.confidence_head(feats)
    return logits.numpy(), None if conf is None else conf.numpy()


def _our_block_logits(draft):
    x = _inputs()
    batch = DSparkBatch(jnp.asarray(x["input_ids"][:1]), jnp.ones((1, 40), jnp.int32),
                        jnp.asarray(x["target_hidden_states_dspark"][:1]),
                        jnp.asarray(x["target_last_hidden_states"][:1]))

    @jax.jit
    def run(state, batch):
        model = nnx.merge(draft.graphdef, state)
        out = train_forward(model, batch, jnp.asarray([ANCHORS]), jnp.ones((1, 5), bool))
        return draft_logits(model, out)[0], out.confidence_logits

    logits, conf = run(draft.state, batch)
    return np.asarray(logits), None if conf is None else np.asarray(conf[0])


# vanilla is gated's bias without the gate: its Markov path is covered by gated and rnn.
# "@K": the draft with a reduced vocabulary (logits over K; markov_w2, lm_head [K, .]).
@pytest.mark.parametrize("name", ["dspark_rnn", "dflash", "dspark_gated@K"])
def test_block_drafts_match_speculators(name, tmp_path, monkeypatch):
    from speculators import SpeculatorModel

    dst = _export(name, tmp_path)
    model = _eager(SpeculatorModel.from_pretrained(dst))
    assert type(model).__name__ == ("DFlashDraftModel" if name == "dflash" else "DSparkDraftModel")
    assert not torch.isnan(model.embed_tokens.weight).any()
    assert model.use_draft_vocab == name.endswith("@K")
    want_logits, want_conf = _spec_block_logits(model, monkeypatch)
    ours = _load_src(name, tmp_path)
    logits, conf = _our_block_logits(ours)
    assert logits.shape == want_logits.shape == (5, 4, K if name.endswith("@K") else 512)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=fp32_tol(want_logits, 2e-6))
    assert (want_conf is None) == (conf is None) == (name == "dflash")
    if conf is not None:
        np.testing.assert_allclose(conf, want_conf, rtol=0, atol=2e-6)
    # the same draft read back here is the original, bit for bit
    _assert_same_params(load_draft(dst, target=_target()), ours)


@pytest.mark.parametrize("name", ["eagle3", "eagle3@K"])
def test_eagle3_matches_speculators(name, tmp_path):
    """Two TTT steps (the second on the draft's own hidden states, teacher-forced ids):
    speculators' forward with its data shift (hidden i with token i+1), logits taken at
    its lm_head, against ``eagle3_train.ttt_forward``."""
    from speculators import SpeculatorModel

    dst = _export(name, tmp_path)
    model = _eager(SpeculatorModel.from_pretrained(dst))
    x = _inputs()
    T = x["input_ids"].shape[1]
    got = []
    model.lm_head.register_forward_hook(lambda m, i, o: got.append(o[0].detach().numpy()))
    with torch.no_grad():
        model(torch.from_numpy(x["target_hidden_states_eagle3"][:1, :-1]),
              torch.from_numpy(x["input_ids"][:1, 1:]), torch.zeros(1, T - 1, dtype=torch.long),
              position_ids=torch.arange(T - 1)[None], ttt_steps=2)
    draft = _load_src(name, tmp_path)

    @jax.jit
    def run(state, ids, feats):
        model = nnx.merge(draft.graphdef, state)
        return model.logits(ttt_forward(model, ids, feats, ttt_length=2))[:, 0]

    ours = np.asarray(run(draft.state, jnp.asarray(x["input_ids"][:1]),
                          jnp.asarray(x["target_hidden_states_eagle3"][:1])))  # [steps, T, V]
    assert ours.shape[-1] == got[0].shape[-1] == (K if name.endswith("@K") else 512)
    for s in range(2):
        n = T - 2 - s                                          # positions with real tokens
        np.testing.assert_allclose(ours[s, :n], got[s][:n], rtol=0,
                                   atol=fp32_tol(got[s][:n], 2e-6))
    _assert_same_params(load_draft(dst), draft)   # Eagle3 files keep embed/lm_head


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

# the library comparisons above check the round trip of their drafts too
@pytest.mark.parametrize("name", ["dspark_vanilla", "eagle3", "dflash@K"])
def test_round_trip_bit_exact(name, tmp_path):
    """JAX dir (shared with the target) -> speculators -> ours, and speculators -> JAX dir
    via convert.from_speculators: identical parameters (d2t/t2d included)."""
    orig = _load_src(name, tmp_path)
    target = _target()
    orig.save(str(tmp_path / "jax"), share_with_target=True)
    spec = str(tmp_path / "spec")
    to_speculators(str(tmp_path / "jax"), spec, target=TARGET_DIR,
                   verifier_name_or_path="Qwen/Qwen3-tiny")
    raw = json.load(open(os.path.join(spec, "config.json")))
    assert raw["speculators_config"]["verifier"] == {"architectures": ["Qwen3ForCausalLM"],
                                                     "name_or_path": "Qwen/Qwen3-tiny"}
    if name.endswith("@K"):
        assert raw["draft_vocab_size"] == K
        sp = load_file(os.path.join(spec, "model.safetensors"))
        assert sp["d2t"].dtype == np.int64 and sp["t2d"].dtype == np.bool_
        assert sp["lm_head.weight"].shape == (K, 64)
    back = load_draft(spec, target=target)
    _assert_same_params(back, orig)
    assert back.kind == orig.kind and back.config.target_layer_ids == orig.config.target_layer_ids
    from_speculators(spec, str(tmp_path / "jax2"), target=TARGET_DIR)
    _assert_same_params(load_draft(str(tmp_path / "jax2"), target=target), orig)
    if not name.startswith("eagle3"):   # embed is not in the file: the target is required
        with pytest.raises(CheckpointError, match="load_draft\\(path, target="):
            load_draft(spec)
    if name == "dflash@K":   # no lm_head stored: the target's rows at t2d, as speculators does
        sp = load_file(os.path.join(spec, "model.safetensors"))
        del sp["lm_head.weight"]
        from safetensors.numpy import save_file
        save_file(sp, os.path.join(spec, "model.safetensors"), metadata={"format": "pt"})
        _assert_same_params(load_draft(spec, target=target), orig)


def test_cli(tmp_path):
    from convert import from_speculators as fs_cli, to_speculators as ts_cli

    src = os.path.join(FS, "dspark_gated")
    assert ts_cli.main([f"--src={src}", f"--dst={tmp_path / 's'}",
                        f"--target={TARGET_DIR}"]) == 0
    assert fs_cli.main([f"--src={tmp_path / 's'}", f"--dst={tmp_path / 'j'}",
                        f"--target={TARGET_DIR}"]) == 0
    _assert_same_params(load_draft(str(tmp_path / "j"), target=_target()), load_draft(src))
    assert ts_cli.main([f"--src={tmp_path / 's'}", f"--dst={tmp_path / 'x'}"]) == 1
    # --dtype casts the floating tensors (how the default draft ships: bf16)
    assert ts_cli.main([f"--src={src}", f"--dst={tmp_path / 'b'}", f"--target={TARGET_DIR}",
                        "--dtype=bfloat16"]) == 0
    got, want = _params(load_draft(str(tmp_path / "b"), target=_target())), _params(
        load_draft(src, dtype="bfloat16"))
    assert got.keys() == want.keys()
    for p in set(got) - {"embed", "lm_head"}:     # stored; embed/lm_head are the target's
        assert got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]), p


# ---------------------------------------------------------------------------
# a draft saved by speculators decodes here losslessly
# ---------------------------------------------------------------------------

def _speculators_draft(kind: str, path: str, reduced: bool) -> str:
    """A speculators draft built with its own classes (seeded random init; embed/lm_head
    loaded from the fixture target as its loader does; ``reduced``: K tokens, its d2t/t2d
    from our selection), saved with save_pretrained."""
    from transformers import Qwen3Config

    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    t = json.load(open(os.path.join(TARGET_DIR, "config.json")))
    V, layers = t["vocab_size"], 1 if kind == "eagle3" else 2
    tl = Qwen3Config(**{k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                          "num_attention_heads", "num_key_value_heads",
                                          "head_dim", "max_position_embeddings", "rms_norm_eps",
                                          "rope_parameters")}, num_hidden_layers=layers,
                     tie_word_embeddings=False)
    sc = SpeculatorsConfig(algorithm=kind, default_proposal_method="greedy",
                           proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
                           verifier=VerifierConfig(name_or_path=TARGET_DIR,
                                                   architectures=t["architectures"]))
    torch.manual_seed(0)
    if kind == "eagle3":
        model = Eagle3DraftModel(Eagle3SpeculatorConfig(
            transformer_layer_config=tl, draft_vocab_size=K if reduced else V,
            eagle_aux_hidden_state_layer_ids=[1, 2, 3, 4, 5], speculators_config=sc))
    else:
        model = DSparkDraftModel(DSparkSpeculatorConfig(
            transformer_layer_config=tl, draft_vocab_size=K if reduced else V, block_size=3,
            aux_hidden_state_layer_ids=[0, 2, 4], mask_token_id=V - 1,
            markov_rank=8, markov_head_type="rnn", speculators_config=sc))
    if reduced:
        d2t, t2d = select_draft_vocab({i: (i * 7919) % 1000 for i in range(V)}, K, V)
        model.load_vocab_mappings(torch.from_numpy(t2d), torch.from_numpy(d2t))
    model.load_verifier_weights()
    model.save_pretrained(path)
    return path


def _check_speculators_saved(kind: str, path: str):
    """load_draft of a speculators-saved dir: every parameter is the tensor speculators
    holds (transposed where ours is [in, out]), d2t/t2d included."""
    from speculators import SpeculatorModel

    sd = {k: v.numpy() for k, v in SpeculatorModel.from_pretrained(path).state_dict().items()
          if v is not None and not k.startswith("verifier_")}
    draft = load_draft(path, target=_target())
    assert draft.kind == kind and draft.family.width(draft.config) == 3
    if kind == "dspark":
        assert draft.config.target_layer_ids == (-1, 1, 3)   # aux 0 = the embeddings
    hf = params_to_hf(draft.spec, draft.state, draft.hf_dtypes)
    assert set(hf) == set(sd)
    for k, v in hf.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    return draft


@pytest.mark.parametrize("kind,reduced", [("eagle3", False), ("eagle3", True), ("dspark", False)])
def test_speculators_saved_draft_loads(kind, reduced, tmp_path):
    _check_speculators_saved(kind, _speculators_draft(kind, str(tmp_path / kind), reduced))


def test_speculators_saved_draft_decodes_losslessly(tmp_path):
    """A reduced-vocabulary DSpark saved by speculators: T=0 output = the target's greedy."""
    target = _target()
    draft = _check_speculators_saved("dspark", _speculators_draft("dspark", str(tmp_path), True))
    assert draft.config.draft_vocab_size == K
    # the target's greedy continuations recorded by the reference (no near ties early on)
    greedy = load_file(os.path.join(FS, "fixtures", "decode_target_greedy.safetensors"))
    n = 12
    prompts = [greedy[f"prompt_{i}"].tolist() for i in range(2)]
    ref = [greedy[f"output_ids_{i}"][len(p):len(p) + n].tolist() for i, p in enumerate(prompts)]
    assert all(greedy[f"margins_{i}"][:n].min() > 1e-3 for i in range(2))
    out = speculative_generate(target, draft, prompts, max_new_tokens=n)
    assert [r.tokens for r in out] == ref


# ---------------------------------------------------------------------------
# what one format cannot express: field-by-field errors
# ---------------------------------------------------------------------------

def _spec_raw(tmp_path, name="dspark_rnn") -> dict:
    return json.load(open(os.path.join(_export(name, tmp_path), "config.json")))


@pytest.mark.parametrize("field,value,match", [
    ("speculators_model_type", "mtp", "speculators_model_type"),
    ("sample_from_anchor", False, "sample_from_anchor"),
    ("draft_vocab_size", 1024, "draft_vocab_size"),
    ("target_hidden_size", 128, "target_hidden_size"),
    ("mask_token_id", None, "mask_token_id"),
    ("aux_hidden_state_layer_ids", [1, 3, 6], "final hidden state"),
    ("aux_hidden_state_layer_ids", None, "aux_hidden_state_layer_ids"),
    ("transformer_layer_config.layer_types", ["full_attention", "sliding_attention"],
     "sliding-window"),
    ("transformer_layer_config.model_type", "llama", "Llama"),
    ("transformer_layer_config.attention_bias", True, "attention_bias"),
])
def test_import_refusals(tmp_path, field, value, match):
    raw = _spec_raw(tmp_path)
    node, *path = field.split(".")
    if path:
        raw[node][path[0]] = value
    else:
        raw[node] = value
    with pytest.raises(ConfigError, match=match):
        deepspec_config(raw, "config.json", target_layers=6)


@pytest.mark.parametrize("field", ["norm_before_fc", "fc_norm", "norm_before_residual",
                                   "norm_output"])
def test_import_refuses_eagle3_norm_variants(tmp_path, field):
    raw = _spec_raw(tmp_path, "eagle3")
    deepspec_config(raw, "config.json", target_layers=6)
    with pytest.raises(ConfigError, match=field):
        deepspec_config({**raw, field: True}, "config.json", target_layers=6)
    for aux in ([1, 2, 3], [0, 1, 2, 3, 4]):
        with pytest.raises(ConfigError, match="eagle_aux_hidden_state_layer_ids"):
            deepspec_config({**raw, "eagle_aux_hidden_state_layer_ids": aux}, "config.json",
                            target_layers=6)
    layers = copy.deepcopy(raw)
    layers["transformer_layer_config"].update(num_hidden_layers=2,
                                              layer_types=["full_attention"] * 2)
    with pytest.raises(ConfigError, match="exactly one decoder layer"):
        deepspec_config(layers, "config.json", target_layers=6)


def test_import_needs_target_depth(tmp_path):
    raw = _spec_raw(tmp_path, "eagle3")
    raw["speculators_config"]["verifier"]["name_or_path"] = "some/hub-id"
    with pytest.raises(ConfigError, match="num_target_layers"):
        deepspec_config(raw, "config.json")
    assert deepspec_config(raw, "config.json", target_layers=6)["num_target_layers"] == 6


def test_export_refusals(tmp_path):
    gemma = [fs for fs in fixture_sets() if fs != FS]
    if gemma:   # Gemma-4 drafts have no speculators counterpart
        with pytest.raises(ConfigError, match="Gemma-4"):
            to_speculators(os.path.join(gemma[0], "dflash"), str(tmp_path / "g"))
    # a DFlash draft whose embed_tokens is not its target's cannot be expressed
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(FS, "dflash"), bad)
    t = load_file(os.path.join(bad, "model.safetensors"))
    t["embed_tokens.weight"] = t["embed_tokens.weight"] * 2
    from safetensors.numpy import save_file
    save_file(t, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="embed_tokens.weight differs"):
        to_speculators(bad, str(tmp_path / "out"), target=TARGET_DIR)
    with pytest.raises(ConfigError, match="already a speculators"):
        to_speculators(_export("dflash", tmp_path), str(tmp_path / "again"))
