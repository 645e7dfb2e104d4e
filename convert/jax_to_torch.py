"""JAX dir -> HF/PyTorch checkpoint directory, as DeepSpec's save_pretrained writes it.

    python -m convert.jax_to_torch --src JAX_DIR --dst HF_DIR [--max_shard_size 5GB]

Tensors come back in the dtypes recorded at conversion; above ``--max_shard_size``
the weights are split into numbered shards plus model.safetensors.index.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from convert.common import DEFAULT_MAX_SHARD_SIZE, jax_to_hf
from deepspec_jax.errors import DeepSpecError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.jax_to_torch", description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="JAX checkpoint directory (with deepspec_jax.json)")
    ap.add_argument("--dst", required=True, help="HF checkpoint directory to write")
    ap.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                    help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB or bytes (default 5GB)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        files = jax_to_hf(args.src, args.dst, args.max_shard_size)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {', '.join(files)} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
