"""The chat training prompts (``deepspec_jax.data.chat_prompts``): readable by regenerate,
filled in completely, and nothing taken from the chat eval sets."""

from __future__ import annotations

import json
import os

from conftest import REPO
from test_code_prompts import _shingles
from deepspec_jax.data import chat_prompts
from deepspec_jax.data.jsonl import read_conversations

EVAL_DIR = os.path.join(REPO, "deepspec_jax", "assets", "eval_datasets")
CHAT_EVALS = ("mt-bench", "arena-hard-v2")


def test_prompt_file_reads_as_conversations(tmp_path):
    path = str(tmp_path / "chat.jsonl")
    n = chat_prompts.write(path)
    n_kinds = sum(len(subjects) for _, subjects in chat_prompts.KINDS)
    assert n_kinds >= 150
    n_crossed = len(chat_prompts.FRAMES) * len(chat_prompts.TOPICS)
    assert n == n_kinds + n_crossed + len(chat_prompts.FRAMES_2) * len(chat_prompts.TOPICS)
    convs = [c for _, c in read_conversations(path)]
    assert len(convs) == n
    assert all(len(c) == 1 and c[0]["role"] == "user" and c[0]["content"] for c in convs)
    texts = [c[0]["content"] for c in convs]
    assert len(set(texts)) == n                                  # no duplicate prompt
    assert not [t for t in texts if "{" in t or "}" in t]       # every slot filled
    # subject-major: the first len(KINDS) prompts are one of each kind
    assert len({t.split()[0] for t in texts[:len(chat_prompts.KINDS)]}) > 10
    # each crossed set comes after the ones before, so earlier line numbers (regenerate's
    # ids) hold
    assert texts[n_kinds:n_kinds + n_crossed] == chat_prompts.crossed()
    assert texts[n_kinds + n_crossed:] == chat_prompts.crossed(chat_prompts.FRAMES_2)


def test_no_prompt_comes_from_a_chat_eval_set():
    seen = set()
    for name in CHAT_EVALS:
        with open(os.path.join(EVAL_DIR, f"{name}.jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen |= set().union(*(_shingles(t) for t in json.loads(line)["turns"]))
    assert len(seen) > 1000, "the chat eval sets were not found"
    for text in chat_prompts.prompts():
        common = _shingles(text) & seen
        assert not common, f"{text[:60]!r} shares {common} with a chat eval set"
