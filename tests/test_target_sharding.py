"""An 8-device CPU mesh (fsdp x tensor) gives the same logits as one device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, fp32_tol, load_manifest, target_fixture_sets

CHILD = r"""
import json, sys
import numpy as np
import jax
from deepspec_jax import load_target
from deepspec_jax.sharding import make_mesh
path, out = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 8, jax.devices()
ids = np.random.default_rng(0).integers(0, 500, size=(4, 24)).astype(np.int32)
res = {}
for name, (d, f, t) in {"single": (1, 1, 1), "fsdp4_tp2": (1, 4, 2), "dp2_fsdp2_tp2": (2, 2, 2)}.items():
    devs = jax.devices()[: d * f * t]
    target = load_target(path, mesh=make_mesh(d, f, t, devices=devs))
    leaves = jax.tree.leaves(target.state)
    res[name + "_q_shards"] = max(len({str(s.index) for s in x.addressable_shards}) for x in leaves)
    o = target.forward(ids, layer_ids=(0, 2))
    res[name + "_logits"] = np.asarray(o.logits).tolist()
    res[name + "_feats"] = np.asarray(o.features).tolist()
    res[name + "_gen"] = target.generate(ids[:2, :10].tolist(), max_new_tokens=12)
json.dump(res, open(out, "w"))
"""


@pytest.mark.parametrize("fs", target_fixture_sets())
def test_mesh_matches_single_device(tmp_path, fs):
    path = os.path.join(fs, load_manifest(fs)["global"]["target_dir"])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "res.json"
    subprocess.run([sys.executable, "-c", CHILD, path, str(out)], check=True, env=env, cwd=REPO)
    res = json.loads(out.read_text())
    assert res["single_q_shards"] == 1
    for name in ("fsdp4_tp2", "dp2_fsdp2_tp2"):
        assert res[name + "_q_shards"] > 1, "parameters were not sharded"
        np.testing.assert_allclose(res[name + "_logits"], res["single_logits"],
                                   atol=fp32_tol(res["single_logits"], 1e-4), rtol=0)
        np.testing.assert_allclose(res[name + "_feats"], res["single_feats"],
                                   atol=fp32_tol(res["single_feats"], 1e-5), rtol=0)
        assert res[name + "_gen"] == res["single_gen"]
