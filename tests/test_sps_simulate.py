"""SPS profiles (``deepspec_jax.sps``) and the cost calculator (``deepspec_jax.simulate``):
a measured profile covers every compiled verify size with positive times, is cached by
key and refused for another target/shape, reads as a staircase; the calculator's
arithmetic follows its cost model and reads both statistics formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepspec_jax import simulate, sps
from deepspec_jax.errors import ConfigError
from deepspec_jax.spec_decode import verify_buckets
from test_verify_policies import _pair


def test_measure_cache_and_refuse(tmp_path):
    target, draft = _pair()
    prof = sps.cached(target, 2, 4, context=16, directory=str(tmp_path), draft=draft, log=None)
    assert prof.buckets == verify_buckets(2, 4)
    assert all(s > 0 for s in prof.seconds) and prof.propose_seconds > 0 and prof.ar_seconds > 0
    assert prof.fixed_seconds > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    again = sps.cached(target, 2, 4, context=16, directory=str(tmp_path), draft=draft, log=None)
    assert again == prof                                  # read back, not re-measured
    path = str(tmp_path / files[0])
    with pytest.raises(ConfigError, match="not this target/machine"):
        sps.load(path, sps.profile_key(target, 3, 4, 16, draft))
    raw = json.loads(open(path).read())
    raw["seconds"] = raw["seconds"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="equally long"):
        sps.load(str(bad))


def test_staircase_and_table():
    prof = sps.SPSProfile((1, 2, 4, 5), (0.01, 0.02, 0.04, 0.05), 1, 5, 256, "k")
    assert [prof.seconds_at(b) for b in (1, 2, 3, 4, 5, 10)] == [0.01, 0.02, 0.04, 0.04, 0.05, 0.1]
    np.testing.assert_allclose(prof.steps_per_second(3), [100, 50, 25])


def test_prediction_arithmetic_and_stats_formats(tmp_path):
    prof = sps.SPSProfile((4, 8, 16, 20), (0.05, 0.06, 0.075, 0.08), 4, 5, 256, "k",
                          propose_seconds=0.02, ar_seconds=0.04)
    p = simulate.predict(prof, tau=2.0, verified=1.5)       # B = 4 * 2.5 = 10 -> 16's cost
    assert p["verify_tokens"] == 10 and p["round_ms"] == pytest.approx(95.0)
    assert p["tokens_per_s"] == pytest.approx(4 * 2.0 / 0.095, rel=1e-3)
    assert p["ar_tokens_per_s"] == pytest.approx(100.0)
    serving = tmp_path / "serving.json"
    serving.write_text(json.dumps({"results": [
        {"rows": 4, "policy": "ar", "tokens_per_s": 90.0},
        {"rows": 4, "policy": "scheduler", "tokens_per_s": 80.0, "tau": 2.0, "verified": 1.5}]}))
    rows = simulate.simulate(simulate.read_stats(str(serving)), {4: prof})
    assert rows[0]["error"] == pytest.approx(100.0 / 90.0 - 1, abs=1e-4)
    assert rows[1]["error"] == pytest.approx(p["tokens_per_s"] / 80.0 - 1, abs=1e-4)
    # a static batch advances at its slowest request: its tokens per round, not tau
    serving.write_text(json.dumps({"results": [
        {"rows": 4, "policy": "fixed", "tokens_per_s": 50.0, "tau": 2.0, "verified": 4.0,
         "tokens_per_round": 1.25}]}))
    (st,) = simulate.read_stats(str(serving))
    assert st["tau"] == 1.25 and st["verified"] == 4.0
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"dataset": "gsm8k", "acceptance_length": 1.6,
                               "draft_tokens_per_proposal": 4.0, "policy": "fixed"}))
    rows = simulate.simulate(simulate.read_stats(str(res)), {4: prof}, [4])
    assert rows[0]["verify_tokens"] == 20 and "error" not in rows[0]
    assert rows[0]["round_ms"] == pytest.approx(100.0)          # packed size 20 + propose
    # with the fixed policy's own verify (``extend`` of [4, 5]) timed, that is its cost
    timed = sps.SPSProfile(prof.buckets, prof.seconds, 4, 5, 256, "k", propose_seconds=0.02,
                           ar_seconds=0.04, fixed_seconds=0.07)
    rows = simulate.simulate(simulate.read_stats(str(res)), {4: timed}, [4])
    assert rows[0]["verify_tokens"] == 20 and rows[0]["round_ms"] == pytest.approx(90.0)
    # with rescale, the profile's plain step re-timed in the serving run scales the whole
    # profile: a run twice as slow (plain step 80 ms vs the profile's 40) predicts half the rate
    serving.write_text(json.dumps({"results": [
        {"rows": 4, "policy": "ar", "tokens_per_s": 50.0, "plain_step_seconds": 0.08},
        {"rows": 4, "policy": "scheduler", "tokens_per_s": 40.0, "tau": 2.0, "verified": 1.5,
         "plain_step_seconds": 0.08}]}))
    ar, sch = simulate.simulate(simulate.read_stats(str(serving)), {4: prof}, rescale=True)
    assert ar["scale"] == 2.0 and ar["tokens_per_s"] == pytest.approx(50.0)
    assert ar["error"] == pytest.approx(0.0) and ar["error_unscaled"] == pytest.approx(1.0)
    assert sch["round_ms"] == pytest.approx(190.0)
    assert sch["tokens_per_s"] == pytest.approx(p["tokens_per_s"] / 2, rel=1e-3)
    assert sch["error_unscaled"] == pytest.approx(p["tokens_per_s"] / 40.0 - 1, abs=1e-4)
    raw = simulate.simulate(simulate.read_stats(str(serving)), {4: prof})   # the default
    assert "scale" not in raw[1] and raw[1]["tokens_per_s"] == p["tokens_per_s"]
    assert prof.scaled(2.0).fixed_seconds is None and prof.scaled(0.5).ar_seconds == 0.02
    # with each round's verify size known, the verify cost is the mean over the rounds
    # (three rounds of anchors only, one of 20 tokens: not the cost of the mean, 16's)
    serving.write_text(json.dumps({"results": [
        {"rows": 4, "policy": "threshold", "tokens_per_s": 40.0, "tau": 1.5, "verified": 1.0,
         "verify_sizes": {"4": 3, "20": 1}}]}))
    (st,) = simulate.read_stats(str(serving))
    assert st["sizes"] == {4: 3, 20: 1}
    (row,) = simulate.simulate([st], {4: prof})
    assert row["round_ms"] == pytest.approx((3 * 50 + 80) / 4 + 20)
    # the serving benchmark's per-R context travels with its statistics
    serving.write_text(json.dumps({"results": [
        {"rows": 4, "policy": "ar", "tokens_per_s": 90.0, "context": 288}]}))
    assert simulate.read_stats(str(serving))[0]["context"] == 288
    with pytest.raises(ConfigError, match="no SPS profile for R=8"):
        simulate.simulate(simulate.read_stats(str(res)), {4: prof}, [8])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="neither an eval results.json"):
        simulate.read_stats(str(tmp_path / "x.json"))
