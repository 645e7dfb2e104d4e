"""The code training prompts (``deepspec_jax.data.code_prompts`` and the crossed
``code_families``): readable by regenerate, every doctest in them true, and nothing taken
from the code eval sets."""

from __future__ import annotations

import ast
import doctest
import json
import os
import re

import pytest

from conftest import REPO
from deepspec_jax.data import code_families, code_prompts
from deepspec_jax.data.jsonl import read_conversations

EVAL_DIR = os.path.join(REPO, "deepspec_jax", "assets", "eval_datasets")
CODE_EVALS = ("humaneval", "mbpp", "lbpp", "livecodebench")


def _eval_texts() -> list[str]:
    out = []
    for name in CODE_EVALS:
        with open(os.path.join(EVAL_DIR, f"{name}.jsonl"), encoding="utf-8") as f:
            out += [t for line in f if line.strip() for t in json.loads(line)["turns"]]
    assert len(out) > 1000, "the code eval sets were not found"
    return out


def _shingles(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_prompt_file_reads_as_conversations(tmp_path):
    path = str(tmp_path / "code.jsonl")
    n = code_prompts.write(path)
    assert n == 3 * (len(code_prompts.TASKS) + len(code_prompts.DESCRIBED)) >= 500
    convs = [c for _, c in read_conversations(path)]
    assert len(convs) == n
    assert all(len(c) == 1 and c[0]["role"] == "user" and c[0]["content"] for c in convs)
    assert len({c[0]["content"] for c in convs}) == n          # no duplicate prompt
    names = [t.name for t in code_prompts.TASKS + code_prompts.DESCRIBED]
    assert len(set(names)) == len(names)


TASK_SETS = {"written": code_prompts.TASKS, "families": code_families.family_tasks()}


@pytest.mark.parametrize("which", sorted(TASK_SETS))
def test_doctests_in_the_stubs_hold(which):
    """Each stub's doctests, run against the task's reference implementation, pass: no
    prompt shows a wrong expected value."""
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(verbose=False)
    for task in TASK_SETS[which]:
        text = "\n".join(code_prompts.doctest_lines(task))
        assert text in code_prompts.stub(task)
        examples = parser.get_examples(text)
        assert len(examples) == len(task.examples), task.name
        test = doctest.DocTest(examples, {task.name: task.impl}, task.name, None, 0, text)
        result = runner.run(test, out=lambda s: None)
        assert result.failed == 0, f"{task.name}: a doctest in its prompt is wrong"


@pytest.mark.parametrize("which", ["written", "families"])
def test_no_task_comes_from_a_code_eval_set(which):
    texts = _eval_texts()
    eval_names = set(re.findall(r"(?:def|class)\s+([A-Za-z_]\w*)\s*[(:]", "\n".join(texts)))
    tasks = (code_prompts.TASKS + code_prompts.DESCRIBED if which == "written"
             else TASK_SETS["families"])
    clash = sorted(t.name for t in tasks if t.name in eval_names)
    assert not clash, f"function names also defined in {CODE_EVALS}: {clash}"
    seen = set().union(*(_shingles(t) for t in texts))
    for task in tasks:
        common = _shingles(task.does) & seen
        assert not common, f"{task.name}: its description shares {common} with an eval set"


def test_family_prompt_file_is_new_tasks_in_three_phrasings(tmp_path):
    """The crossed set: every task once per phrasing, no prompt repeated, and no function
    name shared with the written set (a prompt file of both never asks twice)."""
    path = str(tmp_path / "families.jsonl")
    tasks = TASK_SETS["families"]
    assert code_families.write(path) == 3 * len(tasks) >= 450
    texts = [c[0]["content"] for _, c in read_conversations(path)]
    assert len(set(texts)) == len(texts)
    names = [t.name for t in tasks]
    assert len(set(names)) == len(names)
    assert not set(names) & {t.name for t in code_prompts.TASKS + code_prompts.DESCRIBED}
    assert texts[0] == code_prompts.stub(tasks[0])
    assert texts[len(tasks)].startswith(f"Write a Python function `{tasks[0].name}(")


def test_described_tasks_read_as_stubs_requests_and_explanations():
    """A task given in words only becomes a stub without doctests (a class stub for a
    class), a one-line request and a request with an explanation."""
    fn = next(t for t in code_prompts.DESCRIBED if t.name == "slugify")
    cls = next(t for t in code_prompts.DESCRIBED if t.name == "LRUCache")
    assert "def slugify(title: str) -> str:" in code_prompts.described_stub(fn)
    assert ">>>" not in code_prompts.described_stub(fn)
    assert "class LRUCache:" in code_prompts.described_stub(cls)
    assert "def __init__(self, capacity: int):" in code_prompts.described_stub(cls)
    assert code_prompts.described_request(cls).startswith("Write a Python class `LRUCache`")
    assert "slugify(title: str)" in code_prompts.described_explain(fn)
    prompts = code_prompts.prompts()
    for text in (code_prompts.described_stub(cls), code_prompts.described_request(fn),
                 code_prompts.described_explain(cls)):
        assert text in prompts


def test_word_problems_become_code_prompts(tmp_path):
    """A math prompt file turns into one code prompt per problem, stub and request
    alternately, without the math answer's instruction; each stub is valid Python."""
    src = tmp_path / "problems.jsonl"
    problems = ["Tom has 3 apples and buys 4 more bags of 6 apples each, then gives away "
                "half of all his apples to his sister. How many apples does Tom keep?",
                "A bus carries 40 people. How many buses carry 200 people?",
                "Mia reads 12 pages a day. How many days does a 96-page book take?"]
    suffix = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    src.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": p + suffix}]})
                           + "\n" for p in problems))
    out = str(tmp_path / "code.jsonl")
    assert code_prompts.write(out, word_problems=str(src)) == 3
    texts = [c[0]["content"] for _, c in read_conversations(out)]
    assert not [t for t in texts if "Please reason" in t or "boxed" in t]
    assert texts[1] == code_prompts.WORD_PROBLEM_REQUEST.format(question=problems[1])
    for i in (0, 2):
        code = texts[i].split("```python\n", 1)[1].rsplit("```", 1)[0]
        fn = ast.parse(code).body[0]
        assert fn.name == "solution"
        assert " ".join(ast.get_docstring(fn).split()).startswith(" ".join(problems[i].split()))
