"""Sequential Temperature Scaling of the confidence head (deepspec_jax.evaluation.sts),
its calibration.json, and ``python -m deepspec_jax.calibrate`` feeding the eval."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from deepspec_jax.errors import ConfigError
from deepspec_jax.evaluation import calibration as cal
from deepspec_jax.evaluation import sts


def _synthetic_rounds(n: int, seed: int, distort=(3.0, 0.4, 2.0, 1.0)) -> sts.Rounds:
    """Rounds whose true per-position acceptance is sigmoid(z_k) (so the cumulative
    product of sigmoid(z) is calibrated), observed through logits z_k * distort[k]."""
    rng = np.random.default_rng(seed)
    w = len(distort)
    z = rng.normal(0.5, 1.5, (n, w))
    ok = rng.random((n, w)) < 1.0 / (1.0 + np.exp(-z))
    accepted = np.cumprod(ok, axis=1).sum(axis=1)
    prop = np.where(rng.random(n) < 0.2, rng.integers(1, w + 1, n), w)   # some short rounds
    accepted = np.minimum(accepted, prop)
    return sts.Rounds(z * np.asarray(distort)[None], prop.astype(np.int64),
                      accepted.astype(np.int64))


def test_sts_reduces_held_out_ece_and_preserves_order():
    fit, held = _synthetic_rounds(6000, 0), _synthetic_rounds(6000, 1)
    temps = sts.fit_temperatures(fit)
    # the fitted temperatures undo the distortion of each position
    # (position 4's cumulative predictions are mostly tiny: ECE constrains it less)
    np.testing.assert_allclose(temps[:3], [3.0, 0.4, 2.0], rtol=0.15)
    assert 0.7 < temps[3] < 1.45
    before = sts.per_position_ece(held, np.ones(held.width))
    after = sts.per_position_ece(held, temps)
    for k in (0, 1, 2):                                   # the distorted positions
        assert after[k] < 0.5 * before[k], (k, before, after)
    assert np.mean(after) < np.mean(before)
    # order preserving: each position's calibrated confidence ranks rounds as the raw one
    for k in range(held.width):
        raw = held.logits[:, k]
        calibrated = 1.0 / (1.0 + np.exp(-raw / temps[k]))
        np.testing.assert_array_equal(np.argsort(raw, kind="stable"),
                                      np.argsort(calibrated, kind="stable"))
    p_raw, y = sts.position_scores(held, np.ones(held.width))[0]
    p_cal, _ = sts.position_scores(held, temps)[0]
    assert cal.auroc_exact(p_raw, y) == pytest.approx(cal.auroc_exact(p_cal, y), abs=1e-12)


def test_sts_is_the_sequential_grid_argmin():
    """Brute force: position k's temperature minimises the ECE of the cumulative product
    over the grid with the earlier temperatures fixed at their fitted values."""
    rounds = _synthetic_rounds(800, 2)
    grid = np.geomspace(0.1, 10.0, 31)
    temps = sts.fit_temperatures(rounds, grid)
    for k in range(rounds.width):
        errs = []
        for t in grid:
            trial = temps.copy()
            trial[k] = t
            errs.append(sts.per_position_ece(rounds, trial)[k])
        assert sts.per_position_ece(rounds, temps)[k] == pytest.approx(min(errs), abs=1e-12)
    # a position no round reached keeps temperature 1
    short = sts.Rounds(rounds.logits, np.minimum(rounds.proposal_lengths, 2),
                       np.minimum(rounds.accepted, 2))
    assert list(sts.fit_temperatures(short, grid)[2:]) == [1.0, 1.0]


def test_calibration_json_round_trip_and_refusals(tmp_path):
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text('{"a": 1}')
    (draft / "params.bin").write_bytes(b"\x00" * 64)
    c = sts.Calibration((1.5, 0.8, 1.0, 2.0), sts.draft_fingerprint(str(draft)),
                        {"num_rounds": 10}, [0.1] * 4, [0.05] * 4)
    path = sts.save(c, str(draft))
    assert os.path.basename(path) == "calibration.json"
    assert sts.draft_fingerprint(str(draft)) == c.draft_fingerprint   # sidecar excluded
    assert sts.load(str(draft), 4) == c
    assert sts.load(str(tmp_path), 4) is None                          # no file: no calibration
    with pytest.raises(ConfigError, match=r"calibration.json: field 'temperatures' must be 5"):
        sts.load(str(draft), 5)
    (draft / "params.bin").write_bytes(b"\x01" * 64)                   # another draft's weights
    with pytest.raises(ConfigError, match=r"calibration.json: fitted on a different draft.*"
                                          r"draft_fingerprint.*deepspec_jax.calibrate"):
        sts.load(str(draft), 4)
    raw = json.loads(open(path).read())
    raw["format_version"] = 99
    open(path, "w").write(json.dumps(raw))
    with pytest.raises(ConfigError, match="format_version"):
        sts.load(str(draft), 4)


@pytest.mark.slow
def test_calibrate_cli_then_eval_reports_before_and_after(tmp_path):
    """calibrate writes <draft>/calibration.json on held-out prompts; the eval then reports
    the raw and the calibrated reliability and gates the threshold with it."""
    draft = tmp_path / "draft"
    shutil.copytree(os.path.join(REPO, "deepspec_jax", "assets", "default_draft"), draft)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "deepspec_jax.calibrate", f"--draft={draft}",
                           "--max_samples=4", "--max_new_tokens=32"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((draft / "calibration.json").read_text())
    assert len(rec["temperatures"]) == 4 and all(t > 0 for t in rec["temperatures"])
    assert rec["fitted_on"]["num_samples"] == 4 and rec["fitted_on"]["num_rounds"] > 10
    # position 1's temperature minimises its ECE on the fitting rounds over a grid with 1.0
    assert rec["ece_after"][0] <= rec["ece_before"][0] + 1e-12

    # refuses the eval's own prompts
    bad = subprocess.run([sys.executable, "-m", "deepspec_jax.calibrate", f"--draft={draft}",
                          "--datasets=gsm8k"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "eval set" in bad.stderr

    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "deepspec_jax.eval", "--target=smollm2-135m",
                           f"--draft={draft}", "--datasets=gsm8k", "--max_samples=2",
                           "--max_new_tokens=32", "--noautoregressive", f"--output_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STS calibration" in proc.stdout and "gsm8k (STS)" in proc.stdout
    res = json.loads((out / "gsm8k" / "results.json").read_text())
    assert res["sts_temperatures"] == pytest.approx(rec["temperatures"])
    raw, after = res["confidence"], res["confidence_sts"]
    assert raw["num_scored"] == after["num_scored"] > 0
    for a, b in zip(raw["per_position"], after["per_position"]):
        assert a["count"] == b["count"]
        if a["count"]:   # STS is monotone per position: position 1's ranking is unchanged
            assert a["position"] > 1 or a["auroc_exact"] == pytest.approx(b["auroc_exact"])
    assert os.path.isfile(os.path.join(tmp_path, res["artifacts"]["reliability_png"]))

    # a calibration fitted on another draft is refused by name
    cfg = json.loads((draft / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (draft / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "deepspec_jax.eval", "--target=smollm2-135m",
                           f"--draft={draft}", "--datasets=gsm8k", "--max_samples=1",
                           "--max_new_tokens=8", "--noautoregressive", f"--output_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1 and "calibration.json: fitted on a different draft" in proc.stderr
