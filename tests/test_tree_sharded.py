"""Tree attention on a device mesh: the Pallas kernel (TPU body, interpreted) inside
``jax.shard_map`` on an 8-device CPU mesh gives the unsharded reference's output, for
every head layout rule (heads split, one KV head per shard, batch replicated), through
the context mesh and an explicit one; an impossible head split is refused (impl="pallas")
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
from deepspec_jax.kernels.tree_attention.sharded import head_layout
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
json.dump(res, open(out, "w"))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree_sharded") / "res.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", CHILD, str(out)], check=True, env=env, cwd=REPO)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["split_fsdp2_tp4", "split_dp2_fsdp2_tp2",
                                  "one_kv_per_shard_tp4", "batch_replicated_tp2",
                                  "explicit_mesh_k_tree"])
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
