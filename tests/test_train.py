"""Trainer: sharding invariance (8 vs 1 device; a restart resharded onto 4), kill -9 mid
asynchronous save, online = cached features, NaN stop, 2 processes = 1."""

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
from flax import nnx

from conftest import REPO
from deepspec_jax.data.build_features import build_feature_cache
from deepspec_jax.data.jsonl import DataError
from deepspec_jax.data.token_store import TokenStore
from deepspec_jax.drafts import load_draft
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh
from deepspec_jax.target import load_target
from deepspec_jax.train.trainer import NonFiniteLoss, export, feature_cache_paths, setup, train
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
    store = make_store(str(tmp_path / "tok"))
    target = load_target(tiny_config("dspark", store, "x").target.path, dtype="float32")
    layers = tuple(tiny_config(arch, store, "x").draft.target_layer_ids)
    build_feature_cache(TokenStore(store), target, layers, str(tmp_path / "cache"), dtype="float32",
                        compression="none", smallest_bucket=64, progress=False, log=lambda *_: None)
    losses, params, rows = {}, {}, {}
    for mode in ("online", "cached"):
        c = tiny_config(arch, store, str(tmp_path / mode), max_steps=2)
        if mode == "cached":
            c.data.feature_cache = str(tmp_path / "cache")
        run = setup(c)
        assert run.step_config.num_micro == 2 and run.step_config.online == (mode == "online")
        train(run)
        losses[mode] = _losses(str(tmp_path / mode))
        params[mode] = jax.tree.leaves(run.state.params)
        rows[mode] = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
    assert losses["online"].keys() == losses["cached"].keys() == {1, 2}
    for s in (1, 2):
        assert abs(losses["online"][s] - losses["cached"][s]) <= 1e-6 * abs(losses["online"][s])
    # the gradients (norm before clipping) and the parameters after both steps agree too
    _assert_same_steps(rows["online"], rows["cached"], rtol=1e-6)
    # the parameters after two Adam steps: atol 1e-5 (~2% of one step at lr 6e-4). Adam
    # divides by sqrt(v), so an element whose gradient is ~0 moves by a fraction of lr set
    # by fp32 rounding, which differs between the two (differently fused) programs: seen
    # up to 1.9e-6 with XLA:CPU's own loop fusions (train.cpu_library_fusion="dot"). The
    # losses and gradient norms above are the tight check.
    for a, b in zip(params["online"], params["cached"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-5)


def test_one_feature_cache_per_token_store(tmp_path):
    """Data gathered in pieces: data.train lists two stores, data.feature_cache their two
    caches (comma-separated); the run reads each sample's own cache, so its steps are the
    online run's over the same two stores. A cache count that does not match is refused."""
    stores = [make_store(str(tmp_path / f"tok{i}"), n=n, seed=i) for i, n in ((0, 24), (1, 16))]
    target = load_target(tiny_config("dspark", stores[0], "x").target.path, dtype="float32")
    layers = tuple(tiny_config("dspark", stores[0], "x").draft.target_layer_ids)
    caches = []
    for i, store in enumerate(stores):
        caches.append(str(tmp_path / f"cache{i}"))
        build_feature_cache(TokenStore(store), target, layers, caches[-1], dtype="float32",
                            compression="none", smallest_bucket=64, progress=False,
                            log=lambda *_: None)
    rows = {}
    for mode in ("online", "cached"):
        c = tiny_config("dspark", stores[0], str(tmp_path / mode), max_steps=3)
        c.data.train = tuple(stores)
        if mode == "cached":
            c.data.feature_cache = ",".join(caches)
        run = setup(c)
        assert len(run.lengths) == 40 and run.step_config.online == (mode == "online")
        train(run)
        rows[mode] = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
    assert [r["step"] for r in rows["cached"]] == [1, 2, 3]
    _assert_same_steps(rows["cached"], rows["online"], rtol=1e-6)
    for bad in (caches[0], ",".join(caches + caches[:1]), caches[0] + ","):
        c = tiny_config("dspark", stores[0], str(tmp_path / "bad"), max_steps=1)
        c.data.train = tuple(stores)
        c.data.feature_cache = bad
        with pytest.raises(ConfigError, match="data.feature_cache"):
            setup(c)
    assert feature_cache_paths(" data/./a/features, b/features/") == ["data/a/features",
                                                                      "b/features"]


def test_cache_for_other_layers_is_refused(tmp_path):
    store = make_store(str(tmp_path / "tok"), n=10)
    c = tiny_config("dspark", store, str(tmp_path / "run"))
    target = load_target(c.target.path, dtype="float32")
    build_feature_cache(TokenStore(store), target, (0, 1, 4), str(tmp_path / "cache"), dtype="float32",
                        progress=False, log=lambda *_: None)
    c.data.feature_cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="layer_ids"):
        setup(c)


MESH_SCRIPT = r"""
import json, shutil, sys
import jax, numpy as np
from train_helpers import make_store, tiny_config
from deepspec_jax.sharding import make_mesh
from deepspec_jax.sharding import shardings_of
from deepspec_jax.train.trainer import setup, train
from flax import nnx
tmp, arch = sys.argv[1], sys.argv[2]
store = make_store(tmp + "/tok")
# 2 epochs of 5 steps: the schedule warms up over 3 steps, so lr(0) = 0 and the lr grows
cfg = lambda name: tiny_config(arch, store, f"{tmp}/{name}", max_steps=6, num_epochs=2,
                               warmup_ratio=0.3, checkpoint_every=3)
rows = lambda name: [json.loads(l) for l in open(f"{tmp}/{name}/metrics.jsonl")]
flat = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]
specs = lambda tree: [str(x.sharding.spec) for x in jax.tree.leaves(tree)]
out = {}
for name, mesh in [("one", make_mesh(1, 1, 1, devices=jax.devices()[:1])), ("eight", make_mesh(2, 2, 2))]:
    run = setup(cfg(name), mesh=mesh)
    train(run)
    out[name] = {"rows": rows(name), "params": flat(run.state.params), "specs": specs(run.state.params)}
    if name == "eight":  # step 3 as saved, read back onto the same mesh
        out["eight_at_3"] = flat(run.checkpoints.restore(run.state, 3)[0].params)
    run.checkpoints.close()
# restart from the 8-device run's step-3 checkpoint on 4 OTHER devices split fsdp=4 x tensor=1
shutil.copytree(f"{tmp}/eight/checkpoints/3", f"{tmp}/re/checkpoints/3")
mesh4 = make_mesh(1, 4, 1, devices=jax.devices()[4:])
run = setup(cfg("re"), mesh=mesh4)
_, abs_p, _ = nnx.split(nnx.merge(run.step_config.graphdef, nnx.State(run.state.params),
                                  nnx.State(run.rest)), nnx.Param, ...)
want = [str(s.spec) for s in jax.tree.leaves(shardings_of(abs_p, mesh4))]
out["re"] = {"step": int(run.state.step), "restored": flat(run.state.params),
             "specs": specs(run.state.params), "want_specs": want,
             "devices": sorted({d.id for x in jax.tree.leaves(run.state) for d in x.sharding.device_set})}
train(run)
out["re"].update(rows=rows("re"), params=flat(run.state.params))
json.dump(out, open(tmp + "/mesh.json", "w"))
"""


@pytest.fixture(scope="module", params=["dspark", pytest.param("eagle3")])
def mesh_runs(request, tmp_path_factory):
    """One 8-CPU-device child: the run on 1 device, on data=2 x fsdp=2 x tensor=2, and the
    latter restarted from its step-3 checkpoint on 4 other devices (fsdp=4)."""
    tmp = tmp_path_factory.mktemp(f"mesh_{request.param}")
    script = tmp / "mesh.py"
    script.write_text(MESH_SCRIPT)
    r = subprocess.run([PY, str(script), str(tmp), request.param], env=_env(8), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "mesh.json").read_text())


def _assert_adam_params_agree(got, want) -> None:
    """Parameters of two runs that differ only in how sums are grouped (device count,
    processes, the CPU's kernels), after a few Adam steps. Adam divides by sqrt(v), so
    where an element's gradient is ~0, fp32 rounding of the sum moves it by a visible
    fraction of lr (6e-4): on one machine (not on another) 8 of 4,096 elements of one
    leaf differed by up to 4.6e-5 after 5 steps, every other leaf by < 1.5e-6. Every
    element must agree within 1e-4 (a sixth of one step) and all but 1% within 1e-5; a
    real sharding or reduction error moves far more (and shows in the losses and gradient
    norms, compared tightly by ``_assert_same_steps``)."""
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        far = np.abs(a - b) > 1e-5 + 1e-5 * np.abs(b)
        assert far.mean() <= 1e-2, f"{far.sum()} of {far.size} elements differ by > 1e-5"


def _assert_same_steps(got: list[dict], want: list[dict], rtol: float) -> None:
    """Per-step loss, gradient norm (before clipping; Adam and clipping would hide a uniform
    gradient-scale error in the losses and parameters) and learning rate."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for k in ("total_loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[k] for r in got], [r[k] for r in want], rtol=rtol, atol=1e-7,
                                   err_msg=k)


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(mesh_runs):
    one, eight = mesh_runs["one"], mesh_runs["eight"]
    # parameters really split over both model axes
    assert sum("tensor" in s for s in eight["specs"]) > 0 and sum("fsdp" in s for s in eight["specs"]) > 0
    assert [r["lr"] for r in one["rows"]][0] == 0.0 < one["rows"][-1]["lr"]  # warmup > 0
    _assert_same_steps(eight["rows"], one["rows"], rtol=1e-5)
    _assert_adam_params_agree(eight["params"], one["params"])


@pytest.mark.slow
def test_restart_on_four_devices_reshards_and_continues(mesh_runs):
    eight, re = mesh_runs["eight"], mesh_runs["re"]
    assert re["step"] == 3 and re["devices"] == [4, 5, 6, 7]
    assert re["specs"] == re["want_specs"]                    # laid out for the new mesh ...
    assert sum(a != b for a, b in zip(re["specs"], eight["specs"])) > 0   # ... which differs
    for a, b in zip(re["restored"], mesh_runs["eight_at_3"], strict=True):
        np.testing.assert_array_equal(a, b)                   # resharding moves, never changes
    _assert_same_steps(re["rows"], eight["rows"][3:], rtol=1e-5)
    _assert_adam_params_agree(re["params"], eight["params"])


def _train_cli(cfg: str, devices: int = 1, extra=()) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "deepspec_jax.train", f"--config={cfg}", *extra],
                            env=_env(devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


# The CLI with orbax's commit (the rename of <step>.orbax-checkpoint-tmp to <step>) of one
# step held back: its asynchronous save stays in flight, so a kill -9 lands mid-save.
HOLD_COMMIT = r"""
import asyncio, sys
import orbax.checkpoint as ocp
from absl import app
marker, step = sys.argv[1], sys.argv[2]
cls = ocp.path.atomicity.AtomicRenameTemporaryPath
commit = cls.finalize
async def held(self):
    if self.get_final().name == step:
        open(marker, "w").write(str(self.get()))
        await asyncio.sleep(3600)
    await commit(self)
cls.finalize = held
sys.argv[1:] = sys.argv[3:]
from deepspec_jax.train.__main__ import main
app.run(main)
"""


def _wait_for(cond, what: str, p: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"the run exited ({p.returncode}) before {what}: {p.stdout.read()[-3000:]}")
        if time.time() > deadline:
            p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_during_async_checkpoint_then_resume_continues_the_same_trajectory(tmp_path):
    store = make_store(str(tmp_path / "tok"))
    # 40 samples / 8 = 5 steps per epoch; checkpoints at 2, 4, 6, 8, asynchronous (the default)
    ref = tiny_config("dspark", store, str(tmp_path / "ref"), max_steps=8, num_epochs=3,
                      async_checkpoint=True)
    train(setup(ref))
    ref_losses = _losses(str(tmp_path / "ref"))
    assert sorted(ref_losses) == list(range(1, 9))

    cfg = write_config_file(str(tmp_path / "int.py"), "dspark", store, str(tmp_path / "int"))
    flags = ["--noexport", "--config.train.max_steps=8", "--config.train.num_epochs=3",
             "--config.train.async_checkpoint=True"]
    marker, metrics = tmp_path / "held", tmp_path / "int" / "metrics.jsonl"
    p = subprocess.Popen([PY, "-c", HOLD_COMMIT, str(marker), "6", f"--config={cfg}", *flags],
                         env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(marker.exists, "the save of step 6 reached its commit", p)
    # training goes on while step 6 is saved in the background (it is asynchronous)
    _wait_for(lambda: len(metrics.read_text().splitlines()) >= 7, "step 7", p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ckpts = tmp_path / "int" / "checkpoints"
    assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ["2", "4"]
    assert (ckpts / "6.orbax-checkpoint-tmp" / "state").is_dir()  # written, never committed
    done = _losses(str(tmp_path / "int"))
    assert max(done) in (7, 8)  # step 8 logs, then its save waits for step 6's

    p = _train_cli(cfg, extra=flags)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "step 4/8" in out, out[-3000:]  # resumed from the last committed checkpoint
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    resumed = {r["step"]: r["total_loss"] for r in rows[len(done):]}
    assert sorted(resumed) == [5, 6, 7, 8]
    for s, v in resumed.items():
        assert v == ref_losses[s], (s, v, ref_losses[s])  # same devices: bit-identical continuation
    assert sorted(os.listdir(ckpts)) == ["4", "6", "8"]  # the uncommitted leftover is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_equals_the_one_process_run(tmp_path):
    """2 jax.distributed processes (1 CPU device each, loopback) vs one process on one
    device, same global batch of 8 split into 2 micro-batches of 4 (2 rows per host)."""
    store = make_store(str(tmp_path / "tok"))
    one = setup(tiny_config("dspark", store, str(tmp_path / "one"), max_steps=3),
                mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert one.step_config.num_micro == 2
    train(one)

    cfg = write_config_file(str(tmp_path / "dist.py"), "dspark", store, str(tmp_path / "dist"))
    addr = f"127.0.0.1:{_free_port()}"
    procs = [_train_cli(cfg, extra=["--config.train.max_steps=3", "--config.train.micro_batch_size=2",
                                    f"--coordinator_address={addr}", "--num_processes=2",
                                    f"--process_id={i}"]) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in outs[0] and "2 micro-batch(es)" in outs[0]
    assert os.path.isdir(tmp_path / "dist" / "checkpoints" / "3")
    rows = {n: [json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "dist")}
    _assert_same_steps(rows["dist"], rows["one"], rtol=1e-5)
    d = load_draft(str(tmp_path / "dist" / "final"), dtype="float32")
    _, p, _ = nnx.split(d.model, nnx.Param, ...)
    got, want = p.to_pure_dict(), one.state.params
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # the two runs sum the weight gradients over different row groupings (2 hosts x 2
    # rows vs 4 rows)
    _assert_adam_params_agree(jax.tree.leaves(got), jax.tree.leaves(want))
