"""Pallas kernels, each with a pure-``jnp`` reference beside it and a dispatcher that
uses the kernel where it is supported (GPU: Triton lowering, TPU: Mosaic lowering) and
a ``jnp`` path elsewhere (tree attention: one that reads the cache only up to its filled
length); tests run the kernels with ``interpret=True`` on CPU.

* ``tree_attention``: verify-pass attention of a flattened draft tree over the KV-cache
  prefix plus each node's ancestors (packed ancestor bitmask); on a device mesh it runs
  inside ``shard_map`` (``sharded.py``). See
  ``deepspec_jax/kernels/tree_attention/__init__.py``; benchmark:
  ``benchmarks/tree_attention.py``.
* ``attention``: span attention (each query sees keys ``start <= j < stop``: causal,
  ragged, DSpark blocks, Eagle3 TTT) for training and prefill, flash-style Pallas TPU
  kernel with gradients, plus dense/segment attention for short key sets and decode.
  See ``deepspec_jax/kernels/attention/__init__.py``.

Where "auto" runs a reference on an accelerator it says so (``fallback.py``).
"""
