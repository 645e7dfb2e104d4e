"""Tree-attention verify pass: Pallas kernel vs XLA dense-mask attention.

Times one verify-pass attention (N tree queries over a KV cache of S slots, prefix
lengths differing per row) with
  * kernel: deepspec_jax.kernels.tree_attention (Pallas, Triton on GPU / Mosaic on TPU),
  * xla_dense: the engine's XLA path, deepspec_jax.kernels.attention
    .segment_attention over the whole cache (mask slot < prefix_len) plus the tree
    segment (mask from the same ancestor bits), in the cache dtype,
both taking the tree's keys/values as separate arrays (``k_tree``/``v_tree``: no cache
write or copy before attending),
and reports time, the KV bytes each reads (kernel: the blocks below prefix_len; dense:
the whole cache; both: the tree tile) and achieved bandwidth = bytes / time, plus the kernel's max error
against the fp32 reference. On CPU the kernel only exists interpreted: the program
then runs tiny shapes, says so, and its times say nothing about the kernel.

    python benchmarks/tree_attention.py --cache_lens 1024,4096,16384 --out tree_attn.json
"""

from __future__ import annotations

import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from deepspec_jax import atomic, cli

from deepspec_jax.kernels.attention import segment_attention
from deepspec_jax.kernels.tree_attention import (ancestor_bits, kernel_backend,
                                                 kernel_unsupported_reason, tree_attention,
                                                 tree_attention_reference, tree_visibility)

# Approximate peak HBM bandwidth (bytes/s) by device-kind substring, for a %-of-peak
# column only; unknown devices print no percentage.
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 3.0e11,
           "TPU v6": 1.64e12, "TPU v5p": 2.76e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11,
           "TPU v4": 1.2e12}


def peak_bandwidth(kind: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key.lower() in kind.lower():
            return bw
    return None


def random_parents(rng, batch, n, topk):
    """A top-k-style tree: node i's parent is one of the earlier nodes, at most topk
    children each, so depth grows like log_topk(N)."""
    parents = np.full((batch, n), -1, np.int32)
    for b in range(batch):
        children = np.zeros(n + 1, np.int32)
        for i in range(1, n):
            while True:
                p = int(rng.integers(-1, i))
                if children[p] < topk:
                    children[p] += 1
                    parents[b, i] = p
                    break
    return parents


def timeit(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_case(args, s, interpret, body):
    rng = np.random.default_rng(args.seed)
    dtype = jnp.dtype(args.dtype)
    b, n, kh, g, d = args.batch, args.nodes, args.kv_heads, args.group, args.head_dim
    plen = rng.integers(s // 2, s - n + 1, size=b).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((b, n, kh * g, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, kh, d, s)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kh, s, d)), dtype)
    kt = jnp.asarray(rng.standard_normal((b, kh, d, n)), dtype)
    vt = jnp.asarray(rng.standard_normal((b, kh, n, d)), dtype)
    prefix = jnp.asarray(plen)
    bits = ancestor_bits(jnp.asarray(random_parents(rng, b, n, args.topk)))
    call = (q, k, v, prefix, bits, kt, vt)

    @jax.jit
    def kern(q, k, v, prefix, bits, kt, vt):
        return tree_attention(q, k, v, prefix, bits, k_tree=kt, v_tree=vt, impl="pallas",
                              block_kv=args.block_kv, interpret=interpret, backend=body)

    @jax.jit
    def dense(q, k, v, prefix, bits, kt, vt):
        committed = jnp.arange(s)[None, None, :] < prefix[:, None, None]
        return segment_attention(q, [(k, v, committed), (kt, vt, tree_visibility(bits))])[0]

    item = dtype.itemsize
    bk = args.block_kv
    tree_bytes = b * n * kh * d * 2 * item
    read_kernel = int(sum(min(-(-p // bk) * bk, s) for p in plen)) * kh * d * 2 * item + tree_bytes
    read_dense = b * s * kh * d * 2 * item + tree_bytes
    t_kernel = timeit(kern, call, args.repeats)
    t_dense = timeit(dense, call, args.repeats)
    want = np.asarray(tree_attention_reference(*call[:5], k_tree=kt, v_tree=vt), np.float32)
    err_kernel = float(np.max(np.abs(np.asarray(kern(*call), np.float32) - want)))
    err_dense = float(np.max(np.abs(np.asarray(dense(*call), np.float32) - want)))
    return dict(cache_len=s, prefix_lens=plen.tolist(), kernel_s=t_kernel, dense_s=t_dense,
                speedup=t_dense / t_kernel, kernel_bytes=read_kernel, dense_bytes=read_dense,
                kernel_gbps=read_kernel / t_kernel / 1e9, dense_gbps=read_dense / t_dense / 1e9,
                kernel_max_err=err_kernel, dense_max_err=err_dense)


_CPU = jax.default_backend() == "cpu"   # defaults: tiny shapes for the interpreted kernel
FLAGS = flags.FlagValues()
flags.DEFINE_integer("batch", 2 if _CPU else 8, "Rows.", flag_values=FLAGS)
flags.DEFINE_integer("nodes", 16 if _CPU else 64, "Tree size N.", flag_values=FLAGS)
flags.DEFINE_integer("topk", 4, "Children per expanded node.", flag_values=FLAGS)
flags.DEFINE_integer("kv_heads", 2 if _CPU else 8, "KV heads.", flag_values=FLAGS)
flags.DEFINE_integer("group", 2 if _CPU else 4, "Query heads per KV head.", flag_values=FLAGS)
flags.DEFINE_integer("head_dim", 64 if _CPU else 128, "Head dimension.", flag_values=FLAGS)
flags.DEFINE_string("cache_lens", "256,512" if _CPU else "1024,4096,16384",
                    "Comma-separated cache capacities S.", flag_values=FLAGS)
flags.DEFINE_string("dtype", "float32" if _CPU else "bfloat16", "Cache dtype.", flag_values=FLAGS)
flags.DEFINE_integer("block_kv", 128, "Kernel KV block.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3 if _CPU else 20, "Timed calls.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Data seed.", flag_values=FLAGS)
flags.DEFINE_enum("kernel_body", None, ["tpu", "gpu"], "Kernel body (default: this backend's; "
                  "on CPU the TPU body, interpreted).", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Also write the results here (JSON).", flag_values=FLAGS)


def main(argv=None) -> int:
    args = cli.parse(FLAGS, argv, __doc__)
    cpu = _CPU

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    interpret = cpu
    body = kernel_backend(args.kernel_body, interpret)
    print(f"device: {kind} ({jax.default_backend()}); kernel body: {body}"
          + (" INTERPRETED on CPU: times below measure the interpreter, not the kernel"
             if interpret else ""))
    probe = jax.ShapeDtypeStruct((args.batch, args.nodes, args.kv_heads * args.group,
                                  args.head_dim), jnp.dtype(args.dtype))
    rows = []
    for s in (int(x) for x in args.cache_lens.split(",")):
        kprobe = jax.ShapeDtypeStruct((args.batch, args.kv_heads, args.head_dim, s), probe.dtype)
        reason = kernel_unsupported_reason(probe, kprobe, block_kv=args.block_kv,
                                           backend=body, interpret=interpret)
        if reason:
            raise SystemExit(f"benchmarks/tree_attention.py: kernel unsupported for S={s}: {reason}")
        rows.append(run_case(args, s, interpret, body))

    peak = peak_bandwidth(kind)
    hdr = (f"{'S':>7} {'kernel ms':>10} {'dense ms':>10} {'speedup':>8} {'kern GB/s':>10} "
           f"{'dense GB/s':>10} {'kern err':>9}")
    print(f"B={args.batch} N={args.nodes} K={args.kv_heads} G={args.group} D={args.head_dim} "
          f"{args.dtype} block_kv={args.block_kv}")
    print(hdr)
    for r in rows:
        pct = "" if peak is None else f"  ({100 * r['kernel_gbps'] * 1e9 / peak:.0f}% of peak)"
        print(f"{r['cache_len']:>7} {1e3 * r['kernel_s']:>10.3f} {1e3 * r['dense_s']:>10.3f} "
              f"{r['speedup']:>8.2f} {r['kernel_gbps']:>10.1f} {r['dense_gbps']:>10.1f} "
              f"{r['kernel_max_err']:>9.2e}{pct}")
    if args.out:
        atomic.write_json(args.out, dict(device=kind, backend=jax.default_backend(),
                                         interpreted=interpret, host=platform.node(),
                                         jax=jax.__version__, peak_bw=peak,
                                         config=FLAGS.flag_values_dict(), results=rows), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
