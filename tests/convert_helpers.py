"""Helpers shared by the conversion / load_draft tests (not a test module)."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from conftest import fixture_sets
from deepspec_jax.weights.safetensors_io import INDEX_NAME, TensorSource, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def checkpoint_dirs() -> list[str]:
    """Every checkpoint directory (config.json + model.safetensors) of every fixture set."""
    out = []
    for s in fixture_sets():
        for name in sorted(os.listdir(s)):
            d = os.path.join(s, name)
            if os.path.isfile(os.path.join(d, "config.json")) and \
                    os.path.isfile(os.path.join(d, "model.safetensors")):
                out.append(d)
    return out


def ckpt_id(d: str) -> str:
    return f"{os.path.basename(os.path.dirname(d))}/{os.path.basename(d)}"


def _is_target(d: str) -> bool:
    """Targets: ``*ForCausalLM`` or Gemma-4's ``*ForConditionalGeneration``."""
    return read_config(d)["architectures"][0].endswith(("ForCausalLM", "ForConditionalGeneration"))


def draft_dirs() -> list[str]:
    return [d for d in checkpoint_dirs() if not _is_target(d)]


def target_dirs() -> list[str]:
    return [d for d in checkpoint_dirs() if _is_target(d)]


def read_config(d: str) -> dict:
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def read_tensors(d: str) -> dict[str, np.ndarray]:
    src = TensorSource.from_dir(d)
    return {k: np.array(src.get(k)) for k in src.keys()}


def assert_same_hf(expected_dir: str, got_dir: str) -> None:
    """Same config fields and values, same tensor key set, shapes, dtypes and raw bytes."""
    assert read_config(got_dir) == read_config(expected_dir)
    a, b = read_tensors(expected_dir), read_tensors(got_dir)
    assert sorted(b) == sorted(a), (sorted(set(a) ^ set(b)))
    for k in a:
        assert b[k].dtype == a[k].dtype, (k, b[k].dtype, a[k].dtype)
        assert b[k].shape == a[k].shape, (k, b[k].shape, a[k].shape)
        assert b[k].tobytes() == a[k].tobytes(), f"{k}: bytes differ"
    ma = TensorSource.from_dir(expected_dir).files
    mb = TensorSource.from_dir(got_dir).files
    assert {m for f in mb.values() for m in f.metadata.items()} == \
        {m for f in ma.values() for m in f.metadata.items()}


def make_bf16_copy(src: str, dst: str) -> str:
    """The checkpoint as a bf16 training run would save it: bf16 tensors, config dtype
    "bfloat16", auxiliary files copied."""
    os.makedirs(dst, exist_ok=True)
    tensors = {k: v.astype(BF16) if np.issubdtype(v.dtype, np.floating) else v
               for k, v in read_tensors(src).items()}
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors, {"format": "pt"})
    raw = read_config(src)
    raw["dtype"] = "bfloat16"
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    for name in os.listdir(src):
        if name not in ("config.json", "model.safetensors", INDEX_NAME) and \
                os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


def copy_checkpoint(src: str, dst: str, tensors: dict | None = None, raw: dict | None = None) -> str:
    """Copy a checkpoint, optionally replacing its tensors and/or config dict."""
    shutil.copytree(src, dst)
    if tensors is not None:
        write_safetensors(os.path.join(dst, "model.safetensors"), tensors, {"format": "pt"})
    if raw is not None:
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2, sort_keys=True)
    return dst
