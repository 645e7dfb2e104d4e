"""draft.init_grow_layers: a deeper block draft warm-started from a shallower one starts
predicting exactly as the shallower one (its added layers are the identity), and then
trains every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspec_jax import load_draft
from deepspec_jax.errors import ConfigError
from deepspec_jax.train.trainer import RESIDUAL_OUTPUTS, export, setup, train
from train_helpers import make_store, tiny_config


def _hidden(draft, seed: int = 0):
    """The draft's training backbone output [B, N, K, d] and its logits on fixed inputs."""
    model = draft.model
    rng = np.random.default_rng(seed)
    n_feat = len(draft.config.target_layer_ids)
    d = draft.config.layer.hidden_size
    ids = jnp.asarray(rng.integers(0, 500, (2, 24)), jnp.int32)
    feats = jnp.asarray(rng.standard_normal((2, 24, n_feat * d)), jnp.float32)
    anchors = jnp.asarray([[0, 5, 11], [2, 9, 16]], jnp.int32)
    keep = jnp.ones((2, 3), bool)
    h = model.train_hidden(ids, feats, anchors, keep)
    return np.asarray(h), np.asarray(model.logits(h))


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """A trained one-layer DSpark draft (JAX dir) and its token store."""
    tmp = tmp_path_factory.mktemp("grow")
    store = make_store(str(tmp / "tok"))
    run = setup(tiny_config("dspark", store, str(tmp / "run1"), max_steps=2))
    train(run)
    return export(run), store, tmp


def test_grown_draft_starts_as_the_shallow_one_and_trains(shallow):
    src, store, tmp = shallow
    c = tiny_config("dspark", store, str(tmp / "run3"), max_steps=2)
    c.draft.num_hidden_layers = 3
    c.draft.init_from = src
    c.draft.init_grow_layers = True
    run = setup(c)
    start = load_draft(export(run), dtype="float32")           # step 0: the grown warm start
    one = load_draft(src, dtype="float32")
    assert start.config.num_layers == 3 and one.config.num_layers == 1
    # every parameter is the source's; the added layers' residual outputs are zero
    got = dict(jax.tree_util.tree_flatten_with_path(run.state.params)[0])
    src_p = one.model
    for path, value in got.items():
        keys = [k.key for k in path]
        value = np.asarray(value)
        if keys[0] != "layers":
            want = np.asarray(getattr(src_p, keys[0]).get_value())
            assert np.array_equal(value, want), keys
            continue
        want = np.asarray(getattr(src_p.layers, keys[1]).get_value())
        assert value.shape == (3,) + want.shape[1:], keys
        assert np.array_equal(value[:1], want), keys
        if keys[1] in RESIDUAL_OUTPUTS:
            assert not value[1:].any(), keys
        elif keys[1] in ("q_proj", "gate_proj"):
            assert value[1:].std() > 0, keys                     # fresh, not copies
    # the grown draft predicts exactly as the source: hidden states and logits
    h3, z3 = _hidden(start)
    h1, z1 = _hidden(one)
    np.testing.assert_allclose(h3, h1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(z3, z1, rtol=0, atol=1e-4)
    # and it trains: the added layers' outputs leave zero
    train(run)
    after = jax.device_get(run.state.params["layers"])
    for name in RESIDUAL_OUTPUTS:
        assert np.abs(np.asarray(after[name])[1:]).max() > 0, name


def test_grow_refusals_name_the_fix(shallow):
    src, store, tmp = shallow
    deeper = tiny_config("dspark", store, str(tmp / "refuse0"), max_steps=1)
    deeper.draft.num_hidden_layers = 2
    deeper.draft.init_from = src
    with pytest.raises(ConfigError, match="1 layers and the run 2.*init_grow_layers=True"):
        setup(deeper)
    same = tiny_config("dspark", store, str(tmp / "refuse1"), max_steps=1)
    same.draft.init_from = src
    same.draft.init_grow_layers = True
    with pytest.raises(ConfigError, match="1 layers and the run's draft.num_hidden_layers is 1"):
        setup(same)
    alone = tiny_config("dspark", store, str(tmp / "refuse2"), max_steps=1)
    alone.draft.num_hidden_layers = 2
    alone.draft.init_grow_layers = True
    with pytest.raises(ConfigError, match="needs draft.init_from"):
        setup(alone)
