"""Plain autoregressive generation from the command line (the speculative-decoding
baseline): ``python -m deepspec_jax.generate --prompt "..."``.

With no flags it chats with the embedded default target (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from deepspec_jax import cli
from deepspec_jax.target import load_target

FLAGS = flags.FlagValues()
flags.DEFINE_string("target", None, "HF model dir, .gguf file or 'smollm2-135m' (default: embedded SmolLM2).",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", ["What is the capital of France? Answer in one sentence.",
                                     "Write a haiku about the sea."], "User message(s); one chat prompt each.",
                          flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "0 = off.", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "1 = off.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute/parameter dtype.",
                  flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    t0 = time.perf_counter()
    target = load_target(FLAGS.target, dtype=FLAGS.dtype)
    print(f"loaded {target.source} ({target.config.model_type}, {target.config.num_hidden_layers} layers) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompts = [target.apply_chat_template(p) for p in FLAGS.prompt]
    t0 = time.perf_counter()
    outs = target.generate(prompts, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.seed,
                           FLAGS.top_k, FLAGS.top_p)
    dt = time.perf_counter() - t0
    for p, o in zip(FLAGS.prompt, outs):
        print(f"### {p}\n{target.tokenizer.decode(o, skip_special_tokens=True)}\n")
    n = sum(len(o) for o in outs)
    print(f"{n} tokens in {dt:.1f}s including compilation", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
