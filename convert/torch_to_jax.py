"""HF/PyTorch checkpoint directory -> JAX dir (config.json + orbax params + manifest).

    python -m convert.torch_to_jax --src HF_DIR --dst JAX_DIR [--dtype keep|float32|bfloat16]

Reads only safetensors and JSON (never pickles). Drafts of every registered
architecture and llama/qwen3 targets are recognised from config.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from convert.common import dtype_choices, hf_to_jax
from deepspec_jax.errors import DeepSpecError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.torch_to_jax", description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--dst", required=True, help="JAX checkpoint directory to write")
    ap.add_argument("--dtype", default="keep", choices=dtype_choices(),
                    help="keep: every tensor in its stored dtype (default); else cast all")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        m = hf_to_jax(args.src, args.dst, args.dtype)
    except (DeepSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dts = sorted({p["dtype"] for p in m["params"].values()})
    print(f"wrote {args.dst}: {m['kind']} {m['architecture']}, {len(m['params'])} parameters "
          f"({', '.join(dts)}) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
