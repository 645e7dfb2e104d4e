"""Shared test helpers: fixture-set discovery (env DEEPSPEC_FIXTURES)."""

from __future__ import annotations

import gc
import json
import os
import tempfile

# The suite compiles many identical programs in different modules (the fixture sets'
# targets and drafts, the SmolLM2 decode loops) and drops the in-memory caches between
# modules (below). A persistent compilation cache, shared by the pytest-xdist workers
# and the subprocesses the tests start (they inherit the environment), compiles each
# once per run. Set before jax is imported: jax reads these at import.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"deepspec_jax_tests_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

# Longest test files first in the collection order, measured (seconds of one worker, a
# fresh-clone run of the README's test command on a 2-core machine, 2026-12-03), so the two
# pytest-xdist workers pick files longest first and finish together. The README's command
# passes --no-loadscope-reorder: without it pytest-xdist (>= 3.7) hands out files by
# their NUMBER of tests, which sent the few-test, many-minute files (plan_reference,
# benchmarks_smoke, decode_plan) to the end of the run, one worker alone on them.
_LONGEST_FIRST = ("test_spec_decode_sampled.py",   # 844 s
                  "test_plan_reference.py",        # 677
                  "test_benchmarks_smoke.py",      # 593 (two subprocesses at a time)
                  "test_eval_cli.py",              # 528
                  "test_train.py",                 # 519
                  "test_spec_decode_lossless.py",  # 478
                  "test_tree_decode.py",           # 395
                  "test_dspark_parity.py",         # 290
                  "test_target_cache.py",          # 256
                  "test_decode_plan.py",           # 245
                  "test_draft_vocab.py",           # 182
                  "test_plan.py",                  # 170
                  "test_accelerator_path.py",      # 163
                  "test_spec_decode_fixtures.py",  # 161
                  "test_sts_calibration.py",       # 130
                  "test_smollm2.py",               # 120
                  "test_draft_quality.py",         # 116
                  "test_eagle3_parity.py",         # 111
                  "test_verify_policies.py",       # 105
                  "test_gemma3.py")                # 103


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/fixtures holds the Qwen3 set deepspec_v1, ../shared/fixtures-next the Gemma-4
# set deepspec_gemma4_v1. DEEPSPEC_FIXTURES (os.pathsep-separated roots) overrides both.
FIXTURES_ROOTS = tuple(
    os.environ["DEEPSPEC_FIXTURES"].split(os.pathsep) if os.environ.get("DEEPSPEC_FIXTURES")
    else (os.path.join(REPO, "..", "shared", "fixtures"),
          os.path.join(REPO, "..", "shared", "fixtures-next")))
FIXTURES_ROOT = FIXTURES_ROOTS[0]


def fixture_sets() -> list[str]:
    """Every directory holding a manifest.json under the fixture roots, root by root (the
    first root's sets first: many tests take ``fixture_sets()[0]`` to mean the Qwen3 set
    deepspec_v1), sorted within a root."""
    out = []
    for root in FIXTURES_ROOTS:
        found = [os.path.abspath(dirpath) for dirpath, _, files in os.walk(root)
                 if "manifest.json" in files]
        out += [d for d in sorted(found) if d not in out]
    return out


def load_manifest(fixture_set: str) -> dict:
    with open(os.path.join(fixture_set, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def gemma4_fixture_sets() -> list[str]:
    """The fixture sets recorded on a Gemma-4 target (deepspec_gemma4_v1)."""
    return [fs for fs in fixture_sets()
            if str(load_manifest(fs)["global"].get("target_class", "")).startswith("Gemma4")]


def gemma4_fixture_set() -> str:
    """The Gemma-4 fixture set; its absence is an error (not a skip): the Gemma tests
    must run wherever the suite runs."""
    sets = gemma4_fixture_sets()
    if not sets:
        raise RuntimeError(f"no Gemma-4 fixture set (deepspec_gemma4_v1) under {FIXTURES_ROOTS}; "
                           "place ../shared/fixtures-next beside the repo or set DEEPSPEC_FIXTURES.")
    return sets[0]


def hub_snapshot(src: str, cache_dir: str, repo: str = "deepspec/model", commit: str | None = None,
                 ref: bool = True) -> str:
    """``src`` (file or directory, walked recursively) laid out the way huggingface_hub
    caches a download: ``cache_dir/models--org--name/`` with ``blobs/<sha256>`` (no
    extension), ``snapshots/<commit>/<file>`` relative symlinks into them and, if ``ref``,
    ``refs/main`` holding the commit. Returns the snapshot directory (the repo root is
    two levels up)."""
    import hashlib

    repo_dir = os.path.join(cache_dir, "models--" + repo.replace("/", "--"))
    commit = commit or hashlib.sha1(os.path.abspath(src).encode()).hexdigest()
    snap = os.path.join(repo_dir, "snapshots", commit)
    files = ([(os.path.dirname(src), os.path.basename(src))] if os.path.isfile(src) else
             [(d, f) for d, _, fs in os.walk(src) for f in fs])
    top = os.path.dirname(src) if os.path.isfile(src) else src
    for d, name in files:
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        blob = os.path.join(repo_dir, "blobs", hashlib.sha256(data).hexdigest())
        if not os.path.exists(blob):
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            with open(blob, "wb") as f:
                f.write(data)
        link = os.path.join(snap, os.path.relpath(os.path.join(d, name), top))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref:
        os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
        with open(os.path.join(repo_dir, "refs", "main"), "w", encoding="utf-8") as f:
            f.write(commit)
    return snap


def write_llama_gguf(path: str, tensor: str, data, raw_dtype=None, **metadata: int) -> str:
    """A minimal llama GGUF: a 1-layer, 32-wide, 64-token config (``metadata`` overrides or
    adds ``llama.*`` uint32 fields) and one tensor."""
    import gguf

    fields = {"block_count": 1, "embedding_length": 32, "feed_forward_length": 64,
              "attention.head_count": 2, "attention.head_count_kv": 2, "vocab_size": 64,
              **metadata}
    w = gguf.GGUFWriter(path, "llama")
    for k, v in fields.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor(tensor, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (new tokens only) of one unpadded prompt."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def fixture_set_dirs() -> list[str]:
    sets = fixture_sets()
    if not sets:
        raise RuntimeError(f"no fixture set (a directory with manifest.json) under {FIXTURES_ROOTS}; "
                           "set DEEPSPEC_FIXTURES to the fixtures directory.")
    return sets


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled executables after each test module. The suite compiles
    thousands of programs in one process; XLA:CPU keeps each one's JIT-mapped code
    alive while cached, and a full run once aborted inside a late compile (SIGABRT in
    backend_compile) after the process had accumulated them. Modules share few
    programs, so clearing costs little recompilation."""
    yield
    jax.clear_caches()
    gc.collect()


def target_fixture_sets() -> list:
    """pytest params of every fixture set that ships a target checkpoint (Qwen3, Gemma-4),
    with the set's directory name as the id."""
    return [pytest.param(fs, id=os.path.basename(fs)) for fs in fixture_sets()
            if "target_dir" in load_manifest(fs)["global"]]


def fp32_tol(ref, tol: float) -> float:
    """An absolute tolerance for fp32 results: ``tol`` for O(1) values, scaled by the
    reference's magnitude above that (rounding is relative; the Gemma-4 set's features
    and logits are O(10): sqrt(hidden) embeddings, a final norm scaled by 8)."""
    import numpy as np

    return tol * max(1.0, float(np.abs(np.asarray(ref)).max()))


def dot_shapes(hlo: str) -> list[str]:
    """Result shapes (``f32[40,5]{1,0}``) of the dot instructions of an optimized HLO
    module: which operand order XLA kept for a product."""
    return [line.split("=")[1].split()[0] for line in hlo.splitlines()
            if " dot(" in line and "=" in line]
