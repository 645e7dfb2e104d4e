"""Our draft (DeepSpec HF dir or JAX dir) -> a vLLM ``speculators`` directory.

    python -m convert.to_speculators --src DRAFT --dst OUT [--target TARGET_DIR]
        [--verifier_name_or_path Qwen/Qwen3-4B] [--dtype keep|float32|bfloat16]

Eagle3, DFlash and DSpark drafts with Qwen3 layers. The output loads with
speculators' own classes (``SpeculatorModel.from_pretrained``) and in vLLM.
``--target`` checks the draft against its target (DFlash/DSpark files omit
embed_tokens/lm_head, which must then be the target's), supplies them to JAX dirs
saved with share_with_target, and is recorded as the verifier.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from convert.common import dtype_choices
from convert.speculators_format import to_speculators
from deepspec_jax import cli
from deepspec_jax.errors import DeepSpecError

FLAGS = flags.FlagValues()
flags.DEFINE_string("src", None, "Draft: DeepSpec HF directory or JAX dir.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("dst", None, "speculators directory to write.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("target", None, "The draft's target checkpoint directory (recommended).",
                    flag_values=FLAGS)
flags.DEFINE_string("verifier_name_or_path", None,
                    "Verifier name written into the config (default: --target, else the "
                    "draft's target_model_name_or_path), e.g. a Hugging Face id.",
                    flag_values=FLAGS)
flags.DEFINE_enum("dtype", "keep", dtype_choices(),
                  "keep: every tensor in its stored dtype (default); else cast the floating ones.",
                  flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    t0 = time.time()
    try:
        files = to_speculators(FLAGS.src, FLAGS.dst, FLAGS.target, FLAGS.verifier_name_or_path,
                               FLAGS.dtype)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {FLAGS.dst}: {', '.join(files)} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
