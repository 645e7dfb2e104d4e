"""Calibration of DSpark's confidence head (SPEC §4; collected at threshold 0 only).

For every round and every proposed position k (1-based), the prediction is the
cumulative confidence ``prod_{i<=k} sigmoid(c_i)`` -- the head's estimate that the
whole prefix 1..k survives verification -- and the label is the observed
prefix-acceptance indicator ``1[accepted drafts >= k]``. Positions past the round's
(effective) proposal length are not scored, as in the reference. Predictions are
clipped to [1e-8, 1 - 1e-8] before binning, also as in the reference.

Per position we report:
* ECE over 20 equal-width bins (bin = floor(p * 20)), weighted by bin counts;
* AUROC from a 1000-bin histogram of predictions (``auroc``; the reference's and the
  paper's estimator: pairs in the same bin count one half), and the exact rank-based
  Mann-Whitney AUROC with midrank ties (``auroc_exact``) alongside it; the two differ
  only by within-bin ordering (at most the mass of same-bin positive/negative pairs);
* the Brier score (mean squared error of the prediction);
* the reliability curve (mean prediction vs observed rate per non-empty bin).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

EPS_PROB = 1e-8
NUM_BINS = 20
NUM_FINE_BINS = 1000
AUROC_METHOD = ("1000-bin histogram of predictions, same-bin positive/negative pairs "
                "counted 1/2 (reference/paper); auroc_exact is the rank-based "
                "Mann-Whitney statistic with midrank ties")


def _clip(p) -> np.ndarray:
    return np.clip(np.asarray(p, np.float64).reshape(-1), EPS_PROB, 1.0 - EPS_PROB)


def _bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    return np.clip((p * num_bins).astype(np.int64), 0, num_bins - 1)


def ece(probs, labels, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error with equal-width bins (NaN for no data)."""
    p, y = _clip(probs), np.asarray(labels, np.float64).reshape(-1)
    if p.size == 0:
        return math.nan
    idx = _bin_index(p, num_bins)
    sum_p = np.bincount(idx, weights=p, minlength=num_bins)
    sum_y = np.bincount(idx, weights=y, minlength=num_bins)
    # sum over bins of n_b * |mean_p - mean_y| / N  ==  sum_b |sum_p - sum_y| / N
    return float(np.abs(sum_p - sum_y).sum() / p.size)


def auroc_histogram(probs, labels, num_bins: int = NUM_FINE_BINS) -> float:
    """AUROC from a ``num_bins`` histogram (NaN unless both classes occur)."""
    p, y = _clip(probs), np.asarray(labels, np.float64).reshape(-1)
    idx = _bin_index(p, num_bins)
    pos = np.bincount(idx, weights=y, minlength=num_bins)
    neg = np.bincount(idx, weights=1.0 - y, minlength=num_bins)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg))


def auroc_exact(probs, labels) -> float:
    """Exact AUROC = P(score_pos > score_neg) + P(tie)/2, via midranks."""
    p, y = _clip(probs), np.asarray(labels, np.float64).reshape(-1) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(p.size, np.float64)
    # midranks of tied groups (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], p.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier(probs, labels) -> float:
    """Mean squared error between predicted probability and the 0/1 outcome."""
    p, y = _clip(probs), np.asarray(labels, np.float64).reshape(-1)
    return float(((p - y) ** 2).mean()) if p.size else math.nan


def reliability(probs, labels, num_bins: int = NUM_BINS) -> list[dict]:
    """Non-empty bins: range, mean prediction, observed rate, count."""
    p, y = _clip(probs), np.asarray(labels, np.float64).reshape(-1)
    idx = _bin_index(p, num_bins)
    out = []
    for b in range(num_bins):
        m = idx == b
        n = int(m.sum())
        if n:
            out.append({"bin": b, "range": [b / num_bins, (b + 1) / num_bins],
                        "avg_pred": float(p[m].mean()), "avg_target": float(y[m].mean()),
                        "count": n})
    return out


def prefix_predictions(confidence_logits: Sequence[float], proposal_length: int,
                       accepted_drafts: int, temperatures: Sequence[float] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative confidence, prefix-acceptance label) for positions 1..proposal_length
    of one round. ``confidence_logits`` are the raw head logits of all block positions;
    ``temperatures`` (STS, one per position) divide them first."""
    logits = np.asarray(confidence_logits, np.float64).reshape(-1)
    n = int(proposal_length)
    if n > logits.size:
        raise ValueError(f"round proposed {n} tokens but carries only {logits.size} "
                         "confidence logits.")
    z = logits[:n] if temperatures is None else logits[:n] / np.asarray(temperatures)[:n]
    sig = 1.0 / (1.0 + np.exp(-z))
    labels = (np.arange(n) < int(accepted_drafts)).astype(np.float64)
    return np.cumprod(sig), labels


@dataclasses.dataclass
class ConfidenceCalibration:
    """Collects (prediction, label) pairs per block position over a dataset."""

    num_positions: int
    temperatures: Sequence[float] | None = None    # STS temperatures (None: raw)
    preds: list[list[float]] = dataclasses.field(default_factory=list)
    labels: list[list[float]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.preds:
            self.preds = [[] for _ in range(self.num_positions)]
            self.labels = [[] for _ in range(self.num_positions)]

    def add_round(self, confidence_logits, proposal_length: int, accepted_drafts: int) -> None:
        p, y = prefix_predictions(confidence_logits, proposal_length, accepted_drafts,
                                  self.temperatures)
        for k in range(min(p.size, self.num_positions)):
            self.preds[k].append(float(p[k]))
            self.labels[k].append(float(y[k]))

    def add_sample(self, confidences, accepted_drafts, proposal_lengths) -> None:
        """One sample's rounds: confidence logits, accepted draft tokens (no bonus) and
        proposal length of each round."""
        if not len(confidences) == len(accepted_drafts) == len(proposal_lengths):
            raise ValueError(f"{len(confidences)} rounds of confidences, "
                             f"{len(accepted_drafts)} of acceptances and "
                             f"{len(proposal_lengths)} of proposals; expected one per round.")
        for c, a, p in zip(confidences, accepted_drafts, proposal_lengths):
            self.add_round(c, int(p), int(a))

    def per_position(self) -> list[dict]:
        out = []
        for k in range(self.num_positions):
            p, y = np.asarray(self.preds[k]), np.asarray(self.labels[k])
            n = int(p.size)
            out.append({
                "position": k + 1, "count": n,
                "ece": ece(p, y), "auroc": auroc_histogram(p, y), "auroc_exact": auroc_exact(p, y),
                "brier": brier(p, y),
                "pred_mean": float(_clip(p).mean()) if n else math.nan,
                "target_mean": float(y.mean()) if n else math.nan,
                "reliability": reliability(p, y),
            })
        return out

    def summary(self) -> dict:
        """Per-position metrics plus count-weighted means over positions."""
        per = self.per_position()
        total = sum(e["count"] for e in per)

        def wmean(key):
            pairs = [(e[key], e["count"]) for e in per if e["count"] and not math.isnan(e[key])]
            w = sum(c for _, c in pairs)
            return sum(v * c for v, c in pairs) / w if w else math.nan

        return {
            "num_bins": NUM_BINS, "num_fine_bins": NUM_FINE_BINS, "auroc_method": AUROC_METHOD,
            "num_scored": total,
            "ece_mean": wmean("ece"), "auroc_mean": wmean("auroc"),
            "auroc_exact_mean": wmean("auroc_exact"), "brier_mean": wmean("brier"),
            "pred_mean": wmean("pred_mean"), "target_mean": wmean("target_mean"),
            "per_position": per,
        }
