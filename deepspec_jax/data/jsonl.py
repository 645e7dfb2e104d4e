"""Conversation JSONL reading with errors that point at ``file:line``.

A record is ``{"conversations": [{"role": ..., "content": ...}, ...]}`` (the
reference's format). Malformed lines either stop the run (default) or are reported
and skipped (``on_error="skip"``), so one bad line in a million does not waste a job.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

from deepspec_jax import atomic
from deepspec_jax.errors import ConfigError

ROLES = ("system", "user", "assistant")


class DataError(ConfigError):
    """A data file is malformed; the message names file, line and fix."""


def parse_record(line: str, where: str) -> list[dict]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                        "each line must be one JSON object.") from None
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of "
                        "{\"role\", \"content\"} messages.")
    for j, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: conversations[{j}] must have 'role' in {ROLES} and a "
                            f"string 'content' (got {str(m)[:80]}).")
    return conv


def read_conversations(path: str, on_error: str = "raise",
                       report=None) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(line_index, conversation)`` for each record (0-based line index).

    ``on_error``: "raise" stops at the first malformed line; "skip" reports it
    (through ``report(msg)``, default stderr) and continues.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found.")
    report = report or (lambda msg: print(msg, file=sys.stderr))
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, parse_record(line, f"{path}:{i + 1}")
            except DataError as e:
                if on_error == "raise":
                    raise
                report(f"skipped: {e}")


def append_jsonl(f, record: dict) -> None:
    """Append one record and flush it, so an interrupted run loses at most one line."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_user_prompts(path: str, prompts: list[str]) -> int:
    """A prompt file for ``regenerate``: one single-user-turn conversation per line,
    written atomically. Returns the number of prompts."""
    lines = [json.dumps({"conversations": [{"role": "user", "content": p}]}) for p in prompts]
    atomic.write_text(path, "\n".join(lines) + "\n")
    return len(lines)
