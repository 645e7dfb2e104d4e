"""Minimal safetensors reader/writer on numpy (bf16 via ml_dtypes, no torch).

Reading is lazy and memory-mapped, so a sharded checkpoint streams one tensor at a
time. Writing is atomic (temp file + rename) and the index of a sharded checkpoint is
written last, so an interrupted export never looks complete.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from deepspec_jax import atomic
from deepspec_jax.errors import CheckpointError
from deepspec_jax.hub_cache import dangling_error

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file; ``get(name)`` returns a read-only numpy view."""

    def __init__(self, path: str):
        self.path = path
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if os.path.islink(path):
                raise dangling_error(path) from None
            raise CheckpointError(f"{path}: file not found; re-download or re-export the checkpoint.") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header); re-export it.")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}; the file is truncated or not safetensors.")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e}).") from e
            self.metadata = header.pop("__metadata__", None) or {}
            self.header = header
            self._base = 8 + n
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
            self._size = size

    def keys(self) -> list[str]:
        return list(self.header)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        e = self.header[name]
        return tuple(e["shape"]), _DTYPES[e["dtype"]]

    def get(self, name: str) -> np.ndarray:
        e = self.header[name]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}.")
        dt = _DTYPES[e["dtype"]]
        lo, hi = e["data_offsets"]
        if self._base + hi > self._size:
            raise CheckpointError(f"{self.path}: tensor {name!r} lies past the end of the file; the file is truncated. Re-export it.")
        arr = np.frombuffer(self._mm, dtype=dt, count=(hi - lo) // dt.itemsize, offset=self._base + lo)
        return arr.reshape(e["shape"])


class TensorSource:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, files: Mapping[str, SafetensorsFile], where: Mapping[str, str], root: str):
        self.files, self.where, self.root = files, where, root

    @classmethod
    def from_dir(cls, root: str) -> "TensorSource":
        index = os.path.join(root, INDEX_NAME)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: invalid index ({e}); it needs a 'weight_map' object.") from e
            files = {}
            for shard in sorted(set(weight_map.values())):
                p = os.path.join(root, shard)
                if not os.path.exists(p):
                    raise CheckpointError(
                        f"{p}: shard listed in {INDEX_NAME} is missing; copy the complete "
                        "checkpoint (all shards) into the directory.")
                files[shard] = SafetensorsFile(p)
            for name, shard in weight_map.items():
                if name not in files[shard].header:
                    raise CheckpointError(f"{os.path.join(root, shard)}: tensor {name!r} listed in {INDEX_NAME} is not in the shard.")
            return cls(files, dict(weight_map), root)
        single = os.path.join(root, SINGLE_NAME)
        if not os.path.exists(single):
            found = [f for f in os.listdir(root) if f.endswith(".safetensors")] if os.path.isdir(root) else []
            if len(found) == 1:
                single = os.path.join(root, found[0])
            else:
                raise CheckpointError(
                    f"{root}: no {SINGLE_NAME} or {INDEX_NAME} found; a checkpoint directory "
                    "needs safetensors weights (pickle .bin files are not loaded).")
        f = SafetensorsFile(single)
        name = os.path.basename(single)
        return cls({name: f}, {k: name for k in f.keys()}, root)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: str) -> str:
        return os.path.join(self.root, self.where[name])

    def info(self, name: str):
        return self.files[self.where[name]].info(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)


def _aligned_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None):
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    # Same order as the reference writer: by dtype size (desc), then name.
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    for k in order:
        a = tensors[k]
        if a.dtype not in _NAMES:
            raise CheckpointError(f"tensor {k!r}: dtype {a.dtype} cannot be written to safetensors.")
        header[k] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, order


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    raw, order = _aligned_header(tensors, metadata)

    def chunks():
        yield struct.pack("<Q", len(raw))
        yield raw
        for k in order:
            yield tensors[k].tobytes()

    atomic.write_bytes(path, chunks())


def save_checkpoint_dir(root: str, tensors: Mapping[str, np.ndarray],
                        max_shard_bytes: int = 5 * 2**30,
                        metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write ``model.safetensors`` or, above ``max_shard_bytes``, numbered shards plus
    ``model.safetensors.index.json`` (written last). Returns the files written."""
    os.makedirs(root, exist_ok=True)
    total = sum(int(v.nbytes) for v in tensors.values())
    if total <= max_shard_bytes:
        write_safetensors(os.path.join(root, SINGLE_NAME), tensors, metadata)
        return [SINGLE_NAME]
    shards: list[dict] = [{}]
    size = 0
    for k in tensors:  # keep the caller's (module) order across shards
        nb = int(tensors[k].nbytes)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(root, name), shard, metadata)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_text(os.path.join(root, INDEX_NAME), json.dumps(index, indent=2))
    return names + [INDEX_NAME]
