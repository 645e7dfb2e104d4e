"""Every program under benchmarks/ runs end to end at a tiny size (issue 13).

A benchmark is not imported by the library or its tests, so a refactor can break it
unnoticed (train_step.py once failed at its first step). Each program here runs as a
subprocess, as a user runs it (``python benchmarks/X.py``, CPU, the embedded SmolLM2
target and the shipped draft), at the smallest size its flags allow, and its JSON output
is checked for the documented rows and keys with finite numbers -- never timings.

``BENCHMARKS`` must name every ``benchmarks/*.py``: a program without a smoke entry
fails ``test_every_benchmark_has_a_smoke_entry``; a module that is not a program goes
in ``HELPER_MODULES``. The programs load the 30-layer target and compile it, so they
run two at a time (CI has two cores) with one persistent XLA compilation cache, which
the programs that compile the same program (the target's ``generate`` at batch 1)
share; the groups keep those in order.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES_ROOT, REPO

HELPER_MODULES = {"bench_prompts.py": "the prompt list shared by the decode benchmarks",
                  "timing.py": "the timing loop shared by the micro-benchmarks"}

# program -> its tiniest flags; "{out}" becomes the path of its JSON output
BENCHMARKS = {
    # two configs, one mode: the block drafts' and Eagle3's runs (--eagle3_* flags, the
    # eagle3/dspark ratio) and the feature-cache build; anchors/TTT cut to keep steps short
    "train_step.py": ["--configs=dspark,eagle3", "--modes=cached", "--steps=1", "--eagle3_steps=1",
                      "--batch=2", "--eagle3_batch=2", "--seq=32", "--peak_n=64",
                      "--peak_repeats=1", "--set=draft.num_anchors=4", "--set=draft.ttt_length=2",
                      "--variant=old:loss.vocab_grad=recompute,train.cpu_library_fusion=all",
                      "--json={out}"],
    # both sides are this checkout (HEAD through a temporary git worktree, and the tree
    # itself): the worktree path and the lockstep driver run, the first losses must agree
    "train_step_ab.py": ["--before=HEAD", "--configs=dspark", "--rounds=1",
                         "--set=data.max_length=32", "--set=draft.num_anchors=4",
                         "--set=train.global_batch_size=2", "--set=train.micro_batch_size=2",
                         "--json={out}"],
    "ar_decode.py": ["--batch_sizes=1", "--new_tokens=2", "--repeats=1", "--out={out}"],
    "spec_decode.py": ["--batch_sizes=1", "--new_tokens=2", "--repeats=1", "--block_size=2",
                       "--markov_rank=4", "--out={out}"],
    # --sweep 1,5: extend(1) and extend(5) are the AR step and the default draft's
    # verify (width 4 + 1), already compiled: the sweep path costs no compile
    # the fixture target and its full-vocabulary DSpark draft: --draft_vocab_sizes restricts
    # a full-vocabulary draft, and the shipped one already predicts over 12,288 tokens
    "break_even.py": [f"--target={FIXTURES_ROOT}/deepspec_v1/target_qwen3_tiny",
                      f"--draft={FIXTURES_ROOT}/deepspec_v1/dspark_gated", "--context=8",
                      "--cache_len=16", "--repeats=1", "--sweep=1,5",
                      "--draft_vocab_sizes=64", "--tree=2,4", "--json={out}"],
    "decode_step.py": ["--context=8", "--cache_len=16", "--rounds=1", "--calls=1", "--json={out}"],
    # R=1, two tokens: the SPS profile (measured at context 16 into the work dir), plain
    # decoding and the scheduler's packed path (as "none": every request verifies only its
    # anchor), outputs checked identical to plain greedy by the program. Each policy costs
    # two loop compiles of the 30-layer target (both lengths); fixed / threshold /
    # scheduler / production are covered by test_verify_policies and test_eval_cli
    "serving.py": ["--rows=1", "--new_tokens=2", "--base_tokens=1", "--context=16",
                   "--repeats=1", "--policies=ar,none", "--out={out}"],
    "lm_head.py": ["--vocab=512", "--rows=1,5", "--hidden=32", "--repeats=1", "--rounds=1",
                   "--json={out}"],
    "decoder_chain.py": ["--layers=2", "--hidden=32", "--kv=16", "--intermediate=64",
                         "--rows=1,5,80", "--repeats=1", "--rounds=1", "--json={out}"],
    "tree_attention.py": ["--batch=1", "--nodes=4", "--kv_heads=1", "--group=1", "--head_dim=16",
                          "--cache_lens=128", "--repeats=1", "--out={out}"],
}
# two workers, balanced by their measured times (alone, 2026-12-03: serving 503 s with
# four policies, train_step 101, ar_decode 88 -- it also loads the target into
# transformers --, spec_decode 61, break_even 53, decode_step 46, train_step_ab 45,
# tree_attention 8); each runs its list in order, so spec_decode finds the batch-1
# generate that ar_decode compiled in the shared compilation cache
WORKERS = [["serving.py", "train_step_ab.py"],
           ["train_step.py", "ar_decode.py", "spec_decode.py", "decode_step.py", "break_even.py",
            "tree_attention.py", "lm_head.py", "decoder_chain.py"]]


def _run(name: str, work: str) -> dict:
    out = os.path.join(work, name.replace(".py", ".json"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,   # this checkout's package
               JAX_COMPILATION_CACHE_DIR=os.path.join(work, "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               DEEPSPEC_JAX_SPS_DIR=os.path.join(work, "sps"))
    argv = [a.replace("{out}", out) for a in BENCHMARKS[name]]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", name), *argv], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    data = json.load(open(out, encoding="utf-8")) if os.path.exists(out) else None
    return {"rc": proc.returncode, "json": data, "log": proc.stdout[-4000:], "argv": argv,
            "seconds": time.perf_counter() - t}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("bench_smoke"))

    def worker(names):
        return {n: _run(n, work) for n in names}

    with concurrent.futures.ThreadPoolExecutor(len(WORKERS)) as pool:
        out = {}
        for part in pool.map(worker, WORKERS):
            out.update(part)
    print("benchmark smoke seconds:", {n: round(r["seconds"], 1) for n, r in out.items()})
    return out


def test_every_benchmark_has_a_smoke_entry():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "benchmarks", "*.py"))}
    missing = sorted(files - set(BENCHMARKS) - set(HELPER_MODULES))
    assert not missing, (f"benchmarks/{missing} have no smoke entry: add their tiniest flags to "
                         "BENCHMARKS in tests/test_benchmarks_smoke.py (or, for a module that "
                         "is not a program, to HELPER_MODULES)")
    stale = sorted((set(BENCHMARKS) | set(HELPER_MODULES)) - files)
    assert not stale, f"tests/test_benchmarks_smoke.py names missing benchmarks/{stale}"
    assert sorted(sum(WORKERS, [])) == sorted(BENCHMARKS), "WORKERS must run every BENCHMARKS entry once"
    for name in HELPER_MODULES:   # a helper is imported, never run: no entry point
        src = open(os.path.join(REPO, "benchmarks", name), encoding="utf-8").read()
        assert "__main__" not in src, f"benchmarks/{name} is a program: give it a BENCHMARKS entry"


def _ran(results, name) -> dict:
    r = results[name]
    assert r["rc"] == 0 and r["json"] is not None, (
        f"benchmarks/{name} {' '.join(r['argv'])} exited {r['rc']} "
        f"({'no' if r['json'] is None else 'a'} JSON written):\n{r['log']}")
    return r["json"]


def _finite(row: dict, keys, positive: bool = True):
    for k in keys:
        v = row[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive and v >= 0), \
            f"{k} = {v!r} in {row}"


def test_train_step(results):
    out = _ran(results, "train_step.py")
    rows = out["rows"]
    assert [(r["config"], r["mode"], r["variant"]) for r in rows] == [
        ("dspark", "cached", ""), ("dspark", "cached", "old"),
        ("eagle3", "cached", ""), ("eagle3", "cached", "old")]
    assert rows[1]["overrides"] == ["loss.vocab_grad=recompute", "train.cpu_library_fusion=all"]
    for r in rows:
        assert r["seq"] == 32 and r["global_batch"] == 2 and len(r["step_s_all"]) == 1, r
        _finite(r, ["step_s", "supervised_tok_s", "real_tok_s", "flops_per_step",
                    "achieved_flop_s", "mfu", "compile_s", "trainable_params", "loss"])
        assert r["ok"] == 1.0, r
    assert set(out["ratios"]) == {"eagle3_over_dspark_cached", "dspark_cached_old_over_plain",
                                  "eagle3_cached_old_over_plain"}
    for v in out["ratios"].values():
        _finite(v, ["time", "flops"])
    # the recomputed vocabulary gradient does more matmul work than the fused one
    assert out["ratios"]["eagle3_cached_old_over_plain"]["flops"] > 1.0
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
    assert out["peak_flop_s"] > 0


def test_train_step_ab(results):
    (row,) = _ran(results, "train_step_ab.py")["rows"]
    assert row["config"] == "dspark" and row["rounds"] == 1
    b, a = row["before"], row["after"]
    for side in (b, a):
        _finite(side, ["compile_s", "gflop", "loss", "step_s", "tokens_per_s"])
        assert len(side["step_s_all"]) == 1
    # a worktree of HEAD; this checkout
    assert len(b["rev"]) == 12 and os.path.realpath(a["rev"]) == os.path.realpath(REPO)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["gflop"] == a["gflop"]
    _finite(row, ["paired_ratio"])


def test_ar_decode(results):
    (row,) = _ran(results, "ar_decode.py")["rows"]
    assert row["batch"] == 1
    _finite(row, ["jax_tokens_per_s", "torch_tokens_per_s", "speedup"])
    assert row["same_tokens_before_stop"] is True, row   # greedy fp32 on both sides


def test_spec_decode(results):
    (row,) = _ran(results, "spec_decode.py")["rows"]
    assert row["batch"] == 1 and row["new_tokens"] == 2 and row["rounds"] >= 1, row
    _finite(row, ["ar_tok_s", "spec_tok_s", "spec_rounds_s", "tau", "speedup"])
    assert row["tau"] >= 1.0, row   # every round commits at least the target's token


def test_break_even(results):
    res = _ran(results, "break_even.py")
    assert res["context"] == 8 and res["cache_len"] == 16 and res["width"] >= 1, res
    _finite(res, ["ar_step_ms", "verify_ms", "propose_ms", "round_ms", "break_even_tau"])
    assert set(res["extend_over_ar"]) == {"1", "5"}, res
    _finite(res["extend_over_ar"], ["1", "5"])
    assert res["draft_vocab_size"] == 512, res                # the fixture's full vocabulary
    tree = res["tree"]
    assert tree["shape"] == "2,4" and tree["nodes"] == 4, tree
    _finite(tree, ["propose_ms", "verify_ms", "compact_ms", "round_ms", "break_even_tau"])
    assert set(res["propose_ms_by_vocab"]) == {"64"}, res     # the reduced-vocab proposal
    _finite(res["propose_ms_by_vocab"], ["64"])


def test_lm_head(results):
    res = _ran(results, "lm_head.py")
    forms = ("[d,V] btd,dv->btv", "[V,d] btd,vd->btv", "[V,d] vd,btd->vbt (T)",
             "[V,d] layers.linear")
    assert set(res["ms"]) == {"512"}, res
    assert set(res["ms"]["512"]) == {f"{f} M={m}" for f in forms for m in (1, 5)}, res
    _finite(res["ms"]["512"], list(res["ms"]["512"]))
    assert res["max_abs_diff"] < 1e-4, res   # every form computed the same product


def test_decoder_chain(results):
    res = _ran(results, "decoder_chain.py")
    forms = ("rows-first [in,out]", "rows-first [out,in]", "layers.linear")
    assert set(res["ms"]) == {f"{f} M={m}" for f in forms for m in (1, 5, 80)}, res
    _finite(res["ms"], list(res["ms"]))
    assert res["max_abs_diff"] < 1e-4, res   # every form computed the same chain


def test_decode_step(results):
    res = _ran(results, "decode_step.py")
    assert res["context"] == 8 and res["cache_len"] == 16, res
    _finite(res, ["median_ms", "min_ms"])
    _finite(res, ["copy_mb", "slice_fusion_mb"], positive=False)


def test_tree_attention(results):
    res = _ran(results, "tree_attention.py")
    (row,) = res["results"]
    assert row["cache_len"] == 128 and res["interpreted"] is True, res
    _finite(row, ["kernel_s", "dense_s", "kernel_bytes", "dense_bytes"])
    _finite(row, ["kernel_max_err", "dense_max_err"], positive=False)
    assert row["kernel_max_err"] < 1e-4 and row["dense_max_err"] < 1e-4, row   # fp32


def test_serving(results):
    out = _ran(results, "serving.py")
    rows = {r["policy"]: r for r in out["results"]}
    assert set(rows) == {"ar", "none"}
    for name, r in rows.items():
        _finite(r, ["tokens_per_s", "latency_ms_per_token", "base_seconds", "plain_step_seconds"])
        if name != "ar":
            _finite(r, ["tau"])
            _finite(r, ["verified"], positive=False)
    assert rows["none"]["verified"] == 0
    # rounds per verify size B of the decode span (JSON keys): anchors only for `none`,
    # and at least one decode round (2 tokens vs the 1-token base call)
    assert set(rows["none"]["verify_sizes"]) == {"1"}, rows["none"]
