"""``--tree`` in the evaluation: the runner's tree block (synthetic engine, no model),
the results table's tree row, and (slow) the CLI end to end on the fixtures."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from test_eval_cli import DSPARK, TARGET, ids_dataset, run_cli  # noqa: F401  (fixture)


def _fake_engine(calls):
    """Chain: rounds (accepted drafts, proposed) = (1,4),(0,4); tree: (2,3),(3,3) with 7 and
    9 nodes; every call returns one result per prompt."""
    def spec(target, draft, ids, max_new_tokens, temperature, seed, confidence_threshold,
             prompt_bucket, tree=None):
        calls.append(("tree" if tree else "spec", seed, tree))
        out = []
        for _ in ids:
            if tree is None:
                rounds, nodes = [(1, 4), (0, 4)], None
            else:
                rounds, nodes = [(2, 3), (3, 3)], [7, 9]
            out.append(types.SimpleNamespace(
                tokens=[5] * (1 + sum(a + 1 for a, _ in rounds)),
                accepted_lengths=[a + 1 for a, _ in rounds],
                proposal_lengths=[p for _, p in rounds], confidences=None,
                num_rounds=len(rounds), tree_nodes=nodes))
        return out
    return spec


def test_runner_tree_block_and_table(tmp_path):
    from deepspec_jax.evaluation import report, runner

    data = tmp_path / "syn.jsonl"
    data.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3]}\n')
    calls = []
    target = types.SimpleNamespace(
        source="/m/fake-target", tokenizer=None,
        generate=lambda ids, max_new_tokens, temperature, seed, prompt_bucket: [[5] * 4 for _ in ids])
    draft = types.SimpleNamespace(kind="eagle3", source="/d/fake-draft",
                                  config=types.SimpleNamespace(ttt_length=4))
    settings = runner.Settings(max_new_tokens=32, seed=3, output_dir=str(tmp_path / "out"),
                               tree=(3, 9))
    dec = runner.Decoders(target, draft, settings, _fake_engine(calls))
    row = runner.evaluate_dataset(str(data), dec, target_name="t", draft_name="d")
    # warm-up + one call per sample, for the chain and for the tree
    assert [c for c in calls if c[0] == "tree"] == [("tree", s, (3, 9)) for s in (3, 3, 4)]
    assert [c for c in calls if c[0] == "spec"] == [("spec", s, None) for s in (3, 3, 4)]
    tree = row["tree"]
    assert (tree["topk"], tree["num_nodes"]) == (3, 9)
    assert row["acceptance_length"] == pytest.approx(1.5)
    assert tree["acceptance_length"] == pytest.approx(3.5)
    assert tree["draft_tokens_per_proposal"] == pytest.approx(8.0)       # nodes
    assert tree["tree_depth_per_proposal"] == pytest.approx(3.0)
    assert tree["verify_rate"] == pytest.approx(14 / (32 + 4))          # per verified position
    assert tree["accept_rates_by_position"] == pytest.approx([1.0, 1.0, 0.5, None])
    assert tree["output_tokens"] == 2 * 8 and row["output_tokens"] == 2 * 4
    assert tree["speedup"] == pytest.approx(tree["output_tokens_per_second"]
                                            / row["autoregressive"]["output_tokens_per_second"])
    assert tree["speedup_vs_chain"] == pytest.approx(tree["output_tokens_per_second"]
                                                     / row["output_tokens_per_second"])
    assert row["samples"][0]["tree_rounds"] == 2
    saved = json.loads((tmp_path / "out" / "syn" / "results.json").read_text())
    assert saved["tree"]["acceptance_length"] == pytest.approx(3.5)

    table = report.results_table([row], "/m/fake-target", "/d/fake-draft").splitlines()
    data_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table
                 if ln.startswith("|")][1:]
    assert [r[2] for r in data_rows] == ["fake-draft", "fake-draft [tree 3,9]"]
    assert data_rows[0][3:5] == ["4.00+1", "1.50"] and data_rows[1][3:5] == ["8.00+1", "3.50"]
    assert "tree 3,9: accept_len 3.50" in report.one_line(row)


def test_cli_rejects_bad_tree_flag():
    proc = run_cli(f"--target={TARGET}", f"--draft={DSPARK}", "--tree=4")
    assert proc.returncode == 2
    assert "--tree=4: expected 'topk,nodes'" in proc.stderr


@pytest.mark.slow
def test_cli_tree_end_to_end(ids_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run_cli(f"--target={TARGET}", f"--draft={DSPARK}", f"--datasets={ids_dataset}",
                   "--max_samples=2", "--max_new_tokens=12", "--temperature=0", "--tree=3,8",
                   f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines()
            if ln.startswith("| tiny_ids") and "target_qwen3_tiny" in ln]
    assert len(rows) == 2 and "dspark_gated [tree 3,8]" in rows[1]
    res = json.loads((out / "tiny_ids" / "results.json").read_text())
    tree = res["tree"]
    assert tree["output_tokens"] == res["output_tokens"] == 24   # greedy: same tokens
    assert 1.0 <= tree["acceptance_length"] <= 5.0
    assert tree["output_tokens_per_second"] > 0 and tree["speedup"] > 0
    assert np.isclose(sum(tree["accepted_draft_tokens_histogram"]), tree["num_rounds"])
    assert json.loads((out / "summary.json").read_text())["config"]["tree"] == [3, 8]
