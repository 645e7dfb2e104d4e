"""Broken checkpoints fail with ConfigError/CheckpointError whose message names the
file, the field or tensor at fault and the fix -- in load_draft and both converters."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from convert import hf_to_jax, jax_to_hf
from convert_helpers import copy_checkpoint, draft_dirs, read_config, read_tensors, target_dirs
from deepspec_jax import load_draft
from deepspec_jax.checkpoint import MANIFEST_NAME, PARAMS_DIR
from deepspec_jax.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def src():
    return draft_dirs()[0]


@pytest.fixture(scope="module")
def jax_src(src, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("jax") / "ok")
    hf_to_jax(src, d)
    return d


def _jax_copy(jax_src, tmp_path) -> str:
    d = str(tmp_path / "jax")
    shutil.copytree(jax_src, d)
    return d


def _both_hf_paths(d, tmp_path):
    """The same HF-side error must come from load_draft and from the converter."""
    return [lambda: load_draft(d), lambda: hf_to_jax(d, str(tmp_path / "out"))]


def test_unknown_architecture(src, tmp_path):
    raw = read_config(src)
    raw["architectures"] = ["Qwen3MysteryDraft"]
    d = copy_checkpoint(src, str(tmp_path / "c"), raw=raw)
    for call in _both_hf_paths(d, tmp_path):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert os.path.join(d, "config.json") in msg and "'architectures'" in msg
        assert "Qwen3MysteryDraft" in msg and "Qwen3DSparkModel" in msg and "registry" in msg
    assert not os.path.exists(tmp_path / "out" / MANIFEST_NAME)


def test_missing_tensor(src, tmp_path):
    tensors = read_tensors(src)
    del tensors["fc.weight"]
    d = copy_checkpoint(src, str(tmp_path / "c"), tensors=tensors)
    for call in _both_hf_paths(d, tmp_path):
        with pytest.raises(CheckpointError, match=r"missing 1 tensor.*'fc\.weight'") as e:
            call()
        assert d in str(e.value)


def test_misshaped_tensor(src, tmp_path):
    tensors = read_tensors(src)
    key = "layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1]
    d = copy_checkpoint(src, str(tmp_path / "c"), tensors=tensors)
    for call in _both_hf_paths(d, tmp_path):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert os.path.join(d, "model.safetensors") in msg and repr(key) in msg
        assert "(127, 64)" in msg and "(128, 64)" in msg and "config.json" in msg


def test_unexpected_tensor(src, tmp_path):
    tensors = read_tensors(src)
    tensors["layers.7.mlp.up_proj.weight"] = tensors["layers.1.mlp.up_proj.weight"]
    d = copy_checkpoint(src, str(tmp_path / "c"), tensors=tensors)
    with pytest.raises(CheckpointError, match=r"no parameter uses.*layers\.7\.mlp\.up_proj"):
        load_draft(d)


def test_missing_config(src, tmp_path):
    d = copy_checkpoint(src, str(tmp_path / "c"))
    os.remove(os.path.join(d, "config.json"))
    for call in _both_hf_paths(d, tmp_path):
        with pytest.raises(ConfigError, match="config.json: file not found") as e:
            call()
        assert d in str(e.value)
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        load_draft(str(tmp_path / "does_not_exist"))


def test_invalid_config_json(src, tmp_path):
    d = copy_checkpoint(src, str(tmp_path / "c"))
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{\"architectures\": [")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_draft(d)


def test_target_is_not_a_draft(tmp_path):
    with pytest.raises(ConfigError, match="describes a target.*load_target"):
        load_draft(target_dirs()[0])


def test_missing_manifest(jax_src, tmp_path):
    """An interrupted write (params/ present, manifest absent) is refused everywhere."""
    d = _jax_copy(jax_src, tmp_path)
    os.remove(os.path.join(d, MANIFEST_NAME))
    for call in (lambda: load_draft(d), lambda: jax_to_hf(d, str(tmp_path / "hf"))):
        with pytest.raises(CheckpointError, match="manifest not found.*incomplete") as e:
            call()
        assert os.path.join(d, MANIFEST_NAME) in str(e.value)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


@pytest.mark.parametrize("text,match", [
    ('{"format": "deepspec_jax.checkpoint", "format_ver', "corrupt manifest"),
    ('[1, 2]', "not a deepspec_jax manifest"),
    ('{"format": "deepspec_jax.checkpoint", "format_version": 99}', "format_version"),
    ('{"format": "deepspec_jax.checkpoint", "format_version": 1}', r"\[in, out\].*jax_to_torch"),
    ('{"format": "deepspec_jax.checkpoint", "format_version": 2, "kind": "draft"}', "'architecture'"),
], ids=["truncated", "not-object", "version", "layout-v1", "field"])
def test_corrupt_manifest(jax_src, tmp_path, text, match):
    d = _jax_copy(jax_src, tmp_path)
    with open(os.path.join(d, MANIFEST_NAME), "w") as f:
        f.write(text)
    with pytest.raises(CheckpointError, match=match) as e:
        load_draft(d)
    assert MANIFEST_NAME in str(e.value)


def test_jax_dir_config_mismatch(jax_src, tmp_path):
    d = _jax_copy(jax_src, tmp_path)
    raw = read_config(d)
    raw["intermediate_size"] = raw["intermediate_size"] // 2
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match=r"parameter 'layers\.\w+_proj' has shape") as e:
        load_draft(d)
    assert "config.json" in str(e.value)


def test_jax_dir_damaged_params(jax_src, tmp_path):
    d = _jax_copy(jax_src, tmp_path)
    shutil.rmtree(os.path.join(d, PARAMS_DIR))
    with pytest.raises(CheckpointError, match="parameter directory missing"):
        load_draft(d)


def test_converter_direction_mixups(src, jax_src, tmp_path):
    with pytest.raises(CheckpointError, match="not a JAX checkpoint.*torch_to_jax"):
        jax_to_hf(src, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="already a JAX checkpoint"):
        hf_to_jax(jax_src, str(tmp_path / "jax2"))
    with pytest.raises(ValueError, match="max_shard_size"):
        jax_to_hf(jax_src, str(tmp_path / "hf"), max_shard_size="lots")
    with pytest.raises(ValueError, match="--dtype"):
        hf_to_jax(src, str(tmp_path / "jax3"), dtype="float8")
    with pytest.raises(ValueError, match="must differ"):
        hf_to_jax(src, src)
