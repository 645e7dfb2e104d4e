"""Token store: tokenised samples as flat memory-mapped arrays.

A directory with ``input_ids.npy`` (int32 [T]), ``loss_mask.npy`` (uint8 [T]),
``offsets.npy`` (int64 [N+1]; sample i is ``[offsets[i], offsets[i+1])``) and
``manifest.json`` (written last), plus ``token_counts.json``: how often each token id
occurs at loss-mask positions (what a reduced draft vocabulary is selected from,
``deepspec_jax.draft_vocab``). Flat arrays + offsets make random access O(1) with no
per-sample files, and ``np.load(mmap_mode="r")`` keeps a many-GB store out of RAM (only
the pages a batch touches are read). Writing streams samples to disk (the sizes are not
known up front: the npy headers are rewritten at the end) in a temporary directory that
is renamed into place only when complete, so a crash never leaves a half store that
looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

from deepspec_jax import atomic
from deepspec_jax.data.jsonl import DataError

FORMAT = "deepspec_jax.token_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COUNTS = "token_counts.json"
COUNTS_FORMAT = "deepspec_jax.token_counts"
ARRAYS = {"input_ids": np.int32, "loss_mask": np.uint8}
_HEADER_LEN = 128  # fixed npy (v1.0) header size, so it can be rewritten in place


def _npy_header(dtype, n: int) -> bytes:
    body = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.dtype(dtype).str, n)
    size = _HEADER_LEN - 10
    if len(body) >= size:
        raise ValueError(f"array of {n} elements is too large for the token store header.")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + (body.ljust(size - 1) + "\n").encode("latin1")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TokenStoreWriter:
    """Streams ``(input_ids, loss_mask)`` samples into a new token store at ``path``.

    Use as a context manager: on a clean exit the store is finalised (headers, offsets,
    manifest last) and renamed into place; on an exception the temporary directory is
    removed and nothing at ``path`` changes. Extra keyword arguments go into the manifest.
    """

    def __init__(self, path: str, *, max_length: int, target: str = "", chat_template: str = "",
                 sources: list[str] | tuple = (), overwrite: bool = False, **extra):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path) and not overwrite:
            raise DataError(f"{self.path}: already exists; choose another --output or pass --overwrite "
                            "to replace it.")
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        self.meta = {"max_length": int(max_length), "target": str(target),
                     "chat_template": str(chat_template), "sources": [str(s) for s in sources], **extra}
        self._files = {}
        for name, dt in ARRAYS.items():
            f = open(os.path.join(self.tmp, f"{name}.npy"), "wb")
            f.write(_npy_header(dt, 0))
            self._files[name] = f
        self.lengths: list[int] = []
        self.num_tokens = 0
        self.num_supervised = 0
        self.counts = np.zeros(0, np.int64)   # supervised occurrences per token id
        self._closed = False

    def add(self, input_ids, loss_mask) -> None:
        ids = np.asarray(input_ids)
        mask = np.asarray(loss_mask)
        if ids.ndim != 1 or ids.shape != mask.shape or len(ids) == 0:
            raise ValueError(f"input_ids and loss_mask must be equal-length non-empty 1-D arrays, got "
                             f"{ids.shape} and {mask.shape}.")
        if len(ids) > self.meta["max_length"]:
            raise ValueError(f"sample of {len(ids)} tokens exceeds max_length={self.meta['max_length']}.")
        self._files["input_ids"].write(ids.astype(np.int32).tobytes())
        self._files["loss_mask"].write((mask != 0).astype(np.uint8).tobytes())
        self.lengths.append(len(ids))
        self.num_tokens += len(ids)
        self.num_supervised += int(np.count_nonzero(mask))
        self.counts = _add_counts(self.counts, ids[mask != 0])

    def close(self) -> None:
        """Finalise: rewrite headers, write offsets, the manifest last, then rename."""
        if self._closed:
            return
        self._closed = True
        for name, f in self._files.items():
            f.flush()
            f.seek(0)
            f.write(_npy_header(ARRAYS[name], self.num_tokens))
            f.flush()
            os.fsync(f.fileno())
            f.close()
        offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(np.asarray(self.lengths, np.int64), out=offsets[1:])
        with open(os.path.join(self.tmp, "offsets.npy"), "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "num_samples": len(self.lengths), "num_tokens": self.num_tokens,
                    "num_supervised": self.num_supervised, **self.meta}
        atomic.write_json(os.path.join(self.tmp, COUNTS), _counts_json(self.counts))
        with open(os.path.join(self.tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        old = None
        if os.path.exists(self.path):  # overwrite: move the old store aside, then swap
            old = f"{self.path}.old-{os.getpid()}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        self._closed = True
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _add_counts(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"negative token id {int(ids.min())} in a sample.")
    add = np.bincount(ids, minlength=len(counts)) if ids.size else np.zeros(len(counts), np.int64)
    if len(add) > len(counts):
        counts = np.pad(counts, (0, len(add) - len(counts)))
    return counts + add


def _counts_json(counts: np.ndarray) -> dict:
    nz = np.flatnonzero(counts)
    return {"format": COUNTS_FORMAT, "num_supervised": int(counts.sum()),
            "counts": {str(int(i)): int(counts[i]) for i in nz}}


def token_counts(store: "TokenStore") -> dict[int, int]:
    """{token id: occurrences at loss-mask positions} of a store, from its
    ``token_counts.json``; a store written before that file existed is counted once
    (one pass over the memory-mapped arrays) and the file is added atomically when the
    directory is writable."""
    path = os.path.join(store.path, COUNTS)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") != COUNTS_FORMAT or not isinstance(obj.get("counts"), dict):
                raise ValueError("not a token count file")
            counts = {int(k): int(v) for k, v in obj["counts"].items()}
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable token counts ({e}); delete it to recount.") from None
        if sum(counts.values()) != store.manifest["num_supervised"]:
            raise DataError(f"{path}: counts sum to {sum(counts.values())}, the store has "
                            f"{store.manifest['num_supervised']} supervised tokens; delete the file "
                            "to recount.")
        return counts
    counts = _add_counts(np.zeros(0, np.int64), store.input_ids[np.asarray(store.loss_mask) != 0])
    obj = _counts_json(counts)
    try:
        atomic.write_json(path, obj)
    except OSError:
        pass  # a read-only store: counted again next time
    return {int(k): v for k, v in obj["counts"].items()}


def write_token_store(path: str, samples, **meta) -> str:
    """Write an iterable of ``(input_ids, loss_mask)`` as a token store; returns ``path``."""
    with TokenStoreWriter(path, **meta) as w:
        for ids, mask in samples:
            w.add(ids, mask)
    return path


class TokenStore:
    """Read-only random access to a token store: ``store[i] -> {"input_ids": int32[L],
    "loss_mask": uint8[L]}`` (views of memory-mapped files), ``len(store)``,
    ``store.lengths`` (int64 [N]), ``store.manifest``.

    The manifest and every array's dtype/size are validated on open; ``verify=True``
    also re-counts the supervised tokens (reads the whole loss mask)."""

    def __init__(self, path: str, verify: bool = False):
        self.path = os.fspath(path)
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: token store directory not found; create it with "
                            "python -m deepspec_jax.data.tokenize.")
        if not os.path.exists(mpath):
            raise DataError(f"{mpath}: missing; the token store was not finished (its manifest is "
                            "written last). Re-run python -m deepspec_jax.data.tokenize.")
        try:
            with open(mpath, encoding="utf-8") as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: not valid JSON ({e}); re-run the tokenisation.") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{mpath}: not a token store manifest (field 'format' must be {FORMAT!r}).")
        if m.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{mpath}: format_version {m.get('format_version')!r} is not supported "
                            f"(this code reads {FORMAT_VERSION}); re-run the tokenisation.")
        for k in ("num_samples", "num_tokens", "num_supervised", "max_length"):
            if not isinstance(m.get(k), int) or m[k] < 0:
                raise DataError(f"{mpath}: field {k!r} must be a non-negative integer, got {m.get(k)!r}.")
        self.manifest = m
        n, t = m["num_samples"], m["num_tokens"]
        self.input_ids = self._load("input_ids", np.int32, (t,))
        self.loss_mask = self._load("loss_mask", np.uint8, (t,))
        self.offsets = np.asarray(self._load("offsets", np.int64, (n + 1,)))
        opath = os.path.join(self.path, "offsets.npy")
        if self.offsets[0] != 0 or self.offsets[-1] != t or np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{opath}: offsets must rise from 0 to num_tokens={t}; the file is corrupt. "
                            "Re-run the tokenisation.")
        self.lengths = np.diff(self.offsets)
        if verify:
            got = int(np.count_nonzero(self.loss_mask))
            if got != m["num_supervised"]:
                raise DataError(f"{os.path.join(self.path, 'loss_mask.npy')}: {got} supervised tokens, the "
                                f"manifest says {m['num_supervised']}; the file is corrupt.")

    def _load(self, name: str, dtype, shape: tuple) -> np.ndarray:
        p = os.path.join(self.path, f"{name}.npy")
        if not os.path.exists(p):
            raise DataError(f"{p}: missing from the token store; re-run the tokenisation.")
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: unreadable ({e}); the file is truncated or corrupt. Re-run the "
                            "tokenisation.") from None
        if a.dtype != np.dtype(dtype) or a.shape != shape:
            raise DataError(f"{p}: expected {np.dtype(dtype).name} {shape} (from {MANIFEST}), found "
                            f"{a.dtype.name} {a.shape}; the store is corrupt or mixed up.")
        return a

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a token store of {n} samples.")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[a:b], "loss_mask": self.loss_mask[a:b]}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TokenStore({self.path!r}, samples={m['num_samples']}, tokens={m['num_tokens']}, "
                f"supervised={m['num_supervised']})")
