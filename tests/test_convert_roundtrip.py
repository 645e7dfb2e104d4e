"""HF -> JAX dir -> HF must reproduce DeepSpec's checkpoints exactly (config fields,
key set, shapes, dtypes, raw bytes), for every fixture checkpoint, in fp32 and bf16,
single-file and sharded, drafts and targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convert import hf_to_jax, jax_to_hf, parse_size
from convert.common import plan_shards
from convert_helpers import (BF16, assert_same_hf, checkpoint_dirs, ckpt_id, copy_checkpoint,
                             draft_dirs, make_bf16_copy, read_config, read_tensors, target_dirs)
from deepspec_jax import load_draft, load_target
from deepspec_jax.checkpoint import MANIFEST_NAME, PARAMS_DIR, params_metadata, read_manifest
from deepspec_jax.weights.safetensors_io import INDEX_NAME

CKPTS = checkpoint_dirs()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fixture_checkpoints_found():
    assert CKPTS, "no fixture checkpoint directories found (set DEEPSPEC_FIXTURES)"
    assert draft_dirs() and target_dirs()


def _roundtrip(src: str, tmp_path, **export_kw) -> tuple[str, dict]:
    jax_dir, hf_dir = str(tmp_path / "jax"), str(tmp_path / "hf")
    manifest = hf_to_jax(src, jax_dir)
    jax_to_hf(jax_dir, hf_dir, **export_kw)
    return hf_dir, manifest


@pytest.mark.parametrize("src", CKPTS, ids=ckpt_id)
def test_roundtrip_fp32_bit_identical(src, tmp_path):
    hf_dir, manifest = _roundtrip(src, tmp_path)
    assert_same_hf(src, hf_dir)
    # Beyond equal tensors: the files are byte-for-byte what the reference wrote.
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(hf_dir, name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(hf_dir)) == sorted(os.listdir(src))
    stored = {dt for _, dt in params_metadata(str(tmp_path / "jax" / PARAMS_DIR)).values()}
    assert stored == {np.dtype(np.float32)}
    assert manifest["kind"] == ("target" if src in target_dirs() else "draft")
    assert manifest["architecture"] == read_config(src)["architectures"][0]


@pytest.mark.parametrize("src", CKPTS, ids=ckpt_id)
def test_roundtrip_bf16_bit_identical(src, tmp_path):
    bf16 = make_bf16_copy(src, str(tmp_path / "bf16_src"))
    hf_dir, manifest = _roundtrip(bf16, tmp_path)
    assert_same_hf(bf16, hf_dir)
    assert {t.dtype for t in read_tensors(hf_dir).values()} == {BF16}
    # Stored as bf16 in the JAX dir too (no silent upcast to fp32).
    assert {p["dtype"] for p in manifest["params"].values()} == {"bfloat16"}
    stored = {dt for _, dt in params_metadata(str(tmp_path / "jax" / PARAMS_DIR)).values()}
    assert stored == {BF16}


def test_roundtrip_mixed_dtypes(tmp_path):
    """Norm weights fp32, matrices bf16 (as some releases store them): each tensor
    keeps its own dtype through the JAX dir and back."""
    src = draft_dirs()[0]
    tensors = {k: (v if "norm" in k else v.astype(BF16)) for k, v in read_tensors(src).items()}
    mixed = copy_checkpoint(src, str(tmp_path / "mixed"), tensors=tensors)
    hf_dir, manifest = _roundtrip(mixed, tmp_path)
    assert_same_hf(mixed, hf_dir)
    dts = {p: m["dtype"] for p, m in manifest["params"].items()}
    assert dts["hidden_norm"] == "float32" and dts["fc"] == "bfloat16"
    draft = load_draft(str(tmp_path / "jax"))
    from deepspec_jax.weights.loader import flat_variables
    got = {p: str(v.get_value().dtype) for p, v in flat_variables(draft.state).items()}
    assert got["hidden_norm"] == "float32" and got["fc"] == "bfloat16"


@pytest.mark.parametrize("src", [draft_dirs()[0], target_dirs()[0]] if CKPTS else [], ids=ckpt_id)
def test_sharded_export(src, tmp_path):
    max_bytes = 40_000  # far below the fixtures' size: forces many shards
    hf_dir, _ = _roundtrip(src, tmp_path, max_shard_size=max_bytes)
    files = sorted(os.listdir(hf_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors" not in files and INDEX_NAME in files and len(shards) >= 3
    assert all(f == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, f in enumerate(shards))
    with open(os.path.join(hf_dir, INDEX_NAME), encoding="utf-8") as f:
        index = json.load(f)
    tensors = read_tensors(src)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.size for t in tensors.values())
    for shard in shards:  # HF rule: a shard exceeds the limit only if it is a single tensor
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        size = sum(tensors[k].nbytes for k in keys)
        assert size <= max_bytes or len(keys) == 1, (shard, size, keys)
    assert_same_hf(src, hf_dir)
    # The sharded directory loads like the original and converts back to one file.
    back_jax, back_hf = str(tmp_path / "jax2"), str(tmp_path / "hf2")
    hf_to_jax(hf_dir, back_jax)
    jax_to_hf(back_jax, back_hf)
    with open(os.path.join(src, "model.safetensors"), "rb") as a, \
            open(os.path.join(back_hf, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    # Re-exporting single-file into the sharded directory leaves no stale shard/index.
    jax_to_hf(back_jax, hf_dir)
    assert sorted(f for f in os.listdir(hf_dir) if "safetensors" in f) == ["model.safetensors"]
    assert_same_hf(src, hf_dir)


def test_plan_shards_matches_hf_rule():
    t = {k: np.zeros(n, np.uint8) for k, n in [("a", 4), ("b", 4), ("big", 20), ("c", 3), ("d", 6)]}
    # huggingface_hub emits an oversized tensor's shard at once, before the open shard
    assert plan_shards(t, 10) == [["big"], ["a", "b"], ["c", "d"]]
    assert plan_shards(t, 100) == [["a", "b", "big", "c", "d"]]
    hub = pytest.importorskip("huggingface_hub.serialization._base")
    for limit in (5, 8, 10, 11, 20, 37, 100):
        split = hub.split_state_dict_into_shards_factory(
            t, get_storage_size=lambda x: x.nbytes, filename_pattern="m{suffix}.st",
            max_shard_size=limit)
        assert plan_shards(t, limit) == [list(v) for v in split.filename_to_tensors.values()], limit
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("5 parsecs")


def _logits(path: str, ids: np.ndarray) -> np.ndarray:
    return np.asarray(load_target(path).forward(ids).logits)


def test_target_fixture_logits_identical(tmp_path):
    src = target_dirs()[0]
    hf_dir, manifest = _roundtrip(src, tmp_path)
    assert manifest["kind"] == "target"
    ids = np.random.default_rng(0).integers(0, read_config(src)["vocab_size"], (2, 11)).astype(np.int32)
    a, b = _logits(src, ids), _logits(hf_dir, ids)
    assert a.shape == (2, 11, read_config(src)["vocab_size"]) and np.array_equal(a, b)
    # auxiliary files (generation_config.json, ...) travel through the JAX dir
    for name in os.listdir(src):
        assert os.path.exists(os.path.join(hf_dir, name)), name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_target_from_transformers(tie, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = str(tmp_path / "llama")
    model.save_pretrained(src, safe_serialization=True)
    assert ("lm_head.weight" in read_tensors(src)) != tie
    hf_dir, manifest = _roundtrip(src, tmp_path)
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert_same_hf(src, hf_dir)
    with open(os.path.join(src, "model.safetensors"), "rb") as a, \
            open(os.path.join(hf_dir, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    ids = np.random.default_rng(1).integers(0, 300, (1, 9)).astype(np.int32)
    a, b = _logits(src, ids), _logits(hf_dir, ids)
    assert np.array_equal(a, b)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(a, ref, atol=2e-4, rtol=1e-4)


def test_cli_cast_to_bf16(tmp_path):
    """The command-line tools; --dtype bfloat16 casts every tensor and records the new
    dtype in config.json the way save_pretrained would (other fields untouched)."""
    src = draft_dirs()[-1]
    jax_dir, hf_dir = str(tmp_path / "jax"), str(tmp_path / "hf")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for mod, args in (("convert.torch_to_jax", ["--src", src, "--dst", jax_dir, "--dtype", "bfloat16"]),
                      ("convert.jax_to_torch", ["--src", jax_dir, "--dst", hf_dir,
                                                "--max_shard_size", "100KB"])):
        r = subprocess.run([sys.executable, "-m", mod, *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "wrote" in r.stdout
    assert read_manifest(jax_dir)["params"]["fc"]["dtype"] == "bfloat16"
    raw_src, raw_out = read_config(src), read_config(hf_dir)
    assert raw_out.pop("dtype") == "bfloat16"
    raw_src.pop("dtype")
    assert raw_out == raw_src
    got, want = read_tensors(hf_dir), read_tensors(src)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == BF16 and got[k].tobytes() == want[k].astype(BF16).tobytes(), k
    assert os.path.exists(os.path.join(hf_dir, INDEX_NAME))
    # errors exit 1 with a message on stderr, no traceback
    r = subprocess.run([sys.executable, "-m", "convert.jax_to_torch", "--src", src, "--dst",
                        str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "not a JAX checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_reconvert_into_existing_jax_dir(tmp_path):
    """Converting a different checkpoint into an existing JAX dir replaces it fully."""
    a, b = draft_dirs()[0], target_dirs()[0]
    jax_dir = str(tmp_path / "jax")
    hf_to_jax(a, jax_dir)
    hf_to_jax(b, jax_dir)
    assert read_manifest(jax_dir)["kind"] == "target"
    assert os.path.exists(os.path.join(jax_dir, MANIFEST_NAME))
    jax_to_hf(jax_dir, str(tmp_path / "hf"))
    assert_same_hf(b, str(tmp_path / "hf"))
