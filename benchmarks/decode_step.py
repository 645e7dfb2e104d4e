"""Decode-step time of the target (its one layout: per-layer buffers, unrolled).

Loads the target and times ``extend`` of 1 token (one decode step) at ``--context``
tokens in a ``--cache_len``-slot cache: ``--rounds`` x ``--calls`` timed calls, the
median per round, and reports the median and min over rounds, plus what the compiled
step materialises: the bytes of non-fused ``copy`` ops and of fusions that only slice a
parameter (a per-layer copy of a weight or a cache buffer; 0 for per-layer buffers).

    python benchmarks/decode_step.py                              # SmolLM2-135M
    python benchmarks/decode_step.py --target=DIR --rounds=3 --calls=2

It uses only ``load_target``/``extend``, so running it with ``PYTHONPATH`` at an
older checkout times that code. docs/BENCHMARKS.md ("One parameter layout?") has the
measurement of the stacked layouts that were removed (commit a400675 / d8680dc).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from deepspec_jax import atomic, cli, load_target
from deepspec_jax import target as target_mod

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


FLAGS = flags.FlagValues()
flags.DEFINE_string("target", None, "Target (default: embedded SmolLM2-135M).", flag_values=FLAGS)
flags.DEFINE_integer("context", 256, "Tokens already in the cache.", flag_values=FLAGS)
flags.DEFINE_integer("cache_len", 1024, "KV cache capacity.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 15, "Timed rounds.", flag_values=FLAGS)
flags.DEFINE_integer("calls", 5, "Timed calls per round.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    if args.context + 1 > args.cache_len:
        cli.usage_error(f"--cache_len ({args.cache_len}) must exceed --context ({args.context}).")

    rng = np.random.default_rng(0)
    target = load_target(args.target)
    vocab = target.config.vocab_size
    prompt = rng.integers(0, vocab - 1, (1, args.context)).astype(np.int32)
    lens = jnp.asarray([args.context], jnp.int32)
    tok = jnp.asarray(rng.integers(0, vocab - 1, (1, 1)).astype(np.int32))
    one = jnp.ones((1,), jnp.int32)
    _, cache = target.extend(target.init_cache(1, args.cache_len), prompt, np.asarray(lens))
    lens = jax.device_put(lens, cache.lengths.sharding)   # as extend returns it: no recompile
    hlo = target_mod._extend.lower(target.graphdef, target.state, cache, tok, one,
                                   ()).compile().as_text()

    def step(cache):
        o, c = target.extend(cache, tok, one)
        return o.logits, c._replace(lengths=lens)   # same context every call

    for _ in range(2):                               # compile + warm-up
        logits, cache = step(cache)
        jax.block_until_ready(logits)
    times = []
    for _ in range(args.rounds):
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            logits, cache = step(cache)
            jax.block_until_ready(logits)
            ts.append(time.perf_counter() - t0)
        times.append(float(np.median(ts)) * 1e3)
    res = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
               date=time.strftime("%Y-%m-%d %H:%M"), backend=jax.default_backend(),
               context=args.context, cache_len=args.cache_len, rounds=args.rounds,
               calls=args.calls, load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
               median_ms=round(float(np.median(times)), 2), min_ms=round(float(min(times)), 2),
               **materialised_copies(hlo))
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        atomic.write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
