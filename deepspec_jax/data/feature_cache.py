"""Target-feature cache: the target's features per training sample, in tensorstore zarr3.

Offline training reads the frozen target's features from disk instead of running the
target every step. Layout of a cache directory::

    build.json            the build plan, written when the build starts (resume checks it)
    features/             zarr3 [N, max_length, len(layer_ids) * hidden], chunk [1, max_length, F]
    target_last_hidden/   zarr3 [N, max_length, hidden] (after the final norm), chunk [1, max_length, d]
    lengths/              zarr3 int32 [N]: valid rows of each sample (rows past it are fill)
    written/              zarr3 uint8 [N]: 1 once both chunks of a sample are durably written
    manifest.json         written LAST, atomically, once every sample is written

One chunk per sample keeps a random-access read to one file per array. Every chunk
carries a crc32c checksum, so a truncated or bit-flipped chunk is an error, never
silent garbage; a missing chunk is an error too (``fill_missing_data_reads=False``).
Writing is resumable: a sample is marked in ``written`` only after its chunk writes
completed (tensorstore's file store writes by rename, so a chunk is old or new, never
torn), and a restarted build skips marked samples. A single writer process is assumed.

Readers get numpy arrays in the stored dtype (``ml_dtypes.bfloat16`` for bf16 caches):
half the host memory and host->device bytes of float32; cast on device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from deepspec_jax import atomic
from deepspec_jax.data.jsonl import DataError
from deepspec_jax.dtypes import DTYPES as _ALL_DTYPES, dtype_name
from deepspec_jax.target import DEFAULT_TARGET, smollm2_gguf_path

FORMAT = "deepspec_jax.feature_cache"
FORMAT_VERSION = 1
DTYPES = {n: _ALL_DTYPES[n] for n in ("bfloat16", "float32")}   # the dtypes a cache stores
COMPRESSIONS = ("zstd", "blosc", "none")
ARRAYS = ("features", "target_last_hidden")
MARK_CHUNK = 16384          # samples per chunk of the small `lengths` / `written` arrays
CHECKSUM_BYTES = 4          # crc32c appended to every chunk
MANIFEST = "manifest.json"
PLAN = "build.json"
# Plan fields that define a cache's content; a resumed build and FeatureCache.open
# compare these (paths are informative only: data may move between machines).
IDENTITY_FIELDS = ("format_version", "target", "target_config", "target_dtype", "layer_ids",
                   "hidden_size", "feature_width", "dtype", "compression", "num_samples",
                   "max_length", "num_tokens", "token_store_fingerprint")
# FeatureCache.open(expect=...) keys -> manifest field.
EXPECT_FIELDS = {"target": "target", "layer_ids": "layer_ids", "hidden_size": "hidden_size",
                 "dtype": "dtype", "token_store": "token_store_fingerprint",
                 "max_length": "max_length", "num_samples": "num_samples",
                 "feature_width": "feature_width"}


# ---------------------------------------------------------------------------
# size estimate
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SizeEstimate:
    """Bytes a cache will take on disk (array chunks only; the few small JSON files are
    excluded).

    ``upper_bound_bytes``: uncompressed, every sample padded to ``max_length`` (the
    chunk is one full sample) — exact for ``compression="none"``. ``valid_bytes``: the
    bytes of the valid rows only; with compression the zero padding costs next to
    nothing and float features compress little, so expect roughly this much.
    """

    num_samples: int
    total_tokens: int
    max_length: int
    bytes_per_token: int
    upper_bound_bytes: int
    valid_bytes: int
    compression: str

    @property
    def expected_bytes(self) -> int:
        return self.upper_bound_bytes if self.compression == "none" else self.valid_bytes

    def describe(self) -> str:
        lines = [f"feature cache: {self.num_samples:,} samples, {self.total_tokens:,} tokens, "
                 f"max_length {self.max_length}, {self.bytes_per_token:,} bytes/token",
                 f"  upper bound (uncompressed, every sample padded to max_length): "
                 f"{format_bytes(self.upper_bound_bytes)} ({self.upper_bound_bytes:,} bytes)"]
        if self.compression != "none":
            lines.append(f"  expected with {self.compression} (valid tokens only; padding "
                         f"compresses away): about {format_bytes(self.valid_bytes)} "
                         f"({self.valid_bytes:,} bytes)")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def estimate_bytes(num_samples: int, tokens: int | Sequence[int] | np.ndarray, max_length: int,
                   num_layers: int, hidden_size: int, dtype: str = "bfloat16",
                   compression: str = "zstd") -> SizeEstimate:
    """Disk bytes of a cache (see ``SizeEstimate``).

    ``tokens``: the total token count, or the per-sample lengths (capped at
    ``max_length`` here, as the cache stores at most ``max_length`` rows).
    ``num_layers``: ``len(layer_ids)``; the last hidden state adds one more ``hidden_size``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}.")
    n, max_length = int(num_samples), int(max_length)
    if np.ndim(tokens) == 0:
        total = int(tokens)
    else:
        lens = np.asarray(tokens, np.int64)
        if lens.shape != (n,):
            raise ValueError(f"lengths has shape {lens.shape}, expected ({n},).")
        total = int(np.minimum(lens, max_length).sum())
    per_token = (int(num_layers) + 1) * int(hidden_size) * DTYPES[dtype].itemsize
    mark_chunks = math.ceil(n / MARK_CHUNK) if n else 0
    # lengths (int32) + written (uint8), each chunk with its checksum
    small = n * (4 + 1) + 2 * mark_chunks * CHECKSUM_BYTES
    upper = n * max_length * per_token + 2 * n * CHECKSUM_BYTES + small
    valid = total * per_token + 2 * n * CHECKSUM_BYTES + small
    return SizeEstimate(n, total, max_length, per_token, upper, valid, compression)


# ---------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------

def token_store_fingerprint(store) -> str:
    """Identity of a token store: sample count, per-sample lengths (equivalently its
    offsets), max_length and the first/last samples' tokens, hashed. Cheap (no pass over
    the data) yet a re-tokenised or re-ordered store practically never matches."""
    lengths = np.asarray(store.lengths, np.int64)
    h = hashlib.sha256()
    h.update(json.dumps({"num_samples": int(len(store)), "num_tokens": int(lengths.sum()),
                         "max_length": store.manifest.get("max_length")}).encode())
    h.update(lengths.astype("<i8").tobytes())
    if len(store):
        for i in sorted({0, len(store) - 1}):
            h.update(np.asarray(store[i]["input_ids"], np.int64).astype("<i8").tobytes())
    return h.hexdigest()


def target_name(target: str | None) -> str:
    """The name a cache records for its target: the embedded default's name, else the
    checkpoint's directory/file name (paths differ between machines, names do not)."""
    if target is None or target == DEFAULT_TARGET:
        return DEFAULT_TARGET
    s = os.fspath(target)
    try:
        if os.path.exists(s) and os.path.samefile(s, smollm2_gguf_path()):
            return DEFAULT_TARGET
    except FileNotFoundError:
        pass
    return os.path.basename(os.path.normpath(s))


# ---------------------------------------------------------------------------
# tensorstore specs and small file helpers
# ---------------------------------------------------------------------------

def _codecs(compression: str, itemsize: int) -> list[dict]:
    codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    elif compression == "blosc":
        codecs.append({"name": "blosc", "configuration": {
            "cname": "lz4", "clevel": 5, "shuffle": "shuffle", "typesize": itemsize}})
    codecs.append({"name": "crc32c"})
    return codecs


def _metadata(shape: Sequence[int], chunk: Sequence[int], dtype: str, compression: str) -> dict:
    np_dtype = {"bfloat16": DTYPES["bfloat16"]}.get(dtype, np.dtype(dtype))
    return {"shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": _codecs(compression, np_dtype.itemsize), "fill_value": 0}


def _open(path: str, name: str, *, metadata: dict | None = None, write: bool = False):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, name)},
            "fill_missing_data_reads": False}
    if metadata is not None:
        spec.update(metadata=metadata, create=True, delete_existing=True,
                    store_data_equal_to_fill_value=True)
    else:
        spec.update(open=True)
        if write:
            spec["store_data_equal_to_fill_value"] = True
    try:
        return ts.open(spec, read=True, write=write or metadata is not None).result()
    except ValueError as e:
        raise DataError(f"{os.path.join(path, name)}: cannot open the zarr3 array ({e}); the "
                        "cache is incomplete or damaged: rebuild it with "
                        "python -m deepspec_jax.data.build_features.") from None


def chunk_file(path: str, name: str, index: int) -> str:
    """File of sample ``index``'s chunk of array ``name`` (default chunk key encoding)."""
    return os.path.join(path, name, "c", str(int(index)), "0", "0")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); the feature cache is damaged: rebuild it "
                        "with python -m deepspec_jax.data.build_features.") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataError(f"{path}: not a deepspec_jax feature cache file (field 'format' is "
                        f"{obj.get('format') if isinstance(obj, dict) else None!r}, expected "
                        f"{FORMAT!r}).")
    if obj.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: field 'format_version' is {obj.get('format_version')!r}, this "
                        f"code reads version {FORMAT_VERSION}; rebuild the cache with this "
                        "version of build_features.")
    return obj


def _mismatches(path: str, have: dict, want: dict, fields: Sequence[str]) -> list[str]:
    return [f"  field '{k}': the cache has {have.get(k)!r}, expected {want.get(k)!r}"
            for k in fields if have.get(k) != want.get(k)]


def _read_error(path: str, name: str, index: int, e: Exception) -> DataError:
    return DataError(
        f"{path}: sample {index}: chunk {chunk_file(path, name, index)} is unreadable ({e}). "
        "The feature cache is corrupted; repair it with python -m "
        "deepspec_jax.data.build_features ... --repair (re-computes unreadable samples) or "
        "rebuild it.")


# ---------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class PendingWrite:
    """Chunk writes of one batch in flight; ``FeatureCacheWriter.commit`` marks them."""
    indices: np.ndarray
    futures: list


class FeatureCacheWriter:
    """Creates a cache or resumes an unfinished one. ``plan`` holds the manifest fields
    (see ``IDENTITY_FIELDS``); a resumed build must have the same plan."""

    def __init__(self, path: str, plan: dict, lengths: np.ndarray):
        self.path = os.fspath(path)
        self.plan = dict(plan, format=FORMAT, format_version=FORMAT_VERSION)
        self.lengths = np.asarray(lengths, np.int32)
        n, L = int(self.plan["num_samples"]), int(self.plan["max_length"])
        if self.lengths.shape != (n,) or (n and (self.lengths.min() < 0 or self.lengths.max() > L)):
            raise ValueError(f"lengths must be [num_samples={n}] ints in [0, {L}].")
        self.plan["num_tokens"] = int(self.lengths.sum())
        plan_path = os.path.join(self.path, PLAN)
        if os.path.exists(plan_path):
            self._resume(plan_path)
        else:
            self._create()

    # -- set-up ---------------------------------------------------------------
    def _create(self) -> None:
        if os.path.isdir(self.path):
            extra = set(os.listdir(self.path)) - {*ARRAYS, "lengths", "written"}
            if extra:
                raise DataError(f"{self.path}: directory exists and is not a feature cache "
                                f"(contains {sorted(extra)[:5]}); choose an empty or new --output.")
        os.makedirs(self.path, exist_ok=True)
        p, n, L = self.plan, int(self.plan["num_samples"]), int(self.plan["max_length"])
        dims = {"features": int(p["feature_width"]), "target_last_hidden": int(p["hidden_size"])}
        self.arrays = {name: _open(self.path, name, metadata=_metadata(
            [n, L, w], [1, L, w], p["dtype"], p["compression"])) for name, w in dims.items()}
        mc = [max(1, min(n, MARK_CHUNK))]
        lengths = _open(self.path, "lengths", metadata=_metadata([n], mc, "int32", "none"))
        lengths.write(self.lengths).result()
        self.written_array = _open(self.path, "written", metadata=_metadata([n], mc, "uint8", "none"))
        self.written_array.write(np.zeros((n,), np.uint8)).result()
        self.written = np.zeros((n,), bool)
        atomic.write_json(os.path.join(self.path, PLAN), self.plan, sync_dir=True, indent=1,
                          sort_keys=True)   # the arrays exist before it

    def _resume(self, plan_path: str) -> None:
        old = _read_json(plan_path)
        bad = _mismatches(self.path, old, self.plan, IDENTITY_FIELDS)
        if bad:
            raise DataError(f"{plan_path}: this directory holds a cache built with other "
                            "settings; a build can only resume with the same settings:\n"
                            + "\n".join(bad) + "\nUse a new --output directory or delete this one.")
        self.arrays = {name: _open(self.path, name, write=True) for name in ARRAYS}
        self.written_array = _open(self.path, "written", write=True)
        try:
            stored = _open(self.path, "lengths").read().result()
            self.written = self.written_array.read().result().astype(bool)
        except ValueError as e:
            raise DataError(f"{self.path}: the lengths/written arrays are unreadable ({e}); "
                            "delete the directory and rebuild.") from None
        if not np.array_equal(stored, self.lengths):
            raise DataError(f"{self.path}/lengths: stored sample lengths differ from the token "
                            "store's; use a new --output directory or delete this one.")

    @property
    def complete(self) -> bool:
        return os.path.exists(os.path.join(self.path, MANIFEST))

    # -- writing --------------------------------------------------------------
    def write_batch(self, indices: np.ndarray, features: np.ndarray,
                    last_hidden: np.ndarray) -> PendingWrite:
        """Start writing rows ``[:lengths[i]]`` of each sample (index < 0 = padding row,
        skipped). Arrays are [B, S, F] / [B, S, d] in the cache dtype, S >= the lengths."""
        dt = DTYPES[self.plan["dtype"]]
        futures, done = [], []
        for b, i in enumerate(np.asarray(indices)):
            if i < 0:
                continue
            n = int(self.lengths[i])
            if n > features.shape[1]:
                raise ValueError(f"sample {i}: {n} rows needed, batch has {features.shape[1]}.")
            if n:
                for name, x in (("features", features), ("target_last_hidden", last_hidden)):
                    futures.append((i, name, self.arrays[name][int(i), :n].write(
                        np.ascontiguousarray(x[b, :n], dtype=dt))))
            done.append(int(i))
        return PendingWrite(np.asarray(done, np.int64), futures)

    def commit(self, pending: PendingWrite) -> None:
        """Wait for the chunk writes, then mark their samples written (durably)."""
        for i, name, fut in pending.futures:
            try:
                fut.result()
            except ValueError as e:
                raise DataError(f"{chunk_file(self.path, name, i)}: write failed ({e}); check "
                                "free disk space and permissions, then rerun to resume.") from None
        self.mark(pending.indices, True)

    def mark(self, indices: np.ndarray, value: bool) -> None:
        indices = np.asarray(indices, np.int64)
        if not indices.size:
            return
        self.written[indices] = value
        futs = []
        for c in np.unique(indices // MARK_CHUNK):
            lo, hi = int(c) * MARK_CHUNK, min(len(self.written), (int(c) + 1) * MARK_CHUNK)
            futs.append(self.written_array[lo:hi].write(self.written[lo:hi].astype(np.uint8)))
        for f in futs:
            f.result()

    def unmark_unreadable(self, progress=None) -> list[int]:
        """Read every written sample; unmark those whose chunks are unreadable or missing
        (a later build recomputes them). Returns their indices."""
        bad = []
        for i in np.flatnonzero(self.written):
            n = int(self.lengths[i])
            for name in ARRAYS:
                try:
                    if n:
                        self.arrays[name][int(i), :n].read().result()
                except ValueError:
                    bad.append(int(i))
                    break
            if progress is not None:
                progress(1)
        if bad:
            manifest = os.path.join(self.path, MANIFEST)
            if os.path.exists(manifest):
                os.remove(manifest)
            self.mark(np.asarray(bad), False)
        return bad

    def finalize(self) -> bool:
        """Write manifest.json (atomically, last) if every sample is written."""
        if not self.written.all():
            return False
        atomic.write_json(os.path.join(self.path, MANIFEST), dict(self.plan, complete=True),
                          sync_dir=True, indent=1, sort_keys=True)
        return True


# ---------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------

def _canonical_expect(key: str, value: Any) -> Any:
    if key == "target":
        return target_name(value)
    if key == "layer_ids":
        return [int(i) for i in value]
    if key == "dtype":
        return dtype_name(value)
    if key == "token_store":
        return value if isinstance(value, str) else token_store_fingerprint(value)
    return int(value)


class FeatureCache:
    """A finished feature cache, read-only. ``cache[i]`` -> ``{"features": [L, F],
    "target_last_hidden": [L, d]}`` in the stored dtype, L = the sample's length."""

    def __init__(self, path: str, manifest: dict):
        self.path = os.fspath(path)
        self.manifest = manifest
        self.arrays = {name: _open(self.path, name) for name in ARRAYS}
        n, L = manifest["num_samples"], manifest["max_length"]
        want = {"features": (n, L, manifest["feature_width"]),
                "target_last_hidden": (n, L, manifest["hidden_size"])}
        for name, arr in self.arrays.items():
            if tuple(arr.shape) != want[name] or arr.dtype.numpy_dtype != DTYPES[manifest["dtype"]]:
                raise DataError(f"{self.path}/{name}: shape {tuple(arr.shape)} dtype "
                                f"{arr.dtype.name} does not match manifest.json ({want[name]}, "
                                f"{manifest['dtype']}); the cache is damaged: rebuild it.")
        try:
            self.lengths = np.asarray(_open(self.path, "lengths").read().result(), np.int64)
        except ValueError as e:
            raise DataError(f"{self.path}/lengths: unreadable ({e}); rebuild the cache.") from None
        if self.lengths.shape != (n,) or int(self.lengths.sum()) != manifest["num_tokens"]:
            raise DataError(f"{self.path}/lengths: does not match manifest.json (num_samples "
                            f"{n}, num_tokens {manifest['num_tokens']}); rebuild the cache.")

    @classmethod
    def open(cls, path: str, *, expect: dict | None = None) -> "FeatureCache":
        """Open a finished cache and check it against the run (``expect`` keys: any of
        ``EXPECT_FIELDS``; ``token_store`` may be a fingerprint or a store object)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise DataError(f"{path}: feature cache directory not found; build it with "
                            f"python -m deepspec_jax.data.build_features --output={path} ...")
        mpath = os.path.join(path, MANIFEST)
        if not os.path.exists(mpath):
            if os.path.exists(os.path.join(path, PLAN)):
                try:
                    w = _open(path, "written").read().result()
                    state = f" ({int(w.sum())} of {w.size} samples written)"
                except (DataError, ValueError):
                    state = ""
                raise DataError(f"{mpath}: missing: the feature-cache build did not finish{state}; "
                                "rerun the same build_features command to resume it.")
            raise DataError(f"{mpath}: missing: {path} is not a feature cache; build one with "
                            "python -m deepspec_jax.data.build_features.")
        manifest = _read_json(mpath)
        if expect:
            unknown = sorted(set(expect) - set(EXPECT_FIELDS))
            if unknown:
                raise ValueError(f"expect: unknown key(s) {unknown}; valid: {sorted(EXPECT_FIELDS)}.")
            bad = []
            for key, value in expect.items():
                field = EXPECT_FIELDS[key]
                want = _canonical_expect(key, value)
                if manifest.get(field) != want:
                    bad.append(f"  field '{field}': the cache has {manifest.get(field)!r}, the run "
                               f"config has {want!r}")
            if bad:
                raise DataError(f"{mpath}: the feature cache does not match this run:\n"
                                + "\n".join(bad) + "\nRebuild the cache for this config "
                                "(python -m deepspec_jax.data.build_features) or change the "
                                "config to match the cache.")
        return cls(path, manifest)

    def __reduce__(self):  # grain workers re-open by path (tensorstore handles are not shared)
        return (FeatureCache, (self.path, self.manifest))

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.manifest["dtype"]]

    def _index(self, i) -> int:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"{self.path}: sample {i} out of range for {n} samples.")
        return j

    def _start(self, i: int):
        n = int(self.lengths[i])
        return {name: self.arrays[name][i, :n].read() for name in ARRAYS}

    def _finish(self, i: int, futures: dict) -> dict[str, np.ndarray]:
        out = {}
        for name, fut in futures.items():
            try:
                out[name] = fut.result()
            except ValueError as e:
                raise _read_error(self.path, name, i, e) from None
        return out

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = self._index(i)
        return self._finish(i, self._start(i))

    def get_many(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Read several samples with all chunk reads in flight at once."""
        idx = [self._index(i) for i in indices]
        started = [self._start(i) for i in idx]
        return [self._finish(i, f) for i, f in zip(idx, started)]
