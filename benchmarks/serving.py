"""Batched serving: R concurrent requests, plain decoding vs each verification policy.

R real prompts (held-out eval prompts of gsm8k, humaneval and mt-bench, interleaved)
run as one batch on the embedded SmolLM2 with the shipped draft, greedy, every request
forced to ``--new_tokens`` tokens (no stop token: every method does the same work), for

* ``ar``: plain target decoding (``Target.generate``);
* ``fixed``: speculative, the target verifies every row's whole block;
* ``threshold``: verifies only the drafts before the confidence threshold (packed);
* ``scheduler``: DSpark's prefix scheduler over the batch with this machine's SPS
  profile (``deepspec_jax.sps``, measured once with the draft's proposal and cached);
* ``none``: the scheduler under a cost table that admits no draft (l_r = 0 for every
  request): what a round costs when nothing is verified but the anchor -- one plain
  step plus the proposal.

Reports tokens/s (all requests), the per-request latency (the batch finishes together:
wall time per request, and per token), the acceptance length tau and the mean number of
drafts verified per request per round. Compilation is excluded (one warm-up call each); the timed calls run round-robin over
the policies, best of ``--repeats`` each.
Every call also prefills its prompts (hundreds of tokens each: at R = 32 most of an
AR call), so the ``prefill`` row times ``Target.generate`` of one token and the
``decode_tokens_per_s`` column subtracts it: the decode phase alone, what
``python -m deepspec_jax.simulate`` predicts.

    python benchmarks/serving.py --rows=1,4,16,32 --new_tokens=48 --out=serving.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
from absl import flags

from deepspec_jax import cli, load_target, sps as sps_lib
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft
from deepspec_jax.evaluation.datasets import load_prompts
from deepspec_jax.evaluation.runner import encode_prompts
from deepspec_jax.spec_decode import _proposal_width, speculative_generate

FLAGS = flags.FlagValues()
flags.DEFINE_string("rows", "1,4,16,32", "Comma-separated numbers of concurrent requests R.",
                    flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per request.", flag_values=FLAGS)
flags.DEFINE_string("policies", "prefill,ar,fixed,threshold,scheduler,production,none",
                    "What to run (prefill first: the decode-only columns need it).",
                    flag_values=FLAGS)
flags.DEFINE_float("threshold", 0.5, "Confidence threshold of the threshold policy.",
                   flag_values=FLAGS)
flags.DEFINE_integer("context", None, "Context of the SPS profile measurement (default: the "
                     "workload's mean decode context, mean prompt + half the new tokens, "
                     "rounded to 16).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed runs per policy, interleaved across policies (best "
                     "reported).", flag_values=FLAGS)
flags.DEFINE_string("draft", None, "Draft dir (default: the shipped draft).", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Also write the results here (JSON).", flag_values=FLAGS)

DATASETS = ("gsm8k", "humaneval", "mt-bench")


def _prompts(target, rows: int) -> list[list[int]]:
    per = [encode_prompts(target, load_prompts(name, 64, seed=980406), name) for name in DATASETS]
    return [per[i % len(per)][i // len(per)] for i in range(rows)]


def workload_context(prompts: list[list[int]], new_tokens: int) -> int:
    """The mean context a decode step of these requests attends over (mean prompt
    length + half the generated tokens), rounded to 16: the SPS profile's context."""
    mean = sum(len(p) for p in prompts) / len(prompts) + new_tokens / 2
    return max(16, int(round(mean / 16)) * 16)


def _run(target, draft, prompts, policy, new_tokens, kw):
    if policy == "prefill":
        return target.generate(prompts, max_new_tokens=1, stop_token_ids=[]), None
    if policy == "ar":
        out = target.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
        return out, None
    res = speculative_generate(target, draft, prompts, max_new_tokens=new_tokens,
                               stop_token_ids=[], policy=policy, **kw)
    return [r.tokens for r in res], res


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    target = load_target(None)
    draft = load_draft(args.draft or DEFAULT_DRAFT_DIR, dtype=target.dtype, target=target)
    width = _proposal_width(draft.kind, draft.config) + 1
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        prompts = _prompts(target, rows)
        context = args.context or workload_context(prompts, args.new_tokens)
        profile = sps_lib.cached(target, rows, width, context, draft=draft)
        n = rows * width
        kws = {"ar": {}, "fixed": {},
               "threshold": dict(confidence_threshold=args.threshold),
               "scheduler": dict(sps=profile), "production": dict(sps=profile),
               "none": dict(sps=[1.0 / b ** 3 for b in range(1, n + 1)]), "prefill": {}}
        names = args.policies.split(",")
        policy = {name: "scheduler" if name == "none" else name for name in names}
        run = {name: (lambda name=name: _run(target, draft, prompts, policy[name],
                                             args.new_tokens, kws[name])) for name in names}
        outs = {name: run[name]() for name in names}                          # compile
        # timed calls interleaved round-robin (best of --repeats per policy): a slow
        # spell of the machine then hits every policy alike instead of one
        best = dict.fromkeys(names, float("inf"))
        for _ in range(args.repeats):
            for name in names:
                t0 = time.perf_counter()
                outs[name] = run[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
        prefill = best.get("prefill")
        if prefill is not None:
            results.append(dict(rows=rows, policy="prefill", seconds=round(prefill, 3),
                                context=context))
            print(json.dumps(results[-1]), flush=True)
        base = outs["ar"][0] if "ar" in outs else None
        for name in names:
            if name == "prefill":
                continue
            toks, res = outs[name]
            if base is not None:
                assert toks == [list(t) for t in base], f"{name}: output differs from plain greedy"
            sec = best[name]
            row = dict(rows=rows, policy=name, seconds=round(sec, 3), context=context,
                       tokens_per_s=round(rows * args.new_tokens / sec, 2),
                       latency_ms_per_token=round(sec / args.new_tokens * 1e3, 2))
            if prefill is not None and sec > prefill:
                row["decode_tokens_per_s"] = round(rows * (args.new_tokens - 1) / (sec - prefill), 2)
            if res is not None:
                acc = np.concatenate([r.accepted_lengths for r in res])
                ver = np.concatenate([r.proposal_lengths for r in res])
                row.update(tau=round(float(acc.mean()), 3), verified=round(float(ver.mean()), 3),
                           rounds=int(max(r.num_rounds for r in res)))
            results.append(row)
            print(json.dumps(row), flush=True)
    ar = {r["rows"]: r["tokens_per_s"] for r in results if r["policy"] == "ar"}
    ar_dec = {r["rows"]: r.get("decode_tokens_per_s") for r in results if r["policy"] == "ar"}
    print(f"\nserving on {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, {args.new_tokens} tokens/request, greedy")
    print(f"{'R':>3} {'policy':>10} {'tok/s':>8} {'vs AR':>6} {'ms/tok':>7} {'decode':>7} "
          f"{'vs AR':>6} {'tau':>6} {'verified':>8}")
    nan = float("nan")
    for r in results:
        if r["policy"] == "prefill":
            print(f"{r['rows']:>3} {'prefill':>10} ({r['seconds']:.2f} s)")
            continue
        rel = r["tokens_per_s"] / ar[r["rows"]] if r["rows"] in ar else nan
        dec = r.get("decode_tokens_per_s")
        rel_dec = dec / ar_dec[r["rows"]] if dec and ar_dec.get(r["rows"]) else nan
        print(f"{r['rows']:>3} {r['policy']:>10} {r['tokens_per_s']:>8.1f} {rel:>6.2f} "
              f"{r['latency_ms_per_token']:>7.1f} {dec or nan:>7.1f} {rel_dec:>6.2f} "
              f"{r.get('tau', nan):>6.2f} {r.get('verified', nan):>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(),
                           date=time.strftime("%Y-%m-%d"), new_tokens=args.new_tokens,
                           load=os.getloadavg()[0], results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
