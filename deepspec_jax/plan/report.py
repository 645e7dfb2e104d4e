"""Measuring compiled programs: per-device memory, FLOPs, fit, the largest micro-batch.

Memory is ``Compiled.memory_analysis()``: per-device argument, output, temporary and
aliased (donated) bytes as the compiler planned them; peak = arguments + outputs +
temporaries - aliased. A compile that exceeds the device's memory fails with
``RESOURCE_EXHAUSTED``; that is a "does not fit" row carrying the compiler's own
figures, parsed from its message. FLOPs are per device (the compiled program is the
SPMD-partitioned per-device program): matmul FLOPs of the optimized HLO with loop
trip counts applied (:mod:`deepspec_jax.plan.flops`), next to XLA's cost analysis
(which counts each loop body once).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable

import jax

from deepspec_jax.plan.flops import hlo_matmul_flops

_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _bytes(num: str, unit: str) -> int:
    return int(float(num) * _UNITS[unit.upper()])


@dataclasses.dataclass
class Measurement:
    fits: bool
    compile_s: float
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    peak_bytes: int | None = None        # arg + out + temp - alias; did not compile: >= arg + temp
    capacity_bytes: int | None = None
    flops: float | None = None           # per device, loops x trip count
    xla_flops: float | None = None       # per device, XLA cost analysis (loop bodies once)
    flops_note: str = ""
    error: str = ""                      # the compiler's message when it did not compile


def parse_oom(msg: str) -> dict:
    """The figures of an XLA ``RESOURCE_EXHAUSTED`` compile error, in bytes:
    ``required`` (what the program needs), ``available`` (the device's memory) and, when
    the message lists them, a ``breakdown`` by kind (arguments, temporaries, ...)."""
    out: dict = {}
    m = re.search(r"required for (.+?) \(" + _SIZE + r"\) exceeds available \w+ \(" + _SIZE + r"\)", msg)
    if m:
        out.update(what=m.group(1), required=_bytes(m.group(2), m.group(3)),
                   available=_bytes(m.group(4), m.group(5)))
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", msg)
    if m:
        out.setdefault("required", _bytes(m.group(1), m.group(2)))
        out.setdefault("available", _bytes(m.group(3), m.group(4)))
    m = re.search(r"Total hbm usage >= " + _SIZE + r":(.*?)(?:\n\n|$)", msg, re.S)
    if m:
        out.setdefault("required", _bytes(m.group(1), m.group(2)))
        parts = re.findall(r"(\w[\w ]*?)\s+" + _SIZE, m.group(3))
        out["breakdown"] = {k.strip(): _bytes(n, u) for k, n, u in parts}
    return out


def per_device_bytes(tree) -> int:
    """Bytes of the largest device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * x.dtype.itemsize
    return total


def is_oom(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err)


def measure(thunk: Callable, capacity: int) -> Measurement:
    """Compile ``thunk()`` and measure it against ``capacity`` bytes per device. Only an
    out-of-memory compile error is caught (a "does not fit" result); others propagate."""
    t0 = time.perf_counter()
    try:
        compiled = thunk()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is a result
        if not is_oom(e):
            raise
        figures = parse_oom(str(e))
        r = Measurement(False, time.perf_counter() - t0, peak_bytes=figures.get("required"),
                        capacity_bytes=figures.get("available", capacity),
                        argument_bytes=getattr(thunk, "argument_bytes", None),
                        error=str(e).strip().splitlines()[0][:400])
        if "temporaries" in figures.get("what", "") and r.peak_bytes is not None:
            # the compiler names the temporaries alone: peak >= arguments + temporaries
            r.temp_bytes = r.peak_bytes
            r.peak_bytes += r.argument_bytes or 0
        return r
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    r = Measurement(True, dt, capacity_bytes=capacity)
    if mem is not None:
        r.argument_bytes = int(mem.argument_size_in_bytes)
        r.output_bytes = int(mem.output_size_in_bytes)
        r.temp_bytes = int(mem.temp_size_in_bytes)
        r.alias_bytes = int(mem.alias_size_in_bytes)
        r.peak_bytes = r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
        r.fits = r.peak_bytes <= capacity
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    r.xla_flops = float(ca["flops"]) if ca and "flops" in ca else None
    hlo = hlo_matmul_flops(compiled.as_text())
    r.flops = hlo.flops
    notes = []
    if hlo.unknown_trip_loops:
        notes.append(f"{hlo.unknown_trip_loops} loop(s) of unknown trip count counted once")
    if hlo.unhandled:
        notes.append("not counted: " + ", ".join(hlo.unhandled[:4]))
    r.flops_note = "; ".join(notes)
    return r


def largest_fitting(candidates: list[int], fits: Callable[[int], bool], start: int) -> int | None:
    """The largest of the sorted ``candidates`` for which ``fits`` holds, assuming fit is
    monotone (smaller fits if larger does): from ``start`` (a candidate) double up (or
    halve down) until the answer flips, then bisect between. Few calls: each is a compile."""
    known: dict[int, bool] = {}

    def test(i: int) -> bool:
        v = candidates[i]
        if v not in known:
            known[v] = fits(v)
        return known[v]

    i = candidates.index(start)
    if test(i):
        lo, hi = i, None
        while hi is None:
            nxt = next((j for j in range(lo + 1, len(candidates))
                        if candidates[j] >= 2 * candidates[lo]), len(candidates) - 1)
            if nxt == lo:
                return candidates[lo]
            if test(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        lo, hi = None, i
        while lo is None:
            nxt = next((j for j in range(hi - 1, -1, -1)
                        if 2 * candidates[j] <= candidates[hi]), 0)
            if nxt == hi:
                return None
            if test(nxt):
                lo = nxt
            else:
                hi = nxt
                if hi == 0:
                    return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if test(mid):
            lo = mid
        else:
            hi = mid
    return candidates[lo]


def predicted_start(candidates: list[int], configured: int, m: Measurement) -> int:
    """Where ``largest_fitting`` starts: the largest candidate whose peak, scaled from the
    configured micro-batch's measurement ``m`` (arguments and outputs fixed, temporaries
    proportional to the micro-batch), fits ``m.capacity_bytes``. Why: a compile that fits
    takes minutes at reference sizes, one that runs out of memory seconds; starting near
    the answer leaves about one fitting compile and one failing one, where doubling up
    from the configured size would compile every fitting size on the way. Proportional
    temporaries overestimate above the configured size (part of them is fixed), so the
    start usually fits and the search then goes up; ``configured`` without figures."""
    if m.temp_bytes is None or m.peak_bytes is None or not m.capacity_bytes:
        return configured
    fixed = m.peak_bytes - m.temp_bytes
    fitting = [c for c in candidates
               if fixed + m.temp_bytes * c / configured <= m.capacity_bytes]
    return max(fitting) if fitting else min(candidates)


def gb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


__all__ = ["Measurement", "measure", "parse_oom", "is_oom", "largest_fitting", "predicted_start",
           "gb", "per_device_bytes"]
