"""The grain input pipeline: determinism, resume, per-host slicing, bucketing, padding."""

import json

import numpy as np
import pytest

from deepspec_jax.data.jsonl import DataError
from deepspec_jax.data.pipeline import make_batches
from deepspec_jax.data.token_store import TokenStore, write_token_store
from deepspec_jax.errors import ConfigError

F = 3  # width of a per-token "features" field, as a feature cache returns


class Source:
    """In-memory random-access source with a per-token feature field and a scalar field."""

    def __init__(self, n=53, seed=0, max_len=40):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(1, max_len + 1, n)
        self.samples = []
        for i, L in enumerate(self.lengths):
            self.samples.append({
                "input_ids": rng.integers(1, 1000, L).astype(np.int32),
                "loss_mask": (rng.random(L) < 0.7).astype(np.uint8),
                "features": rng.standard_normal((L, F)).astype(np.float32),
                "weight": np.float32(i),
            })

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


KW = dict(global_batch_size=8, seq_len=32, seed=7, bucket_boundaries=(8, 16, 24), num_threads=0)


def test_batches_hold_the_source_data_padded_and_bucketed():
    src = Source()
    it = make_batches(src, **KW)
    assert it.steps_per_epoch == len(src) // 8
    seen = []
    for batch in take(it, 2 * it.steps_per_epoch):
        idx = batch["index"]
        S = batch["input_ids"].shape[1]
        longest = min(max(src.lengths[i] for i in idx), 32)
        assert S == min(b for b in (8, 16, 24, 32) if b >= longest)  # smallest fitting bucket
        assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.int32
        assert batch["features"].shape == (8, S, F) and batch["features"].dtype == np.float32
        assert batch["index"].dtype == np.int64
        for r, i in enumerate(idx):
            s = src[i]
            n = min(len(s["input_ids"]), S)
            np.testing.assert_array_equal(batch["input_ids"][r, :n], s["input_ids"][:n])
            np.testing.assert_array_equal(batch["loss_mask"][r, :n], s["loss_mask"][:n])
            np.testing.assert_array_equal(batch["features"][r, :n], s["features"][:n])
            assert not batch["input_ids"][r, n:].any() and not batch["loss_mask"][r, n:].any()
            assert not batch["features"][r, n:].any()
            assert batch["weight"][r] == s["weight"]
        seen.append(idx)
    epoch0 = np.concatenate(seen[:it.steps_per_epoch])
    epoch1 = np.concatenate(seen[it.steps_per_epoch:])
    assert len(set(epoch0)) == len(epoch0) == len(epoch1) == len(set(epoch1))  # no repeats in an epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch


def test_deterministic_and_seed_dependent():
    src = Source()
    a = take(make_batches(src, **KW), 9)
    b = take(make_batches(src, **{**KW, "num_threads": 2}), 9)  # threaded read-ahead: same stream
    assert_batches_equal(a, b)
    c = take(make_batches(src, **{**KW, "seed": 8}), 9)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_resume_from_state_equals_uninterrupted():
    src = Source()
    steps = make_batches(src, **KW).steps_per_epoch
    full = take(make_batches(src, **KW), 3 * steps)
    for cut in (1, steps - 1, steps, steps + 2):  # including right at / across an epoch boundary
        it = make_batches(src, **{**KW, "num_threads": 2})
        head = take(it, cut)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint does
        assert state["step"] == cut
        resumed = make_batches(src, **KW, state=state)
        assert_batches_equal(head + take(resumed, 3 * steps - cut), full)
    it = make_batches(src, **KW)  # set_state on a live iterator rewinds it
    take(it, 5)
    it.set_state({**it.get_state(), "step": 2})
    assert_batches_equal(take(it, 3), full[2:5])


def test_two_hosts_concatenate_to_the_global_batch():
    src = Source()
    one = take(make_batches(src, **KW), 10)
    h0 = take(make_batches(src, **KW, process_index=0, process_count=2), 10)
    h1 = take(make_batches(src, **KW, process_index=1, process_count=2), 10)
    for g, a, b in zip(one, h0, h1):
        assert a["input_ids"].shape == b["input_ids"].shape == (4, g["input_ids"].shape[1])
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    # a 1-host state resumes on 2 hosts (the plan does not depend on the process count)
    it = make_batches(src, **KW)
    take(it, 4)
    r1 = take(make_batches(src, **KW, process_index=1, process_count=2, state=it.get_state()), 2)
    for g, b in zip(one[4:6], r1):
        np.testing.assert_array_equal(b["index"], g["index"][4:])


def test_remainder_padding_rows():
    src = Source(n=21)
    it = make_batches(src, **{**KW, "drop_remainder": False}, num_epochs=2)
    assert it.steps_per_epoch == 3 and len(it) == 6
    batches = list(it)
    assert len(batches) == 6
    for e in range(2):
        last = batches[3 * e + 2]
        pad = last["index"] < 0
        assert pad.sum() == 3 and np.array_equal(pad, [0, 0, 0, 0, 0, 1, 1, 1])
        for k in ("input_ids", "loss_mask", "features", "weight"):
            assert not last[k][pad].any(), k
        idx = np.concatenate([b["index"] for b in batches[3 * e:3 * e + 3]])
        assert sorted(idx[idx >= 0]) == list(range(21))  # every sample exactly once per epoch
    # with drop_remainder the short batch is never produced
    full = take(make_batches(src, **KW), 4)
    assert all((b["index"] >= 0).all() for b in full)


def test_length_sorting_reduces_padding():
    src = Source(n=400, max_len=64)
    def padding(window):
        it = make_batches(src, **{**KW, "seq_len": 64, "bucket_boundaries": range(4, 65, 4),
                                  "shuffle_window_batches": window})
        real = tot = 0
        for b in take(it, it.steps_per_epoch):
            real += sum(min(src.lengths[i], 64) for i in b["index"])
            tot += b["input_ids"].size
        return 1 - real / tot
    assert padding(16) < 0.5 * padding(1)


def test_token_store_source_and_truncation(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 99, L).astype(np.int32), np.ones(L, np.uint8)) for L in rng.integers(1, 50, 30)]
    store = TokenStore(write_token_store(str(tmp_path / "s"), samples, max_length=64))
    for b in take(make_batches(store, global_batch_size=4, seq_len=16, seed=0, num_threads=0), 7):
        assert b["input_ids"].shape == (4, 16) and sorted(b) == ["index", "input_ids", "loss_mask"]
        for r, i in enumerate(b["index"]):
            n = min(len(samples[i][0]), 16)  # longer samples truncated to seq_len
            np.testing.assert_array_equal(b["input_ids"][r, :n], samples[i][0][:n])
            assert b["loss_mask"][r].sum() == n


def test_errors():
    src = Source()
    with pytest.raises(ConfigError, match="divisible by process_count"):
        make_batches(src, **{**KW, "global_batch_size": 6}, process_count=4)
    with pytest.raises(ConfigError, match="fewer than global_batch_size"):
        make_batches(Source(n=5), **KW)
    with pytest.raises(ConfigError, match="bucket_boundaries"):
        make_batches(src, **{**KW, "bucket_boundaries": (16, 64)})
    state = make_batches(src, **KW).get_state()
    with pytest.raises(ConfigError, match="different data setup.*seed"):
        make_batches(src, **{**KW, "seed": 1}, state=state)
    with pytest.raises(DataError, match="'input_ids' and 'loss_mask'"):
        make_batches([{"tokens": np.zeros(3)}], global_batch_size=1, seq_len=4, seed=0)
