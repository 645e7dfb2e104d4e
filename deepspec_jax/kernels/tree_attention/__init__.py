"""Tree attention for speculative verification: the flattened draft tree's queries
attend to the committed KV-cache prefix plus their own ancestors in the tree.

Public API (inference only: no custom_vjp, nothing here is differentiated):

* ``tree_attention(q, k_cache, v_cache, prefix_len, tree_bits, *, k_tree=None,
  v_tree=None, scale=None, impl="auto", block_kv=None, interpret=False, backend=None)``
* ``tree_attention_reference(...)``: pure ``jnp``, the oracle (logits over all S slots).
* ``tree_attention_filled(...)``: ``jnp`` reading the cache only up to the longest
  row's prefix, block by block: the path where no kernel runs (CPU).
* ``ancestor_bits(parents)``: parent-index arrays -> the packed ancestor bitmask.

Layouts are the project's KV-cache layouts (deepspec_jax/kernels/attention/segments.py):
q [B,N,H,D]; k_cache [B,K,D,S] (keys transposed); v_cache [B,K,S,D]; H = K*G and query
head h reads KV head h // G. Node i's own key/value is in the cache at slot
prefix_len[b] + i, unless ``k_tree`` [B,K,D,N] / ``v_tree`` [B,K,N,D] are given: then
those hold the tree's keys/values and no cache slot >= prefix_len is read (a verify pass
need not write, or copy, the cache before attending). tree_bits [B,N,ceil(N/32)] uint32
has bit j%32 of word j//32 of row i set iff j == i or j is an ancestor of i. Output
[B,N,H,D] in q.dtype, softmax in fp32.

Kernel cost: it reads the cache blocks below prefix_len (not all S slots) plus the
N-slot tree tile. ``block_kv`` (None: ``DEFAULT_BLOCK_KV`` of the kernel body): 128
suits GPU; on TPU 512 or more (fewer grid steps).

Meshes: XLA cannot partition a Pallas call, so on a multi-device mesh the kernel runs
inside ``jax.shard_map`` (``deepspec_jax/kernels/sharded.py``: batch rows over data/fsdp, heads over tensor;
K % tensor == 0, or one KV head per shard when K < tensor). The mesh is ``mesh=`` or
else the mesh in context (``jax.set_mesh``; ``speculative_generate`` and
``plan.decode`` set the target's). The jnp reference needs neither: XLA partitions it,
so "auto" runs it, with a ``KernelFallbackWarning``, when the mesh's tensor axis
cannot be laid over the heads or the kernel cannot take the shapes.

``impl``: "auto" runs the Pallas kernel on GPU (Triton lowering) and TPU (Mosaic
lowering) when the shapes are supported, ``tree_attention_filled`` on a backend without
a kernel (CPU) and the reference where a kernel exists but cannot take the shapes or the
mesh; "pallas" forces the kernel and raises ValueError on unsupported shapes (with
``interpret=True`` it runs on CPU; ``backend`` "tpu"/"gpu" picks which kernel body,
default: the current backend, or "tpu" on CPU); "filled" and "reference" force those
jnp paths.
"""

from __future__ import annotations

import functools

import jax

from deepspec_jax.kernels import sharded
from deepspec_jax.kernels.fallback import warn_fallback
from deepspec_jax.kernels.tree_attention import kernel
from deepspec_jax.kernels.tree_attention.filled import tree_attention_filled
from deepspec_jax.kernels.tree_attention.reference import (ancestor_bits, check_inputs, num_words,
                                                          tree_attention_reference,
                                                          tree_kv_from_cache, tree_mask,
                                                          tree_visibility)

__all__ = ["tree_attention", "tree_attention_reference", "tree_attention_filled",
           "ancestor_bits", "tree_mask", "tree_visibility", "tree_kv_from_cache", "num_words",
           "kernel_backend", "kernel_unsupported_reason"]

_IMPLS = ("auto", "pallas", "filled", "reference")
# block_kv=None: per kernel body (TPU: fewer, larger grid steps; Triton: register budget)
DEFAULT_BLOCK_KV = {"tpu": 512, "gpu": 128}


def kernel_backend(backend: str | None = None, interpret: bool = False) -> str | None:
    """Which kernel body runs: "tpu" (Mosaic), "gpu" (Triton) or None (no kernel here),
    for the platform of the mesh in context, else the default backend. On CPU only an
    interpreted kernel exists; it defaults to the TPU body."""
    if backend is not None:
        if backend not in ("tpu", "gpu"):
            raise ValueError(f"deepspec_jax.kernels.tree_attention: backend={backend!r}; use "
                             "'tpu', 'gpu' or None (the current JAX backend)")
        return backend
    platform = sharded.context_platform()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if interpret else None


def kernel_unsupported_reason(q, k_cache, v_cache=None, *, block_kv: int = 128,
                              backend: str | None = None, interpret: bool = False,
                              tree_dtypes=()) -> str | None:
    """None if the Pallas kernel supports these shapes on this backend, else why not."""
    body = kernel_backend(backend, interpret)
    if body is None:
        return (f"no Pallas kernel for backend {sharded.context_platform()!r} (GPU/TPU only); pass "
                "interpret=True to run it interpreted on CPU, or impl='reference'")
    kv_dtypes = (k_cache.dtype,) + (() if v_cache is None else (v_cache.dtype,)) + tuple(tree_dtypes)
    return kernel.unsupported_reason(body, q.shape, q.dtype, k_cache.shape, block_kv, kv_dtypes)


def tree_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, prefix_len: jax.Array,
                   tree_bits: jax.Array, *, k_tree: jax.Array | None = None,
                   v_tree: jax.Array | None = None, scale: float | None = None,
                   impl: str = "auto", block_kv: int | None = None, interpret: bool = False,
                   backend: str | None = None, mesh=None) -> jax.Array:
    """Verify-pass attention of a flattened tree over the KV cache; see the module
    docstring for layouts, ``impl`` and ``mesh`` (a Mesh/AbstractMesh the inputs are
    sharded over; None: the mesh in context, if any). Jittable; scale/impl/block_kv/
    interpret/backend/mesh are static."""
    if impl not in _IMPLS:
        raise ValueError(f"deepspec_jax.kernels.tree_attention: impl={impl!r}; use one of {_IMPLS}")
    check_inputs(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree)

    def reference():
        return tree_attention_reference(q, k_cache, v_cache, prefix_len, tree_bits,
                                        k_tree=k_tree, v_tree=v_tree, scale=scale)

    if impl == "reference":
        return reference()
    if impl == "filled" or (impl == "auto" and not interpret and kernel_backend(backend) is None):
        return tree_attention_filled(q, k_cache, v_cache, prefix_len, tree_bits, k_tree=k_tree,
                                     v_tree=v_tree, scale=scale)
    if block_kv is None:
        block_kv = DEFAULT_BLOCK_KV.get(kernel_backend(backend, interpret), 128)
    tree_dtypes = () if k_tree is None else (k_tree.dtype, v_tree.dtype)
    reason = kernel_unsupported_reason(q, k_cache, v_cache, block_kv=block_kv, backend=backend,
                                       interpret=interpret, tree_dtypes=tree_dtypes)
    mesh = sharded.context_mesh() if mesh is None else mesh
    if reason is None and mesh is not None and mesh.size > 1:
        reason = sharded.layout_unsupported_reason(mesh, q.shape[2], k_cache.shape[1])
    if reason is not None:
        if impl == "pallas":
            raise ValueError(f"deepspec_jax.kernels.tree_attention: impl='pallas' unsupported: "
                             f"{reason}")
        warn_fallback("tree_attention", reason)
        return reference()
    call = functools.partial(kernel.tree_attention_pallas, scale=scale, block_kv=block_kv,
                             interpret=interpret, backend=kernel_backend(backend, interpret))
    if mesh is None or mesh.size == 1:
        return call(q, k_cache, v_cache, prefix_len, tree_bits, k_tree, v_tree)
    if k_tree is None:  # gathered before the split: XLA partitions the gather itself
        k_tree, v_tree = tree_kv_from_cache(k_cache, v_cache, prefix_len, q.shape[1])
    Q, KV, ROWS = sharded.Q, sharded.KV, sharded.ROWS
    return sharded.sharded_call(call, mesh, (q, k_cache, v_cache, prefix_len, tree_bits, k_tree,
                                             v_tree),
                                ((Q, 2), (KV, 1), (KV, 1), (ROWS, None), (ROWS, None), (KV, 1),
                                 (KV, 1)), (Q, 2, 4), h=q.shape[2], kh=k_cache.shape[1])
