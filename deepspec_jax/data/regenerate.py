"""Regenerate the assistant answers of a prompt set with the target itself.

Drafts learn to imitate the target, so training answers should be the target's own
(the reference regenerates them too). Runs our JAX target (batched, on device) or any
OpenAI-compatible endpoint (``--endpoint``). Resumable: records are appended and
flushed one by one with an ``id`` of ``<prompt file>:<line>``; a restart skips every
id already in the output or the errors file and drops a torn last line.

    python -m deepspec_jax.data.regenerate --prompts=../shared/train_prompts/gsm8k_train.jsonl \
        --output=data/smollm2/answers.jsonl --max_samples=400 --temperature=0.2 --top_p=0.9
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import urllib.request
import zlib
from typing import Sequence

from absl import flags
from tqdm import tqdm

from deepspec_jax import cli
from deepspec_jax.data.jsonl import append_jsonl, read_conversations
from deepspec_jax.target import DEFAULT_TARGET, load_target

FLAGS = flags.FlagValues()
flags.DEFINE_list("prompts", None, "Prompt JSONL files ({'conversations': [...]} per line).",
                  flag_values=FLAGS, required=True)
flags.DEFINE_string("output", None, "Output JSONL (appended; resumable).",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("errors", None, "Errors JSONL (default: <output>.errors.jsonl).",
                    flag_values=FLAGS)
flags.DEFINE_string("target", DEFAULT_TARGET, "Target: HF dir, .gguf file or 'smollm2-135m'.",
                    flag_values=FLAGS)
flags.DEFINE_string("dtype", "float32", "Target compute dtype.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "Prompts generated together.", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 512, "Answer length limit (tokens).", flag_values=FLAGS)
flags.DEFINE_integer("max_prompt_tokens", 1024, "Longer prompts are written to the errors file.",
                     flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; use the target's recommended value "
                   "(SmolLM2: 0.2, Qwen3 thinking: 0.6, non-thinking: 0.7).", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling (SmolLM2: 0.9, Qwen3: 0.95 / 0.8).",
                   flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "Top-k sampling, 0 = off (Qwen3: 20).", flag_values=FLAGS)
flags.DEFINE_boolean("thinking", False, "Pass enable_thinking to the chat template.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_samples", 0, "Stop after this many prompts per file (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_boolean("interleave", False, "Take prompts from the --prompts files in turn (one "
                     "from each) instead of file after file, so a run stopped early holds a "
                     "mix of all of them.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Sampling seed (each batch derives its own).", flag_values=FLAGS)
flags.DEFINE_enum("on_error", "skip", ["skip", "raise"], "Malformed prompt lines: report and skip, or stop.",
                  flag_values=FLAGS)
flags.DEFINE_string("endpoint", None, "OpenAI-compatible base URL (e.g. http://host:8000/v1); "
                    "if set, the JAX target is not loaded.", flag_values=FLAGS)
flags.DEFINE_string("model_name", None, "Model name sent to --endpoint.", flag_values=FLAGS)
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the endpoint key.",
                    flag_values=FLAGS)
flags.DEFINE_integer("concurrency", 8, "Parallel requests to --endpoint.", flag_values=FLAGS)


def prompt_messages(conv: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant answer."""
    end = len(conv)
    while end and conv[end - 1]["role"] == "assistant":
        end -= 1
    return conv[:end]


def done_ids(*paths: str) -> set[str]:
    """Ids already written; a torn (unterminated) last line is removed from the file."""
    ids = set()
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids


def file_items(path, skip: set[str], max_samples: int, on_error: str, report):
    taken = 0
    for i, conv in read_conversations(path, on_error, report):
        if max_samples and taken >= max_samples:
            break
        taken += 1
        rid = f"{os.path.basename(path)}:{i + 1}"
        msgs = prompt_messages(conv)
        if rid in skip:
            continue
        if not msgs or msgs[-1]["role"] != "user":
            report(f"skipped {path}:{i + 1}: the conversation has no user turn to answer.")
            continue
        yield rid, msgs


def pending_items(paths, skip: set[str], max_samples: int, on_error: str, report,
                  interleave: bool = False):
    """(id, messages) still to answer: file after file, or one from each file in turn."""
    streams = [file_items(p, skip, max_samples, on_error, report) for p in paths]
    if not interleave:
        for stream in streams:
            yield from stream
        return
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


class JaxGenerator:
    def __init__(self, target):
        self.target = target

    def __call__(self, batch, seed):
        tok = self.target.tokenizer
        ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                            return_dict=False, enable_thinking=FLAGS.thinking))
               for _, m in batch]
        results = [None] * len(batch)
        keep = []
        for j, x in enumerate(ids):
            if len(x) > FLAGS.max_prompt_tokens:
                results[j] = ValueError(f"prompt has {len(x)} tokens > --max_prompt_tokens="
                                        f"{FLAGS.max_prompt_tokens}")
                continue
            try:  # over the context: recorded for this prompt alone, not its whole batch
                self.target.check_context([len(x)], FLAGS.max_new_tokens, names=["prompt"])
            except ValueError as e:
                results[j] = e
                continue
            keep.append(j)
        if keep:
            outs = self.target.generate([ids[j] for j in keep], FLAGS.max_new_tokens,
                                        FLAGS.temperature, seed, FLAGS.top_k, FLAGS.top_p,
                                        prompt_bucket=128, cache_bucket=256)
            stops = set(self.target.stop_token_ids)
            for j, out in zip(keep, outs):
                finished = bool(out) and out[-1] in stops
                body = out[:-1] if finished else out
                results[j] = (tok.decode(body, skip_special_tokens=True),
                              "stop" if finished else "length", len(body))
        return results


class EndpointGenerator:
    def __init__(self, url: str, model: str | None, key: str | None):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, key

    def one(self, msgs, seed):
        body = {"model": self.model, "messages": msgs, "max_tokens": FLAGS.max_new_tokens,
                "temperature": FLAGS.temperature, "top_p": FLAGS.top_p, "seed": seed}
        if FLAGS.top_k:
            body["top_k"] = FLAGS.top_k
        req = urllib.request.Request(self.url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
            ch = out["choices"][0]
            return (ch["message"]["content"], ch.get("finish_reason", "stop"),
                    out.get("usage", {}).get("completion_tokens", -1))
        except Exception as e:  # recorded in the errors file, the run goes on
            return e

    def __call__(self, batch, seed):
        with concurrent.futures.ThreadPoolExecutor(FLAGS.concurrency) as ex:
            return list(ex.map(lambda a: self.one(a[1][1], seed + a[0]), enumerate(batch)))


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    errors = FLAGS.errors or FLAGS.output + ".errors.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    skip = done_ids(FLAGS.output, errors)
    report = lambda msg: tqdm.write(msg, file=sys.stderr)
    items = list(pending_items(FLAGS.prompts, skip, FLAGS.max_samples, FLAGS.on_error, report,
                               FLAGS.interleave))
    print(f"regenerate: {len(skip)} already done, {len(items)} to go -> {FLAGS.output}", flush=True)
    if not items:
        return 0
    if FLAGS.endpoint:
        gen = EndpointGenerator(FLAGS.endpoint, FLAGS.model_name, os.environ.get(FLAGS.api_key_env))
    else:
        gen = JaxGenerator(load_target(FLAGS.target, dtype=FLAGS.dtype))
    bs = FLAGS.batch_size
    with open(FLAGS.output, "a", encoding="utf-8") as out, open(errors, "a", encoding="utf-8") as err, \
            tqdm(total=len(items), unit="prompt", desc="regenerate") as bar:
        for start in range(0, len(items), bs):
            batch = items[start:start + bs]
            seed = FLAGS.seed * 1_000_003 + zlib.crc32(batch[0][0].encode()) % 1_000_003
            try:
                results = gen(batch, seed)
            except Exception as e:  # a failing batch is recorded, the run goes on
                results = [e] * len(batch)
            ntok = 0
            for (rid, msgs), res in zip(batch, results):
                if isinstance(res, Exception):
                    append_jsonl(err, {"id": rid, "error": f"{type(res).__name__}: {res}"})
                    continue
                text, finish, n = res
                ntok += max(n, 0)
                append_jsonl(out, {"id": rid, "conversations": msgs + [{"role": "assistant", "content": text}],
                                   "finish_reason": finish, "num_tokens": n})
            bar.update(len(batch))
            bar.set_postfix(tokens=ntok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
