"""Pallas kernels on a device mesh (deepspec_jax/kernels/sharded.py). Tree attention:
the kernel (TPU body, interpreted) inside ``jax.shard_map`` on an 8-device CPU mesh
gives the unsharded reference's output, for every head layout rule (heads split, one
KV head per shard, batch replicated), through the context mesh and an explicit one.
Span attention (training): the kernel under the mesh in context (as the train step
traces) gives the reference's output, lse and gradients, heads split, one KV head
per shard, batch replicated. For tree attention also: an impossible head split is refused (impl="pallas")
or left to the reference (impl="auto"). And the TPU body compiles through Mosaic for a
v5e-4 slice, sharded, at Qwen3-4B size (libtpu's compile-only devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO

from deepspec_jax.kernels.tree_attention import tree_attention
from deepspec_jax.kernels.sharded import head_layout
from deepspec_jax.plan.topology import compile_only_devices
from deepspec_jax.sharding import make_mesh

CHILD = r"""
import json, sys
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from deepspec_jax.kernels.tree_attention import (ancestor_bits, tree_attention,
                                                 tree_attention_reference)
from deepspec_jax.sharding import make_mesh

assert len(jax.devices()) == 8, jax.devices()
out = sys.argv[1]
res = {}

def case(seed, b, n, kh, g, d, s):
    rng = np.random.default_rng(seed)
    parents = np.full((b, n), -1, np.int32)
    for r in range(b):
        for i in range(1, n):
            parents[r, i] = rng.integers(-1, i)
    plen = rng.integers(0, s - n + 1, b).astype(np.int32)
    q = rng.standard_normal((b, n, kh * g, d)).astype(np.float32)
    k = rng.standard_normal((b, kh, d, s)).astype(np.float32)
    v = rng.standard_normal((b, kh, s, d)).astype(np.float32)
    return (q, k, v, plen, np.asarray(ancestor_bits(jnp.asarray(parents))))

def put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

KW = dict(impl="pallas", interpret=True, backend="tpu", block_kv=128)
# name: (mesh data, fsdp, tensor), (seed, B, N, K, G, D, S)
CASES = {
    "split_fsdp2_tp4": ((1, 2, 4), (0, 4, 13, 4, 2, 64, 200)),
    "split_dp2_fsdp2_tp2": ((2, 2, 2), (1, 4, 9, 2, 3, 64, 130)),
    "one_kv_per_shard_tp4": ((1, 2, 4), (2, 2, 11, 2, 4, 64, 160)),
    "batch_replicated_tp2": ((1, 4, 2), (3, 3, 7, 2, 1, 64, 140)),
}
for name, ((dd, ff, tt), shape) in CASES.items():
    mesh = make_mesh(dd, ff, tt)
    q, k, v, plen, bits = case(*shape)
    want = np.asarray(tree_attention_reference(*(jnp.asarray(x) for x in (q, k, v, plen, bits))))
    bspec = ("data", "fsdp") if q.shape[0] % (dd * ff) == 0 else None
    hs = "tensor" if shape[3] % tt == 0 else None
    args = (put(mesh, q, P(bspec, None, "tensor")), put(mesh, k, P(bspec, hs)),
            put(mesh, v, P(bspec, hs)), put(mesh, plen, P(bspec)), put(mesh, bits, P(bspec)))
    f = jax.jit(lambda *a: tree_attention(*a, **KW))
    with jax.set_mesh(mesh):
        got = np.asarray(f(*args))
        jaxpr = str(jax.make_jaxpr(f)(*args))
    res[name] = {"err": float(np.max(np.abs(got - want))), "shard_map": "shard_map" in jaxpr}
    if name == "split_fsdp2_tp4":   # explicit mesh, tree keys/values given separately
        p = plen
        kt = np.stack([k[r, :, :, p[r]:p[r] + q.shape[1]] for r in range(len(p))])
        vt = np.stack([v[r, :, p[r]:p[r] + q.shape[1]] for r in range(len(p))])
        k2, v2 = k.copy(), v.copy()
        for r in range(len(p)):   # poison the cache's tree slots: must not be read
            k2[r, :, :, p[r]:] = 1e4
            v2[r, :, p[r]:] = 1e4
        g = jax.jit(lambda *a, kt, vt: tree_attention(*a, k_tree=kt, v_tree=vt, mesh=mesh, **KW))
        got = np.asarray(g(q, k2, v2, plen, bits, kt=kt, vt=vt))
        res["explicit_mesh_k_tree"] = {"err": float(np.max(np.abs(got - want))),
                                       "shard_map": "shard_map" in str(jax.make_jaxpr(
                                           g)(q, k2, v2, plen, bits, kt=kt, vt=vt))}
    if name == "split_dp2_fsdp2_tp2":   # no mesh in context: the kernel is called directly
        res["no_mesh"] = {"err": float(np.max(np.abs(np.asarray(f(q, k, v, plen, bits)) - want))),
                          "shard_map": "shard_map" in str(jax.make_jaxpr(f)(q, k, v, plen, bits))}
mesh = make_mesh(1, 4, 2)
q, k, v, plen, bits = case(4, 4, 5, 3, 1, 64, 64)   # K=3 over tensor=2: no kernel
want = np.asarray(tree_attention_reference(q, k, v, plen, bits))
with jax.set_mesh(mesh):
    try:
        jax.jit(lambda *a: tree_attention(*a, **KW))(q, k, v, plen, bits)
        res["k3_tp2"] = "no error"
    except ValueError as e:
        res["k3_tp2"] = str(e)
    f = jax.jit(lambda *a: tree_attention(*a, **dict(KW, impl="auto")))
    res["k3_tp2_auto"] = {"err": float(np.max(np.abs(np.asarray(f(q, k, v, plen, bits)) - want))),
                          "shard_map": "shard_map" in str(jax.make_jaxpr(f)(q, k, v, plen, bits)),
                          "pallas": "pallas_call" in str(jax.make_jaxpr(f)(q, k, v, plen, bits))}

from deepspec_jax.kernels.attention import (causal_span, dense_attention, merge_attention,
                                            span_attention, span_attention_reference)

def span_loss(fn):
    def loss(q, k, v, start, stop):
        out, lse = fn(q, k, v, start, stop)
        # lse gets a cotangent through the merge with a dense piece (as DSpark/Eagle3 train)
        own = dense_attention(q, k[:, :1], v[:, :1], jnp.ones((1, 1, 1), bool))
        merged, _ = merge_attention([(out, lse), own])
        return jnp.sum(merged ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

# name: (mesh data, fsdp, tensor), (seed, B, T, K, G, D)
SPAN = {
    "span_split_fsdp2_tp4": ((1, 2, 4), (5, 4, 200, 4, 2, 64)),
    "span_one_kv_per_shard_tp4": ((1, 2, 4), (6, 2, 150, 2, 4, 64)),
    "span_batch_replicated_tp2": ((1, 4, 2), (7, 3, 130, 2, 1, 64)),
}
for name, ((dd, ff, tt), (seed, b, t, kh, g, d)) in SPAN.items():
    mesh = make_mesh(dd, ff, tt)
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    start, stop = causal_span(jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32), t)
    want_l, want_g = span_loss(lambda *a: span_attention_reference(*a, block_q=128))(
        q, k, v, start, stop)
    f = span_loss(lambda *a: span_attention(*a, impl="pallas", interpret=True, block_q=128,
                                            block_kv=128))
    with jax.set_mesh(mesh):
        got_l, got_g = f(q, k, v, start, stop)
        jaxpr = str(jax.make_jaxpr(f)(q, k, v, start, stop))
    err = max(float(jnp.max(jnp.abs(a - w)) / (jnp.max(jnp.abs(w)) + 1e-9))
              for a, w in zip(got_g, want_g))
    res[name] = {"err": max(err, abs(float(got_l - want_l)) / abs(float(want_l))),
                 "shard_map": "shard_map" in jaxpr}
json.dump(res, open(out, "w"))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels_sharded") / "res.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", CHILD, str(out)], check=True, env=env, cwd=REPO)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["split_fsdp2_tp4", "split_dp2_fsdp2_tp2",
                                  "one_kv_per_shard_tp4", "batch_replicated_tp2",
                                  "explicit_mesh_k_tree", "span_split_fsdp2_tp4",
                                  "span_one_kv_per_shard_tp4", "span_batch_replicated_tp2"])
def test_sharded_kernel_matches_reference(child, name):
    r = child[name]
    assert r["shard_map"], f"{name}: the kernel was not wrapped in shard_map"
    assert r["err"] < 1e-5, f"{name}: sharded kernel differs from the reference by {r['err']}"


def test_without_mesh_calls_kernel_directly(child):
    assert not child["no_mesh"]["shard_map"]
    assert child["no_mesh"]["err"] < 1e-5


def test_impossible_head_split_is_refused(child):
    """impl="pallas" raises naming the heads and the axis; "auto" runs the reference."""
    msg = child["k3_tp2"]
    assert "3 KV heads" in msg and "'tensor' axis of size 2" in msg, msg
    auto = child["k3_tp2_auto"]
    assert not auto["pallas"] and not auto["shard_map"] and auto["err"] < 1e-5, auto


def test_head_layout_rule():
    assert head_layout(32, 8, 1) == "none"
    assert head_layout(32, 8, 4) == "split"
    assert head_layout(32, 8, 8) == "split"
    assert head_layout(16, 2, 4) == "one_kv_per_shard"
    assert head_layout(32, 8, 16) == "one_kv_per_shard"
    for h, kh, t in ((9, 3, 2), (12, 6, 4), (4, 2, 8)):   # K%t != 0 and (t%K != 0 or H%t != 0)
        with pytest.raises(ValueError, match="cannot be laid over"):
            head_layout(h, kh, t)


# ------------------------------------------------------------- Mosaic (TPU) compile

def test_mosaic_compiles_sharded_at_qwen3_4b_size():
    """The TPU kernel body lowers through Mosaic and compiles for a v5e-4 slice inside
    shard_map at Qwen3-4B verify size (H=32, K=8, D=128, 4096-slot cache, 64 tree nodes,
    bf16, batch 8), heads split 4 ways: each chip's kernel sees K/4 = 2 KV heads and
    holds a quarter of the cache (no gather of the cache onto every chip)."""
    mesh = make_mesh(1, 1, 4, devices=compile_only_devices("v5e-4"))
    b, n, h, kh, d, s = 8, 64, 32, 8, 128, 4096
    bf = jnp.bfloat16

    def arg(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    heads = P(None, "tensor")
    args = (arg((b, n, h, d), bf, P(None, None, "tensor")), arg((b, kh, d, s), bf, heads),
            arg((b, kh, s, d), bf, heads), arg((b,), jnp.int32, P()),
            arg((b, n, 2), jnp.uint32, P()))
    tree_kv = dict(kt=arg((b, kh, d, n), bf, heads), vt=arg((b, kh, n, d), bf, heads))
    f = jax.jit(lambda *a, kt, vt: tree_attention(*a, k_tree=kt, v_tree=vt, impl="pallas"))
    with jax.set_mesh(mesh):
        lowered = f.lower(*args, **tree_kv)
    compiled = lowered.compile()
    calls = [line for line in compiled.as_text().splitlines()
             if "tpu_custom_call" in line and "tree_attention_tpu" in line]
    assert calls, "no Mosaic tree-attention kernel in the compiled program"
    # per chip: out [B, K/4, rows = N*G (=256), D]
    assert all(f"bf16[{b},{kh // 4},{n * h // kh},{d}]" in c for c in calls), calls[0][:300]
    mem = compiled.memory_analysis()
    cache_bytes = 2 * b * kh * s * d * 2
    assert mem.argument_size_in_bytes < 0.3 * cache_bytes, mem   # a quarter of K and V
    assert mem.temp_size_in_bytes < 0.1 * cache_bytes, mem       # no gathered copy


def test_auto_fallback_on_tpu_warns():
    """On TPU devices a head layout the kernels cannot take (3 KV heads, tensor axis 2)
    runs the jnp reference under impl="auto", and says so (traced only, no compile)."""
    from deepspec_jax.kernels.attention import causal_span, span_attention
    from deepspec_jax.kernels.fallback import KernelFallbackWarning

    mesh = make_mesh(1, 1, 2, devices=compile_only_devices("v5e-4")[:2])
    b, t, n, s, d = 2, 256, 4, 256, 128
    q = jax.ShapeDtypeStruct((b, t, 6, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, 3, d), jnp.bfloat16)
    start, stop = causal_span(jnp.full((b,), t, jnp.int32), t)
    with jax.set_mesh(mesh), pytest.warns(KernelFallbackWarning, match="3 KV heads"):
        jax.eval_shape(lambda q, k, v: span_attention(q, k, v, start, stop), q, kv, kv)
    tq = jax.ShapeDtypeStruct((b, n, 6, d), jnp.bfloat16)
    kc, vc = (jax.ShapeDtypeStruct((b, 3, d, s), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, 3, s, d), jnp.bfloat16))
    plen, bits = jnp.zeros((b,), jnp.int32), jnp.ones((b, n, 1), jnp.uint32)
    with jax.set_mesh(mesh), pytest.warns(KernelFallbackWarning, match="3 KV heads"):
        jax.eval_shape(lambda q, k, v: tree_attention(q, k, v, plen, bits), tq, kc, vc)
