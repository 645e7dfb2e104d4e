"""Result tables (the reference's column layout) and JSON output."""

from __future__ import annotations

import math
import os
from typing import Sequence

from deepspec_jax import atomic


def display_name(path: str) -> str:
    """Last path component, as the reference prints model names."""
    p = str(path).rstrip("/")
    return os.path.basename(p) or p


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]], show_header: bool = True) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [sep]
    if show_header:
        out += [line(header), sep]
    out += [line(r) for r in rows] + [sep]
    return "\n".join(out)


def results_table(rows: Sequence[dict], target: str, draft: str, header: bool = True) -> str:
    """The reference's table (dataset, target_model, draft_model, #propose, accept_len,
    verify_rate, samples, out_tokens, tok/s, verify/s, accept_rate@k ...) with this
    project's plain-decoding columns (ar_tok/s, speedup) before the accept rates. Rows
    with a ``tree`` block (``--tree``) get a second row, draft ``name [tree k,n]``, whose
    #propose is verified tree nodes per round and accept_rate@k is by tree depth."""
    max_pos = max((len(r["accept_rates_by_position"]) for r in rows), default=0)
    head = ["dataset", "target_model", "draft_model", "#propose", "accept_len", "verify_rate",
            "samples", "out_tokens", "tok/s", "verify/s", "ar_tok/s", "speedup"]
    head += [f"accept_rate@{k}" for k in range(max_pos)]
    body = []
    for r in rows:
        ar = r.get("autoregressive") or {}
        # the chain row, then (with --tree) the tree row of the same dataset right below
        for m, name in [(r, display_name(draft))] + (
                [(r["tree"], f"{display_name(draft)} [tree {r['tree']['topk']},"
                             f"{r['tree']['num_nodes']}]")] if r.get("tree") else []):
            cells = [r["dataset"], display_name(target), name,
                     _fmt(m["draft_tokens_per_proposal"], ".2f") + "+1",
                     _fmt(m["acceptance_length"], ".2f"), _fmt(m["verify_rate"], ".4f"),
                     str(r["num_samples"]), str(m["output_tokens"]),
                     _fmt(m["output_tokens_per_second"], ".2f"),
                     _fmt(m["verifications_per_second"], ".2f"),
                     _fmt(ar.get("output_tokens_per_second"), ".2f"),
                     _fmt(m.get("speedup"), ".2f") + "x"]
            rates = list(m["accept_rates_by_position"])
            cells += [_fmt(v, ".4f") for v in rates] + ["-"] * (max_pos - len(rates))
            body.append(cells)
    return _grid(head, body, header)


def one_line(row: dict) -> str:
    """Progress summary of one finished dataset (the full table follows at the end)."""
    ar = row.get("autoregressive") or {}
    return (f"{row['dataset']}: accept_len {_fmt(row['acceptance_length'], '.2f')}, "
            f"verify_rate {_fmt(row['verify_rate'], '.4f')}, {row['num_rounds']} rounds, "
            f"{_fmt(row['output_tokens_per_second'], '.1f')} tok/s speculative vs "
            f"{_fmt(ar.get('output_tokens_per_second'), '.1f')} tok/s plain "
            f"(speedup {_fmt(row.get('speedup'), '.2f')}x)" + _tree_line(row.get("tree")))


def _tree_line(tree: dict | None) -> str:
    if not tree:
        return ""
    return (f"; tree {tree['topk']},{tree['num_nodes']}: accept_len "
            f"{_fmt(tree['acceptance_length'], '.2f')}, "
            f"{_fmt(tree['output_tokens_per_second'], '.1f')} tok/s "
            f"(speedup {_fmt(tree.get('speedup'), '.2f')}x, "
            f"{_fmt(tree.get('speedup_vs_chain'), '.2f')}x vs chain)")


def confidence_table(rows: Sequence[dict], draft: str) -> str:
    """Calibration summary per dataset (reference layout: means, then ECE/AUROC per position)."""
    rows = [r for r in rows if r.get("confidence")]
    max_pos = max((len(r["confidence"]["per_position"]) for r in rows), default=0)
    head = ["dataset", "draft_model", "samples", "proposals", "ece_mean", "auroc_mean",
            "brier_mean", "pred_mean", "target_mean"]
    head += [f"ece@{k + 1}" for k in range(max_pos)] + [f"auroc@{k + 1}" for k in range(max_pos)]
    body = []
    views = []
    for r in rows:      # raw, then after STS (the draft's calibration.json) when present
        views.append((r, r["confidence"], r["dataset"]))
        if r.get("confidence_sts"):
            views.append((r, r["confidence_sts"], r["dataset"] + " (STS)"))
    for r, c, name in views:
        per = c["per_position"]
        cells = [name, display_name(draft), str(r["num_samples"]), str(r["num_rounds"]),
                 _fmt(c["ece_mean"], ".4f"), _fmt(c["auroc_mean"], ".4f"),
                 _fmt(c["brier_mean"], ".4f"), _fmt(c["pred_mean"], ".4f"),
                 _fmt(c["target_mean"], ".4f")]
        for key in ("ece", "auroc"):
            cells += [_fmt(e[key], ".4f") if e["count"] else "-" for e in per]
            cells += ["-"] * (max_pos - len(per))
        body.append(cells)
    return _grid(head, body)


def jsonable(obj):
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, payload: dict) -> str:
    return atomic.write_json(path, jsonable(payload), indent=2, ensure_ascii=False,
                             allow_nan=False)
