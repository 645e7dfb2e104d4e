"""Evaluate a speculative-decoding draft against its target: ``python -m deepspec_jax.eval``.

Prints the reference's results table (dataset, target, draft, #propose, accept_len,
verify_rate, accept_rate@k, plus tokens/s of speculative vs plain decoding) and writes
``<output_dir>/<dataset>/results.json`` with every metric, an acceptance-by-position
PNG and, for DSpark drafts with a confidence head at threshold 0, a reliability diagram.
With ``--tree=topk,nodes`` every dataset is decoded a second time with draft trees
(``speculative_generate(..., tree=...)``): its tau, tokens/s and speedup appear in a row
right below the chain's and under ``tree`` in results.json.

With neither ``--target`` nor ``--draft`` it runs a quick demo: the embedded
SmolLM2-135M-Instruct target with the project's default draft
(``deepspec_jax/assets/default_draft/``) on a few samples of a math, a code and a chat
set with a short generation budget, greedy (T=0: the output is then exactly the target's
own, so the demo shows speed alone). Naming a target or draft switches to the reference
protocol: its dataset list, per-dataset sample counts, max_new_tokens 2048 and T=1. Flags
given explicitly always win.

Exit codes: 0 success, 2 bad flag values, 1 a model/file/dataset problem.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

from absl import flags, logging

from deepspec_jax import atomic, cli, compile_cache
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft
from deepspec_jax.errors import ConfigError, DeepSpecError
from deepspec_jax.evaluation import datasets, report, runner
from deepspec_jax.hub_cache import resolve_checkpoint_path
from deepspec_jax.spec_decode import check_compatible, parse_tree
from deepspec_jax.target import NAMED_TARGETS, load_target, resolve_target_path

QUICK_MAX_SAMPLES = 2
QUICK_MAX_NEW_TOKENS = 64
QUICK_TEMPERATURE = 0.0

FLAGS = flags.FlagValues()
flags.DEFINE_string("target", None, "Target model: HF directory, .gguf file, 'smollm2-135m' or "
                    "'gemma3-270m' (default: the embedded SmolLM2-135M-Instruct).", flag_values=FLAGS)
flags.DEFINE_string("draft", None, "Draft model directory (HF or JAX dir; default: the "
                    "project's default draft under deepspec_jax/assets/default_draft/).",
                    flag_values=FLAGS)
flags.DEFINE_string("datasets", None,
                    "Comma-separated dataset names (or .jsonl paths). Default: the reference "
                    "list gsm8k,math500,aime25,humaneval,mbpp,livecodebench,mt-bench,alpaca,"
                    "arena-hard-v2 (alpaca is not available and is skipped); quick demo: "
                    "gsm8k,humaneval,mt-bench.", flag_values=FLAGS)
flags.DEFINE_integer("max_samples", None, "Samples per dataset, drawn with --seed (default: "
                     f"the reference's count per dataset; quick demo: {QUICK_MAX_SAMPLES}).",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 2048, "New tokens per sample (quick demo: "
                     f"{QUICK_MAX_NEW_TOKENS} unless given).", flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (< 1e-5 means greedy; quick "
                   f"demo: {QUICK_TEMPERATURE:g} unless given).", flag_values=FLAGS)
flags.DEFINE_float("confidence_threshold", 0.0, "DSpark early stop: propose only the prefix "
                   "before the first position whose confidence is below this (0 = off; "
                   "calibration metrics are collected only at 0).", flag_values=FLAGS)
flags.DEFINE_enum("policy", "fixed", ["fixed", "threshold", "scheduler", "production"],
                  "How many drafts the target verifies per request each round: the whole block "
                  "(fixed), the drafts before --confidence_threshold (threshold), or DSpark's "
                  "prefix scheduler under this machine's measured verify cost (scheduler; "
                  "production: its variant whose budget is chosen two rounds ahead; the cost "
                  "profile is measured once per target/batch size and cached, see "
                  "`python -m deepspec_jax.sps`). The #propose column is then the verified "
                  "drafts per round.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 980406, "Seed of sample selection and decoding (sample i uses "
                     "seed + i).", flag_values=FLAGS)
flags.DEFINE_string("output_dir", "eval_results", "Directory for results.json and PNGs.",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 1, "Prompts per decoding call (the reference uses 1).",
                     flag_values=FLAGS)
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache (default "
                    "~/.cache/deepspec_jax/xla; '' disables): later runs skip recompiling.",
                    flag_values=FLAGS)
flags.DEFINE_string("tree", None, "Also decode with draft trees, 'topk,nodes' (e.g. 4,16): "
                    "EAGLE-2 style trees of the draft's top-k (T=0) / sampled (T>0) children, "
                    "the best `nodes` verified in one target pass; tau, tokens/s and speedup "
                    "are reported in a row next to the chain's.", flag_values=FLAGS)
flags.DEFINE_boolean("autoregressive", True, "Also time plain autoregressive decoding of the "
                     "target for the speedup (--noautoregressive skips it).", flag_values=FLAGS)
flags.DEFINE_boolean("calibration", True, "Use the draft's STS calibration "
                     "(<draft>/calibration.json, from `python -m deepspec_jax.calibrate`) when "
                     "present: the confidence threshold compares calibrated confidences and the "
                     "reliability report shows raw and calibrated metrics.", flag_values=FLAGS)


class UsageError(Exception):
    """A flag value is invalid (exit code 2)."""


class SetupError(Exception):
    """A model, file or dataset cannot be used (exit code 1)."""


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _validate_numbers() -> None:
    if FLAGS.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}.")
    if FLAGS.max_samples is not None and FLAGS.max_samples < 1:
        raise UsageError(f"--max_samples must be >= 1, got {FLAGS.max_samples}.")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}.")
    if FLAGS.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {FLAGS.temperature}.")
    if not 0.0 <= FLAGS.confidence_threshold <= 1.0:
        raise UsageError("--confidence_threshold is a probability in [0, 1], got "
                         f"{FLAGS.confidence_threshold}.")
    _tree_setting()


def _tree_setting() -> tuple[int, int] | None:
    """--tree parsed to (topk, num_nodes); UsageError naming the flag when malformed."""
    if FLAGS.tree is None:
        return None
    try:
        return parse_tree(FLAGS.tree)
    except ValueError as e:
        raise UsageError(f"--tree={FLAGS.tree}: {e}".replace(f"tree={FLAGS.tree!r}: ", "")) from None


def _resolved(flag: str, resolve, path: str) -> str:
    try:
        return resolve(path)
    except DeepSpecError as e:
        raise SetupError(f"--{flag}: {e}") from None


def resolve_paths(target: str | None, draft: str | None) -> tuple[str | None, str]:
    """(target path or None for the embedded one, draft path; None = the default draft)
    from the --target/--draft flags; fails fast before loading (shared by the CLIs).
    Hub cache repo roots become their snapshots; links to missing blobs fail here."""
    if target is not None and target not in NAMED_TARGETS:
        target = _resolved("target", resolve_target_path, target)
    draft = _resolved("draft", resolve_checkpoint_path,
                      draft if draft is not None else DEFAULT_DRAFT_DIR)
    if target is not None and target not in NAMED_TARGETS and not os.path.exists(target):
        raise SetupError(f"--target: {target}: no such file or directory (pass an HF model "
                         f"directory, a .gguf file, or one of {sorted(NAMED_TARGETS)}).")
    if not os.path.isdir(draft):
        raise SetupError(f"--draft: {draft}: no such directory (pass a draft checkpoint "
                         "directory: HF config.json + model.safetensors, or a JAX dir).")
    return target, draft


def _load(target_path, draft_path):
    """Load both models and refuse a draft not built for the target (before decoding)."""
    try:
        target = load_target(target_path)
    except Exception as e:
        raise SetupError(f"cannot load target {target_path or 'smollm2-135m'}: {e}") from None
    try:  # the draft computes in the target's dtype; shared embed/lm_head come from it
        draft = load_draft(draft_path, dtype=target.dtype, target=target)
    except Exception as e:  # one clear line for any unreadable checkpoint
        raise SetupError(f"cannot load draft {draft_path}: {e}") from None
    try:
        check_compatible(target, draft)
    except ConfigError as e:
        raise SetupError(str(e)) from None
    return target, draft


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: parses ``argv`` (without the program name) and returns the exit code."""
    cli.parse(FLAGS, argv, __doc__)
    logging.set_verbosity(logging.WARNING)  # keep library INFO logs (jax, orbax) off the console
    quick = not FLAGS["target"].present and not FLAGS["draft"].present
    try:
        _validate_numbers()
        names, notes = datasets.resolve_datasets(
            FLAGS.datasets, default=datasets.QUICK_DATASETS if quick else None)
    except (UsageError, datasets.DatasetError) as e:
        return _fail(str(e), 2)
    max_samples = FLAGS.max_samples
    max_new = FLAGS.max_new_tokens
    temperature = FLAGS.temperature
    if quick:
        if max_samples is None:
            max_samples = QUICK_MAX_SAMPLES
        if not FLAGS["max_new_tokens"].present:
            max_new = QUICK_MAX_NEW_TOKENS
        if not FLAGS["temperature"].present:
            temperature = QUICK_TEMPERATURE
    try:
        target_path, draft_path = resolve_paths(FLAGS.target, FLAGS.draft)
    except SetupError as e:
        return _fail(str(e), 1)
    for note in notes:
        print(note, flush=True)
    if quick:
        print(f"quick demo: SmolLM2-135M-Instruct + default draft, {max_samples} samples of "
              f"{', '.join(names)}, max_new_tokens={max_new}, temperature={temperature:g} "
              "(pass --target/--draft for the reference protocol)", flush=True)

    compile_cache.enable(compile_cache.DEFAULT_DIR if FLAGS.compilation_cache_dir is None
                         else FLAGS.compilation_cache_dir)
    t0 = time.perf_counter()
    try:
        target, draft = _load(target_path, draft_path)
    except SetupError as e:
        return _fail(str(e), 1)
    print(f"loaded target {target.source} and {draft.kind} draft {draft.source} in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    tree = _tree_setting()
    if tree is not None and tree[0] > int(draft.config.out_vocab_size):
        return _fail(f"--tree={FLAGS.tree}: topk {tree[0]} exceeds the draft's vocabulary "
                     f"({draft.config.out_vocab_size}).", 2)
    if FLAGS.policy != "fixed" and (tree is not None or not runner.has_confidence_head(draft)):
        return _fail(f"--policy={FLAGS.policy} needs a chain (no --tree) and a draft with a "
                     f"confidence head ({draft.kind} draft {draft.source}); use --policy=fixed.", 2)
    if FLAGS.confidence_threshold > 0 and not runner.has_confidence_head(draft):
        print("note: --confidence_threshold has no effect: the draft has no confidence head.",
              flush=True)

    settings = runner.Settings(
        max_new_tokens=max_new, temperature=temperature,
        confidence_threshold=FLAGS.confidence_threshold, seed=FLAGS.seed,
        batch_size=FLAGS.batch_size, output_dir=FLAGS.output_dir, max_samples=max_samples,
        run_autoregressive=FLAGS.autoregressive, tree=_tree_setting(),
        use_calibration=FLAGS.calibration, policy=FLAGS.policy)
    config = {"target": target.source, "draft": draft.source, "datasets": names,
              "max_samples": max_samples, "max_new_tokens": max_new,
              "temperature": temperature,
              "confidence_threshold": FLAGS.confidence_threshold, "seed": FLAGS.seed,
              "batch_size": FLAGS.batch_size, "quick_demo": quick,
              "tree": list(_tree_setting()) if FLAGS.tree else None,
              "calibration": FLAGS.calibration, "policy": FLAGS.policy}
    if quick:  # few short prompts: one compilation per decoder for the whole demo
        try:
            settings = dataclasses.replace(settings, prompt_bucket=runner.shared_prompt_bucket(
                names, target, settings))
        except DeepSpecError as e:
            return _fail(str(e), 1)
    try:
        decoders = runner.Decoders(target, draft, settings)
    except DeepSpecError as e:
        return _fail(str(e), 1)
    if decoders.calibration is not None:
        temps = ", ".join(f"{t:.2f}" for t in decoders.calibration.temperatures)
        print(f"using the draft's STS calibration (temperatures {temps}; --nocalibration "
              "ignores it)", flush=True)
    rows = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {datasets.dataset_label(name)}", flush=True)
        try:
            row = runner.evaluate_dataset(name, decoders, target_name=target.source,
                                          draft_name=draft.source, config=config)
        except DeepSpecError as e:
            return _fail(str(e), 1)
        rows.append(row)
        print(report.one_line(row), flush=True)

    table = report.results_table(rows, target.source, draft.source)
    text = table
    if any(r.get("confidence") for r in rows):
        text += "\nConfidence head reliability (threshold 0; '(STS)' rows: after calibration):\n"
        text += report.confidence_table(rows, draft.source)
    print("\n" + text, flush=True)
    atomic.write_text(os.path.join(FLAGS.output_dir, "results_table.txt"), text + "\n")
    report.write_json(os.path.join(FLAGS.output_dir, "summary.json"),
                      {"config": config, "datasets": [
                          {k: v for k, v in r.items() if k not in ("samples", "config")}
                          for r in rows]})
    print(f"wrote {os.path.join(FLAGS.output_dir, '<dataset>', runner.RESULTS_NAME)} for "
          f"{len(rows)} dataset(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
