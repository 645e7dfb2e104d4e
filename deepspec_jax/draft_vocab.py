"""Reduced draft vocabulary: the draft predicts over K of the target's V tokens.

A draft config.json with ``draft_vocab_size`` = K (absent/null = the full vocabulary)
has an lm_head over K columns -- the target's lm_head at the K selected token ids --
and two frozen buffers stored exactly as vLLM's ``speculators`` stores them:

* ``d2t`` [K] (int64 on disk, int32 in the model): offsets, ``target_id = draft_id +
  d2t[draft_id]``; draft ids are the selected target ids in ascending order;
* ``t2d`` [V] (bool): the mask of the selected target ids (``sum(t2d) = K``).

Selection (``select_draft_vocab``) is ``speculators``'
``build_vocab_mappings_from_distribution``: the K most frequent target ids at
loss-mask positions of the training data (ties: lower id first), padded with the
lowest unused ids when the data has fewer than K distinct tokens, sorted ascending.

Decoding samples over K and maps the drawn draft ids to target ids
(``to_target_ids``) before they feed anything else; verification gets the draft
distribution scattered into V (``scatter_to_target``, zeros elsewhere), so rejection
sampling stays exactly lossless. Training restricts the target's logits to the K ids
and renormalises them (softmax over K: the EAGLE-3 / speculators convention); hard
labels outside the draft vocabulary get zero weight (``to_draft_ids``).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepspec_jax.errors import ConfigError

FIELD = "draft_vocab_size"   # the draft config.json field
D2T, T2D = "d2t", "t2d"      # variable names in the model = HF tensor names
D2T_HF_DTYPE, T2D_HF_DTYPE = "int64", "bool"   # vLLM speculators' on-disk dtypes


def parse_draft_vocab_size(raw: dict, vocab_size: int, source: str) -> int | None:
    """``draft_vocab_size`` of a draft config dict: None (full vocabulary) or K with
    0 < K < ``vocab_size``; ConfigError naming the field otherwise."""
    k = raw.get(FIELD)
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"{source}: field {FIELD!r} = {k!r} must be an integer (the draft's "
                          "reduced vocabulary size) or null for the full vocabulary.")
    if not 0 < k < vocab_size:
        raise ConfigError(f"{source}: field {FIELD!r} = {k} must be in [1, {vocab_size - 1}] "
                          f"(below the target vocab_size {vocab_size}); remove it (or set null) "
                          "for the full vocabulary.")
    return int(k)


def select_draft_vocab(counts: Mapping[int, int], draft_vocab_size: int,
                       target_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(d2t int64 [K], t2d bool [V]) from token counts {target id: count}, exactly as
    ``speculators.train.vocab_mapping.build_vocab_mappings_from_distribution``."""
    K, V = int(draft_vocab_size), int(target_vocab_size)
    if not 0 < K < V:
        raise ConfigError(f"draft_vocab_size = {K} must be in [1, {V - 1}] for a target "
                          f"vocabulary of {V}.")
    counts = {int(t): int(c) for t, c in counts.items()}
    bad = [t for t in counts if not 0 <= t < V]
    if bad:
        raise ConfigError(f"token counts hold ids {sorted(bad)[:5]} outside the target "
                          f"vocabulary [0, {V}); they were counted with another tokenizer.")
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    chosen = ranked[:K]
    if len(chosen) < K:
        have = set(chosen)
        chosen += [t for t in range(K) if t not in have][:K - len(chosen)]
    ids = np.sort(np.asarray(chosen, np.int64))
    t2d = np.zeros(V, np.bool_)
    t2d[ids] = True
    return ids - np.arange(K, dtype=np.int64), t2d


def selected_ids(d2t) -> np.ndarray:
    """The target ids of the draft vocabulary (ascending), from the d2t offsets."""
    d2t = np.asarray(d2t, np.int64)
    return np.arange(d2t.shape[0], dtype=np.int64) + d2t


def carry_columns(x, old_ids, new_ids) -> np.ndarray:
    """``x`` [..., K_old], one column per target id of ``old_ids`` (ascending), re-indexed
    to the target ids ``new_ids`` [K_new] (ascending): an id in both keeps its column, a
    new one gets zeros. Re-selecting a trained draft's vocabulary this way keeps what it
    learned for every token it already had."""
    x, old_ids, new_ids = np.asarray(x), np.asarray(old_ids), np.asarray(new_ids)
    pos = np.minimum(np.searchsorted(old_ids, new_ids), old_ids.shape[0] - 1)
    kept = old_ids[pos] == new_ids
    return np.where(kept, np.take(x, pos, axis=-1), 0).astype(x.dtype)


def check_vocab_map(d2t, t2d, draft_vocab_size: int, target_vocab_size: int, source: str) -> None:
    """ConfigError unless (d2t, t2d) is a valid pair for K / V: the d2t ids strictly
    increasing inside [0, V) and exactly the ids t2d marks."""
    d2t, t2d = np.asarray(d2t), np.asarray(t2d)
    K, V = int(draft_vocab_size), int(target_vocab_size)
    if d2t.shape != (K,) or t2d.shape != (V,):
        raise ConfigError(f"{source}: tensors 'd2t' {d2t.shape} / 't2d' {t2d.shape} must have "
                          f"shapes ({K},) / ({V},) for draft_vocab_size {K} and vocab_size {V}.")
    ids = selected_ids(d2t)
    if (K and (ids[0] < 0 or ids[-1] >= V)) or np.any(np.diff(ids) <= 0):
        raise ConfigError(f"{source}: tensor 'd2t' does not map draft ids to strictly increasing "
                          f"target ids in [0, {V}); it is not a speculators d2t offset table.")
    mask = t2d.astype(bool)
    if int(mask.sum()) != K or not bool(np.all(mask[ids])):
        raise ConfigError(f"{source}: tensor 't2d' (sum {int(mask.sum())}) does not mark exactly "
                          f"the {K} target ids of 'd2t'; the two tensors do not belong together.")


def to_target_ids(draft_ids: jax.Array, d2t: jax.Array | None) -> jax.Array:
    """Draft ids -> target ids (``draft_id + d2t[draft_id]``); identity for None."""
    if d2t is None:
        return draft_ids
    return (draft_ids + jnp.take(d2t, draft_ids, axis=0)).astype(draft_ids.dtype)


def to_draft_ids(target_ids: jax.Array, t2d: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(draft ids, in-vocabulary mask) of target ids; ids outside the draft vocabulary
    map to 0 with mask False (their hard-label loss weight is zero). None: identity."""
    if t2d is None:
        return target_ids, jnp.ones(target_ids.shape, bool)
    mask = t2d.astype(bool)
    index = jnp.cumsum(mask.astype(jnp.int32)) - 1          # [V]: draft id of a kept id
    inside = jnp.take(mask, target_ids, axis=0)
    return jnp.where(inside, jnp.take(index, target_ids, axis=0), 0).astype(jnp.int32), inside


def scatter_to_target(x: jax.Array, d2t: jax.Array | None, vocab_size: int,
                      fill=0.0) -> jax.Array:
    """[..., K] values over the draft vocabulary -> [..., V] over the target's, ``fill``
    elsewhere (0 for probabilities, -inf for log-probabilities). None: unchanged."""
    if d2t is None:
        return x
    ids = jnp.arange(d2t.shape[0], dtype=jnp.int32) + d2t
    out = jnp.full(x.shape[:-1] + (int(vocab_size),), fill, x.dtype)
    return out.at[..., ids].set(x, unique_indices=True, indices_are_sorted=True)


__all__ = ["FIELD", "D2T", "T2D", "parse_draft_vocab_size", "select_draft_vocab",
           "selected_ids", "check_vocab_map", "to_target_ids", "to_draft_ids",
           "scatter_to_target"]
