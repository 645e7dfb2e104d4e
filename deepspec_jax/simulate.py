"""Will speculative decoding pay off at batch size R on this (or another) machine?

A cost calculator: tokens/s of plain decoding and of speculative decoding under a
verification policy, predicted from

* acceptance statistics: tau (accepted + 1 per round) and the drafts verified per round
  v, from an eval's ``results.json`` (``--policy`` decides v: the fixed policy verifies
  the whole block) or from ``benchmarks/serving.py``'s JSON (one row per R and policy;
  its static batch runs until the slowest request is done, so there tau is the batch's
  ``tokens_per_round`` when measured);
* an SPS profile per R (``deepspec_jax.sps``: verify seconds per verify batch size B,
  one plain decode step, the draft's propose + commit), measured here and cached, or
  read from files measured on another machine (``--sps``).

The model: a round of R requests verifies B = R (1 + v) tokens and costs
verify(B) + propose(R) (the fixed policy: ``extend`` of R x (block + 1) tokens instead of
the packed verify; with the serving benchmark's per-round sizes, verify is averaged over
its rounds' B); it commits R x tau tokens. Plain decoding commits R tokens per
step. With serving-benchmark input it also prints the measured tokens/s and the
prediction's error. ``--rescale`` first scales the profile by the run's re-timed plain step
over the profile's own (``scale``; ``unscaled`` keeps the raw error): for a profile measured
at another time than the run. Off by default: since profiles time every entry inside a
jitted loop as the engine runs it (v4), the raw profile predicted the serving runs better
(docs/BENCHMARKS.md, session 17: mean |error| 11% raw vs 19% scaled).

    python -m deepspec_jax.simulate --stats=eval_results/gsm8k/results.json --rows=1,4,16,32
    python -m deepspec_jax.simulate --stats=serving.json          # prediction error
                                                   # (profiles at the benchmark's contexts)
    python -m deepspec_jax.simulate --stats=results.json --sps=a.json,b.json   # their machine
"""

from __future__ import annotations

import json
import math
import sys
from typing import Sequence

from absl import flags

from deepspec_jax import atomic, cli, sps as sps_lib
from deepspec_jax.drafts import DEFAULT_DRAFT_DIR, load_draft
from deepspec_jax.errors import ConfigError
from deepspec_jax.spec_decode import _proposal_width
from deepspec_jax.target import load_target


def predict(profile: sps_lib.SPSProfile, tau: float, verified: float,
            fixed: bool = False, sizes: dict[int, int] | None = None) -> dict:
    """Predicted tokens/s (all requests) of a policy with acceptance length ``tau`` and
    ``verified`` drafts per request per round, and of plain decoding, at
    ``profile.rows`` requests. ``fixed``: the fixed policy, whose verify is ``extend``
    of every request's whole block (``profile.fixed_seconds``), not the packed path.
    ``sizes`` ({B: rounds}, when the rounds' verify sizes are known): the verify cost
    is averaged over them (the cost is a staircase in B: a mix of rounds verifying
    nothing and rounds verifying a few drafts costs less than the mean's step)."""
    if profile.propose_seconds is None or profile.ar_seconds is None:
        raise ConfigError("the SPS profile has no proposal / plain-step timing: measure it "
                          "with a draft (`python -m deepspec_jax.sps --draft=...`).")
    r = profile.rows
    b = max(r, math.ceil(r * (1.0 + verified) - 1e-9))
    if fixed and profile.fixed_seconds is not None:   # the fixed policy runs ``extend``
        b, verify_s = r * profile.width, profile.fixed_seconds
    elif sizes:
        verify_s = (sum(c * profile.seconds_at(int(s)) for s, c in sizes.items())
                    / sum(sizes.values()))
    else:
        verify_s = profile.seconds_at(b)
    round_s = verify_s + profile.propose_seconds
    spec = r * tau / round_s
    ar = r / profile.ar_seconds
    return dict(rows=r, tau=tau, verified=verified, verify_tokens=b,
                round_ms=round(round_s * 1e3, 2), tokens_per_s=round(spec, 2),
                ar_tokens_per_s=round(ar, 2), speedup=round(spec / ar, 3))


def read_stats(path: str) -> list[dict]:
    """Rows of (label, policy, tau, verified[, rows, measured tokens/s]) from an eval
    results.json or a serving-benchmark JSON."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read acceptance statistics ({e}).") from e
    if isinstance(raw, dict) and "results" in raw:          # benchmarks/serving.py
        out = []
        for r in raw["results"]:
            if r["policy"] == "prefill":      # outputs before the per-policy base timing
                continue
            # the decode phase alone (each policy's per-call costs taken out) when measured
            meas = r.get("decode_tokens_per_s", r["tokens_per_s"])
            ctx = {"context": int(r["context"])} if r.get("context") else {}
            if r.get("plain_step_seconds"):   # the profile's plain step re-timed in the run
                ctx["plain_step"] = float(r["plain_step_seconds"])
            if r["policy"] == "ar":
                out.append(dict(label="ar", policy="ar", rows=r["rows"], measured=meas, **ctx))
            else:
                # a static batch commits tokens_per_round per request per round (it runs
                # until its slowest request is done), not the mean acceptance length
                if r.get("verify_sizes"):   # the verify size of each round of the span
                    ctx["sizes"] = {int(k): int(v) for k, v in r["verify_sizes"].items()}
                out.append(dict(label=r["policy"], policy=r["policy"], rows=r["rows"],
                                tau=r.get("tokens_per_round", r["tau"]), verified=r["verified"],
                                measured=meas, **ctx))
        return out
    if isinstance(raw, dict) and "acceptance_length" in raw:   # eval results.json
        v = raw.get("verified_drafts_per_round", raw.get("draft_tokens_per_proposal"))
        if raw.get("acceptance_length") is None or v is None:
            raise ConfigError(f"{path}: fields 'acceptance_length' and "
                              "'draft_tokens_per_proposal' are needed (an eval results.json).")
        return [dict(label=raw.get("dataset", path), policy=raw.get("policy", "fixed"),
                     tau=float(raw["acceptance_length"]), verified=float(v))]
    raise ConfigError(f"{path}: neither an eval results.json (field 'acceptance_length') "
                      "nor a benchmarks/serving.py output (field 'results').")


def _predict_row(prof: sps_lib.SPSProfile, st: dict) -> dict:
    if st["policy"] == "ar":
        return dict(rows=prof.rows, tokens_per_s=round(prof.rows / prof.ar_seconds, 2))
    return predict(prof, st["tau"], st["verified"], fixed=st["policy"] == "fixed",
                   sizes=st.get("sizes"))


def simulate(stats: Sequence[dict], profiles: dict[int, sps_lib.SPSProfile],
             rows: Sequence[int] | None = None, rescale: bool = False) -> list[dict]:
    """Predictions for every stats row at every R (``rows``; a stats row that carries its
    own R is predicted at that R only), with the measured figure and error when known.
    ``rescale``: a row carrying the profile's plain step re-timed in its run
    (``plain_step``) is predicted from the profile scaled to that run's speed
    (``scale``), and ``error_unscaled`` keeps the error of the profile as measured."""
    out = []
    for st in stats:
        for r in ([st["rows"]] if "rows" in st else rows or sorted(profiles)):
            if r not in profiles:
                raise ConfigError(f"no SPS profile for R={r} requests (have "
                                  f"{sorted(profiles)}); measure it: `python -m "
                                  f"deepspec_jax.sps --rows={r}`.")
            prof = profiles[r]
            scale = None
            if rescale and st.get("plain_step") and prof.ar_seconds:
                scale = st["plain_step"] / prof.ar_seconds
                unscaled, prof = _predict_row(prof, st), prof.scaled(scale)
            pred = _predict_row(prof, st)
            row = dict(label=st["label"], policy=st["policy"], **pred)
            if scale is not None:
                row["scale"] = round(scale, 4)
            if "measured" in st:
                row["measured_tokens_per_s"] = st["measured"]
                row["error"] = round(pred["tokens_per_s"] / st["measured"] - 1.0, 4)
                if scale is not None:
                    row["error_unscaled"] = round(unscaled["tokens_per_s"] / st["measured"] - 1, 4)
            out.append(row)
    return out


def main(argv=None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("stats", None, "Comma-separated eval results.json files or a "
                        "benchmarks/serving.py JSON.", flag_values=fv)
    flags.DEFINE_string("rows", "1,4,16,32", "Batch sizes R to predict (eval statistics).",
                        flag_values=fv)
    flags.DEFINE_string("sps", None, "Comma-separated SPS profile JSON files (default: measure "
                        "on this machine, cached).", flag_values=fv)
    flags.DEFINE_string("target", None, "Target for measuring profiles (default SmolLM2).",
                        flag_values=fv)
    flags.DEFINE_string("draft", None, "Draft for measuring profiles (default: shipped).",
                        flag_values=fv)
    flags.DEFINE_integer("context", None, "Context of measured profiles (default: the "
                         "serving benchmark's per-R context when --stats has it, else 256).",
                         flag_values=fv)
    flags.DEFINE_bool("rescale", False, "Scale each profile to its serving run's speed (the "
                      "plain step the run re-timed, over the profile's).", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the predictions here.", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    if not args.stats:
        print("error: --stats is required (an eval results.json or a serving benchmark JSON).",
              file=sys.stderr)
        return 2
    try:
        stats = [row for p in args.stats.split(",") for row in read_stats(p)]
        want = sorted({s["rows"] for s in stats if "rows" in s}
                      or {int(r) for r in args.rows.split(",")})
        if args.sps:
            profiles = {}
            for p in args.sps.split(","):
                prof = sps_lib.load(p)
                profiles[prof.rows] = prof
        else:
            target = load_target(args.target)
            draft = load_draft(args.draft or DEFAULT_DRAFT_DIR, dtype=target.dtype, target=target)
            width = _proposal_width(draft.kind, draft.config) + 1
            ctx = {s["rows"]: s["context"] for s in stats if "context" in s}
            profiles = {r: sps_lib.cached(target, r, width, args.context or ctx.get(r, 256),
                                          draft=draft)
                        for r in want}
        rows = simulate(stats, profiles, want, rescale=args.rescale)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'R':>3} {'stats':>12} {'policy':>10} {'tau':>5} {'verified':>8} {'tok/s':>8} "
          f"{'speedup':>7} {'measured':>8} {'error':>7} {'scale':>6} {'unscaled':>8}")
    nan = float("nan")
    for r in rows:
        meas = r.get("measured_tokens_per_s")
        print(f"{r['rows']:>3} {r['label'][:12]:>12} {r['policy']:>10} "
              f"{r.get('tau', nan):>5.2f} {r.get('verified', nan):>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {r.get('speedup', nan):>7.2f} "
              f"{meas if meas is not None else nan:>8.1f} "
              f"{100 * r['error'] if 'error' in r else nan:>6.1f}% {r.get('scale', nan):>6.3f} "
              f"{100 * r['error_unscaled'] if 'error_unscaled' in r else nan:>7.1f}%")
    if args.json:
        atomic.write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
