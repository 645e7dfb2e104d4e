"""Decode-step time of the target's two weight/KV layouts, A/B in one process.

Loads the target once per variant and times ``extend`` of 1 token (one decode step)
at ``--context`` tokens in a ``--cache_len``-slot cache, alternating the variants
round by round so that load changes on a shared machine hit all of them alike.
Prints the median step per variant, the ratio of medians against the first variant,
the median of the per-round ratios, and what the compiled step materialises: the
bytes of non-fused ``copy`` ops and of fusions that only slice a parameter (a
per-layer copy of a weight or a cache buffer).

    python benchmarks/decode_layout.py                      # per_layer vs scan, SmolLM2-135M
    python benchmarks/decode_layout.py --variants=scan --rounds=5

Per-layer buffers, unrolled (the CPU default) vs stacked [L, ...] buffers under
``lax.scan`` (the accelerator default). docs/BENCHMARKS.md ("One parameter layout?")
has the measurement that also included a stacked layout with a statically unrolled
loop (commit a400675).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

VARIANTS = {"per_layer": dict(per_layer=True), "scan": dict(per_layer=False)}

_SHAPE = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\{[^}]*\} (\w[\w-]*)\(")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}


def materialised_copies(hlo: str) -> dict[str, float]:
    """MB written per execution of each instruction (an instruction in a loop body
    counts once) by non-fused ``copy`` ops and by fusions that only slice a parameter
    (``slice_fusion_mb``: a materialised layer slice of a weight or cache buffer)."""
    fused = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo))
    bodies, comp = {}, None
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[comp] = []
        elif comp is not None and _SHAPE.match(line):
            bodies[comp].append(line)
    slice_only = set()
    for name in fused & set(bodies):
        ops = [_SHAPE.match(x).group(3) for x in bodies[name]]
        if set(ops) <= {"parameter", "slice", "dynamic-slice", "bitcast", "constant"} and \
                {"slice", "dynamic-slice"} & set(ops):
            slice_only.add(name)
    copy_mb = slice_mb = 0.0
    for name, lines in bodies.items():
        if name in fused:
            continue
        for line in lines:
            dtype, dims, op = _SHAPE.match(line).groups()
            size = _BYTES.get(dtype, 4) * math.prod(int(x) for x in dims.split(",") if x)
            called = re.search(r"calls=%([\w.\-]+)", line)
            if op == "copy":
                copy_mb += size / 1e6
            elif op == "fusion" and called and called.group(1) in slice_only:
                slice_mb += size / 1e6
    return {"copy_mb": round(copy_mb, 2), "slice_fusion_mb": round(slice_mb, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="target (default: embedded SmolLM2-135M)")
    ap.add_argument("--variants", default="per_layer,scan", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    ap.add_argument("--cache_len", type=int, default=1024, help="KV cache capacity")
    ap.add_argument("--rounds", type=int, default=15, help="A/B rounds")
    ap.add_argument("--calls", type=int, default=5, help="timed calls per variant per round")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepspec_jax import load_target
    from deepspec_jax import target as target_mod

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    rng = np.random.default_rng(0)
    prompt, one = None, jnp.ones((1,), jnp.int32)
    runs = {}
    for name in names:
        target = load_target(args.target, **VARIANTS[name])
        if prompt is None:
            vocab = target.config.vocab_size
            prompt = rng.integers(0, vocab - 1, (1, args.context)).astype(np.int32)
            lens_np = np.asarray([args.context], np.int32)
            tok = jnp.asarray(rng.integers(0, vocab - 1, (1, 1)).astype(np.int32))
        _, cache = target.extend(target.init_cache(1, args.cache_len), prompt, lens_np)
        hlo = target_mod._extend.lower(target.graphdef, target.state, cache, tok, one,
                                       ()).compile().as_text()
        runs[name] = {"target": target, "cache": cache, "times": [], "hlo": materialised_copies(hlo)}

    def step(run):
        o, c = run["target"].extend(run["cache"], tok, one)
        run["cache"] = c._replace(lengths=jnp.asarray(lens_np))   # same context every call
        return o.logits

    for run in runs.values():                       # compile + warm-up
        for _ in range(2):
            jax.block_until_ready(step(run))
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            ts = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                jax.block_until_ready(step(runs[name]))
                ts.append(time.perf_counter() - t0)
            runs[name]["times"].append(float(np.median(ts)) * 1e3)
    base = names[0]
    res = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
               date=time.strftime("%Y-%m-%d %H:%M"), backend=jax.default_backend(),
               context=args.context, cache_len=args.cache_len, rounds=args.rounds,
               calls=args.calls, load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    for name in names:
        t = np.asarray(runs[name]["times"])
        res[name] = dict(median_ms=round(float(np.median(t)), 2),
                         min_ms=round(float(t.min()), 2),
                         ratio_of_medians=round(float(np.median(t) / np.median(runs[base]["times"])), 3),
                         median_round_ratio=round(float(np.median(t / np.asarray(runs[base]["times"]))), 3),
                         **runs[name]["hlo"])
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
