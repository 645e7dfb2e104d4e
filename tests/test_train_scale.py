"""The online train step at scale, on a 4-device CPU mesh (fsdp=2 x tensor=2): the frozen
target runs per micro-batch (compiled temporaries do not grow with the global batch),
the target and the draft's frozen embed/lm_head are split over fsdp/tensor, the frozen
pair is stored in the compute dtype, and a micro-batch that does not split over the
batch mesh axes is refused with the fields to change.

The target's fsdp all-gathers stay inside the micro-batch loop (per layer and
micro-batch), not hoisted out of it for the whole step.

The devices must exist before jax is imported, so the checks run in one child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp
from train_helpers import make_store, tiny_config
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train import trainer as T
from deepspec_jax.train.step import batch_shardings, check_micro_batch, compile_step

tmp, S = sys.argv[1], 64
c = tiny_config("dspark", make_store(tmp + "/tok", max_length=S), tmp + "/out",
                compute_dtype="bfloat16")
mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
ts = T.setup_target(c, mesh)
ds = T.setup_data(c, ts)
dr = T.setup_draft(c, ts, 10, mesh)
spec = lambda x: [a if isinstance(a, (str, type(None))) else list(a) for a in x.sharding.spec]
out = {"frozen": {k: [str(dr.rest[k].dtype), spec(dr.rest[k])] for k in ("embed", "lm_head")},
       "target_specs": [spec(x) for x in jax.tree.leaves(ts.target.state) if x.ndim == 2]}
shard = lambda t: jax.tree.map(lambda x: x.sharding, t)
temp, batch_bytes = {}, {}
for G in (4, 16):  # micro-batches of 2: 2 and 8 of them
    sc = dataclasses.replace(T.step_config(c, ts, ds, dr.graphdef, mesh), num_micro=G // 2)
    batch = {k: jax.ShapeDtypeStruct((G, S), jnp.int32) for k in ("input_ids", "loss_mask", "attention_mask")}
    fn = compile_step(sc, dr.tx, dr.schedule, shard(dr.state), dr.rest_shardings, shard(ts.target.state),
                      batch_shardings(mesh, batch))
    compiled = fn.lower(dr.state, dr.rest, ts.target.state, batch).compile()
    mem = compiled.memory_analysis()
    temp[G], batch_bytes[G] = mem.temp_size_in_bytes, 3 * G * S * 4 // 2  # per device (fsdp=2)
out.update(temp=temp, batch_bytes=batch_bytes)
# the target's all-gathers (op names under target_forward): inside the micro-batch loop
hlo = compiled.as_text()
entry = hlo[hlo.index("\nENTRY"):]
entry = entry[:entry.index("\n}\n")]
gathers = lambda text: [l for l in text.splitlines() if " all-gather(" in l and "target_forward" in l]
out["target_gathers"] = {"all": len(gathers(hlo)), "entry": len(gathers(entry))}
try:
    check_micro_batch(mesh, 8, 8)
    out["error"] = None
except ConfigError as e:
    out["error"] = str(e)
json.dump(out, open(tmp + "/out.json", "w"))
"""


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=TESTS + os.pathsep + REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


def test_online_step_memory_follows_the_micro_batch(scale):
    t, b = {int(k): v for k, v in scale["temp"].items()}, {int(k): v for k, v in scale["batch_bytes"].items()}
    # 4x the global batch at the same micro-batch: temporaries grow by at most the inputs
    assert t[16] - t[4] <= b[16] - b[4], scale["temp"]


def test_frozen_embed_and_lm_head_are_compute_dtype_and_sharded(scale):
    assert scale["frozen"] == {"embed": ["bfloat16", ["tensor", "fsdp"]],
                               "lm_head": ["bfloat16", ["fsdp", "tensor"]]}
    # every 2-D target weight is split over both model axes (no replica of the target)
    specs = scale["target_specs"]
    assert specs and all(sorted(s) == ["fsdp", "tensor"] for s in specs), specs


def test_target_weights_are_gathered_per_micro_batch_not_for_the_whole_step(scale):
    # the fsdp all-gathers of the target's layers stay inside the micro-batch loop; none is
    # hoisted out of it (that would hold a gathered copy of the whole target all step)
    g = scale["target_gathers"]
    assert g["all"] > 0 and g["entry"] == 0, g


def test_micro_batch_not_split_over_the_mesh_is_refused(scale):
    e = scale["error"]
    assert e and "train.global_batch_size" in e and "train.micro_batch_size" in e
    assert "micro-batches of 1 sequences" in e and "'fsdp': 2" in e
