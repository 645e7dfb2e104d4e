"""Evaluation metrics, calibration, datasets and tables on hand-computed cases.

Every expected number below was computed by hand from the definitions in SPEC §4 (and
the reference evaluator's formulas), not by running the code under test."""

from __future__ import annotations

import json
import math
import random
import types

import numpy as np
import pytest

from deepspec_jax.evaluation import calibration as cal
from deepspec_jax.evaluation import datasets as ds
from deepspec_jax.evaluation import metrics, report

# (accepted draft tokens, proposed draft tokens) per round, gamma = 4
ROUNDS = [(0, 4), (2, 4), (4, 4), (1, 3), (3, 4)]


def _stats(rounds=ROUNDS, gamma=4) -> dict:
    st = metrics.RoundStats(gamma)
    st.add([a + 1 for a, _ in rounds[:2]], [p for _, p in rounds[:2]])  # two "samples"
    st.add([a + 1 for a, _ in rounds[2:]], [p for _, p in rounds[2:]])
    return st.summary()


def test_round_metrics_hand_computed():
    s = _stats()
    assert s["num_rounds"] == 5
    assert s["acceptance_length"] == pytest.approx(15 / 5)          # (1+3+5+2+4)/5
    assert s["draft_tokens_per_proposal"] == pytest.approx(19 / 5)  # (4+4+4+3+4)/5
    assert s["verify_rate"] == pytest.approx(15 / (19 + 5))          # reference formula
    # accept_rate@k: rounds with accepted > k / rounds with proposed > k
    assert s["accept_rates_by_position"] == pytest.approx([4 / 5, 3 / 5, 2 / 5, 1 / 4])
    # conditional: accepted > k / (proposed > k and accepted >= k)
    assert s["conditional_accept_rates_by_position"] == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert s["accepted_draft_tokens_histogram"] == [1, 1, 1, 1, 1]
    assert s["proposals_at_position"] == [5, 5, 5, 4]


def test_round_metrics_all_accepted_and_all_rejected():
    full = _stats([(3, 3)] * 4, gamma=3)
    assert full["acceptance_length"] == 4.0 and full["verify_rate"] == 1.0
    assert full["accept_rates_by_position"] == [1.0, 1.0, 1.0]
    assert full["accepted_draft_tokens_histogram"] == [0, 0, 0, 4]
    none = _stats([(0, 3)] * 4, gamma=3)
    assert none["acceptance_length"] == 1.0 and none["verify_rate"] == pytest.approx(4 / 16)
    assert none["accept_rates_by_position"] == [0.0, 0.0, 0.0]
    # nobody reaches position 2 or 3, so the conditional rate there is undefined
    assert none["conditional_accept_rates_by_position"] == [0.0, None, None]


def test_positions_never_proposed_are_undefined_not_zero():
    s = _stats([(1, 2), (0, 1)], gamma=4)
    assert s["accept_rates_by_position"] == [0.5, 0.0, None, None]
    assert s["accepted_draft_tokens_histogram"] == [1, 1, 0, 0, 0]


def test_stop_round_uses_reported_accepted_drafts():
    """A round ended by an accepted stop token records only its accepted drafts (no bonus):
    the engine-reported drafts override the ``length - 1`` default."""
    st = metrics.RoundStats(4)
    st.add([3, 2], [4, 2], accepted_drafts=[2, 2])
    s = st.summary()
    assert s["acceptance_length"] == 2.5
    assert s["accept_rates_by_position"] == [1.0, 1.0, 0.0, 0.0]
    assert s["verify_rate"] == pytest.approx(5 / (6 + 2))


def test_round_stats_rejects_inconsistent_rounds():
    st = metrics.RoundStats(3)
    with pytest.raises(ValueError, match="one entry per round"):
        st.add([1, 2], [3])
    with pytest.raises(ValueError, match="accepted 3 draft tokens of 2"):
        st.add([4], [2])
    with pytest.raises(ValueError, match="more than the draft's maximum 3"):
        st.add([1], [5])


# ---------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------

def test_ece_perfect_calibration_is_zero():
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert cal.ece(p, y) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed():
    assert cal.ece([0.9] * 10, [0] * 10) == pytest.approx(0.9)
    # two bins: |0.2 - 0.5| * 2/6 + |0.8 - 0.75| * 4/6
    p = [0.2, 0.2, 0.8, 0.8, 0.8, 0.8]
    y = [1, 0, 1, 1, 1, 0]
    assert cal.ece(p, y) == pytest.approx(0.3 * 2 / 6 + 0.05 * 4 / 6)
    # same mean prediction in one bin hides miscalibration within the bin (20 bins)
    assert cal.ece([0.41, 0.44], [1, 0]) == pytest.approx(abs(0.425 - 0.5))


def test_auroc_separable_reversed_and_uninformative():
    p = [0.9, 0.8, 0.7, 0.2, 0.1, 0.05]
    y = [1, 1, 1, 0, 0, 0]
    for f in (cal.auroc_histogram, cal.auroc_exact):
        assert f(p, y) == pytest.approx(1.0)
        assert f(p, [1 - v for v in y]) == pytest.approx(0.0)
        assert f([0.5] * 6, y) == pytest.approx(0.5)
        assert math.isnan(f(p, [1] * 6))        # one class only: undefined


def test_auroc_histogram_vs_exact_within_a_bin():
    """Scores 1e-4 apart share a 1000-bin histogram bin (counted 1/2) but are ordered
    exactly by the rank statistic."""
    p, y = [0.5004, 0.5001], [1, 0]
    assert cal.auroc_exact(p, y) == 1.0
    assert cal.auroc_histogram(p, y) == 0.5


def test_auroc_exact_matches_pair_count():
    rng = np.random.default_rng(0)
    p = np.round(rng.random(200), 2)           # many ties
    y = rng.random(200) < p
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert cal.auroc_exact(p, y) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_brier_hand_computed():
    assert cal.brier([0.8, 0.8], [1, 0]) == pytest.approx((0.04 + 0.64) / 2)
    assert cal.brier([1.0, 0.0], [1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_prefix_predictions_cumulative_product_and_labels():
    p, y = cal.prefix_predictions([0.0, 0.0, 0.0, 5.0], proposal_length=3, accepted_drafts=1)
    assert p == pytest.approx([0.5, 0.25, 0.125])     # prod of sigmoid(0) = 0.5
    assert list(y) == [1.0, 0.0, 0.0]                 # only the 1-token prefix survived
    with pytest.raises(ValueError, match="only 2 confidence logits"):
        cal.prefix_predictions([0.0, 0.0], proposal_length=3, accepted_drafts=0)


def test_confidence_calibration_per_position():
    c = cal.ConfidenceCalibration(3)
    big, small = 20.0, -20.0          # sigmoid ~1 / ~0
    # round 1: all 3 accepted, confident; round 2: none accepted, 1st position unsure
    c.add_sample([[big, big, big], [small, big, big]], accepted_drafts=[3, 0],
                 proposal_lengths=[3, 3])
    # round 3 proposes only 2 positions (threshold/stop): position 3 unscored
    c.add_round([big, small, big], proposal_length=2, accepted_drafts=1)
    s = c.summary()
    per = s["per_position"]
    assert [e["count"] for e in per] == [3, 3, 2]
    assert per[0]["target_mean"] == pytest.approx(2 / 3)
    assert per[0]["ece"] == pytest.approx(0.0, abs=1e-6)   # confident and right every time
    assert per[0]["auroc"] == 1.0 and per[0]["auroc_exact"] == 1.0
    assert per[2]["target_mean"] == 0.5
    assert s["num_scored"] == 8
    assert s["ece_mean"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one per round"):
        c.add_sample([[0.0]], accepted_drafts=[0, 1], proposal_lengths=[1])


def test_reliability_bins():
    bins = cal.reliability([0.12, 0.13, 0.91], [0, 1, 1])
    assert [b["bin"] for b in bins] == [2, 18]
    assert bins[0]["avg_pred"] == pytest.approx(0.125) and bins[0]["avg_target"] == 0.5
    assert bins[0]["count"] == 2 and bins[1]["range"] == [0.9, 0.95]


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [
    ("gsm8k", 500), ("math500", 500), ("aime25", 30), ("humaneval", 164), ("mbpp", 256),
    ("livecodebench", 500), ("mt-bench", 80), ("arena-hard-v2", 500)])
def test_reference_sample_counts(name, count):
    assert len(ds.load_prompts(name, None, 980406)) == count
    assert ds.DEFAULT_COUNTS[name] == count


def test_sampling_is_the_reference_shuffle_and_deterministic():
    rows = ds.load_rows("gsm8k")
    a = ds.load_prompts("gsm8k", 5, 980406)
    b = ds.load_prompts("gsm8k", 5, 980406)
    assert a == b
    expected = list(range(len(rows)))
    random.Random(980406).shuffle(expected)
    assert [p.index for p in a] == expected[:5]
    assert [p.index for p in ds.load_prompts("gsm8k", 5, 1)] != [p.index for p in a]
    # no shuffle when the dataset is not larger than the request: file order
    assert [p.index for p in ds.load_prompts("aime25", 30, 980406)] == list(range(30))


def test_first_turn_only():
    with open(f"{ds.DATASET_ROOT}/mt-bench.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert len(first["turns"]) == 2
    p = ds.load_rows("mt-bench")[0]
    assert p.text == first["turns"][0] and p.prompt_ids is None


def test_alpaca_and_unknown_datasets():
    names, notes = ds.resolve_datasets(None)
    assert "alpaca" not in names and len(names) == 8
    assert len(notes) == 1 and "alpaca" in notes[0] and "not available" in notes[0]
    with pytest.raises(ds.DatasetError, match="alpaca .*not available"):
        ds.resolve_datasets("gsm8k,alpaca")
    with pytest.raises(ds.DatasetError, match="unknown dataset 'gsm9k'; valid: .*gsm8k"):
        ds.resolve_datasets("gsm9k")
    with pytest.raises(ds.DatasetError, match="listed twice"):
        ds.resolve_datasets("gsm8k,gsm8k")
    assert ds.resolve_datasets("gsm8k, mt-bench") == (["gsm8k", "mt-bench"], [])


def test_jsonl_path_with_prompt_ids_and_bad_rows(tmp_path):
    good = tmp_path / "ids.jsonl"
    good.write_text('{"prompt_ids": [1, 2, 3]}\n\n{"turns": ["hi", "again"]}\n')
    assert ds.resolve_datasets(str(good))[0] == [str(good)]
    assert ds.dataset_label(str(good)) == "ids"
    rows = ds.load_prompts(str(good), None, 0)       # not in the reference list: all rows
    assert rows[0].prompt_ids == (1, 2, 3) and rows[1].text == "hi"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n')
    with pytest.raises(ds.DatasetError, match=r"bad.jsonl:1: field 'turns'"):
        ds.load_rows(str(bad))
    bad.write_text('{"prompt_ids": [1, -2]}\n')
    with pytest.raises(ds.DatasetError, match="non-negative token ids"):
        ds.load_rows(str(bad))
    with pytest.raises(ds.DatasetError, match="no such file"):
        ds.resolve_datasets(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------
# tables / json
# ---------------------------------------------------------------------------

def _row(**kw) -> dict:
    row = {"dataset": "gsm8k", "num_samples": 2, "output_tokens": 100,
           "output_tokens_per_second": 50.0, "verifications_per_second": 12.5,
           "autoregressive": {"output_tokens_per_second": 25.0}, "speedup": 2.0}
    row.update(_stats())
    row.update(kw)
    return row


def test_results_table_layout():
    text = report.results_table([_row()], "/models/SmolLM2/", "/drafts/dspark-x")
    lines = text.splitlines()
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header[:12] == ["dataset", "target_model", "draft_model", "#propose", "accept_len",
                           "verify_rate", "samples", "out_tokens", "tok/s", "verify/s",
                           "ar_tok/s", "speedup"]
    assert header[12:] == [f"accept_rate@{k}" for k in range(4)]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:12] == ["gsm8k", "SmolLM2", "dspark-x", "3.80+1", "3.00", "0.6250", "2",
                          "100", "50.00", "12.50", "25.00", "2.00x"]
    assert cells[12:] == ["0.8000", "0.6000", "0.4000", "0.2500"]
    assert len({len(line) for line in lines}) == 1      # aligned grid


def test_confidence_table_and_strict_json(tmp_path):
    c = cal.ConfidenceCalibration(2)
    c.add_round([3.0, 3.0], 2, 2)
    row = _row(num_rounds=1, confidence=c.summary())
    text = report.confidence_table([row], "d")
    assert "ece@1" in text and "auroc@2" in text
    path = report.write_json(str(tmp_path / "r.json"), {"x": float("nan"), "y": np.float32(2),
                                                         "z": (1, 2)})
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"x": None, "y": 2.0, "z": [1, 2]}


def test_compatibility_errors_name_the_mismatch():
    """The one target/draft check (the engine and the eval CLI call it)."""
    from deepspec_jax.errors import ConfigError
    from deepspec_jax.spec_decode import check_compatible

    def target(vocab, layers, hidden=64):
        return types.SimpleNamespace(config=types.SimpleNamespace(
            vocab_size=vocab, num_hidden_layers=layers, hidden_size=hidden), source="T")

    def draft(kind="dspark", ids=(-1, 2)):
        return types.SimpleNamespace(config=types.SimpleNamespace(
            vocab_size=512, num_target_layers=6, target_layer_ids=ids, hidden_size=64),
            source="D", kind=kind)

    assert check_compatible(target(512, 6), draft()) == (-1, 2)
    with pytest.raises(ConfigError, match="D: draft vocab_size 512 != target vocab_size 49152"):
        check_compatible(target(49152, 6), draft())
    with pytest.raises(ConfigError, match="hidden_size 64 != target hidden_size 32"):
        check_compatible(target(512, 6, hidden=32), draft())
    with pytest.raises(ConfigError, match="num_target_layers 6 != the target's 30"):
        check_compatible(target(512, 30), draft())
    with pytest.raises(ConfigError, match=r"contain \[-1\].*allowed: 0\.\.4"):
        check_compatible(target(512, 6), draft("eagle3"))   # eagle3 never reads embeddings
    with pytest.raises(ConfigError, match=r"contain \[5\]"):
        check_compatible(target(512, 6), draft(ids=(1, 5)))  # the last layer is no feature
    with pytest.raises(ConfigError, match="draft kind 'medusa' is unknown"):
        check_compatible(target(512, 6), draft("medusa"))


# ---------------------------------------------------------------------------
# runner with a synthetic engine (no model): metrics, files, degenerate samples
# ---------------------------------------------------------------------------

def test_runner_with_synthetic_rounds(tmp_path):
    from deepspec_jax.evaluation import runner

    data = tmp_path / "syn.jsonl"
    data.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3]}\n')
    # sample 0: ROUNDS[:3]; sample 1: stopped at its first token (no rounds at all)
    per_prompt = {(1, 2): ROUNDS[:3], (3,): []}
    calls = []

    def fake_spec(target, draft, ids, max_new_tokens, temperature, seed, confidence_threshold,
                  prompt_bucket):
        calls.append(("spec", seed, len(ids)))
        out = []
        for p in ids:
            rounds = per_prompt[tuple(p)]
            out.append(types.SimpleNamespace(
                tokens=[7] * (1 + sum(a + 1 for a, _ in rounds)),
                accepted_lengths=[a + 1 for a, _ in rounds],
                proposal_lengths=[q for _, q in rounds],
                confidences=np.full((len(rounds), 4), 2.0), num_rounds=len(rounds)))
        return out

    target = types.SimpleNamespace(
        source="/m/fake-target", tokenizer=None,
        generate=lambda ids, max_new_tokens, temperature, seed, prompt_bucket: (
            calls.append(("ar", seed, len(ids))) or [[7] * 5 for _ in ids]))
    draft = types.SimpleNamespace(kind="dspark", source="/d/fake-draft", config=types.SimpleNamespace(
        block_size=4, enable_confidence_head=True))
    settings = runner.Settings(max_new_tokens=32, seed=10, output_dir=str(tmp_path / "out"))
    dec = runner.Decoders(target, draft, settings, fake_spec)
    row = runner.evaluate_dataset(str(data), dec, target_name="t", draft_name="d")
    # warm-up call (seed 10) then one call per prompt with seed + sample index
    assert calls == [("spec", 10, 1), ("spec", 10, 1), ("spec", 11, 1),
                     ("ar", 10, 1), ("ar", 10, 1), ("ar", 11, 1)]
    assert row["num_rounds"] == 3 and row["num_samples"] == 2
    assert row["acceptance_length"] == pytest.approx((1 + 3 + 5) / 3)
    assert row["verify_rate"] == pytest.approx(9 / (12 + 3))
    assert row["accept_rates_by_position"] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert row["output_tokens"] == 10 + 1 and row["autoregressive"]["output_tokens"] == 10
    per = row["confidence"]["per_position"]
    # sigmoid(2)^k against the prefix labels of rounds (0,4), (2,4), (4,4)
    sig = 1 / (1 + math.exp(-2.0))
    assert per[1]["pred_mean"] == pytest.approx(sig ** 2)
    assert per[1]["target_mean"] == pytest.approx(2 / 3)
    assert per[1]["brier"] == pytest.approx(((sig ** 2 - 1) ** 2 * 2 + sig ** 4) / 3)
    with open(tmp_path / "out" / "syn" / "results.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["accepted_draft_tokens_histogram"] == [1, 0, 1, 0, 1]
    assert saved["samples"][1] == {"row": 1, "prompt_tokens": 1, "output_tokens": 1,
                                   "rounds": 0, "ar_output_tokens": 5}
    for key in ("acceptance_png", "reliability_png"):
        with open(saved["artifacts"][key], "rb") as f:
            assert f.read(4) == b"\x89PNG"
    # a threshold > 0 turns calibration off, as in the reference
    dec2 = runner.Decoders(target, draft, runner.Settings(
        max_new_tokens=32, confidence_threshold=0.5, output_dir=str(tmp_path / "o2"),
        run_autoregressive=False), fake_spec)
    row2 = runner.evaluate_dataset(str(data), dec2, target_name="t", draft_name="d")
    assert row2["confidence"] is None and "threshold 0" in row2["confidence_note"]
    assert row2["autoregressive"] is None and row2["speedup"] is None


def test_shared_prompt_bucket_covers_every_dataset(tmp_path):
    from deepspec_jax.evaluation import runner

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt_ids": [1, 2]}\n')
    b.write_text(json.dumps({"prompt_ids": [5] * 70}) + "\n" + '{"prompt_ids": [4]}\n')
    target = types.SimpleNamespace(source="t", tokenizer=None)
    s = runner.Settings()
    assert runner.shared_prompt_bucket([str(a)], target, s) == 64
    assert runner.shared_prompt_bucket([str(a), str(b)], target, s) == 128
    # max_samples=1 draws one row of b (seeded shuffle); the bucket follows the draw
    one = ds.load_prompts(str(b), 1, s.seed)[0]
    expect = 128 if one.prompt_ids == tuple([5] * 70) else 64
    assert runner.shared_prompt_bucket([str(b)], target,
                                       runner.Settings(max_samples=1)) == expect
