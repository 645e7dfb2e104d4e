"""Evaluation prompt sets: which datasets exist, how many samples each, and which rows.

Row selection mirrors the reference exactly so that numbers are comparable: the first
user turn of every row, and, when a dataset holds more rows than requested, the first
``n`` rows after ``random.Random(seed).shuffle`` (Python's Mersenne Twister, the same
generator the reference uses), otherwise all rows in file order.

Besides the shipped names, a dataset may be a path to a ``.jsonl`` file. Its rows may
carry ``"prompt_ids"`` (token ids used as the prompt verbatim, bypassing the chat
template) -- the way to evaluate targets that have no tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Sequence

from deepspec_jax.errors import DeepSpecError

DATASET_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "assets", "eval_datasets")

# The reference's default task list and per-dataset sample counts, in its order.
REFERENCE_TASKS: tuple[tuple[str, int], ...] = (
    ("gsm8k", 500),
    ("math500", 500),
    ("aime25", 30),
    ("humaneval", 164),
    ("mbpp", 256),
    ("livecodebench", 500),
    ("mt-bench", 80),
    ("alpaca", 500),
    ("arena-hard-v2", 500),
)
DEFAULT_COUNTS = dict(REFERENCE_TASKS)

# In the reference list but not shipped with this project (no redistributable copy).
UNAVAILABLE = {
    "alpaca": "alpaca is in the reference's default list but its prompt file is not "
              "available in this project",
}

# The no-flag demo: one math, one code and one chat set.
QUICK_DATASETS = ("gsm8k", "humaneval", "mt-bench")


class DatasetError(DeepSpecError, ValueError):
    """A dataset name, file or row is unusable (the message names it and the fix)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: its row index in the file, the first user turn (text) and,
    for token-id datasets, the ids to use verbatim."""

    index: int
    text: str | None
    prompt_ids: tuple[int, ...] | None = None


def shipped_datasets() -> list[str]:
    """Names of the prompt files shipped under ``assets/eval_datasets``."""
    if not os.path.isdir(DATASET_ROOT):
        return []
    return sorted(f[:-len(".jsonl")] for f in os.listdir(DATASET_ROOT) if f.endswith(".jsonl"))


def _is_path(name: str) -> bool:
    return name.endswith(".jsonl") or os.sep in name


def dataset_label(name: str) -> str:
    """Display/output-directory name: the shipped name, or a file's stem."""
    return os.path.splitext(os.path.basename(name))[0] if _is_path(name) else name


def resolve_datasets(spec: str | Sequence[str] | None, *,
                     default: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Parse ``--datasets`` into (names to run, notes to print).

    ``spec`` None/empty means ``default`` (the reference list when None); unavailable
    datasets in a default list are skipped with a note, while naming one explicitly,
    or naming an unknown dataset, is an error that lists the valid names."""
    explicit = bool(spec)
    if not spec:
        names = list(default) if default is not None else [n for n, _ in REFERENCE_TASKS]
    elif isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in spec if str(s).strip()]
    shipped = set(shipped_datasets())
    out, notes = [], []
    for name in names:
        if name in UNAVAILABLE:
            if explicit:
                raise DatasetError(f"--datasets: {UNAVAILABLE[name]}; choose from "
                                   f"{', '.join(sorted(shipped))} (or a .jsonl path).")
            notes.append(f"note: skipping {name}: {UNAVAILABLE[name]}.")
            continue
        if _is_path(name):
            if not os.path.isfile(name):
                raise DatasetError(f"--datasets: {name}: no such file.")
        elif name not in shipped:
            raise DatasetError(f"--datasets: unknown dataset {name!r}; valid: "
                               f"{', '.join(sorted(shipped))} (or a path to a .jsonl file).")
        if name in out:
            raise DatasetError(f"--datasets: {name!r} is listed twice.")
        out.append(name)
    if not out:
        raise DatasetError("--datasets: nothing to evaluate; name at least one of "
                           f"{', '.join(sorted(shipped))}.")
    return out, notes


def default_count(name: str) -> int | None:
    """Reference sample count for ``name``; None (all rows) for sets outside its list."""
    return DEFAULT_COUNTS.get(name)


def _path_of(name: str) -> str:
    return name if _is_path(name) else os.path.join(DATASET_ROOT, f"{name}.jsonl")


def load_rows(name: str) -> list[Prompt]:
    """All rows of a dataset as Prompts (first user turn only), validated line by line."""
    path = _path_of(name)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: dataset file not found.")
    rows: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object with a 'turns' list.")
            ids = row.get("prompt_ids")
            if ids is not None:
                if (not isinstance(ids, list) or not ids
                        or not all(isinstance(t, int) and t >= 0 for t in ids)):
                    raise DatasetError(f"{where}: 'prompt_ids' must be a non-empty list of "
                                       "non-negative token ids.")
                ids = tuple(ids)
            turns = row.get("turns")
            text = None
            if turns is not None or ids is None:
                if (not isinstance(turns, list) or not turns
                        or not all(isinstance(t, str) for t in turns)):
                    raise DatasetError(f"{where}: field 'turns' must be a non-empty list of "
                                       "strings (or give 'prompt_ids').")
                text = turns[0]
            rows.append(Prompt(len(rows), text, ids))
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows.")
    return rows


def sample_rows(rows: Sequence[Prompt], max_samples: int | None, seed: int) -> list[Prompt]:
    """The reference's selection: all rows if there are at most ``max_samples``, else the
    first ``max_samples`` after a ``random.Random(seed)`` shuffle."""
    rows = list(rows)
    if max_samples is None or len(rows) <= max_samples:
        return rows
    random.Random(int(seed)).shuffle(rows)
    return rows[:max_samples]


def load_prompts(name: str, max_samples: int | None, seed: int) -> list[Prompt]:
    """Rows to evaluate for ``name``: ``max_samples`` (None = the reference's count for
    the dataset) drawn with ``seed``."""
    count = max_samples if max_samples is not None else default_count(name)
    return sample_rows(load_rows(name), count, seed)
