"""HF (PyTorch DeepSpec release) <-> JAX dir conversion, both directions.

The HF side is written the way ``transformers``' ``save_pretrained`` writes it
(what DeepSpec's trainer produces; tested byte for byte against DeepSpec's releases,
no other engine's format is implemented or tested): ``config.json`` as
``json.dumps(indent=2, sort_keys=True)``, safetensors with ``{"format": "pt"}``
metadata and tensors in the writer's canonical order, and above ``max_shard_size``
``model-0000i-of-0000n.safetensors`` shards split greedily in module order plus a
``model.safetensors.index.json`` written last. Key names, shapes and dtypes come from
the architecture's single ``Rule`` list, the one the loader uses.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Mapping

import numpy as np

from deepspec_jax import atomic
from deepspec_jax.checkpoint import (CONFIG_NAME, EXTRA_DIR, MANIFEST_NAME,
                                     is_jax_dir, load_hf_dir, load_jax_dir,
                                     params_to_hf, read_config, save_jax_dir)
from deepspec_jax.draft_vocab import FIELD as DRAFT_VOCAB_FIELD
from deepspec_jax.drafts.registry import resolve_spec
from deepspec_jax.dtypes import parse_dtype
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.hub_cache import checked_file, copy_file, resolve_checkpoint_path
from deepspec_jax.weights.safetensors_io import INDEX_NAME, SINGLE_NAME, write_safetensors

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
          "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1}
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def parse_size(size: int | str) -> int:
    """Bytes from an int or "5GB"/"500MB"/"2GiB" (HF's decimal units, plus binary ones)."""
    if isinstance(size, (int, np.integer)):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = (m.group(2) or "B").upper() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"max_shard_size: cannot parse {size!r}; use bytes or e.g. '5GB', "
                             "'500MB', '2GiB'.")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return n


def _natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def module_order(keys) -> list[str]:
    """HF keys in an approximation of PyTorch module order (layer indices numeric), so
    every layer's tensors land in the same or adjacent shards as ``save_pretrained``
    puts them."""
    return sorted(keys, key=_natural_key)


def plan_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """huggingface_hub's greedy split: walk the keys in order; a tensor that alone
    exceeds the limit gets its own shard; otherwise start a new shard when adding the
    tensor would pass the limit."""
    shards: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for k, t in tensors.items():
        nb = int(t.nbytes)
        if nb > max_bytes:
            shards.append([k])
            continue
        if size + nb > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    if cur:
        shards.append(cur)
    return [s for s in shards if s] or [[]]


def write_hf_weights(dst: str, tensors: Mapping[str, np.ndarray], max_shard_size: int | str =
                     DEFAULT_MAX_SHARD_SIZE, metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write safetensors (single file or shards + index, index last) into ``dst``,
    removing stale weight files of an earlier export. Returns the file names."""
    os.makedirs(dst, exist_ok=True)
    metadata = dict(metadata or {"format": "pt"})
    index_path = os.path.join(dst, INDEX_NAME)
    if os.path.exists(index_path):  # a stale index would make a half-written dir look complete
        os.remove(index_path)
    ordered = {k: tensors[k] for k in module_order(tensors)}
    shards = plan_shards(ordered, parse_size(max_shard_size))
    if len(shards) == 1:
        names = [SINGLE_NAME]
        write_safetensors(os.path.join(dst, SINGLE_NAME), ordered, metadata)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            write_safetensors(os.path.join(dst, name), {k: ordered[k] for k in keys}, metadata)
    for f in os.listdir(dst):
        if f not in names and (f == SINGLE_NAME or _SHARD_NAME.match(f)):
            os.remove(os.path.join(dst, f))
    if len(shards) > 1:
        index = {
            "metadata": {"total_parameters": int(sum(t.size for t in ordered.values())),
                         "total_size": int(sum(t.nbytes for t in ordered.values()))},
            "weight_map": {k: n for n, keys in zip(names, shards) for k in keys},
        }
        atomic.write_json(index_path, index, indent=2, sort_keys=True)
        names.append(INDEX_NAME)
    return names


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def hf_to_jax(src: str, dst: str, dtype: str | None = "keep", mesh=None) -> dict:
    """Convert an HF checkpoint directory (draft of any registered architecture, or a
    llama/qwen3 target) into a JAX dir. ``dtype`` "keep" stores every tensor in its
    own dtype; "float32"/"bfloat16" cast and update config.json's dtype field.
    Returns the manifest. ``src`` may be a hub cache snapshot or repo root."""
    src, dst = resolve_checkpoint_path(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--dst must differ from --src ({src}).")
    if is_jax_dir(src):
        raise ConfigError(f"{src}: this is already a JAX checkpoint ({MANIFEST_NAME}); use "
                          "convert.jax_to_torch to export it to HF format.")
    raw, cfg_path = read_config(src)
    cast = parse_dtype(dtype, "--dtype")
    spec = resolve_spec(raw, cfg_path)
    loaded = load_hf_dir(src, spec, dtype=cast, mesh=mesh)
    if loaded.dropped:
        warnings.warn(f"{src}: tensors no parameter uses were not converted: {loaded.dropped}")
    # Verbatim config unless a cast changes the recorded dtype (then save_pretrained's text).
    config_text = _read_text(cfg_path) if cast is None else None
    return save_jax_dir(dst, spec, loaded.state, loaded.hf_dtypes, loaded.hf_metadata,
                        extra_from=src, source=os.path.abspath(src), config_text=config_text)


def jax_to_hf(src: str, dst: str, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Export a JAX dir to an HF checkpoint directory in DeepSpec's format:
    config.json (verbatim), safetensors in the recorded HF dtypes, the auxiliary files.
    Returns the files written. ``src`` may be a hub cache snapshot or repo root."""
    src, dst = resolve_checkpoint_path(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--dst must differ from --src ({src}).")
    if not is_jax_dir(src):
        raise CheckpointError(
            f"{src}: not a JAX checkpoint (no deepspec_jax.json / params/); convert an HF "
            "directory with convert.torch_to_jax first.")
    parse_size(max_shard_size)  # fail before any work
    raw, cfg_path = read_config(src)
    if raw.get(DRAFT_VOCAB_FIELD) is not None:
        raise ConfigError(
            f"{cfg_path}: field '{DRAFT_VOCAB_FIELD}' = {raw[DRAFT_VOCAB_FIELD]}: this draft has a "
            "reduced vocabulary (d2t/t2d maps), which DeepSpec's HF format and loader cannot "
            "express; export it in vLLM's speculators format instead: python -m "
            f"convert.to_speculators --src={src} --dst=...")
    loaded, manifest = load_jax_dir(src, resolve_spec, host=True)
    tensors = params_to_hf(loaded.spec, loaded.state, loaded.hf_dtypes)
    missing = sorted(set(manifest["hf"].get("tensors", {})) - set(tensors))
    if missing:
        raise CheckpointError(f"{src}: manifest lists HF tensors {missing[:5]} that no parameter "
                              "produces; the manifest does not belong to this config.json.")
    os.makedirs(dst, exist_ok=True)
    written = []
    extra_dir = os.path.join(src, EXTRA_DIR)
    for name in manifest.get("extra_files", []):
        p = os.path.join(extra_dir, name)
        if os.path.basename(name) == name and os.path.isfile(checked_file(p)):
            copy_file(p, os.path.join(dst, name))
            written.append(name)
    atomic.write_text(os.path.join(dst, CONFIG_NAME), _read_text(os.path.join(src, CONFIG_NAME)))
    written.append(CONFIG_NAME)
    # Weights last (index last of all): the directory is loadable only once complete.
    written += write_hf_weights(dst, tensors, max_shard_size, loaded.hf_metadata)
    return written


def dtype_choices() -> list[str]:
    # float64 is not offered: JAX stores it as float32 unless x64 mode is enabled.
    return ["keep", "float32", "bfloat16", "float16"]
