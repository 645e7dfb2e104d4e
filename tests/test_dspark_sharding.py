"""The DSpark loss and gradients do not depend on how the batch and parameters are
sharded: 1 CPU device vs an 8-device (data=2 x fsdp=4) CPU mesh.

The 8 host devices must exist before jax is imported, so the check runs in a child
process with XLA_FLAGS set; this process's jax is never asked for 8 devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, fixture_sets, load_manifest

CHILD = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from deepspec_jax.drafts import dspark_train as T
from deepspec_jax.drafts.dspark import DSparkLossConfig, load_dspark_checkpoint
from deepspec_jax.sharding import batch_sharding, make_mesh
from deepspec_jax.weights.safetensors_io import SafetensorsFile

fs, name = sys.argv[1], sys.argv[2]
man = json.load(open(os.path.join(fs, "manifest.json")))
entry = man["files"][name]
inp = entry["inputs"]
def arr(ref):
    f, k = ref.split(":")
    return SafetensorsFile(os.path.join(fs, man["files"][f]["path"])).get(k)
src = SafetensorsFile(os.path.join(fs, man["files"]["inputs"]["path"]))
import math
rep = 8 // math.gcd(src.get("input_ids").shape[0], 8)  # a global batch divisible by 8
tile = lambda x: np.concatenate([np.asarray(x)] * rep, axis=0)
host = T.DSparkBatch(tile(src.get("input_ids")).astype(np.int32),
                     tile(src.get("loss_mask")).astype(np.int32),
                     tile(arr(inp["target_hidden_states"])), tile(arr(inp["target_last_hidden_states"])))
anchors = tile(np.asarray(inp["anchor_positions"], np.int32))
keep = tile(np.asarray(inp["block_keep_mask"]) > 0)
kw = inp["loss_kwargs"]
loss_cfg = DSparkLossConfig(float(kw["ce_loss_alpha"]), float(kw["l1_loss_alpha"]),
                            float(kw["confidence_head_alpha"]), float(kw["loss_decay_gamma"]))

def run(mesh):
    model = load_dspark_checkpoint(os.path.join(fs, inp["checkpoint"]), mesh=mesh)
    put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim, x.shape[0]))
    g, params, rest = T.split_trainable(model)
    res, grads = T.loss_and_grads(g, params, rest, T.DSparkBatch(*map(put, host)), put(anchors),
                                  put(keep), loss_cfg, 4)
    fc_spec = str(model.fc.get_value().sharding.spec)
    return (float(res.total), {k: float(v) for k, v in res.terms.items()},
            T.grads_to_hf(g, grads, rest), fc_spec, len(model.fc.get_value().sharding.device_set))

one = run(make_mesh(devices=jax.devices()[:1]))
eight = run(make_mesh(data=2, fsdp=4))
grad_rel = max(float(np.linalg.norm(eight[2][k] - one[2][k]) / max(np.linalg.norm(one[2][k]), 1e-30))
               for k in one[2])
print(json.dumps({"devices": len(jax.devices()), "batch": int(host.input_ids.shape[0]),
                  "total_1": one[0], "total_8": eight[0], "terms_1": one[1], "terms_8": eight[1],
                  "grad_rel": grad_rel, "fc_spec_8": eight[3], "fc_devices_8": eight[4]}))
"""


def _cases():
    """The first DSpark training fixture with a confidence head of each fixture set."""
    out = []
    for fs in fixture_sets():
        files = load_manifest(fs)["files"]
        for name, entry in sorted(files.items()):
            inp = entry.get("inputs") or {}
            if name.startswith("train_") and "anchor_positions" in inp and \
                    float((inp.get("loss_kwargs") or {}).get("confidence_head_alpha", 0)) > 0:
                out.append(pytest.param(fs, name, id=f"{os.path.basename(fs)}-{name}"))
                break
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fs,name", _cases())
def test_loss_independent_of_sharding(fs, name):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, fs, name], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["batch"] % 8 == 0, r
    assert r["fc_devices_8"] == 8 and "fsdp" in r["fc_spec_8"], r  # parameters really sharded
    assert abs(r["total_8"] - r["total_1"]) <= 1e-5 * abs(r["total_1"]), r
    for k, v in r["terms_1"].items():
        assert abs(r["terms_8"][k] - v) <= 1e-5 * abs(v) + 1e-7, (k, r)
    assert r["grad_rel"] <= 1e-4, r
