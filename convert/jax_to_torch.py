"""JAX dir -> HF/PyTorch checkpoint directory, as DeepSpec's save_pretrained writes it.

    python -m convert.jax_to_torch --src JAX_DIR --dst HF_DIR [--max_shard_size 5GB]

Tensors come back in the dtypes recorded at conversion; above ``--max_shard_size``
the weights are split into numbered shards plus model.safetensors.index.json.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from convert.common import DEFAULT_MAX_SHARD_SIZE, jax_to_hf
from deepspec_jax import cli
from deepspec_jax.errors import DeepSpecError

FLAGS = flags.FlagValues()
flags.DEFINE_string("src", None, "JAX checkpoint directory (with deepspec_jax.json).",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("dst", None, "HF checkpoint directory to write.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("max_shard_size", DEFAULT_MAX_SHARD_SIZE,
                    "Largest safetensors shard, e.g. 5GB, 500MB, 2GiB or bytes.",
                    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    cli.parse(FLAGS, argv, __doc__)
    t0 = time.time()
    try:
        files = jax_to_hf(FLAGS.src, FLAGS.dst, FLAGS.max_shard_size)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {FLAGS.dst}: {', '.join(files)} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
