"""PNG figures of an evaluation: acceptance by position and confidence reliability.

matplotlib runs on the non-interactive Agg backend so evaluation works headless."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _num(v) -> float:
    return math.nan if v is None else float(v)


def plot_acceptance(path: str, dataset: str, metrics: dict) -> str:
    """Left: unconditional accept_rate@k and conditional acceptance per draft position.
    Right: histogram of accepted draft tokens per round (tau - 1)."""
    rates = [_num(v) for v in metrics["accept_rates_by_position"]]
    cond = [_num(v) for v in metrics["conditional_accept_rates_by_position"]]
    hist = metrics["accepted_draft_tokens_histogram"]
    pos = list(range(1, len(rates) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(pos, rates, "o-", label="accept_rate@k (prefix 1..k accepted)")
    ax1.plot(pos, cond, "s--", label="conditional (k accepted | 1..k-1 accepted)")
    ax1.set_xlabel("draft position k")
    ax1.set_ylabel("rate")
    ax1.set_ylim(0.0, 1.02)
    ax1.set_xticks(pos)
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8, loc="lower left")
    ax2.bar(range(len(hist)), hist, color="C2")
    ax2.set_xlabel("accepted draft tokens per round")
    ax2.set_ylabel("rounds")
    ax2.set_xticks(range(len(hist)))
    tau = metrics.get("acceptance_length")
    fig.suptitle(f"{dataset}: acceptance by position"
                 + (f" (tau = {tau:.2f})" if tau is not None else ""))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(path: str, dataset: str, per_position: list[dict],
                     calibrated: list[dict] | None = None) -> str:
    """One reliability panel per block position: mean cumulative confidence vs observed
    prefix acceptance per bin, with the bin counts as a faint bar chart; with
    ``calibrated`` (the same rounds after STS) its curve too, and both ECEs."""
    n = max(len(per_position), 1)
    ncols = min(4, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.6 * nrows), squeeze=False)
    for i, entry in enumerate(per_position):
        ax = axes[i // ncols][i % ncols]
        ax.plot([0, 1], [0, 1], "--", color="0.6", linewidth=1)
        bins = entry.get("reliability") or []
        if bins:
            ax.plot([b["avg_pred"] for b in bins], [b["avg_target"] for b in bins], "o-",
                    color="C1", markersize=4, label="raw")
            if calibrated is not None and calibrated[i].get("reliability"):
                cb = calibrated[i]["reliability"]
                ax.plot([b["avg_pred"] for b in cb], [b["avg_target"] for b in cb], "s-",
                        color="C2", markersize=4, label="STS")
                ax.legend(loc="upper left", fontsize=7)
            ax2 = ax.twinx()
            ax2.bar([(b["range"][0] + b["range"][1]) / 2 for b in bins],
                    [b["count"] for b in bins],
                    width=[b["range"][1] - b["range"][0] for b in bins], color="C0", alpha=0.2)
            ax2.set_ylim(0, 3 * max(b["count"] for b in bins))  # bars in the lower third
            ax2.set_yticks([])
            ax.set_zorder(ax2.get_zorder() + 1)   # curve above the bars
            ax.patch.set_visible(False)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.25)
        ax.set_xlabel("predicted prefix acceptance")
        ax.set_ylabel("observed prefix acceptance")
        ece_txt = f"ECE={_num(entry['ece']):.3f}"
        if calibrated is not None:
            ece_txt += f"->{_num(calibrated[i]['ece']):.3f} (STS)"
        ax.set_title(f"pos {entry['position']}  n={entry['count']}\n{ece_txt}  "
                     f"AUROC={_num(entry['auroc']):.3f}  Brier={_num(entry['brier']):.3f}",
                     fontsize=9)
    for i in range(len(per_position), nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    fig.suptitle(f"{dataset}: confidence-head reliability (threshold 0)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
