"""Chat tokenisation with assistant loss masks, and the tokenisation CLI.

The draft learns to propose what the target generates after a chat prompt, so only
assistant turns are supervised: their content and the end-of-turn token that closes
them (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ...: the draft must learn to
propose it), never system/user text, role headers or the generation prompt (e.g. the
empty ``<think>\\n\\n</think>\\n\\n`` Qwen3 puts in the prompt when thinking is off).

How the mask is found, for any Jinja template: the conversation is rendered once and
tokenised once with character offsets. An assistant turn's supervised text starts
where the template's generation prompt for the turns before it ends (rendering
``messages[:i]`` with ``add_generation_prompt=True`` is a prefix of the full text for
well-behaved templates; otherwise the header shared with the generation prompt is
skipped) and ends after the answer text, located verbatim in the render; the special
token right after it is the end of turn. Tokens overlapping those character spans are
supervised. Because the token ids come from tokenising the rendered text, they equal
the template's own ``tokenize=True`` output (checked by ``ChatTokenizer.verify``).

    python -m deepspec_jax.data.tokenize --input=answers.jsonl --output=data/tokens \\
        --target=smollm2-135m --max_length=2048
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags
from tqdm import tqdm

from deepspec_jax import cli
from deepspec_jax.data.chat_templates import ChatTemplate, resolve_template
from deepspec_jax.data.jsonl import DataError, read_conversations
from deepspec_jax.data.token_store import TokenStoreWriter
from deepspec_jax.errors import ConfigError
from deepspec_jax.target import DEFAULT_TARGET, resolve_target_path
from deepspec_jax.weights.gguf_loader import gguf_tokenizer

FLAGS = flags.FlagValues()
flags.DEFINE_list("input", None, "Answer JSONL files ({'conversations': [...]} per line).",
                  flag_values=FLAGS, required=True)
flags.DEFINE_string("output", None, "Token store directory (written atomically).",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("target", DEFAULT_TARGET, "Tokenizer source: 'smollm2-135m', a .gguf file "
                    "or an HF model directory (weights are not loaded).", flag_values=FLAGS)
flags.DEFINE_integer("max_length", 2048, "Samples are truncated to this many tokens.",
                     flag_values=FLAGS)
flags.DEFINE_string("chat_template", "", "Empty: the tokenizer's own; or one of chatml, smollm2, "
                    "qwen3, gemma, gemma4, llama3; or a .jinja file.", flag_values=FLAGS)
flags.DEFINE_boolean("thinking", False, "Pass enable_thinking=True to the chat template.",
                     flag_values=FLAGS)
flags.DEFINE_enum("on_error", "skip", ["skip", "raise"], "Malformed lines / unrenderable "
                  "samples: report with file:line and skip, or stop.", flag_values=FLAGS)
flags.DEFINE_integer("min_loss_tokens", 1, "Drop samples with fewer supervised tokens.",
                     flag_values=FLAGS)
flags.DEFINE_boolean("overwrite", False, "Replace an existing token store at --output.",
                     flag_values=FLAGS)

_THOUGHT_ENDS = ("</think>", "<channel|>")


def _answer_text(content: str) -> str:
    """The part of an assistant message every template renders verbatim (up to
    surrounding whitespace): the answer after any reasoning block."""
    for sep in _THOUGHT_ENDS:
        if sep in content:
            content = content.split(sep)[-1]
    return content.strip()


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatTokenizer:
    """Renders and tokenises conversations with one template; reuse it for many samples
    (the template and the tokenizer's special tokens are resolved once)."""

    def __init__(self, tokenizer, chat_template: str | ChatTemplate | None = None,
                 thinking: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{type(tokenizer).__name__}: a fast (Rust `tokenizers`) tokenizer is needed "
                            "for character offsets; load it with AutoTokenizer(..., use_fast=True).")
        self.tokenizer = tokenizer
        self.template = (chat_template if isinstance(chat_template, ChatTemplate)
                         else resolve_template(tokenizer, chat_template))
        self.thinking = bool(thinking)
        special = set(int(i) for i in tokenizer.all_special_ids)
        for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(tok, "special", False):
                special.add(int(i))
        self._special = frozenset(special)

    # -- rendering ---------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template.jinja, tokenize=False,
                add_generation_prompt=add_generation_prompt, enable_thinking=self.thinking)
        except Exception as e:  # jinja raise_exception / undefined fields
            raise DataError(f"{where or 'conversation'}: chat template {self.template.name!r} failed to "
                            f"render it ({type(e).__name__}: {e}); check the roles/order of its "
                            "messages or choose another --chat_template.") from None

    def _answer_spans(self, conv: list[dict], text: str, where: str) -> list[tuple[int, int, int]]:
        """Per assistant turn: (start, answer_end, message_index) character positions."""
        spans = []
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            gen = self.render(conv[:i], True, where)
            if text.startswith(gen):
                start = lo = len(gen)
            else:  # the template renders earlier turns differently with a generation prompt
                base = self.render(conv[:i], False, where)
                if not text.startswith(base):
                    raise DataError(
                        f"{where or 'conversation'}: chat template {self.template.name!r} renders the turns "
                        f"before message {i} differently once the conversation goes on, so the assistant "
                        "turn cannot be located; use a built-in template (--chat_template=NAME).")
                lo = len(base)
                start = lo + _common_prefix_len(text[lo:], gen[lo:])  # header shared with the prompt
            answer = _answer_text(m["content"])
            if not answer:
                spans.append((start, start, i))
                continue
            pos = text.find(answer, lo)
            while pos >= 0 and pos + len(answer) <= start:  # an occurrence inside the header
                pos = text.find(answer, pos + 1)
            if pos < 0:
                raise DataError(
                    f"{where or 'conversation'}: the content of message {i} (assistant) does not appear "
                    f"verbatim in the text rendered by chat template {self.template.name!r}; the "
                    "template rewrites it, so its loss mask cannot be located. Use a built-in template "
                    "(--chat_template=NAME).")
            spans.append((min(start, pos), pos + len(answer), i))
        return spans

    # -- tokenisation ------------------------------------------------------------------
    def __call__(self, conversation: list[dict], max_length: int, *, where: str = "",
                 supervise_last_end: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32 [L], loss_mask uint8 [L])``, ``L <= max_length``.

        ``supervise_last_end=False`` leaves the final assistant turn's end-of-turn token
        unsupervised (an answer cut at the generation limit never ended there)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        text = self.render(conversation, False, where)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        starts = offs[:, 0].tolist()
        mask = np.zeros(len(ids), np.uint8)
        spans = self._answer_spans(conversation, text, where)
        last_assistant = spans[-1][2] if spans else -1
        for start, end, i in spans:
            if i != last_assistant or supervise_last_end:
                end = self._with_end_of_turn(text, end, ids, offs, starts)
            hit = (offs[:, 0] < end) & (offs[:, 1] > start) & (offs[:, 1] > offs[:, 0])
            mask[hit] = 1
        return ids[:max_length], mask[:max_length]

    def _with_end_of_turn(self, text, end, ids, offs, starts) -> int:
        """``end`` extended over trailing whitespace and the end-of-turn token that follows,
        or unchanged when no end-of-turn token follows the answer."""
        e = end
        while e < len(text) and text[e].isspace():
            e += 1
        t = bisect.bisect_left(starts, e)
        if t >= len(ids) or starts[t] != e:
            return end
        eot = self.template.end_of_turn
        is_eot = (text.startswith(eot, e) and int(offs[t, 1]) == e + len(eot)) if eot \
            else int(ids[t]) in self._special
        return int(offs[t, 1]) if is_eot else end

    def verify(self, conversation: list[dict], where: str = "") -> None:
        """Tokenising the rendered text must equal the template's own ``tokenize=True``
        output (else e.g. a BOS is doubled or dropped); raises ConfigError otherwise."""
        mine = self.tokenizer(self.render(conversation, False, where), add_special_tokens=False)["input_ids"]
        theirs = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.template.jinja, tokenize=True, return_dict=False,
            add_generation_prompt=False, enable_thinking=self.thinking)
        if list(mine) != list(theirs):  # a setup error, not a bad sample: never skipped
            raise ConfigError(f"{where or 'conversation'}: tokenising the rendered chat text gives "
                            f"{len(mine)} tokens but the template's own tokenisation gives {len(theirs)}; "
                            f"chat template {self.template.name!r} does not fit this tokenizer.")


def tokenize_conversation(tokenizer, conversation: list[dict], *, max_length: int,
                          chat_template: str | ChatTemplate | None = None,
                          thinking: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 [L], loss_mask uint8 [L])`` of one conversation, truncated to
    ``max_length``; ``loss_mask`` is 1 on assistant content and its end-of-turn token.
    ``chat_template``: None = the tokenizer's own, or a name from
    ``deepspec_jax.data.chat_templates.TEMPLATES``. Use ``ChatTokenizer`` for many samples."""
    return ChatTokenizer(tokenizer, chat_template, thinking)(conversation, max_length)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def load_tokenizer(target: str | None):
    """The target's tokenizer without loading its weights: a name of ``NAMED_TARGETS``
    or None (the embedded GGUF), a ``.gguf`` file, or an HF directory with tokenizer files."""
    target = resolve_target_path(target)
    if target.endswith(".gguf"):
        if not os.path.exists(target):
            raise DataError(f"{target}: GGUF file not found (--target).")
        return gguf_tokenizer(target)
    if os.path.isdir(target):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any(os.path.exists(os.path.join(target, n)) for n in names):
            raise DataError(f"{target}: no tokenizer files ({', '.join(names)}) in this directory (--target).")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target)
    raise DataError(f"{target}: --target must be 'smollm2-135m', a .gguf file or an HF model "
                    "directory with tokenizer files.")


def _records(path: str, on_error: str, report):
    """``(line_index, conversation, finish_reason)``: conversations validated by
    ``read_conversations``; the finish reason is read from the same line."""
    with open(path, encoding="utf-8") as raw:
        line_no, line = -1, ""
        for i, conv in read_conversations(path, on_error, report):
            while line_no < i:
                line, line_no = raw.readline(), line_no + 1
            try:
                finish = json.loads(line).get("finish_reason")
            except (json.JSONDecodeError, AttributeError):
                finish = None
            yield i, conv, finish


def tokenize_files(inputs: list[str], output: str, tokenizer, *, max_length: int,
                   chat_template: str | None = None, thinking: bool = False,
                   on_error: str = "raise", min_loss_tokens: int = 1, target_name: str = "",
                   overwrite: bool = False, report=None, progress: bool = True) -> dict:
    """Tokenise answer JSONL files into a token store at ``output``; returns counts.

    Records cut at the generation limit (``finish_reason == "length"``) keep their last
    end-of-turn token unsupervised; samples with fewer than ``min_loss_tokens``
    supervised tokens after truncation are dropped and counted."""
    report = report or (lambda msg: tqdm.write(msg, file=sys.stderr))
    chat = ChatTokenizer(tokenizer, chat_template, thinking)
    counts = {"samples": 0, "dropped_no_loss": 0, "skipped_errors": 0}

    def count_skip(msg):
        counts["skipped_errors"] += 1
        report(msg)

    writer = TokenStoreWriter(output, max_length=max_length, target=target_name,
                              chat_template=chat.template.name, sources=list(inputs),
                              thinking=thinking, overwrite=overwrite)
    verified = False
    with writer, tqdm(desc="tokenize", unit="sample", disable=not progress) as bar:
        for path in inputs:
            for i, conv, finish in _records(path, on_error, count_skip):
                where = f"{path}:{i + 1}"
                try:
                    if not verified:
                        chat.verify(conv, where)
                        verified = True
                    ids, mask = chat(conv, max_length, where=where,
                                     supervise_last_end=finish != "length")
                except DataError as e:
                    if on_error == "raise":
                        raise
                    count_skip(f"skipped: {e}")
                    continue
                bar.update(1)
                if int(mask.sum()) < max(1, min_loss_tokens):
                    counts["dropped_no_loss"] += 1
                    continue
                writer.add(ids, mask)
                counts["samples"] += 1
    counts.update(num_tokens=writer.num_tokens, num_supervised=writer.num_supervised)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    F = cli.parse(FLAGS, argv, __doc__)
    try:
        tok = load_tokenizer(F.target)
        counts = tokenize_files(F.input, F.output, tok, max_length=F.max_length,
                                chat_template=F.chat_template or None, thinking=F.thinking,
                                on_error=F.on_error, min_loss_tokens=F.min_loss_tokens,
                                target_name=F.target, overwrite=F.overwrite)
    except ConfigError as e:  # DataError included: a clear one-line message, no traceback
        print(f"error: tokenize: {e}", file=sys.stderr)
        return 1
    print(f"tokenize: wrote {counts['samples']} samples ({counts['num_tokens']} tokens, "
          f"{counts['num_supervised']} supervised) to {F.output}; dropped {counts['dropped_no_loss']} "
          f"with < {max(1, F.min_loss_tokens)} supervised tokens, skipped {counts['skipped_errors']} "
          "malformed.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
