"""A vLLM ``speculators`` directory -> our JAX dir.

    python -m convert.from_speculators --src SPECULATORS_DIR --dst JAX_DIR [--target TARGET_DIR]

Eagle3, DFlash and DSpark drafts (Qwen3 layers, full vocabulary). DFlash/DSpark files
store no embed_tokens/lm_head: ``--target`` supplies them (kept shared with the
target: load the result with ``load_draft(dst, target=...)``) and the target's depth.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from convert.speculators_format import from_speculators
from deepspec_jax import cli
from deepspec_jax.errors import DeepSpecError

FLAGS = flags.FlagValues()
flags.DEFINE_string("src", None, "speculators draft directory.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("dst", None, "JAX checkpoint directory to write.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("target", None, "The draft's target checkpoint directory.",
                    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    t0 = time.time()
    try:
        m = from_speculators(FLAGS.src, FLAGS.dst, FLAGS.target)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {FLAGS.dst}: {m['kind']} {m['architecture']}, {len(m['params'])} parameters "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
