"""Eagle3 TTT loss and gradients: one device vs an 8-device CPU mesh (data x fsdp).

The 8-device run happens in a subprocess because the host device count must be set
before jax is imported. Its batch is the fixture batch tiled 4x and sharded over
(data, fsdp); the loss is a per-sequence mean, so it must equal the 1-device loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import fixture_sets, load_manifest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SCRIPT = textwrap.dedent('''
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from safetensors.numpy import load_file
    from deepspec_jax.drafts import eagle3
    from deepspec_jax.drafts.eagle3_train import eagle3_loss
    from deepspec_jax.sharding import batch_sharding, make_mesh
    from deepspec_jax.weights.loader import flat_variables

    fixture_set, name, out_path, n_dev, data, tile = sys.argv[1:7]
    n_dev, data, tile = int(n_dev), int(data), int(tile)
    assert jax.device_count() >= n_dev, jax.devices()
    mesh = make_mesh(data=data, fsdp=-1, devices=jax.devices()[:n_dev])
    import json
    manifest = json.load(open(os.path.join(fixture_set, "manifest.json")))
    spec = manifest["files"][name]["inputs"]
    inp = load_file(os.path.join(fixture_set, manifest["files"]["inputs"]["path"]))
    model = eagle3.load_eagle3(os.path.join(fixture_set, spec["checkpoint"]), mesh=mesh)
    col = lambda ref: inp[ref.split(":", 1)[1]]
    arrays = [inp["input_ids"].astype(np.int32), col(spec["target_hidden_states"]),
              col(spec["target_last_hidden_states"]), inp["loss_mask"], inp["attention_mask"]]
    arrays = [np.concatenate([a] * tile) for a in arrays]
    args = [jax.device_put(a, batch_sharding(mesh, a.ndim, a.shape[0])) for a in arrays]
    sharded = [str(v.get_value().sharding.spec) for v in flat_variables(nnx.state(model)).values()]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(p):
        def f(p):
            out = eagle3_loss(nnx.merge(graphdef, p, rest), *args, vocab_chunk=96)
            return out.loss, out.step_losses
        return jax.value_and_grad(f, has_aux=True)(p)

    (loss, steps), grads = step(params)
    res = {"loss": np.asarray(loss), "steps": np.asarray(steps),
           "n_sharded_params": np.asarray(sum(s != "PartitionSpec()" for s in sharded)),
           "batch_sharded": np.asarray(int(len(args[0].sharding.device_set) == n_dev
                                       and not args[0].sharding.is_fully_replicated))}
    for k, v in flat_variables(grads).items():
        res["grad/" + k] = np.asarray(v.get_value())
    np.savez(out_path, **res)
''')


def _run(tmp_path, fixture_set, name, n_dev, data, tile):
    out = os.path.join(tmp_path, f"res_{n_dev}.npz")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, HERE]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, fixture_set, name, out, str(n_dev),
                           str(data), str(tile)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def _cases():
    for fs in fixture_sets():
        for name in load_manifest(fs)["files"]:
            if name.startswith("train_eagle3"):
                yield pytest.param(fs, name, id=f"{os.path.basename(fs)}:{name}")


@pytest.mark.slow
@pytest.mark.parametrize("fixture_set,name", list(_cases()))
def test_one_vs_eight_devices(tmp_path, fixture_set, name):
    one = _run(tmp_path, fixture_set, name, 1, 1, 1)
    eight = _run(tmp_path, fixture_set, name, 8, 2, 4)
    assert int(eight["batch_sharded"]) == 1
    assert int(eight["n_sharded_params"]) > 0  # fsdp really splits parameters
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["steps"], one["steps"], rtol=1e-5)
    grads = [k for k in one if k.startswith("grad/")]
    assert grads and set(grads) == {k for k in eight if k.startswith("grad/")}
    for k in grads:
        scale = np.max(np.abs(one[k]))
        assert np.max(np.abs(eight[k] - one[k])) <= 1e-4 * scale, k
