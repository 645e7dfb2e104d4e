"""Records the shipped default draft's quality figure (the CI guard's reference).

Runs the eval's quick demo (embedded SmolLM2 target + the default draft) greedily on
its held-out samples, with the arguments stored in
``deepspec_jax/assets/default_draft_quality.json`` (or the defaults below when that file
does not exist yet), and rewrites that file with the per-dataset and mean acceptance
lengths. ``tests/test_draft_quality.py`` reruns the same command and fails when the mean
moves by more than the recorded tolerance: a re-shipped draft must be re-recorded, a code
change that silently degrades acceptance is caught.

    python scripts/record_draft_quality.py            # after re-shipping the draft
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from deepspec_jax import atomic  # noqa: E402  (the checkout's package, installed or not)

QUALITY_PATH = os.path.join(REPO, "deepspec_jax", "assets", "default_draft_quality.json")
DEFAULT_ARGS = ["--temperature=0", "--noautoregressive", "--max_samples=4",
                "--max_new_tokens=64", "--datasets=gsm8k,humaneval,mt-bench"]
DEFAULT_TOLERANCE = 0.1


def measure(eval_args: list[str], output_dir: str) -> dict:
    """Runs ``python -m deepspec_jax.eval`` (quick demo) and returns its acceptance lengths."""
    cmd = [sys.executable, "-m", "deepspec_jax.eval", *eval_args, f"--output_dir={output_dir}"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=output_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    if not summary["config"]["quick_demo"] or summary["config"]["temperature"] != 0.0:
        raise ValueError(f"quality args {eval_args} must run the greedy quick demo "
                         "(no --target/--draft, --temperature=0)")
    per = {d["dataset"]: d["acceptance_length"] for d in summary["datasets"]}
    return {"acceptance_length": per,
            "mean_acceptance_length": sum(per.values()) / len(per),
            "num_samples": {d["dataset"]: d["num_samples"] for d in summary["datasets"]}}


def load_recorded(path: str = QUALITY_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    for key in ("eval_args", "mean_acceptance_length", "tolerance"):
        if key not in rec:
            raise ValueError(f"{path}: field {key!r} missing; rerun "
                             "`python scripts/record_draft_quality.py`")
    return rec


def main() -> int:
    prior = load_recorded() if os.path.exists(QUALITY_PATH) else {}
    eval_args = prior.get("eval_args", DEFAULT_ARGS)
    with tempfile.TemporaryDirectory() as tmp:
        got = measure(eval_args, tmp)
    record = {"eval_args": eval_args, "tolerance": prior.get("tolerance", DEFAULT_TOLERANCE),
              **got, "recorded": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    atomic.write_json(QUALITY_PATH, record, indent=2)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
