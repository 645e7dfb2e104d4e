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
drafts verified per request per round. Compilation is excluded (one warm-up call each); the
timed calls run round-robin over the policies, best of ``--repeats`` each.
Every call also prefills its prompts (hundreds of tokens each: at R = 32 most of an AR
call) and, speculative ones, the draft's state over them. So each policy is timed twice,
at ``--new_tokens`` and at ``--base_tokens``, and ``decode_tokens_per_s`` is the
difference: R x (new - base) tokens over t(new) - t(base), the decode phase alone with
every per-call cost of that policy taken out (greedy: the first ``base_tokens`` of both
calls are the same tokens). That is what ``python -m deepspec_jax.simulate`` predicts.
The batch is static: it runs rounds until its slowest request has its tokens, so its
rate follows ``tokens_per_round`` (tokens per request per round of the batch over the
same span: (new - base) / rounds) rather than the mean acceptance length ``tau`` (a
server that refills finished slots runs at tau). Between the timed calls it also re-times
the SPS profile's plain decode step (``plain_step_seconds``: 8 steps in one jitted loop,
median of 5, best over the repeats): ``simulate --rescale`` scales the profile by it, for
a profile measured in another spell of a shared machine than this run.

    python benchmarks/serving.py --rows=1,4,16,32 --new_tokens=48 --out=serving.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import flags

from deepspec_jax import atomic, cli, load_target, sps as sps_lib
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft
from deepspec_jax.evaluation.datasets import load_prompts
from deepspec_jax.evaluation.runner import encode_prompts
from deepspec_jax.spec_decode import _proposal_width, speculative_generate

FLAGS = flags.FlagValues()
flags.DEFINE_string("rows", "1,4,16,32", "Comma-separated numbers of concurrent requests R.",
                    flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per request.", flag_values=FLAGS)
flags.DEFINE_string("policies", "ar,fixed,threshold,scheduler,production,none",
                    "What to run.", flag_values=FLAGS)
flags.DEFINE_integer("base_tokens", 8, "Each policy is also timed at this many new tokens; the "
                     "decode-only rate is the difference (0: not measured).", flag_values=FLAGS)
flags.DEFINE_float("threshold", 0.5, "Confidence threshold of the threshold policy.",
                   flag_values=FLAGS)
flags.DEFINE_integer("context", None, "Context of the SPS profile measurement (default: the "
                     "workload's decode context, longest prompt + half the new tokens, "
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
    """The context a decode step of these requests costs: the longest prompt + half the
    generated tokens, rounded to 16 (the SPS profile's context). ``extend`` reads every
    row's cache up to the longest row's length, so the batch's cost follows its longest
    request (R = 32: plain step 310 ms at the real lengths, 302 with every row at the
    longest, 257 with every row at the mean; the loop ran 311)."""
    longest = max(len(p) for p in prompts) + new_tokens / 2
    return max(16, int(round(longest / 16)) * 16)


def _run(target, draft, prompts, policy, new_tokens, kw):
    if policy == "ar":
        out = target.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
        return out, None
    res = speculative_generate(target, draft, prompts, max_new_tokens=new_tokens,
                               stop_token_ids=[], policy=policy, **kw)
    return [r.tokens for r in res], res


def _loop_rounds(res) -> int:
    """Rounds the batch ran: the loop runs until its slowest request is done."""
    return int(max(r.num_rounds for r in res))


def _verify_sizes(res, start: int) -> dict[int, int]:
    """How many loop rounds from round ``start`` on verified B tokens, per B: every
    request still running contributes its current token plus the drafts it verified
    (the packed size of that round; its cost is a staircase in B, so the calculator
    averages the cost over these rounds rather than taking the cost of the mean)."""
    sizes = np.zeros(_loop_rounds(res), np.int64)
    for r in res:
        sizes[: r.num_rounds] += 1 + np.asarray(r.proposal_lengths[: r.num_rounds], np.int64)
    vals, counts = np.unique(sizes[start:], return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    target = load_target(None)
    draft = load_draft(args.draft or DEFAULT_DRAFT_DIR, dtype=target.dtype, target=target)
    width = _proposal_width(draft.kind, draft.config) + 1
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        # drop the previous R's executables: 12 compiled loops per R, kept for all four
        # R, exhaust the process's memory mappings (LLVM: "Cannot allocate memory")
        jax.clear_caches()
        prompts = _prompts(target, rows)
        context = args.context or workload_context(prompts, args.new_tokens)
        profile = sps_lib.cached(target, rows, width, context, draft=draft)
        n = rows * width
        kws = {"ar": {}, "fixed": {},
               "threshold": dict(confidence_threshold=args.threshold),
               "scheduler": dict(sps=profile), "production": dict(sps=profile),
               "none": dict(sps=[1.0 / b ** 3 for b in range(1, n + 1)])}
        names = args.policies.split(",")
        policy = {name: "scheduler" if name == "none" else name for name in names}
        lengths = [args.new_tokens] + ([args.base_tokens] if 0 < args.base_tokens < args.new_tokens
                                       else [])
        calls = [(name, n) for name in names for n in lengths]
        run = {(name, n): (lambda name=name, n=n: _run(target, draft, prompts, policy[name], n,
                                                       kws[name])) for name, n in calls}
        outs = {call: run[call]() for call in calls}                          # compile
        # the profile's plain step, re-timed between the runs: the calculator scales the
        # profile by it (a profile measured in a slower spell of the machine is not wrong)
        plain = sps_lib.plain_step(target, rows, width, context)
        jax.block_until_ready(plain())
        plain_best = float("inf")
        # timed calls interleaved round-robin (best of --repeats per call): a slow spell
        # of the machine then hits every policy alike instead of one
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(args.repeats):
            for call in calls:
                t0 = time.perf_counter()
                outs[call] = run[call]()
                best[call] = min(best[call], time.perf_counter() - t0)
            steps = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(plain())
                steps.append((time.perf_counter() - t0) / plain.steps)
            plain_best = min(plain_best, float(np.median(steps)))
        del plain
        for n in lengths:
            base = outs[("ar", n)][0] if "ar" in names else None
            for name in names:
                if base is not None:
                    assert outs[(name, n)][0] == [list(t) for t in base], \
                        f"{name} ({n} tokens): output differs from plain greedy"
        for name in names:
            _, res = outs[(name, args.new_tokens)]
            sec = best[(name, args.new_tokens)]
            row = dict(rows=rows, policy=name, seconds=round(sec, 3), context=context,
                       plain_step_seconds=round(plain_best, 5),
                       tokens_per_s=round(rows * args.new_tokens / sec, 2),
                       latency_ms_per_token=round(sec / args.new_tokens * 1e3, 2))
            if len(lengths) == 2:
                base_sec = best[(name, lengths[1])]
                row["base_seconds"] = round(base_sec, 3)
                if sec > base_sec:
                    row["decode_tokens_per_s"] = round(
                        rows * (args.new_tokens - lengths[1]) / (sec - base_sec), 2)
            if res is not None:
                acc = np.concatenate([r.accepted_lengths for r in res])
                ver = np.concatenate([r.proposal_lengths for r in res])
                row.update(tau=round(float(acc.mean()), 3), verified=round(float(ver.mean()), 3),
                           rounds=_loop_rounds(res))
                start = _loop_rounds(outs[(name, lengths[1])][1]) if len(lengths) == 2 else 0
                spent = row["rounds"] - start
                if len(lengths) == 2 and spent > 0:
                    row["tokens_per_round"] = round((args.new_tokens - lengths[1]) / spent, 3)
                row["verify_sizes"] = _verify_sizes(res, start)
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
        rel = r["tokens_per_s"] / ar[r["rows"]] if r["rows"] in ar else nan
        dec = r.get("decode_tokens_per_s")
        rel_dec = dec / ar_dec[r["rows"]] if dec and ar_dec.get(r["rows"]) else nan
        print(f"{r['rows']:>3} {r['policy']:>10} {r['tokens_per_s']:>8.1f} {rel:>6.2f} "
              f"{r['latency_ms_per_token']:>7.1f} {dec or nan:>7.1f} {rel_dec:>6.2f} "
              f"{r.get('tau', nan):>6.2f} {r.get('verified', nan):>8.2f}")
    if args.out:
        atomic.write_json(args.out, dict(
            machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
            new_tokens=args.new_tokens, base_tokens=args.base_tokens,
            load=os.getloadavg()[0], results=results), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
