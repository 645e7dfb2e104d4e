"""A decoder's projections for a few rows: which product form XLA runs fast.

Decoding multiplies 1 row per step through every projection of the target, verification
5-8, a batch of single tokens one row per request. This times a chain of ``--layers``
SmolLM2-shaped layers (RMS norm, q/k/v/o, gated MLP; a token-mixing stand-in for the
attention), each with its own weights so that every step reads them all, in three forms:

- ``rows-first [in,out]``: ``x @ W`` with W stored [in, out] (deepspec_jax's layout before
  2026-12-04);
- ``rows-first [out,in]``: ``x @ W.T`` with W stored [out, in] (as HF stores it);
- ``layers.linear``: what the models run, W [out, in] multiplied weight-first
  (``W @ x.T``, then the small transpose) up to ``WEIGHT_FIRST_MAX_ROWS`` rows.

Each is printed as a ratio to the one-row ``rows-first [in,out]`` chain (jitted, median of
``--repeats``, the forms alternated ``--rounds`` times), so a run on a busy machine still
compares the forms; the forms' outputs are checked to agree.

    python benchmarks/decoder_chain.py
    python benchmarks/decoder_chain.py --rows=1,5,8,32,128 --json=out.json
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from deepspec_jax import atomic, cli
from deepspec_jax.layers import linear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_list("rows", ["1", "5", "8"], "Rows M (tokens per call).", flag_values=FLAGS)
flags.DEFINE_integer("layers", 30, "Layers in the chain (SmolLM2-135M: 30).", flag_values=FLAGS)
flags.DEFINE_integer("hidden", 576, "Hidden size d (SmolLM2-135M: 576).", flag_values=FLAGS)
flags.DEFINE_integer("kv", 192, "Key/value projection width (SmolLM2-135M: 3 x 64).",
                     flag_values=FLAGS)
flags.DEFINE_integer("intermediate", 1536, "MLP width (SmolLM2-135M: 1536).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 15, "Timed calls per form (median reported).", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 2, "Times the forms are alternated (median over rounds).",
                     flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)

# name -> (weight layout, product x [M, in] . W -> [M, out])
FORMS = {
    "rows-first [in,out]": ("io", lambda x, w: x @ w),
    "rows-first [out,in]": ("oi", lambda x, w: x @ w.T),
    "layers.linear": ("oi", linear),
}


def _rms(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def _chain(product):
    """A jitted decoder chain over per-layer weight dicts using ``product``."""
    def run(x, layers):
        for w in layers:
            y = _rms(x)
            q, k, v = product(y, w["q"]), product(y, w["k"]), product(y, w["v"])
            kv = jnp.tile(k + v, (1, q.shape[-1] // k.shape[-1]))
            a = q + 0.01 * kv * jnp.sum(jax.nn.softmax(q[:, :8], axis=0), -1, keepdims=True)
            x = x + product(a, w["o"])
            y = _rms(x)
            x = x + product(jax.nn.silu(product(y, w["gate"])) * product(y, w["up"]), w["down"])
        return x
    return jax.jit(run)


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    rng = np.random.default_rng(0)
    d, kv, inter = args.hidden, args.kv, args.intermediate
    if d % kv:
        raise SystemExit(f"--hidden={d} must be a multiple of --kv={kv} (heads share keys).")
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
              "gate": (d, inter), "up": (d, inter), "down": (inter, d)}   # [in, out]
    io = [{n: (0.02 * rng.standard_normal(s, dtype=np.float32)) for n, s in shapes.items()}
          for _ in range(args.layers)]
    weights = {"io": [{n: jnp.asarray(a) for n, a in w.items()} for w in io],
               "oi": [{n: jnp.asarray(np.ascontiguousarray(a.T)) for n, a in w.items()} for w in io]}
    chains = {name: (layout, _chain(product)) for name, (layout, product) in FORMS.items()}
    rows = [int(m) for m in args.rows]
    times: dict[tuple[str, int], list[float]] = {}
    worst = 0.0
    for _ in range(args.rounds):
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, d), dtype=np.float32))
            for name, (layout, fn) in chains.items():
                times.setdefault((name, m), []).append(median_ms(lambda: fn(x, weights[layout]), args.repeats))
            outs = [np.asarray(fn(x, weights[layout])) for layout, fn in chains.values()]
            worst = max(worst, max(float(np.abs(o - outs[0]).max()) for o in outs))
    base = float(np.median(times[(next(iter(FORMS)), rows[0])]))
    print(f"{args.layers} layers, d = {d}, MLP {inter}: ms (ratio to the {rows[0]}-row "
          f"{next(iter(FORMS))} chain)")
    print(f"  {'form':22s}" + "".join(f"{f'M={m}':>18s}" for m in rows))
    results = {}
    for name in FORMS:
        cells = []
        for m in rows:
            ms = float(np.median(times[(name, m)]))
            results[f"{name} M={m}"] = round(ms, 3)
            cells.append(f"{ms:8.2f} ({ms / base:4.2f}x)")
        print(f"  {name:22s}" + "".join(f"{c:>18s}" for c in cells))
    print(f"largest difference between the forms' outputs: {worst:.2e}")
    res = dict(machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               backend=jax.default_backend(), layers=args.layers, hidden=d, ms=results,
               max_abs_diff=worst,
               load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    if args.json:
        atomic.write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
