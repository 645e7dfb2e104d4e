"""Fit the STS calibration of a DSpark draft's confidence head: ``python -m deepspec_jax.calibrate``.

Decodes held-out prompts speculatively (confidence threshold 0, so every round scores
every block position), fits one temperature per block position by Sequential
Temperature Scaling (``deepspec_jax.evaluation.sts``) and writes
``<draft>/calibration.json``. The eval and ``speculative_generate`` callers then use it:
the eval reports the confidence metrics before and after (an extra "(STS)" row and
curve), and a ``--confidence_threshold`` compares the calibrated confidences.

The prompts must not be the eval's own samples: the shipped eval sets are refused; the
default is ``deepspec_jax/assets/calibration_prompts.jsonl`` (64 math and instruction
prompts from the tail of the training prompt files, which the shipped draft's data
regeneration never read). With neither ``--target`` nor ``--draft`` it calibrates the
shipped default draft against the embedded SmolLM2 target.

    python -m deepspec_jax.calibrate --max_samples=32 --max_new_tokens=96
    python -m deepspec_jax.calibrate --target=Qwen/Qwen3-4B --draft=runs/dspark/final \\
        --datasets=my_heldout.jsonl --temperature=1.0

Exit codes: 0 success, 2 bad flag values, 1 a model/file/dataset problem.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from absl import flags, logging

from deepspec_jax import cli, compile_cache
from deepspec_jax.errors import DeepSpecError
from deepspec_jax.eval import SetupError, UsageError, _fail, _load, resolve_paths
from deepspec_jax.evaluation import datasets, report, runner, sts

HELDOUT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                               "calibration_prompts.jsonl")

FLAGS = flags.FlagValues()
flags.DEFINE_string("target", None, "Target model: HF directory, .gguf file or "
                    "'smollm2-135m' (default: the embedded SmolLM2-135M-Instruct).",
                    flag_values=FLAGS)
flags.DEFINE_string("draft", None, "DSpark draft directory with a confidence head (default: "
                    "the shipped default draft); calibration.json is written into it.",
                    flag_values=FLAGS)
flags.DEFINE_string("datasets", HELDOUT_PROMPTS, "Comma-separated held-out .jsonl prompt "
                    "files ({'turns': [...]} or {'prompt_ids': [...]} rows); never the eval's.",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_samples", None, "Prompts per file, drawn with --seed (default: all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature of the decoding the confidences "
                   "will gate (the eval's default is 1.0; < 1e-5 is greedy).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of prompt selection and decoding.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 1, "Prompts per decoding call.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Where to write the calibration (default: "
                    "<draft>/calibration.json, where the eval looks for it).", flag_values=FLAGS)


def _heldout_names() -> list[str]:
    names, _ = datasets.resolve_datasets(FLAGS.datasets)
    shipped = [n for n in names if not datasets._is_path(n)]
    if shipped:
        raise UsageError(
            f"--datasets: {', '.join(shipped)} is an eval set: calibrating on the eval's own "
            f"samples would overstate calibration; pass held-out .jsonl files (default "
            f"{HELDOUT_PROMPTS}).")
    return names


def _table(before: list[float], after: list[float], temps: Sequence[float], counts) -> str:
    head = ["position", "rounds", "temperature", "ece_raw", "ece_sts"]
    body = [[str(k + 1), str(n), f"{t:.3f}", report._fmt(b, ".4f"), report._fmt(a, ".4f")]
            for k, (b, a, t, n) in enumerate(zip(before, after, temps, counts))]
    return report._grid(head, body)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.max_new_tokens < 1 or FLAGS.batch_size < 1 or FLAGS.temperature < 0:
            raise UsageError("--max_new_tokens and --batch_size must be >= 1 and "
                                 "--temperature >= 0.")
        if FLAGS.max_samples is not None and FLAGS.max_samples < 1:
            raise UsageError(f"--max_samples must be >= 1, got {FLAGS.max_samples}.")
        names = _heldout_names()
    except (UsageError, datasets.DatasetError) as e:
        return _fail(str(e), 2)
    try:
        target_path, draft_path = resolve_paths(FLAGS.target, FLAGS.draft)
        compile_cache.enable(compile_cache.DEFAULT_DIR)
        target, draft = _load(target_path, draft_path)
    except SetupError as e:
        return _fail(str(e), 1)
    if not runner.has_confidence_head(draft):
        return _fail(f"--draft: {draft.source} ({draft.kind}) has no confidence head: "
                     "nothing to calibrate.", 1)

    settings = runner.Settings(max_new_tokens=FLAGS.max_new_tokens,
                               temperature=FLAGS.temperature, seed=FLAGS.seed,
                               batch_size=FLAGS.batch_size, use_calibration=False)
    decoders = runner.Decoders(target, draft, settings)
    results, num_samples = [], 0
    try:
        for name in names:
            prompts = datasets.load_prompts(name, FLAGS.max_samples, FLAGS.seed)
            ids = runner.encode_prompts(target, prompts, datasets.dataset_label(name))
            out, _, _ = decoders.timed("spec", ids, f"{datasets.dataset_label(name)} decode")
            results += out
            num_samples += len(prompts)
    except DeepSpecError as e:
        return _fail(str(e), 1)
    rounds = sts.Rounds.from_results(results)
    temps = sts.fit_temperatures(rounds)
    before = sts.per_position_ece(rounds, np.ones(rounds.width))
    after = sts.per_position_ece(rounds, temps)
    counts = [int((rounds.proposal_lengths > k).sum()) for k in range(rounds.width)]
    cal = sts.Calibration(
        tuple(float(t) for t in temps), sts.draft_fingerprint(str(draft.source)),
        {"datasets": [os.path.abspath(n) for n in names], "num_samples": num_samples,
         "num_rounds": len(rounds), "rounds_per_position": counts,
         "temperature": FLAGS.temperature, "max_new_tokens": FLAGS.max_new_tokens,
         "seed": FLAGS.seed, "target": target.source},
        [float(x) for x in before], [float(x) for x in after])
    print(_table(before, after, temps, counts), flush=True)
    dst = FLAGS.output or sts.path_for(str(draft.source))
    try:
        if FLAGS.output:
            os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
            report.write_json(dst, cal.to_json())
        else:
            sts.save(cal, str(draft.source))
    except OSError as e:
        return _fail(f"cannot write {dst}: {e} (pass --output=<path>, then copy it to "
                     f"{sts.path_for(str(draft.source))}).", 1)
    print(f"wrote {dst} ({len(rounds)} rounds from {num_samples} prompts)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
