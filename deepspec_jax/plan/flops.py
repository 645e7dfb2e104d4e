"""Matmul FLOPs of a compiled XLA program, loops counted with their trip counts.

XLA's ``Compiled.cost_analysis()`` counts the body of every ``while`` loop once,
whatever its trip count (checked on jax 0.10.2 with a 4-step ``lax.scan`` of matmuls:
1x, not 4x), and the train step is full of loops (micro-batch accumulation, chunked
vocab losses, ``lax.map`` query blocks, the Markov scan). :func:`hlo_matmul_flops`
reads the *optimized* HLO text instead and weights each loop body by its
``known_trip_count``: what the compiled program executes, including rematerialised
forwards, excluding what XLA removed. Elementwise FLOPs are not counted (the usual MFU
convention). Used by ``python -m deepspec_jax.plan`` and benchmarks/train_step.py.

:func:`target_matmul_params` / :func:`target_forward_flops` are the analytic
counterparts for a target's forward, layer by layer from the config's per-layer
geometry (Gemma: sliding vs full head size and KV heads, k_eq_v layers without v_proj,
KV-shared layers without k/v projections, double-wide MLPs), to check a compiled
program against.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from deepspec_jax.config import TargetConfig

_COMP_RE = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY_RE = re.compile(r"^[a-z]\w*\[([0-9,]*)\]")
_REF_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _split_shape(rest: str) -> tuple[str, str]:
    """``'f32[2,3]{1,0} dot(...)...'`` -> (shape text, remainder); tuple shapes nest."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _dims(shape: str) -> tuple[int, ...] | None:
    m = _ARRAY_RE.match(shape)
    if m is None:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _operands(text: str) -> list[str]:
    """Names of the operands in ``op(...)`` (with or without inline operand shapes)."""
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch == ")":
            end = i
            break
    return re.findall(r"%([\w.\-]+)", text[:end])


def _constant(lines: list[str], name: str) -> int | None:
    """Integer value of instruction ``name`` if it is a scalar constant (through copies)."""
    for line in lines:
        m = _INSTR_RE.match(line)
        if m and m.group(1) == name:
            c = re.search(r"\bconstant\((-?\d+)\)", m.group(2))
            if c:
                return int(c.group(1))
            cp = re.search(r"\bcopy\(%([\w.\-]+)\)", m.group(2))
            return _constant(lines, cp.group(1)) if cp else None
    return None


def _counted_trips(cond: list[str], while_operands: list[str], caller: list[str]) -> int | None:
    """Trip count of a counted loop whose HLO carries no ``known_trip_count`` (XLA:TPU
    drops it): the condition's ROOT is ``compare(get-tuple-element(param, k), constant N)``
    with LT/LE; the counter starts at element k of the loop's initial tuple (a constant)
    and steps by one, as ``lax.scan``/``fori_loop`` counters do."""
    root = next((ln for ln in cond if ln.lstrip().startswith("ROOT")), "")
    m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=(LT|LE)", root)
    if m is None:
        return None
    limit = _constant(cond, m.group(2))
    gte = next((ln for ln in cond if re.match(rf"\s*%{re.escape(m.group(1))} = ", ln)), "")
    k = re.search(r"get-tuple-element\(.*\), index=(\d+)", gte)
    if limit is None or k is None or not while_operands:
        return None
    tup = next((ln for ln in caller if re.match(rf"\s*%{re.escape(while_operands[0])} = ", ln)), "")
    ops = _operands(tup.split(" tuple(", 1)[1]) if " tuple(" in tup else []
    start = _constant(caller, ops[int(k.group(1))]) if int(k.group(1)) < len(ops) else None
    if start is None:
        return None
    return max(0, limit - start + (m.group(3) == "LE"))


def _window_field(window: str, key: str, n: int, default: int) -> list:
    m = re.search(rf"\b{key}=(\S+)", window)
    if m is None:
        return [default] * n
    return [tuple(int(v) for v in part.split("_")) if "_" in part else int(part)
            for part in m.group(1).split("x")]


def _taps(size_in: int, k: int, out: int, stride: int, lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial dim that land on an input
    element (not padding, not a hole of the lhs dilation)."""
    o = np.arange(out) * stride - lo
    last = (size_in - 1) * lhs_dil
    total = 0
    for t in range(k):
        p = o + t * rhs_dil
        total += int(np.count_nonzero((p >= 0) & (p <= last) & (p % lhs_dil == 0)))
    return total


def _conv_flops(shape: str, tail: str, shapes: dict[str, str]) -> float | None:
    """2 x the multiply-adds of an HLO convolution: output batch x output features x
    input features (per group) x, per spatial dim, the (output, tap) pairs that hit an
    input element. XLA:TPU writes matmuls and batched dot_generals as convolutions whose
    batch dims are spatial dims with lhs dilation and padding (one tap per output), so
    counting every kernel element would overcount them by their size."""
    out = _dims(shape)
    ops = _operands(tail[len("convolution") + 1:])
    lhs = _dims(shapes.get(ops[0], "")) if ops else None
    rhs = _dims(shapes.get(ops[1], "")) if len(ops) > 1 else None
    m = re.search(r"dim_labels=([^_]+)_([^-]+)->(\w+)", tail)
    if out is None or lhs is None or rhs is None or m is None:
        return None
    ll, rl, ol = m.groups()
    if (len(ll), len(rl), len(ol)) != (len(lhs), len(rhs), len(out)):
        return None
    spatial = sorted(ch for ch in ol if ch.isdigit())
    w = re.search(r"window=\{([^}]*)\}", tail)
    window = w.group(1) if w else ""
    n = len(spatial)
    size = _window_field(window, "size", n, 1)
    stride = _window_field(window, "stride", n, 1)
    pad = _window_field(window, "pad", n, (0, 0))
    ldil = _window_field(window, "lhs_dilate", n, 1)
    rdil = _window_field(window, "rhs_dilate", n, 1)
    macs = out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")]
    for d, ch in enumerate(spatial):
        macs *= _taps(lhs[ll.index(ch)], size[d], out[ol.index(ch)], stride[d], pad[d][0],
                      ldil[d], rdil[d])
    return 2.0 * macs


@dataclasses.dataclass
class HloFlops:
    flops: float                   # matmul FLOPs, loop bodies x trip count
    dots: int                      # dot / convolution instructions seen (static count)
    loops: int                     # while loops seen (static count)
    unknown_trip_loops: int        # while loops without known_trip_count (counted once)
    conditionals: int              # conditionals (the costliest branch is counted)
    unhandled: tuple[str, ...]     # unreadable dots/convolutions, matmul-like custom-calls: NOT counted
    custom_calls: tuple[str, ...]  # other custom-calls (TopK, ...): no matmul FLOPs
    inferred_trip_loops: int = 0   # loops whose trip count was read off their condition


def hlo_matmul_flops(hlo_text: str) -> HloFlops:
    """2*M*N*K of every ``dot`` and ``convolution`` reachable from ENTRY in an optimized HLO
    module text,
    each computation weighted by how often it runs (while bodies x known_trip_count,
    fusions/calls x1, conditionals: the costliest branch)."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        if cur is None:
            m = _COMP_RE.match(line)
            if m and "->" in line:
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text.")

    stats = dict(dots=0, loops=0, unknown=0, conds=0, inferred=0)
    unhandled: list[str] = []
    custom: list[str] = []
    memo: dict[str, float] = {}

    def cost(name: str, stack: tuple = ()) -> float:
        if name in memo:
            return memo[name]
        if name in stack or name not in comps:
            return 0.0
        shapes: dict[str, str] = {}
        total = 0.0
        for line in comps[name]:
            m = _INSTR_RE.match(line)
            if m is None:
                continue
            iname, rest = m.group(1), m.group(2)
            shape, tail = _split_shape(rest)
            shapes[iname] = shape
            op = tail.split("(", 1)[0].strip()
            if op == "dot":
                stats["dots"] += 1
                out = _dims(shape)
                ops = _operands(tail[len(op) + 1:])
                lhs = _dims(shapes.get(ops[0], "")) if ops else None
                cm = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", tail)
                if out is None or lhs is None or cm is None:
                    unhandled.append(f"dot {iname} (shapes unreadable)")
                    continue
                k = math.prod(lhs[int(i)] for i in cm.group(1).split(",") if i)
                total += 2.0 * math.prod(out) * k
            elif op == "convolution":
                stats["dots"] += 1
                conv = _conv_flops(shape, tail, shapes)
                if conv is None:
                    unhandled.append(f"convolution {iname} (shapes unreadable)")
                else:
                    total += conv
            elif op == "custom-call":
                tgt = re.search(r'custom_call_target="([^"]+)"', tail)
                tname = tgt.group(1) if tgt else iname
                matmul_like = re.search(r"matmul|gemm|dot|conv|einsum", tname, re.IGNORECASE)
                (unhandled if matmul_like else custom).append(f"custom-call {tname}")
            refs = dict((k, v) for k, v in _REF_RE.findall(tail))
            if op == "while":
                stats["loops"] += 1
                t = _TRIP_RE.search(tail)
                trips = int(t.group(1)) if t else _counted_trips(
                    comps.get(refs.get("condition", ""), []), _operands(tail[len(op) + 1:]),
                    comps[name])
                if t is None and trips is not None:
                    stats["inferred"] += 1
                if trips is None:
                    stats["unknown"] += 1
                    trips = 1
                total += trips * cost(refs.get("body", ""), stack + (name,))
                total += (trips + 1) * cost(refs.get("condition", ""), stack + (name,))
                continue
            if op == "conditional":
                stats["conds"] += 1
                b = _BRANCHES_RE.search(tail)
                names = (re.findall(r"%([\w.\-]+)", b.group(1)) if b else
                         [refs[k] for k in ("true_computation", "false_computation") if k in refs])
                total += max((cost(n, stack + (name,)) for n in names), default=0.0)
                continue
            for key in ("calls", "to_apply"):
                if key in refs:
                    total += cost(refs[key], stack + (name,))
        memo[name] = total
        return total

    flops = cost(entry)
    return HloFlops(flops, stats["dots"], stats["loops"], stats["unknown"], stats["conds"],
                    tuple(sorted(set(unhandled))), tuple(sorted(set(custom))), stats["inferred"])


def target_matmul_params(cfg: TargetConfig) -> int:
    """Weights of the target's matmuls per token (decoder projections and MLPs, plus the
    [d, V] output projection), from each layer's own geometry; norms, biases, scalars
    and the embedding gather are not matmuls."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    total = d * cfg.vocab_size
    for i in range(cfg.num_hidden_layers):
        hd, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        total += 2 * d * h * hd                                    # q_proj, o_proj
        if i < cfg.first_kv_shared:                                # own keys (and values)
            total += d * kv * hd * (1 if cfg.layer_k_eq_v(i) else 2)
        total += 3 * d * cfg.layer_intermediate(i)                 # gate, up, down
    return total


def target_forward_flops(cfg: TargetConfig, batch: int, seq: int, keys: int | None = None) -> float:
    """Matmul FLOPs of a forward over [batch, seq] tokens attending to ``keys`` keys
    per query in every layer (default ``seq``: every pair of a dense [seq, seq] grid,
    what a single-tile attention computes; a layer's window or causal mask saves only
    what its kernel skips). Softcapping, norms and embedding scaling are elementwise."""
    keys = seq if keys is None else keys
    attn = sum(4 * cfg.num_attention_heads * cfg.layer_head_dim(i)
               for i in range(cfg.num_hidden_layers))              # QK^T and PV per pair
    return 2.0 * batch * seq * target_matmul_params(cfg) + float(batch * seq * keys * attn)


__all__ = ["HloFlops", "hlo_matmul_flops", "target_matmul_params", "target_forward_flops"]
