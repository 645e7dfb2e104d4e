"""Target-feature cache: round trip against the target forward, resume, validation, corruption."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_sets, load_manifest
from deepspec_jax import load_target
from deepspec_jax.data import build_features as bf
from deepspec_jax.data.feature_cache import (FeatureCache, FeatureCacheWriter, chunk_file,
                                             estimate_bytes, token_store_fingerprint)
from deepspec_jax.data.jsonl import DataError

LAYER_IDS = (-1, 1, 3)
MAX_LEN = 32
LENGTHS = [5, 17, 3, 32, 12, 9, 1, 22]   # 8 samples; batch 3 -> a padded last batch


class FakeStore:
    """The TokenStore interface: len, [i] -> input_ids/loss_mask, lengths, manifest."""

    def __init__(self, lengths, vocab=512, seed=0, max_length=MAX_LEN):
        rng = np.random.default_rng(seed)
        self.samples = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
        self.lengths = np.asarray(lengths, np.int64)
        self.manifest = {"target": "target_qwen3_tiny", "max_length": max_length,
                         "num_tokens": int(self.lengths.sum())}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        ids = self.samples[i]
        return {"input_ids": ids, "loss_mask": np.ones_like(ids, np.uint8)}


def _fixture_target_dir():
    for fs in fixture_sets():
        g = load_manifest(fs)["global"]
        if "target_dir" in g:
            return os.path.join(fs, g["target_dir"])
    pytest.fail("no fixture set with a target_dir (set DEEPSPEC_FIXTURES)")


@pytest.fixture(scope="module")
def target():
    return load_target(_fixture_target_dir(), dtype="float32")


@pytest.fixture(scope="module")
def store():
    return FakeStore(LENGTHS)


def _build(store, target, out, **kw):
    kw = {"batch_size": 3, "dtype": "float32", "compression": "zstd", "smallest_bucket": 8,
          "progress": False, "log": lambda *_: None, **kw}
    return bf.build_feature_cache(store, target, LAYER_IDS, str(out), **kw)


@pytest.fixture(scope="module")
def f32_cache(tmp_path_factory, store, target):
    out = tmp_path_factory.mktemp("cache") / "f32"
    res = _build(store, target, out)
    assert res.complete and res.written_now == len(LENGTHS)
    return str(out)


def _expect(store, **over):
    e = {"target": "target_qwen3_tiny", "layer_ids": LAYER_IDS, "hidden_size": 64,
         "dtype": "float32", "token_store": store}
    return {**e, **over}


def _all(cache):
    return [cache[i] for i in range(len(cache))]


def test_roundtrip_equals_target_forward(f32_cache, store, target):
    cache = FeatureCache.open(f32_cache, expect=_expect(store))
    assert len(cache) == len(LENGTHS)
    np.testing.assert_array_equal(cache.lengths, LENGTHS)
    # independent reference: one unbucketed forward of all samples through the public API
    ids = np.zeros((len(LENGTHS), MAX_LEN), np.int32)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = store[i]["input_ids"]
    ref = target.forward(ids, layer_ids=LAYER_IDS)
    feats, last = np.asarray(ref.features), np.asarray(ref.last_hidden)
    assert feats.shape[-1] == len(LAYER_IDS) * 64
    for i, n in enumerate(LENGTHS):
        s = cache[i]
        assert s["features"].dtype == np.float32 and s["features"].shape == (n, 192)
        assert s["target_last_hidden"].shape == (n, 64)
        np.testing.assert_allclose(s["features"], feats[i, :n], atol=2e-6, rtol=0)
        np.testing.assert_allclose(s["target_last_hidden"], last[i, :n], atol=2e-6, rtol=0)
    # negative index and batched reads agree with single reads
    np.testing.assert_array_equal(cache[-1]["features"], cache[len(cache) - 1]["features"])
    for a, b in zip(cache.get_many([3, 0, 3]), [cache[3], cache[0], cache[3]]):
        np.testing.assert_array_equal(a["features"], b["features"])
    with pytest.raises(IndexError):
        cache[len(LENGTHS)]
    # grain worker processes receive the source by in-memory pickling: it re-opens by path
    import pickle
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[4]["target_last_hidden"], cache[4]["target_last_hidden"])


def test_bf16_cache_is_the_cast(tmp_path, f32_cache, store, target):
    res = _build(store, target, tmp_path / "bf16", dtype="bfloat16", compression="blosc")
    assert res.complete
    cache = FeatureCache.open(str(tmp_path / "bf16"), expect=_expect(store, dtype="bfloat16"))
    ref = FeatureCache.open(f32_cache)
    for s, r in zip(_all(cache), _all(ref)):
        for k in ("features", "target_last_hidden"):
            assert s[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(s[k], r[k].astype(ml_dtypes.bfloat16))


def test_resume_after_interruption(tmp_path, f32_cache, store, target):
    out = tmp_path / "resume"
    first = _build(store, target, out, max_batches=1)
    assert not first.complete and first.written_now == 3 and first.written_total == 3
    with pytest.raises(DataError, match=r"did not finish \(3 of 8 samples written\).*resume"):
        FeatureCache.open(str(out))
    # a crash after a chunk write but before its mark: that sample is redone
    plan = json.load(open(out / "build.json"))
    writer = FeatureCacheWriter(str(out), plan, np.asarray(LENGTHS, np.int32))
    redo = int(np.flatnonzero(writer.written)[0])
    writer.mark([redo], False)
    second = _build(store, target, out)
    assert second.complete and second.written_now == len(LENGTHS) - 2
    assert _build(store, target, out).written_now == 0  # complete: nothing to do
    # (a resumed run batches samples differently; padded shapes move fp32 results ~1e-7)
    got, ref = FeatureCache.open(str(out)), FeatureCache.open(f32_cache)
    for s, r in zip(_all(got), _all(ref)):
        np.testing.assert_allclose(s["features"], r["features"], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(s["target_last_hidden"], r["target_last_hidden"], atol=1e-6, rtol=1e-5)


def test_resume_with_other_settings_is_refused(tmp_path, store, target):
    out = tmp_path / "c"
    _build(store, target, out, max_batches=1)
    with pytest.raises(DataError, match=r"field 'dtype': the cache has 'float32', expected 'bfloat16'"):
        _build(store, target, out, dtype="bfloat16")
    with pytest.raises(DataError, match="token_store_fingerprint"):
        _build(FakeStore(LENGTHS, seed=1), target, out)


@pytest.mark.parametrize("key,value,field", [
    ("layer_ids", (1, 3), "layer_ids"),
    ("hidden_size", 32, "hidden_size"),
    ("target", "/models/Qwen3-4B", "target"),
    ("dtype", "bfloat16", "dtype"),
    ("token_store", FakeStore(LENGTHS[:-1]), "token_store_fingerprint"),
])
def test_manifest_mismatch(f32_cache, store, key, value, field):
    with pytest.raises(DataError) as e:
        FeatureCache.open(f32_cache, expect=_expect(store, **{key: value}))
    msg = str(e.value)
    assert f32_cache in msg and f"field '{field}'" in msg and "Rebuild the cache" in msg
    if key != "token_store":
        have = {"layer_ids": [-1, 1, 3], "hidden_size": 64, "target": "'target_qwen3_tiny'",
                "dtype": "'float32'"}[key]
        want = {"layer_ids": [1, 3], "hidden_size": 32, "target": "'Qwen3-4B'",
                "dtype": "'bfloat16'"}[key]
        assert f"the cache has {have}, the run config has {want}" in msg


def test_expect_accepts_equivalent_values(f32_cache, store):
    fp = token_store_fingerprint(store)
    FeatureCache.open(f32_cache, expect=_expect(store, layer_ids=[-1, 1, 3],
                                                dtype=np.float32, token_store=fp,
                                                target=_fixture_target_dir()))
    with pytest.raises(ValueError, match="unknown key"):
        FeatureCache.open(f32_cache, expect={"layer_id": (1,)})


def test_missing_manifest_and_not_a_cache(tmp_path, f32_cache):
    with pytest.raises(DataError, match="not found"):
        FeatureCache.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing.*not a feature cache"):
        FeatureCache.open(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(f32_cache, broken)
    os.remove(broken / "manifest.json")
    with pytest.raises(DataError, match=r"did not finish \(8 of 8 samples written\)"):
        FeatureCache.open(str(broken))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a feature cache"):
        FeatureCacheWriter(str(tmp_path / "other"), {"num_samples": 1, "max_length": 1},
                           np.ones(1, np.int32))


def test_truncated_or_missing_chunk_is_detected_and_repaired(tmp_path, f32_cache, store, target):
    bad = tmp_path / "bad"
    shutil.copytree(f32_cache, bad)
    victim = chunk_file(str(bad), "features", 3)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    os.remove(chunk_file(str(bad), "target_last_hidden", 5))
    cache = FeatureCache.open(str(bad))
    cache[2]  # other samples still read
    with pytest.raises(DataError) as e:
        cache[3]
    assert "sample 3" in str(e.value) and victim in str(e.value) and "--repair" in str(e.value)
    with pytest.raises(DataError, match="sample 5.*is missing"):
        cache[5]
    with pytest.raises(DataError, match="sample 3"):
        cache.get_many([0, 3])
    res = _build(store, target, bad, repair=True)
    assert res.repaired == (3, 5) and res.written_now == 2 and res.complete
    fixed, ref = FeatureCache.open(str(bad)), FeatureCache.open(f32_cache)
    for i in (3, 5):
        np.testing.assert_allclose(fixed[i]["features"], ref[i]["features"], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(fixed[i]["target_last_hidden"], ref[i]["target_last_hidden"],
                                   atol=1e-6, rtol=1e-5)


def test_bit_flip_is_detected(tmp_path, f32_cache):
    bad = tmp_path / "flip"
    shutil.copytree(f32_cache, bad)
    victim = chunk_file(str(bad), "target_last_hidden", 1)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(bytes(data))
    with pytest.raises(DataError, match="sample 1"):
        FeatureCache.open(str(bad))[1]


def test_estimate_by_hand():
    # per token: (2 layers + last hidden) * 4 hidden * 4 bytes = 48; lengths capped: 3 + 8
    est = estimate_bytes(2, [3, 100], 8, 2, 4, "float32", "none")
    assert est.bytes_per_token == 48 and est.total_tokens == 11
    # chunks: 2 samples * 8 rows * 48 + a 4-byte crc per sample chunk (2 arrays);
    # lengths int32 + written uint8 (5 bytes/sample) + one crc each
    assert est.upper_bound_bytes == 2 * 8 * 48 + 2 * 2 * 4 + 2 * 5 + 2 * 4 == 802
    assert est.valid_bytes == 11 * 48 + 16 + 10 + 8 == 562
    assert est.expected_bytes == 802
    # the reference's Qwen3-4B setting: 5 layers of 2560, bf16 -> 30720 bytes per token
    big = estimate_bytes(1000, 2_000_000, 4096, 5, 2560, "bfloat16", "zstd")
    assert big.bytes_per_token == 30720 and big.expected_bytes == big.valid_bytes
    assert big.valid_bytes - 2_000_000 * 30720 == 1000 * 13 + 8


def test_estimate_is_exact_on_disk_uncompressed(tmp_path, store, target):
    out = tmp_path / "raw"
    res = _build(store, target, out, compression="none")
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out)
                  for f in fs if not f.endswith(".json"))
    assert on_disk == res.estimate.upper_bound_bytes
    est = estimate_bytes(len(LENGTHS), sum(LENGTHS), MAX_LEN, len(LAYER_IDS), 64, "float32", "none")
    assert est.upper_bound_bytes == on_disk


def test_length_buckets_and_batches():
    assert bf.length_buckets(2048, 64) == (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    assert bf.length_buckets(100, 64) == (64, 96, 100)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 301, 103)
    todo = np.flatnonzero(rng.random(103) < 0.8)
    buckets = bf.length_buckets(300, 16)
    batches = bf.plan_batches(lengths, todo, 8, buckets)
    idx = np.concatenate([b for b, _ in batches])
    assert all(b.shape == (8,) for b, _ in batches)
    assert sorted(idx[idx >= 0].tolist()) == sorted(todo.tolist())
    assert (idx < 0).sum() == -len(todo) % 8
    for b, padded in batches:
        real = lengths[b[b >= 0]]
        assert padded in buckets and real.max() <= padded
        assert padded == min(x for x in buckets if x >= real.max())  # the tightest bucket


def test_compiles_once_per_bucket(tmp_path, store, target):
    res = _build(store, target, tmp_path / "b", batch_size=3)
    # sorted lengths 1 3 5 | 9 12 17 | 22 32 -> padded to 8, 24 (17 <= 24), 32
    assert res.padded_lengths == (8, 24, 32)
    fn = bf._features
    before = fn._cache_size()
    res = _build(store, target, tmp_path / "c", batch_size=4)  # a new batch shape
    # 1 3 5 9 | 12 17 22 32 -> 12, 32: two batches, two compilations, then none
    assert res.padded_lengths == (12, 32) and fn._cache_size() == before + 2
    _build(store, target, tmp_path / "d", batch_size=4)
    assert fn._cache_size() == before + 2


def test_cli_estimate_only(capsys):
    argv = ["--estimate_only", "--num_samples=1000", "--total_tokens=2000000",
            "--max_length=4096", "--hidden_size=2560", "--layer_ids=1,9,17,25,33"]
    assert bf.main(argv) == 0
    out = capsys.readouterr().out
    est = estimate_bytes(1000, 2_000_000, 4096, 5, 2560, "bfloat16", "zstd")
    assert f"{est.upper_bound_bytes:,} bytes" in out and "upper bound (uncompressed" in out
    assert f"{est.valid_bytes:,} bytes" in out
    with pytest.raises(SystemExit):
        bf.main(["--estimate_only", "--layer_ids=1"])  # nothing to estimate from


def test_cli_build_resumes(tmp_path, store, capsys, f32_cache):
    from deepspec_jax.data.token_store import TokenStore, write_token_store

    tokens = write_token_store(str(tmp_path / "tokens"),
                               [(store[i]["input_ids"], store[i]["loss_mask"]) for i in range(len(store))],
                               max_length=MAX_LEN, target="target_qwen3_tiny")
    real = TokenStore(tokens)
    assert token_store_fingerprint(real) == token_store_fingerprint(store)  # same content
    assert token_store_fingerprint(FakeStore(LENGTHS, max_length=64)) != token_store_fingerprint(store)
    out = str(tmp_path / "cli")
    argv = [f"--tokens={tokens}", f"--target={_fixture_target_dir()}", "--layer_ids=-1,1,3",
            f"--output={out}", "--batch_size=3", "--dtype=float32", "--smallest_bucket=8",
            "--no_progress"]
    assert bf.main(argv + ["--max_batches=2"]) == 0
    text = capsys.readouterr().out
    assert text.index("upper bound") < text.index("stopped after 2 batch(es): 6 of 8")
    assert bf.main(argv) == 0
    assert "resuming, 6 of 8 samples already written" in capsys.readouterr().out
    assert bf.main([f"--tokens={tokens}", f"--target={_fixture_target_dir()}", "--layer_ids=1",
                    "--estimate_only", "--dtype=float32", "--compression=none"]) == 0
    est = estimate_bytes(8, LENGTHS, MAX_LEN, 1, 64, "float32", "none")
    assert f"{est.upper_bound_bytes:,} bytes" in capsys.readouterr().out
    cache = FeatureCache.open(out, expect={"target": _fixture_target_dir(),
                                           "layer_ids": LAYER_IDS, "token_store": real})
    np.testing.assert_allclose(cache[7]["features"], FeatureCache.open(f32_cache)[7]["features"],
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(SystemExit):  # the fixture target has layers 0..5
        bf.main(argv[:2] + ["--layer_ids=1,6", f"--output={out}x"])


# ---------------------------------------------------------------------------
# a bf16 cache against online (fp32) features, with a stated tolerance
# ---------------------------------------------------------------------------

# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most half an ulp,
# 2^-8 of its magnitude. The cache is that rounding of fp32 features computed at bucketed
# batch shapes, which differ from one unbucketed forward by ~1e-7..1e-6 (absolute).
BF16_RTOL = 2.0 ** -8
FP32_ATOL = 3e-6


def _outside_bf16_tolerance(cached: np.ndarray, online: np.ndarray) -> np.ndarray:
    c, f = cached.astype(np.float32), online.astype(np.float32)
    return np.abs(c - f) > BF16_RTOL * np.abs(f) + FP32_ATOL


def test_bf16_cache_matches_online_features_and_loss(tmp_path, store, target):
    """A bf16 cache for the fixture Eagle3 draft's layers equals the online fp32 features
    up to bf16 rounding, and gives the Eagle3 training loss within the first-order bound
    that rounding implies: |dL| <= 2^-8 * sum |dL/dx * x| over every input x (features
    and last hidden), doubled for higher-order terms. A wrong layer or a shifted position
    is far outside both tolerances."""
    import jax
    import jax.numpy as jnp

    from deepspec_jax import load_draft
    from deepspec_jax.drafts.eagle3_train import eagle3_loss

    # a distilled draft: its loss depends on the features enough for a wrong layer to
    # show (a random draft's barely does)
    draft = load_draft(os.path.join(os.path.dirname(_fixture_target_dir()), "eagle3_distilled"))
    layer_ids = tuple(int(i) for i in draft.config.target_layer_ids)
    out = tmp_path / "bf16"
    bf.build_feature_cache(store, target, layer_ids, str(out), batch_size=4, dtype="bfloat16",
                           compression="none", smallest_bucket=32, progress=False,
                           log=lambda *_: None)
    cache = FeatureCache.open(str(out), expect=_expect(store, layer_ids=layer_ids,
                                                       dtype="bfloat16"))
    ids = np.zeros((len(LENGTHS), MAX_LEN), np.int32)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = store[i]["input_ids"]
    # online features, plus the layer below each: the classic off-by-one (HF's
    # hidden_states[i] is the output of layer i - 1)
    online = target.forward(ids, layer_ids=(layer_ids[0] - 1,) + layer_ids)
    both = np.asarray(online.features)
    d = target.config.hidden_size
    f32 = {"features": both[..., d:], "target_last_hidden": np.asarray(online.last_hidden)}
    off_by_one = both[..., :-d]
    bf16 = {k: np.zeros_like(v) for k, v in f32.items()}
    for i, n in enumerate(LENGTHS):
        s = cache[i]
        assert s["features"].dtype == ml_dtypes.bfloat16
        for k in bf16:
            bf16[k][i, :n] = s[k].astype(np.float32)

    def outside(got, want):
        return np.concatenate([_outside_bf16_tolerance(got[i, :n], want[i, :n]).ravel()
                               for i, n in enumerate(LENGTHS)])

    for k in f32:
        assert not outside(bf16[k], f32[k]).any(), k
        rel = np.abs(bf16[k] - f32[k]) / np.maximum(np.abs(f32[k]), 1e-30)
        assert rel.max() > 2.0 ** -10, "the cache was not rounded to bf16"
    shifted = np.roll(bf16["features"], 1, axis=1)   # positions shifted by one
    for wrong in (off_by_one, shifted):
        assert outside(wrong, f32["features"]).mean() > 0.5

    # the training loss; one compiled value-and-gradient serves every input
    attn = jnp.asarray(np.arange(MAX_LEN)[None] < np.asarray(LENGTHS)[:, None], jnp.int32)
    model = draft.model
    loss_grad = jax.jit(jax.value_and_grad(
        lambda f, h: eagle3_loss(model, jnp.asarray(ids), f, h, attn, attn).loss, argnums=(0, 1)))
    l32, (g_f, g_h) = loss_grad(f32["features"], f32["target_last_hidden"])
    bound = 2 * BF16_RTOL * float(jnp.sum(jnp.abs(g_f * f32["features"]))
                                  + jnp.sum(jnp.abs(g_h * f32["target_last_hidden"])))
    gap, *wrong = (abs(float(loss_grad(f, bf16["target_last_hidden"])[0]) - float(l32))
                   for f in (bf16["features"], off_by_one, shifted))
    assert gap <= bound, (gap, bound)
    assert min(wrong) > bound, (wrong, bound)   # a wrong layer / position shows
