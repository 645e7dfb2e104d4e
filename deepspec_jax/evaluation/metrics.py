"""Acceptance metrics from per-round speculative-decoding statistics (SPEC §4).

A *round* is one draft proposal followed by one target verification. For each round the
engine reports ``accepted_length`` (accepted draft tokens + 1, the bonus/residual token
included) and ``proposal_length`` (draft tokens proposed). Everything here is computed
from those numbers, pooled over all rounds of all samples of a dataset, exactly as
the reference does (rounds, not samples, are the unit):

* ``acceptance_length`` tau = mean(accepted_length)
* ``draft_tokens_per_proposal`` = mean(proposal_length)
* ``verify_rate`` = sum(accepted_length) / (sum(proposal_length) + rounds): committed
  tokens per verified position (the target scores the drafts plus one bonus position
  per round); 1.0 when every draft is accepted. This is the reference's formula (its
  numerator is the acceptance-length sum, i.e. accepted drafts + 1 per round)
* ``accept_rate@k`` (k = 0..gamma-1) = #(rounds with accepted drafts > k) /
  #(rounds that proposed > k drafts): the unconditional chance that the first k+1
  drafts all survive
* ``conditional_accept_rate@k`` = #(accepted > k) / #(proposed > k and accepted >= k):
  the chance that draft k+1 survives given drafts 1..k did (paper Fig. 2)
* ``accepted_draft_tokens_histogram[i]`` = rounds that accepted exactly i drafts.

Accepted draft tokens per round are ``accepted_length - 1`` unless the engine reports
them itself (``accepted_drafts``): a round ended by an accepted stop token records only
its accepted drafts as its length (no bonus token), as in the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass
class RoundStats:
    """Pooled round statistics of one dataset; ``add`` one sample at a time."""

    max_proposal: int                       # gamma: block size / ttt length of the draft
    lengths: list[int] = dataclasses.field(default_factory=list)    # accepted_length (tau_r)
    accepted: list[int] = dataclasses.field(default_factory=list)   # accepted drafts
    proposed: list[int] = dataclasses.field(default_factory=list)

    def add(self, accepted_lengths: Sequence[int], proposal_lengths: Sequence[int],
            accepted_drafts: Sequence[int] | None = None) -> None:
        """Add one sample's rounds (``accepted_lengths`` include the +1 bonus token;
        ``accepted_drafts`` defaults to ``accepted_lengths - 1``)."""
        lens = [int(a) for a in accepted_lengths]
        acc = ([a - 1 for a in lens] if accepted_drafts is None
               else [int(a) for a in accepted_drafts])
        prop = [int(p) for p in proposal_lengths]
        if not len(lens) == len(acc) == len(prop):
            raise ValueError(f"accepted_lengths ({len(lens)} rounds), accepted drafts "
                             f"({len(acc)}) and proposal_lengths ({len(prop)}) must have one "
                             "entry per round.")
        for a, p in zip(acc, prop):
            if not 0 <= a <= p:
                raise ValueError(f"a round accepted {a} draft tokens of {p} proposed; "
                                 "expected 0 <= accepted <= proposed.")
            if p > self.max_proposal:
                raise ValueError(f"a round proposed {p} draft tokens, more than the "
                                 f"draft's maximum {self.max_proposal}.")
        self.lengths += lens
        self.accepted += acc
        self.proposed += prop

    @property
    def num_rounds(self) -> int:
        return len(self.accepted)

    def summary(self) -> dict:
        """All acceptance metrics as a JSON-ready dict (None where undefined)."""
        lens = np.asarray(self.lengths, np.int64)
        acc = np.asarray(self.accepted, np.int64)
        prop = np.asarray(self.proposed, np.int64)
        n = acc.size
        return {
            "num_rounds": int(n),
            "acceptance_length": float(lens.mean()) if n else None,
            "draft_tokens_per_proposal": float(prop.mean()) if n else None,
            "verify_rate": float(lens.sum() / (prop.sum() + n)) if n else None,
            "accept_rates_by_position": accept_rates(acc, prop, self.max_proposal),
            "conditional_accept_rates_by_position":
                conditional_accept_rates(acc, prop, self.max_proposal),
            "accepted_draft_tokens_histogram": histogram(acc, self.max_proposal),
            "proposals_at_position": [int((prop > k).sum()) for k in range(self.max_proposal)],
        }


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den else None


def accept_rates(accepted: Iterable[int], proposed: Iterable[int], max_proposal: int) -> list:
    """accept_rate@k for k = 0..max_proposal-1 (None where no round proposed > k)."""
    acc, prop = np.asarray(list(accepted)), np.asarray(list(proposed))
    return [_ratio(int((acc > k).sum()), int((prop > k).sum())) for k in range(max_proposal)]


def conditional_accept_rates(accepted: Iterable[int], proposed: Iterable[int],
                             max_proposal: int) -> list:
    """P(draft k+1 accepted | drafts 1..k accepted and draft k+1 proposed), k = 0..."""
    acc, prop = np.asarray(list(accepted)), np.asarray(list(proposed))
    out = []
    for k in range(max_proposal):
        reached = (prop > k) & (acc >= k)
        out.append(_ratio(int((reached & (acc > k)).sum()), int(reached.sum())))
    return out


def histogram(accepted: Iterable[int], max_proposal: int) -> list[int]:
    """Rounds that accepted exactly i draft tokens, i = 0..max_proposal."""
    acc = np.asarray(list(accepted), np.int64)
    return [int(c) for c in np.bincount(acc, minlength=max_proposal + 1)[: max_proposal + 1]]


def throughput(tokens: int, seconds: float) -> float | None:
    """Tokens per second (None when nothing was timed)."""
    return float(tokens) / seconds if seconds > 0 else None
