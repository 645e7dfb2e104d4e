"""``python -m deepspec_jax.plan --config=configs/dspark/dspark_qwen3_4b.py --topology=v5e-8``

Compiles a training run's programs for a TPU slice before you rent it: no TPU, no
weights, no data (everything is abstract shapes; libtpu compiles for the slice's
chips: ``pip install 'jax[tpu]==0.10.2'``, scripts/setup.sh does it). For each
program (the train step in ``cached`` and ``online`` feature mode; with
``--programs=train,decode`` also the eval's decode programs -- prefill, chain and tree
verify loops, autoregressive baseline -- on ``--decode_mesh``, by default the target
tensor-sharded over every device) it prints per-device
HBM (arguments, temporaries, peak = arguments + outputs + temporaries - donated, vs
the chip's capacity), whether it fits, matmul GFLOP per step per device (loops counted
with their trip counts), the largest ``train.micro_batch_size`` that fits and the
compile seconds. Every ``--config.<field>=...`` override of the trainer works here.

Topologies: ``v5e-N``, ``v6e-N`` (N chips), ``v5p-N``, ``v4-N`` (N TensorCores), as
GCP names slices. ``cpu-N --hbm_gb=80``: compile for N host CPU devices and compare
XLA:CPU's memory plan with the budget: an estimate for an N-GPU machine only (a GPU
compile needs a GPU).

Exit codes: 0 every program fits; 1 a program does not fit (the message names it and
the knobs to turn); 2 bad flags or config.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from deepspec_jax import atomic, cli
from deepspec_jax.errors import ConfigError
from deepspec_jax.plan.decode import DECODE_PROGRAMS, DecodeSettings
from deepspec_jax.plan.programs import PROGRAMS, TRAIN_MODES, PlanContext, train_step_thunk
from deepspec_jax.plan.report import Measurement, gb, largest_fitting, measure, predicted_start
from deepspec_jax.plan.targets import resolve_target_arch
from deepspec_jax.plan.topology import (GIB, compile_only_devices, cpu_device_count, cpu_devices,
                                        parse_slice)
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train.trainer import batch_split

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


def _flags(argv: Sequence[str]) -> tuple[flags.FlagValues, flags.FlagHolder]:
    """A fresh flag set per call: ml_collections reads the ``--config.x`` overrides from
    the argv given at definition."""
    fv = flags.FlagValues()
    cfg = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<arch>/<name>.py), "
                                          "as for python -m deepspec_jax.train.", flag_values=fv,
                                          lock_config=True, sys_argv=["plan", *argv])
    flags.DEFINE_string("topology", None, "Slice to compile for: v5e-8, v6e-4, v5p-16, v4-8, ... "
                        "or cpu-N (with --hbm_gb).", flag_values=fv)
    flags.DEFINE_list("mode", list(TRAIN_MODES), "Train-step feature modes: cached (features "
                      "from a feature cache), online (target inside the step).", flag_values=fv)
    flags.DEFINE_list("programs", ["train"], f"Program families to compile ({sorted(PROGRAMS)}).",
                      flag_values=fv)
    flags.DEFINE_float("hbm_gb", None, "Memory per device in GiB: required with cpu-N; for a TPU "
                       "slice it overrides the chip's.", flag_values=fv)
    flags.DEFINE_string("target_config", "", "The target's HF config.json (default: "
                        "<target.path>/config.json, else the architecture shipped in "
                        "deepspec_jax/assets/target_configs/).", flag_values=fv)
    flags.DEFINE_boolean("search", True, "Search the largest train.micro_batch_size that fits "
                         "(doubling, then bisection: a few more compiles per mode).", flag_values=fv)
    flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"], "dtype of the cached "
                      "features (python -m deepspec_jax.data.build_features --dtype).", flag_values=fv)
    flags.DEFINE_string("json", "", "Also write the rows here.", flag_values=fv)
    d = DecodeSettings()
    flags.DEFINE_list("decode_mesh", ["1", "1", "-1"], "--programs=decode: data,fsdp,tensor mesh "
                      "of the eval (default: the target tensor-sharded over every device).",
                      flag_values=fv)
    flags.DEFINE_list("decode_programs", ["prefill", "chain", "tree"], "--programs=decode: which "
                      f"of {list(DECODE_PROGRAMS)}.", flag_values=fv)
    flags.DEFINE_integer("decode_batch", d.batch_size, "--programs=decode: prompts per call.",
                         flag_values=fv)
    flags.DEFINE_integer("decode_prompt_len", d.prompt_len, "--programs=decode: padded prompt "
                         "width.", flag_values=fv)
    flags.DEFINE_integer("decode_max_new", d.max_new_tokens, "--programs=decode: new tokens.",
                         flag_values=fv)
    flags.DEFINE_string("decode_tree", ",".join(map(str, d.tree)), "--programs=decode: the tree "
                        "program's topk,num_nodes.", flag_values=fv)
    return fv, cfg


@dataclasses.dataclass
class Row:
    program: str
    mode: str
    topology: str
    devices: int
    processes: int
    mesh: dict
    measurement: Measurement
    micro_batch_size: int | None = None    # train: per host, as configured
    num_micro: int | None = None
    seqs_per_device: float | None = None   # train: sequences per device per micro-batch
    largest_micro_batch: int | None = None  # train: per host (None: none fits / not searched)
    searched: bool = False
    estimate: bool = False                 # cpu-N: XLA:CPU's plan, not a GPU's

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("measurement"))
        return d


def _platform(topology: str, hbm_gb: float | None):
    """(devices, capacity bytes per device, estimate?) for ``--topology``."""
    n = cpu_device_count(topology)
    if n is not None:
        if hbm_gb is None:
            cli.usage_error(f"--topology={topology} needs --hbm_gb=<memory per device in GiB> "
                            "(e.g. 80 for an 8x80GB GPU machine).")
        jax.config.update("jax_num_cpu_devices", n)   # before the CPU backend starts
        return cpu_devices(topology), int(hbm_gb * GIB), True
    sl = parse_slice(topology)
    devs = compile_only_devices(topology)
    return devs, int(hbm_gb * GIB) if hbm_gb else sl.generation.hbm_bytes, False


def micro_candidates(local: int, processes: int, batch_shards: int, configured: int) -> list[int]:
    """Per-host micro-batch sizes to search: divisors of the host's rows per step whose
    global micro-batch splits evenly over the batch shards (plus the configured one)."""
    divs = [m for m in range(1, local + 1) if local % m == 0]
    even = [m for m in divs if (m * processes) % batch_shards == 0] or divs
    return sorted(set(even) | {configured})


def _knobs(row: Row, c, topology: str) -> str:
    m = row.measurement
    if row.program != "train":
        return "mesh.tensor (shard the target), or a larger topology"
    args_heavy = m.argument_bytes is not None and m.argument_bytes > 0.5 * (m.capacity_bytes or 1)
    knobs = []
    if row.largest_micro_batch is not None:
        knobs.append(f"train.micro_batch_size (largest that fits: {row.largest_micro_batch}: "
                     f"--config.train.micro_batch_size={row.largest_micro_batch})")
    elif row.searched:
        knobs.append("train.micro_batch_size does not help: not even 1 sequence per host fits")
    else:
        knobs.append("train.micro_batch_size (lower it; --search finds the largest that fits)")
    knobs.append("mesh.fsdp / mesh.tensor (shard parameters, optimizer state"
                 + (" and the target" if row.mode == "online" else "") + ")")
    if row.mode == "cached" or args_heavy:
        knobs.append("train.global_batch_size / data.max_length (the step's global batch"
                     + (", with its cached features," if row.mode == "cached" else "")
                     + " is a step input)")
    else:
        knobs.append("data.max_length")
    if c.draft.kind in ("dspark", "dflash"):
        knobs.append("draft.num_anchors")
    knobs.append(f"a larger topology than {topology}")
    return "; ".join(knobs)


def _print_table(rows: list[Row], out=None) -> None:
    out = out or sys.stdout
    head = (f"{'program':8} {'mode':13} {'micro':>5} {'seq/dev':>7} {'args GiB':>8} {'temp GiB':>8} "
            f"{'peak GiB':>8} {'cap GiB':>7} {'fits':>4} {'GFLOP/dev':>9} {'largest':>7} "
            f"{'compile s':>9}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        m = r.measurement
        g = lambda x: "-" if x is None else f"{x / GIB:.2f}"
        largest = ("-" if not r.searched else
                   "none" if r.largest_micro_batch is None else str(r.largest_micro_batch))
        print(f"{r.program:8} {r.mode:13} {'-' if r.micro_batch_size is None else r.micro_batch_size:>5} "
              f"{'-' if r.seqs_per_device is None else f'{r.seqs_per_device:g}':>7} "
              f"{g(m.argument_bytes):>8} {g(m.temp_bytes):>8} "
              f"{('>=' if m.error and m.peak_bytes else '') + g(m.peak_bytes):>8} "
              f"{g(m.capacity_bytes):>7} {'yes' if m.fits else 'NO':>4} "
              f"{'-' if m.flops is None else f'{m.flops / 1e9:.1f}':>9} {largest:>7} "
              f"{m.compile_s:9.1f}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fv, cfg_flag = _flags(argv)
    try:
        a = cli.parse(fv, argv, __doc__)
        c = cfg_flag.value
    except (ValueError, KeyError, AttributeError, TypeError) as e:   # a bad --config.x override
        cli.usage_error(f"--config override: {e.args[0] if e.args else e}")
    if c is None:
        cli.usage_error("pass --config=configs/<arch>/<name>.py (a training run config).")
    if not a.topology:
        cli.usage_error("pass --topology=<slice>, e.g. v5e-8, v5p-16, v6e-4, v4-8, or cpu-8 --hbm_gb=80.")
    bad_modes = [m for m in a.mode if m not in TRAIN_MODES]
    bad_progs = [p for p in a.programs if p not in PROGRAMS]
    if bad_modes or not a.mode:
        cli.usage_error(f"--mode={','.join(a.mode)}: use one or both of {list(TRAIN_MODES)}.")
    if bad_progs or not a.programs:
        cli.usage_error(f"--programs={','.join(a.programs)}: this build compiles {sorted(PROGRAMS)}.")
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")   # compile-only: never claim a local TPU/GPU
    try:
        devices, capacity, estimate = _platform(a.topology, a.hbm_gb)
    except ValueError as e:
        cli.usage_error(str(e))
    try:
        mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    except ValueError as e:
        cli.usage_error(f"config fields mesh.data/fsdp/tensor on {a.topology} ({len(devices)} "
                        f"devices): {e}")
    processes = len({getattr(d, "process_index", 0) for d in devices})
    try:
        arch = resolve_target_arch(c.target.path, a.target_config)
        local, num_micro = batch_split(c, processes)
    except ConfigError as e:
        cli.usage_error(str(e))
    try:
        sizes = [int(x) for x in a.decode_mesh]
        if len(sizes) != 3:
            raise ValueError("give three sizes")
        decode_mesh = make_mesh(*sizes, devices=devices)
        tree = tuple(int(x) for x in a.decode_tree.split(","))
        decode = DecodeSettings(batch_size=a.decode_batch, prompt_len=a.decode_prompt_len,
                                max_new_tokens=a.decode_max_new, tree=tree,
                                programs=tuple(a.decode_programs)).validate()
    except (ValueError, ConfigError) as e:
        cli.usage_error(f"--decode_mesh={','.join(a.decode_mesh)} / --decode_*: {e}")
    ctx = PlanContext(c, arch, mesh, processes, tuple(a.mode), a.cache_dtype, decode=decode,
                      decode_mesh=decode_mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    mbs = local // num_micro
    print(f"plan: {c.name} on {a.topology}: {len(devices)} devices "
          f"({devices[0].device_kind}), {processes} host(s), mesh {dict(mesh.shape)}, "
          f"{gb(capacity)} GB ({capacity / GIB:.2f} GiB) per device; target {arch.source}; "
          f"global batch {c.train.global_batch_size} x {c.data.max_length} tokens, "
          f"micro-batch {mbs} per host ({num_micro} per step)", flush=True)
    rows: list[Row] = []
    for prog in a.programs:
        try:
            thunks = PROGRAMS[prog](ctx)
        except ConfigError as e:
            cli.usage_error(str(e))
        for mode, thunk in thunks.items():
            m = measure(thunk, capacity)
            row_mesh = ctx.decode_mesh if prog == "decode" else mesh
            row = Row(prog, mode, a.topology, len(devices), processes, dict(row_mesh.shape), m,
                      estimate=estimate)
            if prog == "train":
                row.micro_batch_size, row.num_micro = mbs, num_micro
                row.seqs_per_device = mbs * processes / batch_shards
            print(f"  {prog}/{mode}: {'fits' if m.fits else 'does NOT fit'}, peak {gb(m.peak_bytes)} GB, "
                  f"compiled in {m.compile_s:.1f} s", file=sys.stderr, flush=True)
            if prog == "train" and a.search:
                def fits(size: int, mode=mode) -> bool:
                    if size == mbs:
                        return m.fits
                    r = measure(train_step_thunk(ctx, mode, size), capacity)
                    print(f"    micro_batch_size={size}: {'fits' if r.fits else 'does not fit'} "
                          f"({gb(r.peak_bytes)} GB, {r.compile_s:.1f} s)", file=sys.stderr, flush=True)
                    return r.fits
                cands = micro_candidates(local, processes, batch_shards, mbs)
                row.largest_micro_batch = largest_fitting(cands, fits,
                                                          predicted_start(cands, mbs, m))
                row.searched = True
            rows.append(row)
    print()
    _print_table(rows)
    notes = list(ctx.notes)
    if estimate:
        notes.insert(0, f"{a.topology}: memory is XLA:CPU's plan for {len(devices)} host CPU devices "
                        f"against --hbm_gb={a.hbm_gb}: an ESTIMATE for a GPU machine (a GPU compile "
                        "needs a GPU; GPU kernels, fusion and memory layout differ).")
    notes.append("GiB per device; peak = arguments + outputs + temporaries - donated (aliased), "
                 ">= when the compile ran out of memory (the compiler's temporaries + the inputs); "
                 "GFLOP/dev = matmul FLOPs of one step on one device, loops x trip count; micro and "
                 "largest = train.micro_batch_size (per host).")
    for r in rows:
        if r.measurement.flops_note:
            notes.append(f"{r.program}/{r.mode} FLOPs: {r.measurement.flops_note}")
    for n in notes:
        print(f"note: {n}")
    if a.json:
        atomic.write_json(a.json, {"config": c.name, "topology": a.topology,
                                   "rows": [r.to_json() for r in rows], "notes": notes}, indent=2)
        print(f"wrote {a.json}")
    failing = [r for r in rows if not r.measurement.fits]
    for r in failing:
        m = r.measurement
        over = "" if m.peak_bytes is None or m.capacity_bytes is None else (
            f": needs {m.peak_bytes / GIB:.2f} GiB per device of {m.capacity_bytes / GIB:.2f} GiB")
        print(f"plan: {r.program}/{r.mode} of {c.name} does not fit on {a.topology}{over}. "
              f"Turn: {_knobs(r, c, a.topology)}.", file=sys.stderr)
    return EXIT_DOES_NOT_FIT if failing else EXIT_FITS


if __name__ == "__main__":
    sys.exit(main())
