"""Eagle3 config and checkpoint errors name the file, the field or key, and the fix."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import fixture_sets, load_manifest
from deepspec_jax.drafts import eagle3
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.weights.loader import DictSource


def _eagle3_dirs():
    for fs in fixture_sets():
        for name in load_manifest(fs)["global"].get("drafts", {}):
            path = os.path.join(fs, name)
            cfg = os.path.join(path, "config.json")
            if os.path.exists(cfg) and "Qwen3Eagle3Model" in json.load(open(cfg)).get("architectures", []):
                yield path


DRAFT = next(_eagle3_dirs(), None)
pytestmark = pytest.mark.skipif(DRAFT is None, reason="no Eagle3 draft in any fixture set")


def _raw():
    with open(os.path.join(DRAFT, "config.json")) as f:
        return json.load(f)


def _parse(tmp_path, **changes):
    path = os.path.join(tmp_path, "config.json")
    return eagle3.eagle3_config_from_dict(dict(_raw(), **changes), path), path


@pytest.mark.parametrize("ids,why", [
    (lambda n: [0, 1, 2, 3], "has 4 entries"),
    (lambda n: [0, 1, 2, 3, 4, 5], "has 6 entries"),
    (lambda n: [-1, 0, 1, 2, 3], "contains -1"),
    (lambda n: [0, 1, 2, 3, n - 1], "last layer"),
    (lambda n: [0, 1, 2, 3, n + 5], "out of range"),
    (lambda n: [0, 2, 1, 3, 4], "strictly increasing"),
])
def test_bad_target_layer_ids(tmp_path, ids, why):
    n = _raw()["num_target_layers"]
    with pytest.raises(ConfigError) as e:
        _parse(tmp_path, target_layer_ids=ids(n))
    msg = str(e.value)
    assert "target_layer_ids" in msg and why in msg and "config.json" in msg


def test_missing_eagle3_fields(tmp_path):
    raw = _raw()
    del raw["num_target_layers"]
    with pytest.raises(ConfigError, match="num_target_layers"):
        eagle3.eagle3_config_from_dict(raw, "x/config.json")


def test_more_than_one_draft_layer(tmp_path):
    with pytest.raises(ConfigError, match="draft_num_hidden_layers"):
        _parse(tmp_path, draft_num_hidden_layers=2)


def _checkpoint_dir(tmp_path, mutate):
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(_raw(), f)
    tensors = {}
    for name in sorted(os.listdir(DRAFT)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(DRAFT, name)))
    mutate(tensors)
    return DictSource(tensors, os.path.join(tmp_path, "model.safetensors"))


def test_loads_unmodified(tmp_path):
    model = eagle3.load_eagle3(str(tmp_path), source=_checkpoint_dir(tmp_path, lambda t: None))
    assert model.fc.get_value().shape == (model.cfg.feature_size, model.cfg.hidden_size)


def test_missing_tensor(tmp_path):
    src = _checkpoint_dir(tmp_path, lambda t: t.pop("layers.0.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError) as e:
        eagle3.load_eagle3(str(tmp_path), source=src)
    assert "layers.0.self_attn.k_norm.weight" in str(e.value) and "missing" in str(e.value)


def test_misshaped_tensor(tmp_path):
    def mutate(t):
        t["fc.weight"] = np.zeros((t["fc.weight"].shape[0], t["fc.weight"].shape[1] - 1), np.float32)

    with pytest.raises(CheckpointError) as e:
        eagle3.load_eagle3(str(tmp_path), source=_checkpoint_dir(tmp_path, mutate))
    assert "'fc.weight'" in str(e.value) and "shape" in str(e.value)


def test_unused_tensor(tmp_path):
    src = _checkpoint_dir(tmp_path, lambda t: t.update({"layers.1.hidden_norm.weight": np.ones(4, np.float32)}))
    with pytest.raises(CheckpointError, match=r"layers\.1\.hidden_norm\.weight"):
        eagle3.load_eagle3(str(tmp_path), source=src)
