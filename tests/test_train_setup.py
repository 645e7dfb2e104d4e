"""Trainer set-up stages, each alone: target, data, draft + optimizer, checkpoints.

The whole chain (``setup``) and the step are exercised by tests/test_train.py; these
check what each stage promises on its own, in-process on one CPU device.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train.checkpoints import Checkpoints
from deepspec_jax.train.step import TrainState
from deepspec_jax.train.trainer import (open_checkpoints, setup_data, setup_draft, setup_target,
                                        shardings_of)
from train_helpers import make_store, tiny_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("stage") / "tok"))


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def target_stage(store, mesh1):
    return setup_target(tiny_config("dspark", store, "unused"), mesh1)


def test_setup_target_derives_the_draft_from_the_target(store, mesh1, target_stage):
    ts = target_stage
    assert ts.layer_ids == (0, 2, 4) and ts.name == "target_qwen3_tiny"
    assert ts.spec.raw["hidden_size"] == ts.target.config.hidden_size == 64
    assert ts.spec.raw["num_target_layers"] == 6 and ts.spec.raw["mask_token_id"] == 511
    c = tiny_config("dspark", store, "unused")
    c.draft.target_layer_ids = (0, 6)  # the tiny target has layers 0..5
    with pytest.raises(ValueError, match="out of range"):
        setup_target(c, mesh1)
    c = tiny_config("dspark", store, "unused")
    c.draft.kind = "medusa"
    with pytest.raises(ConfigError, match="draft.kind"):
        setup_target(c, mesh1)


def test_setup_data_alone_splits_the_global_batch_over_processes(store):
    c = tiny_config("dspark", store, "unused", max_steps=3, num_epochs=2)
    one = setup_data(c)  # online: no target needed
    assert (one.online, one.local_batch, one.num_micro) == (True, 8, 2)
    assert (one.total_steps, one.schedule_steps) == (3, 10)  # 40 samples / 8 = 5 steps per epoch
    assert one.lengths.shape == (40,)
    halves = [setup_data(c, process_index=i, process_count=2) for i in range(2)]
    assert [(h.local_batch, h.num_micro) for h in halves] == [(4, 1), (4, 1)]
    b, b0, b1 = next(one.data), next(halves[0].data), next(halves[1].data)
    np.testing.assert_array_equal(np.concatenate([b0["index"], b1["index"]]), b["index"])
    np.testing.assert_array_equal(np.concatenate([b0["input_ids"], b1["input_ids"]]), b["input_ids"])
    with pytest.raises(ConfigError, match="global_batch_size=8 must split evenly over 3 processes"):
        setup_data(c, process_index=0, process_count=3)
    c.data.feature_cache = "/nonexistent"
    with pytest.raises(ValueError, match="needs the TargetSetup"):
        setup_data(c)


def test_setup_draft_alone_places_params_and_optimizer_on_the_mesh(store, mesh1, target_stage):
    c = tiny_config("dspark", store, "unused", warmup_ratio=0.5)
    dr = setup_draft(c, target_stage, 10, mesh1)
    assert int(dr.state.step) == 0 and float(dr.schedule(0)) == 0.0 and float(dr.schedule(5)) > 0
    # the frozen embedding is the target's (not a random init) and not trained
    assert "embed" not in dr.state.params
    np.testing.assert_array_equal(np.asarray(dr.rest["embed"]),
                                  np.asarray(target_stage.target.model.embed.get_value()))
    model = nnx.merge(dr.graphdef, nnx.State(dr.state.params), nnx.State(dr.rest))
    _, p, _ = nnx.split(model, nnx.Param, ...)
    want = shardings_of(p, mesh1)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 dr.state.params, want)
    # Adam's moments mirror the params; every optimizer leaf lives on the run's mesh
    for x in jax.tree.leaves(dr.state.opt_state):
        assert set(x.sharding.device_set) == set(mesh1.devices.flat)


def _state(step: int, value: float) -> TrainState:
    return TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.full((4, 3), value, jnp.float32)},
                      {"mu": jnp.full((4, 3), -value, jnp.float32)}, jnp.zeros((2,), jnp.uint32))


def test_async_checkpoints_never_pick_up_an_uncommitted_save(store, tmp_path):
    c = tiny_config("dspark", store, str(tmp_path / "run"), keep_checkpoints=3, async_checkpoint=True)
    ck = open_checkpoints(c)
    assert isinstance(ck, Checkpoints) and ck.directory == str(tmp_path / "run" / "checkpoints")
    for step in (1, 2):
        ck.save(_state(step, float(step)), {"step": step}, {"name": "t"})
    ck.close()
    # what a kill -9 during the asynchronous save of step 5 leaves: the step's complete
    # contents under orbax's temporary name, never renamed to "5"
    tmp = os.path.join(ck.directory, "5.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ck.directory, "2"), tmp)
    ck = open_checkpoints(c)
    assert ck.latest_step() == 2
    state, data_state, info = ck.restore(_state(0, 0.0))
    assert int(state.step) == 2 and data_state == {"step": 2} and info == {"name": "t"}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((4, 3), 2.0, np.float32))
    ck.save(_state(3, 3.0), {"step": 3}, {"name": "t"})
    ck.close()
    assert not os.path.exists(tmp)  # the leftover is deleted, not left to fill the disk
    assert sorted(os.listdir(ck.directory)) == ["1", "2", "3"]
    assert int(Checkpoints(ck.directory, 3).restore(_state(0, 0.0))[0].step) == 3
