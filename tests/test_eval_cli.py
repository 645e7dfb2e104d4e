"""End-to-end tests of ``python -m deepspec_jax.eval``.

Fast tests run the CLI in a subprocess on the tiny reference fixtures (a tokenizer-less
Qwen3 target, fed through a ``prompt_ids`` .jsonl dataset) and check what it writes and
how it fails. The slow test runs the real embedded SmolLM2 target with a small randomly
initialised DSpark draft built for its vocabulary."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES_ROOT, REPO

FIX = os.path.join(FIXTURES_ROOT, "deepspec_v1")
TARGET = os.path.join(FIX, "target_qwen3_tiny")
DSPARK = os.path.join(FIX, "dspark_gated")       # block_size 4, confidence head
EAGLE3 = os.path.join(FIX, "eagle3")             # ttt_length 3, no confidence head
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "deepspec_jax.eval", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def ids_dataset(tmp_path_factory) -> str:
    """Three token-id prompts of different lengths for the tokenizer-less fixture target."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny_ids.jsonl"
    with open(path, "w") as f:
        for n in (5, 17, 30):
            f.write(json.dumps({"prompt_ids": rng.integers(0, 511, n).tolist()}) + "\n")
    return str(path)


def check_results(res: dict, *, gamma: int, samples: int, max_new: int) -> None:
    """Internal consistency of one results.json (fixture target: no stop tokens)."""
    n = res["num_rounds"]
    assert res["num_samples"] == samples == len(res["samples"])
    assert res["max_proposal_tokens"] == gamma
    assert res["output_tokens"] == samples * max_new          # no EOS: full budget
    hist = res["accepted_draft_tokens_histogram"]
    assert len(hist) == gamma + 1 and sum(hist) == n > 0
    # tau from the histogram; verify_rate from tau and the (constant) proposal length
    tau = sum((i + 1) * c for i, c in enumerate(hist)) / n
    assert res["acceptance_length"] == pytest.approx(tau)
    assert res["draft_tokens_per_proposal"] == gamma
    assert res["verify_rate"] == pytest.approx(tau / (gamma + 1))
    rates = res["accept_rates_by_position"]
    assert rates == pytest.approx([sum(hist[k + 1:]) / n for k in range(gamma)])
    assert [res["accept_rate"][f"@{k}"] for k in range(gamma)] == rates
    cond = res["conditional_accept_rates_by_position"]
    assert len(cond) == gamma and cond[0] == pytest.approx(rates[0])
    assert res["output_tokens_per_second"] > 0 and res["verifications_per_second"] > 0
    assert res["compile_seconds_excluded"] >= 0
    assert sum(s["output_tokens"] for s in res["samples"]) == res["output_tokens"]
    # each round commits its accepted length after the prefill's first token; rounds run
    # until the budget is reached, so the last one overshoots by at most gamma tokens
    committed = samples + tau * n
    assert 0 <= committed - res["output_tokens"] <= samples * gamma


def test_cli_dspark_fixture_end_to_end(ids_dataset, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(f"--target={TARGET}", f"--draft={DSPARK}", f"--datasets={ids_dataset}",
                   "--max_samples=2", "--max_new_tokens=12", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[:2]]
    assert cells[0][:6] == ["dataset", "target_model", "draft_model", "#propose",
                            "accept_len", "verify_rate"]
    assert cells[1][:4] == ["tiny_ids", "target_qwen3_tiny", "dspark_gated", "4.00+1"]
    assert "accept_rate@3" in proc.stdout and "Confidence head reliability" in proc.stdout
    res = json.loads((out / "tiny_ids" / "results.json").read_text())
    check_results(res, gamma=4, samples=2, max_new=12)
    assert res["draft_kind"] == "dspark" and res["config"]["max_new_tokens"] == 12
    ar = res["autoregressive"]
    assert ar["output_tokens"] == 24 and ar["output_tokens_per_second"] > 0
    assert res["speedup"] == pytest.approx(res["output_tokens_per_second"]
                                           / ar["output_tokens_per_second"])
    conf = res["confidence"]
    assert conf["num_bins"] == 20 and conf["num_fine_bins"] == 1000 and conf["auroc_method"]
    per = conf["per_position"]
    assert [e["position"] for e in per] == [1, 2, 3, 4]
    assert all(e["count"] == res["num_rounds"] for e in per)   # threshold 0: full blocks
    for e in per:
        assert 0 <= e["ece"] <= 1 and 0 <= e["brier"] <= 1
        assert e["target_mean"] == pytest.approx(
            res["accept_rates_by_position"][e["position"] - 1])
        assert sum(b["count"] for b in e["reliability"]) == e["count"]
    # predictions are cumulative products, so the mean can only fall with position
    assert all(a["pred_mean"] >= b["pred_mean"] for a, b in zip(per, per[1:]))
    assert_png(res["artifacts"]["acceptance_png"])
    assert_png(res["artifacts"]["reliability_png"])
    saved = (out / "results_table.txt").read_text()
    assert table[0] in saved and table[1] in saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"][0]["acceptance_length"] == res["acceptance_length"]


def test_cli_eagle3_fixture_batched_without_baseline(ids_dataset, tmp_path):
    """Eagle3 (no confidence head), greedy, two prompts decoded in one batch."""
    out = tmp_path / "out"
    proc = run_cli(f"--target={TARGET}", f"--draft={EAGLE3}", f"--datasets={ids_dataset}",
                   "--max_samples=2", "--max_new_tokens=10", "--temperature=0",
                   "--batch_size=2", "--noautoregressive", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "tiny_ids" / "results.json").read_text())
    check_results(res, gamma=3, samples=2, max_new=10)
    # 2 of 3 rows: the reference's draw, random.Random(seed).shuffle then the first 2
    order = [0, 1, 2]
    random.Random(980406).shuffle(order)
    assert [s["row"] for s in res["samples"]] == order[:2]
    assert res["draft_kind"] == "eagle3"
    assert res["confidence"] is None and res["confidence_note"] == "no confidence head"
    assert res["autoregressive"] is None and res["speedup"] is None
    assert not (out / "tiny_ids" / "reliability_diagram.png").exists()
    assert_png(str(out / "tiny_ids" / "acceptance_by_position.png"))
    assert "Confidence head reliability" not in proc.stdout


@pytest.mark.parametrize("args,code,needle", [
    (["--datasets=gsm8k,gsm9k"], 2, "unknown dataset 'gsm9k'; valid: aime24, aime25"),
    (["--datasets=alpaca"], 2, "alpaca is in the reference's default list but its prompt "
                               "file is not available"),
    (["--max_new_tokens=0"], 2, "--max_new_tokens must be >= 1"),
    (["--confidence_threshold=1.5"], 2, "--confidence_threshold is a probability in [0, 1]"),
    (["--max_samples=-3"], 2, "--max_samples must be >= 1"),
    (["--no_such_flag=1"], 2, "Unknown command line flag 'no_such_flag'"),
    ([f"--target={TARGET}", "--draft=/nonexistent/draft"], 1,
     "--draft: /nonexistent/draft: no such directory"),
    (["--target=/nonexistent/model", f"--draft={DSPARK}"], 1,
     "--target: /nonexistent/model: no such file or directory"),
])
def test_cli_bad_flags_one_clear_line(args, code, needle):
    proc = run_cli(*args)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_default_list_skips_alpaca_with_a_note(tmp_path):
    """The reference list is the default once a model is named; alpaca is skipped with
    a note, then the text prompts meet the tokenizer-less fixture target."""
    proc = run_cli(f"--target={TARGET}", f"--draft={DSPARK}", "--max_samples=1",
                   "--max_new_tokens=4", f"--output_dir={tmp_path}")
    # text datasets on a tokenizer-less target: a clear error after the alpaca note
    assert "note: skipping alpaca" in proc.stdout
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and "has no tokenizer" in lines[0] and "prompt_ids" in lines[0]


def test_cli_vocab_mismatch(tmp_path, ids_dataset):
    """A target whose vocabulary differs from the draft's is refused before decoding."""
    from safetensors.numpy import load_file, save_file

    tdir = tmp_path / "target_v600"
    tdir.mkdir()
    cfg = json.loads(open(os.path.join(TARGET, "config.json")).read())
    cfg["vocab_size"] = 600
    (tdir / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(os.path.join(TARGET, "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = (0.02 * rng.standard_normal((600, cfg["hidden_size"]))).astype(np.float32)
    save_file(tensors, str(tdir / "model.safetensors"))
    proc = run_cli(f"--target={tdir}", f"--draft={DSPARK}", f"--datasets={ids_dataset}",
                   f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "draft vocab_size 512 != target vocab_size 600" in lines[0]


# ---------------------------------------------------------------------------
# real target (slow)
# ---------------------------------------------------------------------------

def build_random_smollm2_draft(path: str) -> None:
    """A 1-layer DSpark draft (block 4, gated Markov head, confidence head) with random
    weights, shaped for SmolLM2-135M (vocab 49152, hidden 576, 30 layers)."""
    import jax.numpy as jnp
    from flax import nnx

    from deepspec_jax.drafts import Draft
    from deepspec_jax.drafts.registry import resolve_spec
    from deepspec_jax.sharding import make_mesh

    raw = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "vocab_size": 49152,
           "hidden_size": 576, "intermediate_size": 256, "num_hidden_layers": 1,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 100000.0,
           "tie_word_embeddings": False, "attention_bias": False, "block_size": 4,
           "num_target_layers": 30, "target_layer_ids": [1, 14, 27], "mask_token_id": 0,
           "num_anchors": 16, "markov_rank": 8, "markov_head_type": "gated",
           "enable_confidence_head": True, "confidence_head_with_markov": True}
    spec = resolve_spec(raw, "random SmolLM2 draft")
    model = spec.build_fn(spec.config, dtype=jnp.float32, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    Draft(spec.config, spec.family, graphdef, state, make_mesh(), spec, "random").save(path)


@pytest.mark.slow
def test_cli_smollm2_random_dspark(tmp_path):
    draft = str(tmp_path / "draft")
    build_random_smollm2_draft(draft)
    out = tmp_path / "out"
    proc = run_cli(f"--draft={draft}", "--datasets=gsm8k", "--max_samples=1",
                   "--max_new_tokens=16", f"--output_dir={out}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SmolLM2-135M-Instruct" in proc.stdout and "| gsm8k " in proc.stdout
    res = json.loads((out / "gsm8k" / "results.json").read_text())
    assert res["num_samples"] == 1 and 1 <= res["samples"][0]["output_tokens"] <= 16
    # the sample is the reference's draw: row 0 after random.Random(980406).shuffle
    order = list(range(1319))
    random.Random(980406).shuffle(order)
    assert res["samples"][0]["row"] == order[0]
    assert res["samples"][0]["prompt_tokens"] > 20        # chat template applied
    assert 1.0 <= res["acceptance_length"] <= 5.0
    assert res["autoregressive"]["output_tokens_per_second"] > 0
    assert len(res["confidence"]["per_position"]) == 4
    assert_png(res["artifacts"]["acceptance_png"])
    assert_png(res["artifacts"]["reliability_png"])


@pytest.mark.slow
def test_cli_no_flags_quick_demo(tmp_path):
    """The bare command runs the quick demo with the shipped default draft, greedy."""
    proc = subprocess.run([sys.executable, "-m", "deepspec_jax.eval"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quick demo" in proc.stdout
    for name in ("gsm8k", "humaneval", "mt-bench"):
        res = json.loads((tmp_path / "eval_results" / name / "results.json").read_text())
        assert res["num_samples"] == 2 and res["acceptance_length"] >= 1.0
        assert res["config"]["quick_demo"] and res["config"]["temperature"] == 0.0  # greedy
        assert res["autoregressive"]["output_tokens_per_second"] > 0
        assert res["samples"][0]["prompt_tokens"] > 20        # chat template applied
        assert len(res["confidence"]["per_position"]) == 4    # the shipped draft: block 4
        assert_png(os.path.join(tmp_path, res["artifacts"]["acceptance_png"]))  # relative to cwd
        assert_png(os.path.join(tmp_path, res["artifacts"]["reliability_png"]))


def test_cli_policies_same_greedy_output(ids_dataset, tmp_path):
    """--policy=threshold/scheduler (variable-length verification; the scheduler measures
    and caches this machine's SPS profile first) decode what --policy=fixed decodes at
    T=0, and report the verified drafts per round next to tau."""
    env_dir = tmp_path / "sps"
    res = {}
    for policy in ("fixed", "threshold", "scheduler"):
        out = tmp_path / policy
        proc = run_cli(f"--target={TARGET}", f"--draft={DSPARK}", f"--datasets={ids_dataset}",
                       "--max_samples=3", "--max_new_tokens=10", "--temperature=0",
                       "--batch_size=3", "--confidence_threshold=0.5", "--noautoregressive",
                       f"--policy={policy}", f"--output_dir={out}",
                       env={"DEEPSPEC_JAX_SPS_DIR": str(env_dir)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[policy] = json.loads((out / "tiny_ids" / "results.json").read_text())
        assert res[policy]["policy"] == policy
        assert (res[policy]["verified_drafts_per_round"]
                == res[policy]["draft_tokens_per_proposal"])
    assert list(env_dir.glob("sps_*.json")) and list(env_dir.glob("sps_*.png"))
    outs = {p: [s["output_tokens"] for s in r["samples"]] for p, r in res.items()}
    assert outs["threshold"] == outs["fixed"] == outs["scheduler"]
    # at T=0 the threshold policy makes the fixed policy's rounds (same proposals cut at
    # the same place), only verifying fewer tokens; the scheduler verifies at most a block
    assert (res["threshold"]["accepted_draft_tokens_histogram"]
            == res["fixed"]["accepted_draft_tokens_histogram"])
    assert (res["threshold"]["verified_drafts_per_round"]
            == res["fixed"]["verified_drafts_per_round"])
    assert 0 <= res["scheduler"]["verified_drafts_per_round"] <= 4
    proc = run_cli(f"--target={TARGET}", f"--draft={EAGLE3}", f"--datasets={ids_dataset}",
                   "--policy=scheduler")
    assert proc.returncode == 2 and "needs a chain (no --tree) and a draft with a confidence head" in proc.stderr
