"""Before / after of the real train step across two checkouts of this repository, in one run.

    python benchmarks/train_step_ab.py --before=687a0b2 [--after=.] [--configs=dspark,dflash,eagle3]
        [--rounds=5] [--eagle3_rounds=3] [--set=FIELD=VALUE ...] [--json=out.json]

A side is a directory holding a checkout, or a git revision of this repository (checked
out into a temporary ``git worktree``, removed at the end). For each config
(``configs/<arch>/<arch>_smollm2_135m.py``, cached features) each side runs in its own
process with ``PYTHONPATH`` = its checkout, so the step is built by that side's code: its
trainer (``step_for``) with random weights and one random batch drawn from the same seed
on both sides (same shapes, same values: the first losses agree unless the loss itself
changed). After both processes have compiled and run a warm-up step, the driver asks for
single steps alternately, the order swapping every round, so load drifting on a shared
machine hits both sides alike; the ratio is the median over rounds of before / after.
``--set`` overrides config fields on both sides (``train.global_batch_size=2``); a field a
side does not know is that side's error.

Reported per config and side: compile seconds, the HLO matmul GFLOP/step (loops x trip
counts, ``deepspec_jax.plan.flops``), the first step's loss, every round's step seconds
and the median, tokens/s (padded tokens of the batch), and the paired ratio.

Works for checkouts that have ``deepspec_jax.plan.programs`` (the TPU planner, late Nov
2026) and the trainer's ``step_for``; use ``benchmarks/train_step.py --variant`` to compare
config choices inside one checkout.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("dspark", "dflash", "eagle3")


# ---------------------------------------------------------------------------
# worker: one side, one config (runs with PYTHONPATH = that side's checkout)
# ---------------------------------------------------------------------------

def worker(arch: str, sets: list[str]) -> None:
    """Build the side's cached-mode step, print READY, then run one step per stdin line."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepspec_jax.draft_vocab import D2T, T2D, select_draft_vocab
    from deepspec_jax.plan.__main__ import resolve_target_arch
    from deepspec_jax.plan.flops import hlo_matmul_flops
    from deepspec_jax.plan.programs import (PlanContext, _SCHEDULE_STEPS, _with_mask_token,
                                            batch_struct, with_fields)
    from deepspec_jax.plan.targets import abstract_target
    from deepspec_jax.sharding import make_mesh
    from deepspec_jax.train.trainer import (DataSetup, batch_split, setup_draft, setup_target,
                                            step_for)

    path = pathlib.Path("configs") / arch / f"{arch}_smollm2_135m.py"
    spec = importlib.util.spec_from_file_location("bench_ab_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c0 = mod.get_config()
    fields = {"data__feature_cache": "<abstract>"}
    for item in sets:
        key, _, raw = item.partition("=")
        try:
            fields[key.strip().replace(".", "__")] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            fields[key.strip().replace(".", "__")] = raw
    mesh = make_mesh(c0.mesh.data, c0.mesh.fsdp, c0.mesh.tensor, devices=jax.devices()[:1])
    tarch = resolve_target_arch(c0.target.path, "")
    ctx = PlanContext(c0, tarch, mesh, 1, ("cached",))
    c = _with_mask_token(ctx, with_fields(c0, **fields))
    ts = setup_target(c, mesh, target=abstract_target(tarch, c.target.dtype, mesh))
    local, num_micro = batch_split(c, 1)
    ds = DataSetup(None, None, None, False, local, num_micro, 0, _SCHEDULE_STEPS)
    dr = setup_draft(c, ts, _SCHEDULE_STEPS, mesh, shapes_only=True)
    bs = batch_struct(c, ts, False, "bfloat16")
    _, tstate, _, step_fn = step_for(c, mesh, ts, ds, dr, {k: v.ndim for k, v in bs.items()})

    rng = np.random.default_rng(0)

    def concrete(x, scale):
        if jnp.issubdtype(x.dtype, jnp.integer):
            a = np.zeros(x.shape, x.dtype)
        else:
            a = (rng.standard_normal(x.shape) * scale).astype(x.dtype)
        return jax.device_put(a, getattr(x, "sharding", None))

    state = jax.tree.map(lambda x: concrete(x, 0.02), dr.state)
    rest = jax.tree.map(lambda x: concrete(x, 0.05), dr.rest)
    if D2T in rest:   # a reduced draft vocabulary: a valid map (the K lowest ids), not zeros
        d2t, t2d = select_draft_vocab({i: 1 for i in range(rest[D2T].shape[0])},
                                      rest[D2T].shape[0], rest[T2D].shape[0])
        for k, v in ((D2T, d2t), (T2D, t2d)):
            rest[k] = jax.device_put(v.astype(rest[k].dtype), rest[k].sharding)
    B, S = bs["input_ids"].shape
    batch = {"input_ids": jnp.asarray(rng.integers(0, tarch.config.vocab_size, (B, S)), jnp.int32),
             "loss_mask": jnp.asarray(np.arange(S)[None] >= S // 4, jnp.int32).repeat(B, 0),
             "attention_mask": jnp.ones((B, S), jnp.int32)}
    for k in ("features", "target_last_hidden"):
        batch[k] = jnp.asarray(rng.standard_normal(bs[k].shape), bs[k].dtype)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, rest, tstate, batch).compile()
    compile_s = time.perf_counter() - t0
    gflop = hlo_matmul_flops(compiled.as_text()).flops / 1e9
    state, m = compiled(state, rest, tstate, batch)   # warm-up
    loss = float(m["total_loss"])
    print("READY " + json.dumps(dict(compile_s=compile_s, gflop=gflop, loss=loss, tokens=B * S)),
          flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        state, m = compiled(state, rest, tstate, batch)
        jax.block_until_ready((state, m))
        print(f"STEP {time.perf_counter() - t0}", flush=True)


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def _git(*args) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def checkout(side: str):
    """(directory, label) for ``side``: itself when it is a directory, else a temporary
    detached worktree of that revision (removed on exit)."""
    if os.path.isdir(side):
        yield os.path.abspath(side), side
        return
    try:
        rev = _git("rev-parse", "--verify", f"{side}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"train_step_ab: {side!r} is neither a directory nor a git revision of {REPO}")
    path = os.path.join(tempfile.mkdtemp(prefix="bench_ab_"), "tree")
    _git("worktree", "add", "--detach", path, rev)
    try:
        yield path, rev[:12]
    finally:
        _git("worktree", "remove", "--force", path)
        os.rmdir(os.path.dirname(path))


class Side:
    """One worker process; ``step()`` runs one step there and returns its seconds."""

    def __init__(self, tree: str, arch: str, sets: list[str]):
        env = dict(os.environ, PYTHONPATH=tree)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", arch,
             *(f"--set={s}" for s in sets)], cwd=tree, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.info = json.loads(line[6:])
                break
        if self.info is None:
            self.proc.wait()
            sys.exit(f"train_step_ab: the {arch} worker in {tree} exited with {self.proc.returncode} "
                     "before its first step (its stderr is above)")
        self.times: list[float] = []

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("STEP "):
            sys.exit(f"train_step_ab: a worker failed mid-run ({line.strip()!r})")
        self.times.append(float(line.split()[1]))
        return self.times[-1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(arch: str, trees: dict, rounds: int, sets: list[str]) -> dict:
    sides = {}
    try:
        for name, (tree, _) in trees.items():   # one at a time: compiles do not overlap
            sides[name] = Side(tree, arch, sets)
            i = sides[name].info
            print(f"== {arch} {name}: compile {i['compile_s']:.1f} s, {i['gflop']:.1f} GFLOP/step, "
                  f"first loss {i['loss']:.4f}", flush=True)
        order = list(sides)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                sides[name].step()
            print(f"round {r + 1}: load {os.getloadavg()[0]:.1f}, "
                  + ", ".join(f"{n} {s.times[-1]:.2f} s" for n, s in sides.items()), flush=True)
    finally:
        for s in sides.values():
            s.close()
    b, a = sides["before"], sides["after"]
    row = dict(config=arch, rounds=rounds,
               paired_ratio=statistics.median(x / y for x, y in zip(b.times, a.times)))
    for name, s in sides.items():
        med = statistics.median(s.times)
        row[name] = dict(s.info, step_s=med, step_s_all=s.times, tokens_per_s=s.info["tokens"] / med,
                         rev=trees[name][1])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/train_step_ab.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="a checkout directory or a git revision (required)")
    ap.add_argument("--after", default=str(REPO), help="default: this checkout")
    ap.add_argument("--configs", default="dspark,dflash,eagle3")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eagle3_rounds", type=int, default=3, help="0 = --rounds")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.set)
        return 0
    archs = [a for a in args.configs.split(",") if a]
    if not args.before or not archs or set(archs) - set(ARCHS) or args.rounds < 1:
        ap.error(f"need --before, --configs from {ARCHS}, --rounds >= 1")
    rows = []
    with contextlib.ExitStack() as stack:
        trees = {name: stack.enter_context(checkout(side))
                 for name, side in (("before", args.before), ("after", args.after))}
        print(f"before = {trees['before'][0]} ({trees['before'][1]}), "
              f"after = {trees['after'][0]} ({trees['after'][1]})", flush=True)
        for arch in archs:
            n = args.eagle3_rounds if arch == "eagle3" and args.eagle3_rounds else args.rounds
            rows.append(compare(arch, trees, n, args.set))
    print()
    print(f"{'config':7} {'before s':>9} {'after s':>8} {'before/after':>12} {'tok/s before':>12} "
          f"{'tok/s after':>11} {'GFLOP before':>12} {'GFLOP after':>11}")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"{r['config']:7} {b['step_s']:9.3f} {a['step_s']:8.3f} {r['paired_ratio']:11.2f}x "
              f"{b['tokens_per_s']:12.0f} {a['tokens_per_s']:11.0f} {b['gflop']:12.1f} {a['gflop']:11.1f}")
    out = dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), cpu_count=os.cpu_count(),
               command="python benchmarks/train_step_ab.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               load_avg_end=os.getloadavg(), rows=rows)
    if args.json:
        from deepspec_jax.evaluation.report import write_json
        print(f"wrote {write_json(args.json, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
