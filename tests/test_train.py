"""Trainer: sharding invariance, resume after kill -9, online = cached, NaN stop, multi-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from train_helpers import make_store, tiny_config, write_config_file

PY = sys.executable
TESTS = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=TESTS + os.pathsep + REPO)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _losses(out_dir: str) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["total_loss"] for r in rows}


@pytest.mark.parametrize("arch", ["dspark", "eagle3"])
def test_train_checkpoint_export_roundtrip(tmp_path, arch):
    from flax import nnx

    from deepspec_jax.drafts import load_draft
    from deepspec_jax.train.trainer import export, setup, train

    store = make_store(str(tmp_path / "tok"))
    c = tiny_config(arch, store, str(tmp_path / "run"), max_steps=3)
    run = setup(c)
    m = train(run)
    assert m["step"] == 3 and np.isfinite(m["total_loss"]) and m["ok"] == 1.0
    assert run.checkpoints.latest_step() == 3
    dst = export(run)
    d = load_draft(dst, dtype="float32")
    _, p, _ = nnx.split(d.model, nnx.Param, ...)
    got = jax.tree.leaves(p.to_pure_dict())
    want = jax.tree.leaves(run.state.params)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the trainer recompiles nothing across steps with one bucket
    assert run.step_fn._cache_size() == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from deepspec_jax.train.trainer import NonFiniteLoss, setup, train

    store = make_store(str(tmp_path / "tok"))
    c = tiny_config("dspark", store, str(tmp_path / "run"), max_steps=4, lr=1e30, warmup_ratio=0.0,
                    max_grad_norm=0.0, checkpoint_every=1)
    run = setup(c)
    with pytest.raises(NonFiniteLoss) as e:
        train(run)
    msg = str(e.value)
    assert "not finite" in msg and "batch sample indices [" in msg and "step" in msg
    latest = run.checkpoints.latest_step()
    assert latest is not None and f"checkpoint is step {latest}" in msg
    restored, _, _ = run.checkpoints.restore(run.state, latest)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("arch", ["dspark", "eagle3"])
def test_online_and_cached_features_give_identical_losses(tmp_path, arch):
    from deepspec_jax.data.build_features import build_feature_cache
    from deepspec_jax.data.token_store import TokenStore
    from deepspec_jax.target import load_target
    from deepspec_jax.train.trainer import setup, train

    store = make_store(str(tmp_path / "tok"))
    target = load_target(tiny_config("dspark", store, "x").target.path, dtype="float32")
    layers = tuple(tiny_config(arch, store, "x").draft.target_layer_ids)
    build_feature_cache(TokenStore(store), target, layers, str(tmp_path / "cache"), dtype="float32",
                        compression="none", smallest_bucket=64, progress=False, log=lambda *_: None)
    losses = {}
    for mode in ("online", "cached"):
        c = tiny_config(arch, store, str(tmp_path / mode), max_steps=2)
        if mode == "cached":
            c.data.feature_cache = str(tmp_path / "cache")
        train(setup(c))
        losses[mode] = _losses(str(tmp_path / mode))
    assert losses["online"].keys() == losses["cached"].keys() == {1, 2}
    for s in (1, 2):
        assert abs(losses["online"][s] - losses["cached"][s]) <= 1e-6 * abs(losses["online"][s])


def test_cache_for_other_layers_is_refused(tmp_path):
    from deepspec_jax.data.build_features import build_feature_cache
    from deepspec_jax.data.jsonl import DataError
    from deepspec_jax.data.token_store import TokenStore
    from deepspec_jax.target import load_target
    from deepspec_jax.train.trainer import setup

    store = make_store(str(tmp_path / "tok"), n=10)
    c = tiny_config("dspark", store, str(tmp_path / "run"))
    target = load_target(c.target.path, dtype="float32")
    build_feature_cache(TokenStore(store), target, (0, 1, 4), str(tmp_path / "cache"), dtype="float32",
                        progress=False, log=lambda *_: None)
    c.data.feature_cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="layer_ids"):
        setup(c)


MESH_SCRIPT = r'''
import json, sys
import jax, numpy as np
from train_helpers import make_store, tiny_config
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train.trainer import setup, train
tmp, arch = sys.argv[1], sys.argv[2]
store = make_store(tmp + "/tok")
out = {}
for name, mesh in [("one", make_mesh(1, 1, 1, devices=jax.devices()[:1])), ("eight", make_mesh(2, 2, 2))]:
    c = tiny_config(arch, store, f"{tmp}/{name}", max_steps=3)
    run = setup(c, mesh=mesh)
    train(run)
    losses = [json.loads(l)["total_loss"] for l in open(f"{tmp}/{name}/metrics.jsonl")]
    out[name] = {"losses": losses, "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(run.state.params)]}
    if name == "eight":
        sh = [x.sharding.spec for x in jax.tree.leaves(run.state.params)]
        out["sharded"] = sum(any(a is not None for a in s) for s in sh)
json.dump(out, open(tmp + "/mesh.json", "w"))
'''


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dspark", pytest.param("eagle3", marks=pytest.mark.heavy)])
def test_eight_device_mesh_matches_one_device(tmp_path, arch):
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    r = subprocess.run([PY, str(script), str(tmp_path), arch], env=_env(8), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "mesh.json").read_text())
    assert out["sharded"] > 0
    np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["eight"]["params"], out["one"]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _train_cli(cfg: str, devices: int = 1, extra=()) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "deepspec_jax.train", f"--config={cfg}", "--noexport", *extra],
                            env=_env(devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_trajectory(tmp_path):
    store = make_store(str(tmp_path / "tok"))
    steps = "--config.train.max_steps=8"
    epochs = "--config.train.num_epochs=3"  # 40 samples / 8 = 5 steps per epoch
    ref_cfg = write_config_file(str(tmp_path / "ref.py"), "dspark", store, str(tmp_path / "ref"))
    p = _train_cli(ref_cfg, extra=[steps, epochs])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    ref = _losses(str(tmp_path / "ref"))
    assert sorted(ref) == list(range(1, 9))

    cfg = write_config_file(str(tmp_path / "int.py"), "dspark", store, str(tmp_path / "int"))
    p = _train_cli(cfg, extra=[steps, epochs])
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 once step 5 is logged (checkpoints at 2 and 4)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = _losses(str(tmp_path / "int"))
    assert 5 <= max(done) < 8
    p = _train_cli(cfg, extra=[steps, epochs])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "step 4/8" in out or "step 6/8" in out  # resumed from a checkpoint, not from 0
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    resumed = {r["step"]: r["total_loss"] for r in rows[len(done):]}
    assert max(resumed) == 8
    for s, v in resumed.items():
        assert v == ref[s], (s, v, ref[s])  # same devices: bit-identical continuation

    # and a restart on a different device count (2 devices, data-parallel) continues too
    cfg2 = write_config_file(str(tmp_path / "two.py"), "dspark", store, str(tmp_path / "int"))
    p = _train_cli(cfg2, devices=2, extra=["--config.train.max_steps=10", epochs, "--config.mesh.data=2",
                                           "--config.mesh.fsdp=1"])
    out, _ = p.communicate(timeout=600)
    assert "step 9/10" in out and "step 10/10" in out, out[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_run_trains_and_checkpoints(tmp_path):
    store = make_store(str(tmp_path / "tok"))
    cfg = write_config_file(str(tmp_path / "dist.py"), "dspark", store, str(tmp_path / "dist"))
    addr = f"127.0.0.1:{_free_port()}"
    procs = [_train_cli(cfg, extra=["--config.train.max_steps=3", f"--coordinator_address={addr}",
                                    "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "step 3/3" in outs[0]
    assert os.path.isdir(tmp_path / "dist" / "checkpoints" / "3")
