"""Checkpoint converters between DeepSpec's HF-format PyTorch releases, vLLM
``speculators`` directories and our JAX dirs (docs/FORMATS.md).

    python -m convert.torch_to_jax --src HF_DIR --dst JAX_DIR [--dtype keep|float32|bfloat16]
    python -m convert.jax_to_torch --src JAX_DIR --dst HF_DIR [--max_shard_size 5GB]
    python -m convert.to_speculators --src DRAFT --dst DIR [--target TARGET_DIR]
    python -m convert.from_speculators --src DIR --dst JAX_DIR [--target TARGET_DIR]

or from Python: ``convert.hf_to_jax(src, dst)`` / ``convert.jax_to_hf(src, dst)``.
"""

from convert.common import hf_to_jax, jax_to_hf, parse_size, write_hf_weights

__all__ = ["hf_to_jax", "jax_to_hf", "parse_size", "write_hf_weights"]
