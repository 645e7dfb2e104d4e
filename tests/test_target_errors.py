"""Bad inputs to target loading/forward raise errors naming the file/field and the fix."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import fixture_sets, load_manifest, write_llama_gguf
from deepspec_jax import load_target
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.weights.safetensors_io import SafetensorsFile, save_checkpoint_dir


@pytest.fixture()
def target_dir(tmp_path):
    fs = fixture_sets()[0]
    src = os.path.join(fs, load_manifest(fs)["global"]["target_dir"])
    dst = tmp_path / "target"
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)
    for f in os.listdir(dst):
        os.chmod(dst / f, 0o644)
    return dst


def _tensors(path):
    f = SafetensorsFile(str(path / "model.safetensors"))
    return {k: np.array(f.get(k)) for k in f.keys()}


def test_missing_shard(target_dir):
    tensors = _tensors(target_dir)
    os.remove(target_dir / "model.safetensors")
    save_checkpoint_dir(str(target_dir), tensors, max_shard_bytes=200_000)
    assert (target_dir / "model.safetensors.index.json").exists()
    load_target(str(target_dir))  # the sharded checkpoint loads
    shard = sorted(p for p in os.listdir(target_dir) if p.startswith("model-"))[1]
    os.remove(target_dir / shard)
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        load_target(str(target_dir))


def test_missing_tensor(target_dir):
    tensors = _tensors(target_dir)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_checkpoint_dir(str(target_dir), tensors)
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_target(str(target_dir))


def test_shape_mismatch(target_dir):
    tensors = _tensors(target_dir)
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:-1]
    save_checkpoint_dir(str(target_dir), tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        load_target(str(target_dir))


def test_leftover_tensor(target_dir):
    tensors = _tensors(target_dir)
    tensors["model.layers.99.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
    save_checkpoint_dir(str(target_dir), tensors)
    with pytest.raises(CheckpointError, match=r"no parameter uses.*layers\.99"):
        load_target(str(target_dir))


def test_unknown_architecture(target_dir):
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (target_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'model_type'.*mamba.*supported"):
        load_target(str(target_dir))


def test_bad_gqa_config(target_dir):
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (target_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_target(str(target_dir))


def test_not_a_model_path(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        load_target(str(tmp_path / "nope"))


def test_layer_id_out_of_range(target_dir):
    target = load_target(str(target_dir))
    n = target.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"layer_ids: \[{n}\] out of range.*0\.\.{n - 1}"):
        target.forward(np.zeros((1, 4), np.int32), layer_ids=(0, n))
    with pytest.raises(ValueError, match="token ids must lie in"):
        target.forward(np.full((1, 4), target.config.vocab_size, np.int32))


def test_unsupported_gguf_quant(tmp_path):
    import gguf

    # Q5_K: 256-value blocks of 176 bytes; the contents do not matter, the type does.
    path = write_llama_gguf(str(tmp_path / "bad.gguf"), "token_embd.weight",
                            np.zeros((64, 176), np.uint8), gguf.GGMLQuantizationType.Q5_K)
    from deepspec_jax.weights.gguf_loader import read_gguf

    with pytest.raises(CheckpointError, match=r"bad\.gguf.*token_embd\.weight.*Q5_K.*not supported"):
        read_gguf(path)


def test_truncated_safetensors(target_dir):
    p = target_dir / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_target(str(target_dir))
