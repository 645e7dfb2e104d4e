"""Training input pipeline: deterministic, length-bucketed, per-host sharded, resumable.

Batch composition is planned by our own deterministic index logic, not by grain's
shuffle/batch: SPMD training needs every host to agree on each step's global batch
(which samples, and the padded length ``S`` that fixes the compiled shapes), and each
host to read only its own rows. grain's built-in ``shuffle``/``batch`` work on one host's
stream, so they cannot give "compose globally, then slice". The plan is a pure function
of (seed, epoch, sample lengths, batch size, buckets): every host computes the same one
without communication, and it does not depend on the process count, so a run can be
resumed on a different number of hosts. grain does the rest: a ``MapDataset`` over
steps whose map reads and pads this host's rows, turned into an ``IterDataset`` with
threaded read-ahead (``ReadOptions``). The iterator state is just the next step number
plus the plan's parameters (JSON), checked on restore.

Plan of one epoch: a permutation of all samples from ``(seed, epoch)``; windows of
``shuffle_window_batches * global_batch_size`` consecutive samples are sorted by length
and cut into global batches (similar lengths together, so padding stays small); the
batches are then shuffled so lengths do not trend within the epoch. ``S`` of a batch is
the smallest bucket boundary >= its longest (clipped) sample. The incomplete last batch
(``drop_remainder=False``) comes last, its missing rows with index -1 and all zeros.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from deepspec_jax.data.jsonl import DataError
from deepspec_jax.errors import ConfigError

STATE_VERSION = 1
_INT32_FIELDS = ("input_ids", "loss_mask")


def _sample_lengths(source) -> np.ndarray:
    lengths = getattr(source, "lengths", None)
    if lengths is None:  # a source without lengths: read each sample once
        lengths = [len(source[i]["input_ids"]) for i in range(len(source))]
    lengths = np.asarray(lengths, np.int64)
    if lengths.shape != (len(source),):
        raise DataError(f"source.lengths has shape {lengths.shape}, expected ({len(source)},).")
    return lengths


def _buckets(bucket_boundaries, seq_len: int) -> list[int]:
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}.")
    bounds = sorted({int(b) for b in (bucket_boundaries or ())})
    if bounds and (bounds[0] < 1 or bounds[-1] > seq_len):
        raise ConfigError(f"bucket_boundaries {list(bucket_boundaries)} must lie in [1, seq_len={seq_len}] "
                          "(samples longer than seq_len are truncated to it).")
    if not bounds or bounds[-1] != seq_len:
        bounds.append(seq_len)
    return bounds


class BatchPlan:
    """Which samples form each global batch and its padded length: a pure function of
    the arguments, identical on every host."""

    def __init__(self, lengths: np.ndarray, *, global_batch_size: int, seq_len: int, seed: int,
                 bucket_boundaries=None, drop_remainder: bool = True, shuffle_window_batches: int = 16):
        if global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if shuffle_window_batches < 1:
            raise ConfigError(f"shuffle_window_batches must be >= 1, got {shuffle_window_batches}.")
        self.lengths = np.minimum(np.asarray(lengths, np.int64), seq_len)
        self.num_samples = len(self.lengths)
        self.global_batch_size = int(global_batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.buckets = _buckets(bucket_boundaries, self.seq_len)
        self.drop_remainder = bool(drop_remainder)
        self.window = int(shuffle_window_batches) * self.global_batch_size
        self.shuffle_window_batches = int(shuffle_window_batches)
        full, rest = divmod(self.num_samples, self.global_batch_size)
        self.steps_per_epoch = full + (1 if rest and not drop_remainder else 0)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {self.num_samples} samples, fewer than global_batch_size="
                              f"{self.global_batch_size}, so no full batch exists; lower the batch size or "
                              "set drop_remainder=False.")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def fingerprint(self) -> dict:
        """What a saved iterator state must match to be resumed."""
        return {"num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "seq_len": self.seq_len, "seed": self.seed, "buckets": list(self.buckets),
                "drop_remainder": self.drop_remainder,
                "shuffle_window_batches": self.shuffle_window_batches}

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        gbs = self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_samples)
        n_full = (self.num_samples // gbs) * gbs
        used, tail = perm[:n_full], perm[n_full:]
        chunks = [np.zeros(0, np.int64)]
        for w in range(0, n_full, self.window):
            win = used[w:w + self.window]
            chunks.append(win[np.argsort(self.lengths[win], kind="stable")])
        full = n_full // gbs
        batches = np.full((self.steps_per_epoch, gbs), -1, np.int64)
        batches[:full] = np.concatenate(chunks).reshape(full, gbs)[rng.permutation(full)]
        if not self.drop_remainder and len(tail):  # the short batch last, padded with -1 rows
            batches[-1, :len(tail)] = tail
        longest = np.where(batches >= 0, self.lengths[np.maximum(batches, 0)], 0).max(axis=1)
        seq = np.asarray(self.buckets, np.int64)[np.searchsorted(self.buckets, longest)]
        return batches, seq

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices int64 [steps_per_epoch, global_batch_size] (-1 = padding row),
        padded lengths int64 [steps_per_epoch])`` of one epoch (cached, thread-safe)."""
        with self._lock:
            if epoch not in self._cache:
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = self._build(epoch)
            return self._cache[epoch]

    def step(self, step: int) -> tuple[np.ndarray, int]:
        """Global batch of a step (counting across epochs): (indices [gbs], S)."""
        e, k = divmod(int(step), self.steps_per_epoch)
        idx, seq = self.epoch(e)
        return idx[k], int(seq[k])


class _FieldSpec:
    """Names, dtypes and trailing shapes of a source's fields (read from sample 0), so
    padding rows and per-token padding need no sample of their own."""

    def __init__(self, sample: dict):
        if "input_ids" not in sample or "loss_mask" not in sample:
            raise DataError(f"source samples must have 'input_ids' and 'loss_mask' fields, got "
                            f"{sorted(sample)}.")
        n = len(sample["input_ids"])
        self.fields = {}
        for k, v in sample.items():
            v = np.asarray(v)
            per_token = v.ndim >= 1 and v.shape[0] == n
            dtype = np.dtype(np.int32) if k in _INT32_FIELDS else v.dtype
            self.fields[k] = (per_token, v.shape[1:] if per_token else v.shape, dtype)


class _HostBatches:
    """Random access ``step -> this host's padded batch`` (what grain maps and prefetches)."""

    def __init__(self, source, plan: BatchPlan, spec: _FieldSpec, process_index: int,
                 process_count: int, num_steps: int):
        self.source, self.plan, self.spec = source, plan, spec
        self.rows = plan.global_batch_size // process_count
        self.row0 = process_index * self.rows
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        idx, seq = self.plan.step(step)
        idx = idx[self.row0:self.row0 + self.rows]
        b = self.rows
        out = {k: np.zeros((b, seq, *shape) if per_token else (b, *shape), dt)
               for k, (per_token, shape, dt) in self.spec.fields.items()}
        for r, i in enumerate(idx):
            if i < 0:
                continue
            sample = self.source[int(i)]
            n = min(len(sample["input_ids"]), seq)
            for k, (per_token, shape, _) in self.spec.fields.items():
                if k not in sample:
                    raise DataError(f"sample {i}: field {k!r} missing (sample 0 has it).")
                v = np.asarray(sample[k])
                if per_token:
                    if v.shape[0] != len(sample["input_ids"]) or v.shape[1:] != shape:
                        raise DataError(f"sample {i}: field {k!r} has shape {v.shape}, expected "
                                        f"({len(sample['input_ids'])}, *{shape}).")
                    out[k][r, :n] = v[:n]
                else:
                    out[k][r] = v
        out["index"] = idx.astype(np.int64)
        return out


class BatchIterator:
    """Iterator of this host's batches with a JSON state (``get_state``/``set_state``)."""

    def __init__(self, host: _HostBatches, read_options: grain.ReadOptions, state: dict | None):
        self._host = host
        self._ds = grain.MapDataset.source(host)
        self._read_options = read_options
        self.step = 0
        self._it = None
        if state is not None:
            self.set_state(state)

    @property
    def steps_per_epoch(self) -> int:
        return self._host.plan.steps_per_epoch

    def __len__(self) -> int:
        return self._host.num_steps

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self._host.num_steps:
            raise StopIteration
        if self._it is None:
            ds = self._ds[self.step:] if self.step else self._ds
            self._it = iter(ds.to_iter_dataset(self._read_options))
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """Small JSON-serialisable state: resuming from it yields exactly the batches an
        uninterrupted iterator would have yielded next (on any process count)."""
        return {"version": STATE_VERSION, "step": self.step, **self._host.plan.fingerprint()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"data iterator state {state!r} is not a version-{STATE_VERSION} state from "
                              "BatchIterator.get_state().")
        mine = self._host.plan.fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ConfigError("the saved data iterator state was made with a different data setup "
                              f"(field: (saved, now)) {diff}; resume with the same dataset, seed, batch "
                              "size, seq_len and buckets, or start the data stream afresh.")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"data iterator state: 'step' must be a non-negative integer, got {step!r}.")
        self.step = step
        self._it = None  # rebuilt lazily from the new position


def make_batches(source, *, global_batch_size: int, seq_len: int, seed: int, process_index: int = 0,
                 process_count: int = 1, bucket_boundaries=None, num_epochs: int | None = None,
                 drop_remainder: bool = True, shuffle_window_batches: int = 16,
                 state: dict | None = None, num_threads: int = 2,
                 prefetch_buffer_size: int = 4) -> BatchIterator:
    """Iterator of this host's batches: ``{"input_ids": int32 [b, S], "loss_mask": int32
    [b, S], "index": int64 [b] (-1 = padding row), ...}`` with every other per-token field
    of the source (e.g. cached features [L, F]) padded/truncated to S the same way and
    other fields stacked; ``b = global_batch_size // process_count``.

    ``source``: random access (``__len__``, ``__getitem__`` -> dict of arrays whose leading
    dim is the sample length), ideally with a ``lengths`` attribute (else every sample is
    read once to get it). A field is per-token when its leading dim equals sample 0's
    ``len(input_ids)``; output dtypes are the source's (``input_ids``/``loss_mask``: int32). ``num_epochs=None`` repeats forever. ``state`` (from
    ``get_state()``) resumes a stream. ``num_threads=0`` reads in the calling thread."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={global_batch_size} must be divisible by process_count="
                          f"{process_count} (every host takes an equal slice).")
    if len(source) == 0:
        raise DataError("the data source is empty.")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}.")
    spec = _FieldSpec(source[0])
    plan = BatchPlan(_sample_lengths(source), global_batch_size=global_batch_size, seq_len=seq_len,
                     seed=seed, bucket_boundaries=bucket_boundaries, drop_remainder=drop_remainder,
                     shuffle_window_batches=shuffle_window_batches)
    num_steps = plan.steps_per_epoch * num_epochs if num_epochs is not None else sys.maxsize
    host = _HostBatches(source, plan, spec, process_index, process_count, num_steps)
    opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return BatchIterator(host, opts, state)
