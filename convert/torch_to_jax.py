"""HF/PyTorch checkpoint directory -> JAX dir (config.json + orbax params + manifest).

    python -m convert.torch_to_jax --src HF_DIR --dst JAX_DIR [--dtype keep|float32|bfloat16]

Reads only safetensors and JSON (never pickles). Drafts of every registered
architecture and llama/qwen3 targets are recognised from config.json.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from convert.common import dtype_choices, hf_to_jax
from deepspec_jax import cli
from deepspec_jax.errors import DeepSpecError

FLAGS = flags.FlagValues()
flags.DEFINE_string("src", None, "HF checkpoint directory (config.json + safetensors).",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("dst", None, "JAX checkpoint directory to write.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_enum("dtype", "keep", dtype_choices(),
                  "keep: every tensor in its stored dtype (default); else cast all.",
                  flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    t0 = time.time()
    try:
        m = hf_to_jax(FLAGS.src, FLAGS.dst, FLAGS.dtype)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dts = sorted({p["dtype"] for p in m["params"].values()})
    print(f"wrote {FLAGS.dst}: {m['kind']} {m['architecture']}, {len(m['params'])} parameters "
          f"({', '.join(dts)}) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
