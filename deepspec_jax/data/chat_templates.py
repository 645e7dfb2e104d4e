"""Built-in chat templates, selectable by name, for tokenizers whose own template is
missing or differs from the one the target was served with.

Each template is plain Jinja rendered through the tokenizer's ``apply_chat_template``
(so there is a single rendering path for built-in and the tokenizer's own templates),
written for text-only conversations (system/user/assistant) and rendering them exactly
like the model families' official templates do:

* ``chatml``  - ``<|im_start|>role\\n...<|im_end|>\\n``.
* ``smollm2`` - ChatML with SmolLM2's default system prompt when none is given.
* ``qwen3``   - ChatML with Qwen3's ``<think>`` handling: assistant turns after the last
  user turn carry a ``<think>\\n...\\n</think>\\n\\n`` block (empty when there is no
  reasoning); with ``enable_thinking=False`` the generation prompt already holds the
  empty block, so it is prompt, not supervised answer.
* ``gemma``   - Gemma-2/3 ``<start_of_turn>user ... <end_of_turn>`` (system text is
  prepended to the first user turn, assistant is ``model``, contents trimmed).
* ``gemma4``  - Gemma-4 ``<|turn>user ... <turn|>`` (system turn of its own; with
  thinking off the model turn opens with an empty ``<|channel>thought\\n<channel|>``).
* ``llama3``  - Llama-3 ``<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>``.
"""

from __future__ import annotations

import dataclasses
import os

from deepspec_jax.data.jsonl import DataError


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    end_of_turn: str | None           # the token closing an assistant turn (supervised)
    special_tokens: tuple[str, ...]   # must each be ONE token of the tokenizer


_CHATML_TURNS = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

CHATML = _CHATML_TURNS

SMOLLM2 = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' -}}"
    "{%- endif -%}" + _CHATML_TURNS)

QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")

GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m['content'] | trim"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}")

GEMMA4 = (
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set turns = messages[1:] -%}"
    "{{- '<|turn>system\\n' + ('<|think|>\\n' if thinking else '') + messages[0]['content'] | trim"
    " + '<turn|>\\n' -}}"
    "{%- else -%}{%- set turns = messages -%}"
    "{%- if thinking -%}{{- '<|turn>system\\n<|think|>\\n<turn|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|turn>model\\n' -}}"
    "{%- if not thinking and loop.index0 > ns.last_user -%}{{- '<|channel>thought\\n<channel|>' -}}"
    "{%- endif -%}"
    "{{- m['content'] | trim + '<turn|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|turn>' + m['role'] + '\\n' + m['content'] | trim + '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}{%- endif -%}")

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}")

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "smollm2": ChatTemplate("smollm2", SMOLLM2, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "qwen3": ChatTemplate("qwen3", QWEN3, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "gemma": ChatTemplate("gemma", GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "gemma4": ChatTemplate("gemma4", GEMMA4, "<turn|>",
                           ("<|turn>", "<turn|>", "<|channel>", "<channel|>")),
    "llama3": ChatTemplate("llama3", LLAMA3, "<|eot_id|>",
                           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


def _single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def resolve_template(tokenizer, chat_template: str | None = None) -> ChatTemplate:
    """The template to render with: a built-in by name, a ``.jinja`` file, or (None/"")
    the tokenizer's own. Errors name the known templates and the fix."""
    known = ", ".join(sorted(TEMPLATES))
    if not chat_template:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no "
                f"chat template; pass a built-in one by name (--chat_template=NAME, one of: {known}) "
                "or a .jinja file.")
        return ChatTemplate("tokenizer", own, None, ())
    if chat_template.endswith(".jinja"):
        if not os.path.exists(chat_template):
            raise DataError(f"{chat_template}: chat template file not found.")
        with open(chat_template, encoding="utf-8") as f:
            return ChatTemplate(os.path.basename(chat_template), f.read(), None, ())
    tpl = TEMPLATES.get(chat_template.lower())
    if tpl is None:
        raise DataError(f"unknown chat template {chat_template!r}; known templates: {known} "
                        "(or leave it empty for the tokenizer's own, or pass a .jinja file).")
    missing = [t for t in tpl.special_tokens if _single_token_id(tokenizer, t) is None]
    if missing:
        raise DataError(
            f"chat template {tpl.name!r} needs the special token(s) {missing}, which this tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) does not have as "
            "single tokens; the template does not belong to this model. Use the tokenizer's own "
            f"template (--chat_template=) or the matching one of: {known}.")
    return tpl
