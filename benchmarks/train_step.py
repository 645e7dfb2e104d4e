"""Tokens/s and MFU of the REAL train step for the SmolLM2 training configs.

    python -m benchmarks.train_step [--configs dspark,dflash,eagle3] [--modes online,cached]
        [--steps 3] [--eagle3_steps 1] [--batch 4] [--eagle3_batch 2] [--seq 256] [--micro N]
        [--set train.lr=1e-4 ...] [--variant NAME:FIELD=VALUE[,FIELD=VALUE] ...]
        [--draft_vocab_size K] [--json out.json]

For each config (``configs/<arch>/<arch>_smollm2_135m.py``) and feature mode the run is
built by the trainer's own ``setup`` on a synthetic token store (random token ids,
lengths uniform in [seq/2, seq], the second half of every sample supervised), so the
timed function is ``Run.step_fn`` exactly as ``python -m deepspec_jax.train`` runs it:
online target forward (``online``) or features read from a feature cache built with
``build_feature_cache`` (``cached``), gradient accumulation, clipping, AdamW, donation.
``--batch``/``--seq``/``--micro`` override ``train.global_batch_size``,
``data.max_length`` and ``train.micro_batch_size``; ``--set`` overrides any field.
``--variant`` adds, for every config and mode, a run with further overrides (e.g.
``--variant old:loss.vocab_grad=recompute,train.cpu_library_fusion=all``), timed in the
same rounds as the plain run, so "before / after" of a config choice is one run's
round-paired ratio. ``--draft_vocab_size K`` is the variant ``vocabK``
(``draft.draft_vocab_size=K``: a reduced draft vocabulary of the K most frequent tokens
of the synthetic store, whose vocabulary projections then cost K columns instead of V;
the ids are near-uniform here, which does not change the step's cost).

Per run: compile seconds (trace + lower + compile, excluded from the step time), one
untimed warm-up step, then the median of ``--steps`` steps each ended by
``jax.block_until_ready`` (batches are read and put on the device beforehand; the host
data time per batch is reported separately). All runs are set up and compiled first and
then timed round-robin (one step of each per round), so load drifting on a shared
machine hits every run alike and the ratios between runs stay meaningful. Eagle3 runs
``--eagle3_steps`` steps at ``--eagle3_batch`` (default 2 = its config's micro-batch: the
same per-token work, half the wall time). Reported: step seconds, supervised and real
(non-padding) tokens/s, FLOPs per step, achieved FLOP/s and MFU.

FLOPs: XLA's ``Compiled.cost_analysis()`` counts the body of every ``while`` loop once,
whatever its trip count (checked on jax 0.10.2 with a 4-step ``lax.scan`` of matmuls:
1x, not 4x), and the train step is full of loops (micro-batch accumulation, chunked
vocab losses, ``lax.map`` query blocks, the Markov scan). So the FLOPs used are the
matmul FLOPs of XLA's *optimized* HLO with each loop body multiplied by its
``known_trip_count`` (``hlo_matmul_flops``): what the compiled program executes,
including rematerialised forwards, excluding what XLA removed (e.g. the online target's
unused logits). XLA's raw number is reported next to it. Elementwise FLOPs are not
counted (the usual MFU convention).

Peak: the theoretical peak of a (virtualised) CPU is unknown, so the denominator of MFU
is MEASURED: the best FLOP/s of a square fp32 matmul (``--peak_n``, best of
``--peak_repeats``) on the same machine, measured before the runs and after every timing
round (load drifts), the best of all. MFU here is therefore "fraction of what this
machine's XLA matmul reaches", not of a datasheet number; on a loaded machine it can
even exceed 1 if a step ran in a quieter moment than every peak measurement. On a
shared CPU compare ratios within one run, not absolute times.

The target is loaded once and shared by all runs (``shared_targets``; the step only
reads it): ``--reload_target`` loads it in every ``setup`` as the trainer does.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gc
import importlib.util
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from deepspec_jax import atomic
from deepspec_jax.plan.flops import hlo_matmul_flops

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("dspark", "dflash", "eagle3")
MODES = ("online", "cached")


# ---------------------------------------------------------------------------
# machine and peak
# ---------------------------------------------------------------------------

def machine_info() -> dict:
    import jax

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "python": platform.python_version()}


def measure_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of an ``[n,n] @ [n,n]`` matmul under jit (after a warm-up call): the
    MFU denominator, since a shared/virtualised CPU's theoretical peak is unknown."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


# ---------------------------------------------------------------------------
# configs and synthetic data
# ---------------------------------------------------------------------------

def load_config(arch: str):
    """``configs/<arch>/<arch>_smollm2_135m.py:get_config()`` (configs/ is not a package)."""
    path = ROOT / "configs" / arch / f"{arch}_smollm2_135m.py"
    spec = importlib.util.spec_from_file_location(f"_bench_cfg_{arch}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _set_field(c, dotted: str, value) -> None:
    node = c
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value   # a locked ConfigDict refuses unknown fields (typos)


def apply_overrides(c, args, store: str, cache: str, out_dir: str, batch: int = 0,
                    extra: list[str] = ()) -> str:
    """Benchmark overrides (then ``--set``, then ``extra``: a variant's) on a locked run
    config; returns a note on the micro-batch."""
    gbs = batch or int(c.train.global_batch_size)
    mbs = args.micro or int(c.train.micro_batch_size) or gbs
    note = ""
    if gbs % mbs:
        note = f"micro {mbs} does not divide batch {gbs}: no accumulation"
        mbs = gbs
    _set_field(c, "train.global_batch_size", gbs)
    _set_field(c, "train.micro_batch_size", mbs)
    if args.seq:
        _set_field(c, "data.max_length", args.seq)
    _set_field(c, "data.bucket_boundaries", ())
    _set_field(c, "data.train", (store,))
    _set_field(c, "data.feature_cache", cache)
    _set_field(c, "output_dir", out_dir)
    _set_field(c, "train.num_epochs", 1)
    _set_field(c, "train.max_steps", 0)
    _set_field(c, "train.tensorboard", False)
    _set_field(c, "train.async_checkpoint", False)
    for item in [*args.set, *extra]:
        key, _, raw = item.partition("=")
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw
        _set_field(c, key.strip(), val)
    return note


def synthetic_samples(n: int, seq: int, vocab: int, seed: int = 0):
    """Random ids, lengths uniform in [seq/2, seq], the second half of each sample
    supervised (a prompt and its answer, as in chat data)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        length = int(rng.integers(max(seq // 2, 2), seq + 1))
        ids = rng.integers(0, vocab, length).astype(np.int32)
        mask = np.zeros(length, np.uint8)
        mask[length // 2:] = 1
        yield ids, mask


# ---------------------------------------------------------------------------
# one benchmark run
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    """One set-up, compiled run awaiting its timed steps: everything ``step_once`` needs,
    kept alive between rounds so runs can be timed round-robin."""
    arch: str
    mode: str
    variant: str                   # "" = the plain run, else the --variant name
    steps: int                     # timed steps (after the warm-up, host[0])
    run: object                    # the trainer's Run (its rest/tstate/checkpoints)
    compiled: object               # run.step_fn compiled for host[0]'s batch shapes
    state: object                  # the TrainState, threaded through the (donating) steps
    host: list                     # 1 + steps dicts: device batch + token counts
    row: dict                      # the result row; finish() adds the timing columns
    times: list = dataclasses.field(default_factory=list)   # seconds of each timed step
    last_metrics: dict | None = None                        # the last step's metrics

def prepare(arch: str, mode: str, args, store: str, lengths: np.ndarray, cache: str, work: str,
            steps: int, batch: int, variant: tuple[str, list[str]] = ("", [])) -> Prepared:
    """Set up ``arch`` through the trainer's ``setup``, read 1 + ``steps`` batches, compile
    the step (timed separately) and count its FLOPs. ``variant``: (name, FIELD=VALUE
    overrides applied after ``--set``)."""
    import jax

    from deepspec_jax.train.trainer import device_batch, setup

    c = load_config(arch)
    note = apply_overrides(c, args, store, cache if mode == "cached" else "",
                           os.path.join(work, f"run_{arch}_{mode}_{variant[0]}"), batch,
                           variant[1])
    t0 = time.perf_counter()
    run = setup(c, resume=False)
    setup_s = time.perf_counter() - t0
    if mode == "cached":
        run.target = None   # the cached step never reads it: free its weights while others run
    host, data_s = [], []
    for _ in range(1 + steps):
        t = time.perf_counter()
        b = next(run.data)
        g, idx = device_batch(run, b)
        g = jax.block_until_ready(g)
        data_s.append(time.perf_counter() - t)
        seq = b["input_ids"].shape[1]
        real = int(sum(min(int(lengths[i]), seq) for i in np.asarray(idx) if i >= 0))
        host.append(dict(batch=g, supervised=int((b["loss_mask"] > 0).sum()), real=real,
                         padded=int(b["input_ids"].size)))

    t = time.perf_counter()
    traced = run.step_fn.trace(run.state, run.rest, run.tstate, host[0]["batch"])
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t

    xla_flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca["flops"]) if ca and "flops" in ca else None
    except Exception:   # noqa: BLE001 - a backend without cost analysis
        xla_flops = None
    hlo = None
    try:
        hlo = hlo_matmul_flops(compiled.as_text())
    except Exception as e:   # noqa: BLE001 - the text format changed: say so, use XLA's number
        print(f"  warning: HLO FLOP count failed ({e}); using XLA cost analysis", flush=True)
    if hlo is not None and hlo.flops > 0:
        flops, source = hlo.flops, "hlo-matmul (loops x trip count)"
    elif xla_flops:
        flops, source = xla_flops, "xla cost_analysis (loop bodies once: lower bound)"
    else:
        flops, source = None, "unavailable"
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else sum(
        getattr(mem, f, 0) or 0
        for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(run.state.params)))
    row = dict(
        config=arch, mode=mode, variant=variant[0], overrides=list(variant[1]), note=note, num_micro=run.step_config.num_micro,
        global_batch=int(c.train.global_batch_size), micro_batch=int(c.train.micro_batch_size),
        seq=int(host[0]["batch"]["input_ids"].shape[1]), trainable_params=n_params,
        setup_s=setup_s, compile_s=compile_s, data_s_per_batch=statistics.median(data_s[1:]),
        supervised_tokens_per_step=statistics.mean(h["supervised"] for h in host[1:]),
        supervised_per_timed_step=[h["supervised"] for h in host[1:]],
        real_tokens_per_step=statistics.mean(h["real"] for h in host[1:]),
        padded_tokens_per_step=host[0]["padded"],
        flops_per_step=flops, flops_source=source, xla_cost_analysis_flops=xla_flops,
        hlo=dataclasses.asdict(hlo) if hlo else None,
        xla_buffers_gib=(xla_bytes or 0) / 2 ** 30)
    return Prepared(arch, mode, variant[0], steps, run, compiled, run.state, host, row)


def step_once(p: Prepared, i: int) -> float:
    """Run step ``i`` (0 = the warm-up) of ``p`` to completion; returns its seconds."""
    import jax

    t = time.perf_counter()
    p.state, m = p.compiled(p.state, p.run.rest, p.run.tstate, p.host[i]["batch"])
    jax.block_until_ready((p.state, m))
    dt = time.perf_counter() - t
    p.last_metrics = m
    return dt


def finish(p: Prepared) -> dict:
    """Fill the timing columns of ``p.row`` and release the run."""
    import jax

    r = p.row
    metrics = {k: float(v) for k, v in jax.device_get(p.last_metrics).items()}
    step_s = statistics.median(p.times)
    r.update(step_s=step_s, step_s_all=p.times, min_step_s=min(p.times),
             supervised_tok_s=r["supervised_tokens_per_step"] / step_s,
             real_tok_s=r["real_tokens_per_step"] / step_s,
             achieved_flop_s=r["flops_per_step"] / step_s if r["flops_per_step"] else None,
             mfu=None,   # set by main() from the best measured peak
             loss=metrics.get("total_loss"), ok=metrics.get("ok"))
    p.run.state = p.state
    p.run.checkpoints.close()
    p.run = p.compiled = p.state = p.host = None
    gc.collect()
    return r


@contextlib.contextmanager
def shared_targets(enabled: bool = True):
    """Load each target once per process instead of once per run.

    ``setup`` calls ``load_target`` for every run (~20 s for SmolLM2's GGUF on this CPU,
    6 runs by default). The step only reads the target's arrays (they are not donated),
    so runs can share one load; the timed step is unchanged, only ``setup_s`` shrinks.
    """
    import deepspec_jax.target as target_mod

    orig = target_mod.load_target
    memo: dict = {}

    def load(path=None, dtype="float32", mesh=None):
        key = (path, dtype, None if mesh is None else
               (tuple(mesh.axis_names), mesh.devices.shape, tuple(d.id for d in mesh.devices.flat)))
        if key not in memo:
            memo[key] = orig(path, dtype=dtype, mesh=mesh)
        return memo[key]

    if enabled:
        target_mod.load_target = load
    try:
        yield
    finally:
        target_mod.load_target = orig


def build_cache(args, store: str, work: str, c, seq: int) -> tuple[str, float]:
    """The feature cache of ``store`` for config ``c``'s target and layers (timed)."""
    from deepspec_jax.data.build_features import build_feature_cache
    from deepspec_jax.data.feature_cache import target_name
    from deepspec_jax.data.token_store import TokenStore
    from deepspec_jax.sharding import make_mesh
    from deepspec_jax.target import load_target

    layer_ids = tuple(c.draft.target_layer_ids)
    out = os.path.join(work, "cache_" + "_".join(str(i) for i in layer_ids))
    target = load_target(c.target.path, dtype=c.target.dtype,
                         mesh=make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))  # = setup's
    t = time.perf_counter()
    build_feature_cache(TokenStore(store), target, layer_ids, out, name=target_name(c.target.path),
                        batch_size=min(args.batch or 4, 8), dtype=args.cache_dtype,
                        smallest_bucket=seq, progress=False, log=lambda *_: None)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def print_table(rows: list[dict], peak: float) -> None:
    head = (f"{'config':7} {'mode':7} {'variant':8} {'micro':>5} {'compile s':>9} {'step s':>8} {'min s':>8} "
            f"{'sup tok/s':>9} "
            f"{'tok/s':>8} {'GFLOP/step':>10} {'XLA GFLOP':>9} {'GFLOP/s':>8} {'MFU':>6} {'data s':>7} "
            f"{'loss':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        f = r["flops_per_step"]
        print(f"{r['config']:7} {r['mode']:7} {r.get('variant') or '-':8} {r['num_micro']:>5} {r['compile_s']:9.1f} "
              f"{r['step_s']:8.2f} {r['min_step_s']:8.2f} {r['supervised_tok_s']:9.0f} {r['real_tok_s']:8.0f} "
              f"{_fmt(f and f / 1e9, '10.1f'):>10} "
              f"{_fmt(r['xla_cost_analysis_flops'] and r['xla_cost_analysis_flops'] / 1e9, '9.1f'):>9} "
              f"{_fmt(r['achieved_flop_s'] and r['achieved_flop_s'] / 1e9, '8.1f'):>8} "
              f"{_fmt(r['mfu'] and 100 * r['mfu'], '5.1f'):>5}% {r['data_s_per_batch']:7.3f} "
              f"{_fmt(r['loss'], '7.3f'):>7}")
    print(f"peak (measured fp32 matmul): {peak / 1e9:.1f} GFLOP/s; FLOPs = "
          f"{rows[0]['flops_source'] if rows else '-'}; ratios pair the steps of the same round:")
    for line in ratios(rows).values():
        print(line["text"])


def _paired(a: dict, b: dict, per_token: bool) -> float:
    """Median over the rounds both runs ran in of a's time / b's time (per supervised
    token if ``per_token``): pairs share the machine's load of that round."""
    k = min(len(a["step_s_all"]), len(b["step_s_all"]))
    norm = (lambda r, i: r["supervised_per_timed_step"][i]) if per_token else (lambda r, i: 1.0)
    return statistics.median(
        (a["step_s_all"][i] / norm(a, i)) / (b["step_s_all"][i] / norm(b, i)) for i in range(k))


def ratios(rows: list[dict]) -> dict:
    """online/cached per draft and eagle3/dspark per mode (plain runs), and each variant's
    time / the plain run's per config and mode, from round-paired times."""
    by = {(r["config"], r["mode"]): r for r in rows if not r.get("variant")}
    out = {}
    for r in rows:
        base = by.get((r["config"], r["mode"]))
        if r.get("variant") and base is not None:
            t = _paired(r, base, False)
            f = (r["flops_per_step"] or 0) / max(base["flops_per_step"] or 1, 1)
            out[f"{r['config']}_{r['mode']}_{r['variant']}_over_plain"] = dict(
                time=t, flops=f, text=f"{r['config']} {r['mode']}: variant {r['variant']} step / "
                                      f"plain step = {t:.2f}x (FLOPs {f:.2f}x)")
    for a in ARCHS:
        if (a, "online") in by and (a, "cached") in by:
            o, k = by[(a, "online")], by[(a, "cached")]
            t = _paired(o, k, False)
            f = (o["flops_per_step"] or 0) / max(k["flops_per_step"] or 1, 1)
            out[f"{a}_online_over_cached"] = dict(
                time=t, flops=f, text=f"{a}: online step / cached step = {t:.2f}x (FLOPs {f:.2f}x)")
    for mode in MODES:
        if ("dspark", mode) in by and ("eagle3", mode) in by:
            d, e = by[("dspark", mode)], by[("eagle3", mode)]
            fpt = lambda r: (r["flops_per_step"] or 0) / max(r["supervised_tokens_per_step"], 1)
            t = _paired(e, d, True)
            f = fpt(e) / max(fpt(d), 1)
            out[f"eagle3_over_dspark_{mode}"] = dict(
                time=t, flops=f, text=f"{mode}: eagle3 / dspark time per supervised token = "
                                      f"{t:.2f}x (FLOPs per supervised token {f:.2f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="dspark,dflash,eagle3")
    ap.add_argument("--modes", default="online,cached")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--eagle3_steps", type=int, default=1,
                    help="timed steps for eagle3 (4-7x DSpark per step on CPU); 0 = --steps")
    ap.add_argument("--batch", type=int, default=4, help="train.global_batch_size (0 = config's)")
    ap.add_argument("--eagle3_batch", type=int, default=2,
                    help="train.global_batch_size for eagle3 (its config's micro-batch: one "
                         "micro-batch per step, same cost per token); 0 = --batch")
    ap.add_argument("--seq", type=int, default=256, help="data.max_length (0 = config's)")
    ap.add_argument("--micro", type=int, default=0, help="train.micro_batch_size (0 = config's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other config override, e.g. --set train.compute_dtype=bfloat16")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,...]",
                    help="also time every config/mode with these overrides (after --set), in "
                         "the same rounds; ratios report variant / plain")
    ap.add_argument("--draft_vocab_size", type=int, default=0, metavar="K",
                    help="also time a reduced draft vocabulary of K tokens (the variant "
                         "vocabK: draft.draft_vocab_size=K)")
    ap.add_argument("--cache_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peak_n", type=int, default=2048)
    ap.add_argument("--peak_repeats", type=int, default=5)
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--reload_target", action="store_true",
                    help="load the target in every run's setup, as the trainer does (default: "
                         "load it once and share it; the step is the same, setup is faster)")
    ap.add_argument("--workdir", default="", help="keep the synthetic data here (default: a temp dir)")
    args = ap.parse_args(argv)
    archs = [a for a in args.configs.split(",") if a]
    modes = [m for m in args.modes.split(",") if m]
    bad = [a for a in archs if a not in ARCHS] + [m for m in modes if m not in MODES]
    if bad or args.steps < 1 or args.eagle3_steps < 0:
        ap.error(f"unknown --configs/--modes {bad} (choose from {ARCHS} / {MODES}); --steps >= 1.")

    from deepspec_jax.data.token_store import TokenStore, write_token_store
    from deepspec_jax.errors import ConfigError

    variants = [("", [])]
    for v in args.variant:
        name, sep, body = v.partition(":")
        if not sep or not name or not body or name in {n for n, _ in variants}:
            ap.error(f"--variant {v!r}: want a new NAME:FIELD=VALUE[,FIELD=VALUE...]")
        variants.append((name, [x for x in body.split(",") if x]))
    if args.draft_vocab_size:
        if args.draft_vocab_size < 0 or f"vocab{args.draft_vocab_size}" in {n for n, _ in variants}:
            ap.error(f"--draft_vocab_size {args.draft_vocab_size}: want K > 0 (once).")
        variants.append((f"vocab{args.draft_vocab_size}",
                         [f"draft.draft_vocab_size={args.draft_vocab_size}"]))
    batch_of = {a: (args.eagle3_batch or args.batch) if a == "eagle3" else args.batch for a in archs}
    steps_of = {a: (args.eagle3_steps or args.steps) if a == "eagle3" else args.steps for a in archs}
    cfgs = {a: load_config(a) for a in archs}
    try:
        for a, c in cfgs.items():   # validate the overrides before any expensive work
            apply_overrides(c, args, "", "", "", batch_of[a])
            for _, extra in variants[1:]:
                apply_overrides(load_config(a), args, "", "", "", batch_of[a], extra)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        ap.error(f"bad override: {e}")

    info = machine_info()
    print(f"{info['cpu_model']}, {info['cpu_count']} cores, backend {info['backend']}, "
          f"load {info['load_avg'][0]:.1f}", flush=True)
    peaks = [measure_peak(args.peak_n, args.peak_repeats)]
    print(f"peak: {peaks[0] / 1e9:.1f} GFLOP/s ({args.peak_n}^3 fp32 matmul)", flush=True)
    seq = args.seq or max(int(c.data.max_length) for c in cfgs.values())
    n = max(int(c.train.global_batch_size) * (1 + steps_of[a]) for a, c in cfgs.items())

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp, \
            shared_targets(not args.reload_target):
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        store = os.path.join(work, f"tokens_{seq}_{n}")
        if not os.path.exists(store):
            vocab = 49152   # SmolLM2; checked against the target by build_feature_cache
            write_token_store(store, synthetic_samples(n, seq, vocab), max_length=seq,
                              target="smollm2-135m", chat_template="synthetic")
        lengths = np.asarray(TokenStore(store).lengths)
        caches: dict = {}
        preps: list[Prepared] = []
        # 1) set up and compile every run; all stay in memory so that 2) can interleave
        for a in archs:
            c = cfgs[a]
            for mode, variant in ((m, v) for m in modes for v in variants):
                cache = ""
                if mode == "cached":
                    key = (tuple(c.draft.target_layer_ids), c.target.path, c.target.dtype)
                    if key not in caches:
                        caches[key] = build_cache(args, store, work, c, seq)
                        print(f"feature cache built in {caches[key][1]:.1f} s", flush=True)
                    cache = caches[key][0]
                try:
                    p = prepare(a, mode, args, store, lengths, cache, work, steps_of[a], batch_of[a],
                                variant)
                except ConfigError as e:
                    sys.exit(f"train_step: {a} {mode} {variant[0]}: {e}")
                h = p.row["hlo"] or {}
                print(f"== {a} {mode}{' ' + variant[0] if variant[0] else ''}: setup {p.row['setup_s']:.1f} s, compile "
                      f"{p.row['compile_s']:.1f} s, {(p.row['flops_per_step'] or 0) / 1e9:.1f} GFLOP/step",
                      flush=True)
                if h.get("unhandled") or h.get("unknown_trip_loops"):
                    print(f"   warning: FLOPs may be undercounted: {h}", flush=True)
                preps.append(p)
        # 2) round-robin timing: round 0 warms every run up; in round i every run with
        #    >= i timed steps runs one. Load on a shared machine drifts over minutes, so
        #    interleaving keeps the ratios between runs fair; the peak is re-measured
        #    every round for the same reason.
        for i in range(1 + max(steps_of.values())):
            for p in preps:
                if i <= p.steps:
                    dt = step_once(p, i)
                    if i:
                        p.times.append(dt)
            peaks.append(measure_peak(args.peak_n, args.peak_repeats))
            print(f"round {i}{' (warm-up)' if i == 0 else ''}: load {os.getloadavg()[0]:.1f}, "
                  f"peak {peaks[-1] / 1e9:.1f} GFLOP/s, steps "
                  + ", ".join(f"{p.arch}/{p.mode}{'/' + p.variant if p.variant else ''} "
                              f"{p.times[-1]:.2f} s" for p in preps
                              if i and i <= p.steps), flush=True)
        rows = [finish(p) for p in preps]
        del preps
        peak = max(peaks)
        for r in rows:
            if r["achieved_flop_s"]:
                r["mfu"] = r["achieved_flop_s"] / peak
        print()
        print_table(rows, peak)

    out = dict(machine=info, date=time.strftime("%Y-%m-%d"),
               command="python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv),
               args=vars(args), peak_flop_s=peak, peak_measurements=peaks,
               peak_note="measured: best fp32 [n,n]@[n,n] matmul under jit; theoretical CPU peak unknown",
               load_avg_end=os.getloadavg(), ratios=ratios(rows),
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, rows=rows)
    if args.json:
        atomic.write_json(args.json, out, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
