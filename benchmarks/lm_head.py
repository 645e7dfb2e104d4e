"""Output projection (lm_head) of a few rows: which operand layout XLA runs fast.

A decode step projects 1 hidden state onto the vocabulary, a verify pass 5-8, a DSpark
proposal its block. The weight can be stored [d, V] (input-major, ``x @ W``) or [V, d]
(a tied embedding), and the product written with the rows first (``[M, V]``) or the
vocabulary first (``[V, M]``, then a small transpose). On XLA:CPU these run through
different matmul paths whose cost for 4-8 rows differs by up to 3x at the same FLOPs;
on an accelerator they should all cost about one weight read. This times each form at
``--rows`` and ``--vocab`` sizes (jitted, median of ``--repeats``, the forms alternated
``--rounds`` times) and prints each as a ratio to the one-row ``[d, V]`` product of the
same vocabulary, so a run on a busy machine still compares the forms.

    python benchmarks/lm_head.py
    python benchmarks/lm_head.py --vocab=8192,49152,151936 --rows=1,4,5,8 --json=out.json

What the models use: the target keeps ``btd,vd->btv`` (tied) / ``btd,dv->btv``, and the
drafts' heads ``btd,dv->btv``. ``layers.linear`` (the decoder layers' product: weight-
first for up to 32 float32 rows, behind an optimization barrier that keeps XLA from
folding the transpose back into the product) is faster here at 4-8 rows but slower at one
row, the plain decode step; inside the target's ``extend`` neither vocabulary-first form
gave a gain beyond this machine's noise (docs/BENCHMARKS.md, "Output projection of a few
rows" and "Weight-first products for a few rows").
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
flags.DEFINE_list("vocab", ["8192", "49152"], "Vocabulary sizes V.", flag_values=FLAGS)
flags.DEFINE_list("rows", ["1", "4", "5", "8"], "Rows M (tokens per call).", flag_values=FLAGS)
flags.DEFINE_integer("hidden", 576, "Hidden size d (SmolLM2-135M: 576).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 15, "Timed calls per form (median reported).", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 2, "Times the forms are alternated (median over rounds).",
                     flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)

# name -> (weight layout, jitted product [1, M, d] x weight -> [1, M, V])
FORMS = {
    "[d,V] btd,dv->btv": ("dV", jax.jit(lambda h, w: jnp.einsum("btd,dv->btv", h, w))),
    "[V,d] btd,vd->btv": ("Vd", jax.jit(lambda h, w: jnp.einsum("btd,vd->btv", h, w))),
    "[V,d] vd,btd->vbt (T)": ("Vd", jax.jit(
        lambda h, w: jnp.einsum("vd,btd->vbt", w, h).transpose(1, 2, 0))),
    "[V,d] layers.linear": ("Vd", jax.jit(lambda h, w: linear(h, w))),
}


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    rng = np.random.default_rng(0)
    rows = [int(m) for m in args.rows]
    results, worst = {}, 0.0
    for v in (int(x) for x in args.vocab):
        w_dv = rng.standard_normal((args.hidden, v), dtype=np.float32)
        weights = {"dV": jnp.asarray(w_dv), "Vd": jnp.asarray(np.ascontiguousarray(w_dv.T))}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for m in rows:
                h = jnp.asarray(rng.standard_normal((1, m, args.hidden), dtype=np.float32))
                for name, (layout, fn) in FORMS.items():
                    times.setdefault((name, m), []).append(
                        median_ms(lambda: fn(h, weights[layout]), args.repeats))
                # the forms are one product: a form that computed something else is no rival
                outs = [np.asarray(fn(h, weights[layout])) for layout, fn in FORMS.values()]
                worst = max(worst, max(float(np.abs(o - outs[0]).max()) for o in outs))
        base = float(np.median(times[(next(iter(FORMS)), rows[0])]))
        print(f"V = {v}, d = {args.hidden}: ms (ratio to the {rows[0]}-row [d,V] product)")
        print(f"  {'form':24s}" + "".join(f"{f'M={m}':>18s}" for m in rows))
        results[v] = {}
        for name in FORMS:
            cells = []
            for m in rows:
                ms = float(np.median(times[(name, m)]))
                results[v][f"{name} M={m}"] = round(ms, 3)
                cells.append(f"{ms:8.2f} ({ms / base:4.2f}x)")
            print(f"  {name:24s}" + "".join(f"{c:>18s}" for c in cells))
    res = dict(machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               backend=jax.default_backend(), hidden=args.hidden, ms=results,
               max_abs_diff=worst,
               load=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    print(f"largest difference between the forms' outputs: {worst:.2e}")
    if args.json:
        atomic.write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
