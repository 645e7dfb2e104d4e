"""Sequential Temperature Scaling (STS) of DSpark's confidence head (SPEC §6).

The head's raw confidences are over- or under-confident by position. STS fits one
temperature per block position on held-out rounds, in order: for position k, with
t_1..t_{k-1} already fixed, a 1-D grid search picks the t_k that minimises the ECE of
the cumulative prediction ``prod_{i<=k} sigmoid(c_i / t_i)`` against the prefix-
acceptance label ``1[accepted drafts >= k]`` (the quantity the eval scores and the
scheduler uses). Dividing a logit by a positive temperature is monotone, so the ranking
of rounds by confidence at each position -- and so AUROC of the per-position
confidence -- is unchanged.

The fit is stored beside the draft as ``calibration.json`` with a fingerprint of the
draft's files; loading it for a different draft is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from deepspec_jax import atomic
from deepspec_jax.errors import ConfigError
from deepspec_jax.evaluation.calibration import ece

FILE_NAME = "calibration.json"
FORMAT = "deepspec_jax.sts_calibration"
FORMAT_VERSION = 1
# log-spaced temperatures (plus exactly 1.0: an uninformative position keeps its logit)
GRID = np.unique(np.concatenate([np.geomspace(0.05, 20.0, 241), [1.0]]))
# files beside the weights that are not part of the draft's identity
SIDECAR_FILES = frozenset({FILE_NAME})


@dataclasses.dataclass(frozen=True)
class Rounds:
    """Held-out rounds: raw confidence logits [N, W], proposal length and accepted drafts [N]."""

    logits: np.ndarray
    proposal_lengths: np.ndarray
    accepted: np.ndarray

    @classmethod
    def from_results(cls, results: Sequence) -> "Rounds":
        """From ``speculative_generate`` results decoded at confidence threshold 0."""
        logits, prop, acc = [], [], []
        for r in results:
            if r.confidences is None:
                raise ValueError("these results carry no confidence logits: the draft has no "
                                 "confidence head (or they come from tree decoding).")
            logits.append(np.asarray(r.confidences, np.float64))
            prop += list(r.proposal_lengths)
            acc += [int(a) - 1 for a in r.accepted_lengths]
        return cls(np.concatenate(logits, 0), np.asarray(prop, np.int64),
                   np.asarray(acc, np.int64))

    @property
    def width(self) -> int:
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.logits.shape[0])


def cumulative_confidence(logits: np.ndarray, temperatures: Sequence[float]) -> np.ndarray:
    """[N, W] ``prod_{i<=k} sigmoid(logit_i / t_i)``."""
    z = np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64)[None, :]
    return np.cumprod(1.0 / (1.0 + np.exp(-z)), axis=1)


def position_scores(rounds: Rounds, temperatures: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position k: (predictions, labels) of the rounds that proposed >= k tokens."""
    cum = cumulative_confidence(rounds.logits, temperatures)
    out = []
    for k in range(rounds.width):
        m = rounds.proposal_lengths > k
        out.append((cum[m, k], (rounds.accepted[m] > k).astype(np.float64)))
    return out


def fit_temperatures(rounds: Rounds, grid: np.ndarray = GRID) -> np.ndarray:
    """The STS temperatures [W] (1.0 for a position no round reached)."""
    temps = np.ones(rounds.width, np.float64)
    for k in range(rounds.width):
        m = rounds.proposal_lengths > k
        if not m.any():
            continue
        prefix = np.prod(1.0 / (1.0 + np.exp(-rounds.logits[m, :k] / temps[:k])), axis=1)
        labels = (rounds.accepted[m] > k).astype(np.float64)
        errs = np.array([ece(prefix / (1.0 + np.exp(-rounds.logits[m, k] / t)), labels)
                         for t in grid])
        best = np.flatnonzero(errs <= errs.min() + 1e-12)
        temps[k] = float(grid[best[np.argmin(np.abs(np.log(grid[best])))]])  # ties: nearest 1
    return temps


def draft_fingerprint(draft_dir: str) -> str:
    """sha256 over the draft directory's files (relative path and bytes), sidecars excluded."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(draft_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), draft_dir)
            if rel in SIDECAR_FILES:
                continue
            h.update(rel.encode() + b"\0")
            with open(os.path.join(root, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Calibration:
    temperatures: tuple[float, ...]
    draft_fingerprint: str
    fitted_on: dict                 # datasets, samples, rounds, temperature, max_new_tokens
    ece_before: list[float]
    ece_after: list[float]

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "temperatures": list(self.temperatures),
                "draft_fingerprint": self.draft_fingerprint, "fitted_on": self.fitted_on,
                "ece_before": self.ece_before, "ece_after": self.ece_after}


def path_for(draft_dir: str) -> str:
    return os.path.join(draft_dir, FILE_NAME)


def save(cal: Calibration, draft_dir: str) -> str:
    """Atomically writes ``<draft_dir>/calibration.json``; returns its path."""
    return atomic.write_json(path_for(draft_dir), cal.to_json(), indent=2)


def load(draft_dir: str, width: int) -> Calibration | None:
    """The draft's calibration, or None when it has none. Raises ConfigError naming the
    file and the fix when it is malformed, for another block width, or fitted on a
    different draft (the fingerprint of the draft's files differs)."""
    path = path_for(draft_dir)
    if not os.path.isfile(path):
        return None
    fix = f"rerun `python -m deepspec_jax.calibrate --draft={draft_dir}` or delete {path}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); {fix}.") from e
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: field 'format'/'format_version' is "
                          f"{raw.get('format')!r}/{raw.get('format_version')!r}, expected "
                          f"{FORMAT!r}/{FORMAT_VERSION}; {fix}.")
    temps = raw.get("temperatures")
    if (not isinstance(temps, list) or len(temps) != width
            or not all(isinstance(t, (int, float)) and t > 0 for t in temps)):
        raise ConfigError(f"{path}: field 'temperatures' must be {width} positive numbers "
                          f"(one per block position), got {temps!r}; {fix}.")
    got = draft_fingerprint(draft_dir)
    if raw.get("draft_fingerprint") != got:
        raise ConfigError(f"{path}: fitted on a different draft (field 'draft_fingerprint' "
                          f"{str(raw.get('draft_fingerprint'))[:12]}... != this draft's "
                          f"{got[:12]}...); {fix}.")
    return Calibration(tuple(float(t) for t in temps), got, dict(raw.get("fitted_on") or {}),
                       list(raw.get("ece_before") or []), list(raw.get("ece_after") or []))


def per_position_ece(rounds: Rounds, temperatures: Sequence[float]) -> list[float]:
    return [ece(p, y) for p, y in position_scores(rounds, temperatures)]


__all__ = ["Rounds", "Calibration", "fit_temperatures", "cumulative_confidence",
           "position_scores", "per_position_ece", "draft_fingerprint", "save", "load",
           "path_for", "FILE_NAME", "GRID"]
