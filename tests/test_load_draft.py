"""``deepspec_jax.load_draft``: HF dirs and JAX dirs give the same Draft, with the
family config, dtype policy, mesh placement and save/export path."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from convert import hf_to_jax, jax_to_hf
from convert_helpers import (BF16, assert_same_hf, ckpt_id, draft_dirs, make_bf16_copy,
                             read_config, read_tensors)
from deepspec_jax import Draft, load_draft
from deepspec_jax.checkpoint import params_to_hf
from deepspec_jax.sharding import make_mesh
from deepspec_jax.weights.loader import flat_variables

DRAFTS = draft_dirs()


def _arrays(draft: Draft) -> dict[str, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in flat_variables(draft.state).items()}


def _assert_config_matches_raw(config, raw: dict) -> None:
    """Every dataclass field named like a config.json field carries its value."""
    checked = 0
    for f in dataclasses.fields(config):
        if f.name in raw and f.name != "raw":
            want = raw[f.name]
            got = getattr(config, f.name)
            assert (list(got) if isinstance(got, tuple) else got) == want, f.name
            checked += 1
    assert checked >= 3, "config dataclass shares too few field names with config.json"


def test_drafts_found():
    assert DRAFTS
    kinds = {read_config(d)["architectures"][0] for d in DRAFTS}
    assert {"Qwen3DSparkModel", "Qwen3Eagle3Model"} <= kinds


@pytest.mark.parametrize("src", DRAFTS, ids=ckpt_id)
def test_hf_and_jax_dir_load_identically(src, tmp_path):
    jax_dir = str(tmp_path / "jax")
    hf_to_jax(src, jax_dir)
    a, b = load_draft(src), load_draft(jax_dir)
    raw = read_config(src)
    for d in (a, b):
        assert isinstance(d, Draft)
        assert raw["architectures"][0] in d.family.architectures.values()
        assert d.spec.architecture == raw["architectures"][0]
        heads = raw.get("markov_rank", 0) > 0 or raw.get("enable_confidence_head", False)
        assert d.kind == ("eagle3" if "Eagle3" in raw["architectures"][0]
                          else "dspark" if heads else "dflash")
        assert d.kind in d.family.kinds
        assert d.dtype == "float32"
        _assert_config_matches_raw(d.config, raw)
        assert d.raw_config == raw
    assert a.graphdef == b.graphdef  # same module graph: jit caches are shared
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys() and len(xa) > 5
    for p in xa:
        assert xa[p].dtype == xb[p].dtype == np.float32, p
        assert np.array_equal(xa[p], xb[p]), p
    # The loaded values are the checkpoint's tensors (names/transposes via the rules).
    hf = params_to_hf(a.spec, a.state)
    want = read_tensors(src)
    assert hf.keys() == want.keys()
    for k in want:
        assert hf[k].tobytes() == want[k].tobytes(), k


def test_dtype_policy(tmp_path):
    src = DRAFTS[0]
    bf16_src = make_bf16_copy(src, str(tmp_path / "bf16"))
    kept = load_draft(bf16_src)  # None: keep the stored bf16
    assert kept.dtype == "bfloat16" and {a.dtype for a in _arrays(kept).values()} == {BF16}
    up = load_draft(bf16_src, dtype="float32")
    assert up.dtype == "float32" and {a.dtype for a in _arrays(up).values()} == {np.dtype(np.float32)}
    down = load_draft(src, dtype="bfloat16")
    assert {a.dtype for a in _arrays(down).values()} == {BF16}
    jax_dir = str(tmp_path / "jax")
    hf_to_jax(bf16_src, jax_dir)
    from_jax = load_draft(jax_dir, dtype="float32")  # cast while restoring from orbax
    xa, xb = _arrays(up), _arrays(from_jax)
    assert all(xb[p].dtype == np.float32 and np.array_equal(xa[p], xb[p]) for p in xa)
    with pytest.raises(ValueError, match="dtype"):
        load_draft(src, dtype="int3")
    # A cast draft saved and exported is a consistent bf16 release (config dtype too).
    down.save(str(tmp_path / "down"))
    jax_to_hf(str(tmp_path / "down"), str(tmp_path / "down_hf"))
    raw = read_config(str(tmp_path / "down_hf"))
    assert raw.pop("dtype") == "bfloat16"
    assert raw == {k: v for k, v in read_config(src).items() if k != "dtype"}
    assert_same_hf(bf16_src, str(tmp_path / "down_hf"))


def test_mesh_placement(tmp_path):
    """Both formats place every parameter directly into its sharding on the given mesh."""
    mesh = make_mesh()
    hf_to_jax(DRAFTS[0], str(tmp_path / "jax"))
    for path in (DRAFTS[0], str(tmp_path / "jax")):
        d = load_draft(path, mesh=mesh)
        assert d.mesh is mesh
        for p, v in flat_variables(d.state).items():
            arr = v.get_value()
            assert isinstance(arr, jax.Array) and arr.sharding.mesh == mesh, (path, p)


_SHARDED_SCRIPT = r"""
import sys, numpy as np, jax
from deepspec_jax import load_draft
from deepspec_jax.sharding import make_mesh
from deepspec_jax.weights.loader import flat_variables
assert len(jax.devices()) == 4
mesh = make_mesh(fsdp=2, tensor=2)
a, b = load_draft(sys.argv[1], mesh=mesh), load_draft(sys.argv[2], mesh=mesh)
va, vb = flat_variables(a.state), flat_variables(b.state)
sharded = 0
for p in va:
    x, y = va[p].get_value(), vb[p].get_value()
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), p
    assert np.array_equal(np.asarray(x), np.asarray(y)), p
    shard = y.addressable_shards[0].data.shape
    sharded += shard != y.shape
print("SHARDED", sharded, len(va))
"""


def test_jax_dir_restores_into_shardings(tmp_path):
    """On a 4-device mesh, the orbax restore gives the same shardings (each device holds
    only its shard) and values as streaming the HF checkpoint."""
    import os
    import subprocess
    import sys

    src = DRAFTS[0]
    hf_to_jax(src, str(tmp_path / "jax"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, src, str(tmp_path / "jax")],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("SHARDED")][0]
    n_sharded, n_total = map(int, line.split()[1:])
    assert n_sharded >= n_total // 2, line


@pytest.mark.parametrize("src", [DRAFTS[0], DRAFTS[-1]] if DRAFTS else [], ids=ckpt_id)
def test_save_then_export_reproduces_release(src, tmp_path):
    """A Draft (possibly after training) saved as a JAX dir exports to the release layout."""
    d = load_draft(src)
    d.save(str(tmp_path / "saved"))
    again = load_draft(str(tmp_path / "saved"))
    xa, xb = _arrays(d), _arrays(again)
    assert all(np.array_equal(xa[p], xb[p]) for p in xa)
    jax_to_hf(str(tmp_path / "saved"), str(tmp_path / "hf"))
    assert_same_hf(src, str(tmp_path / "hf"))
    # Changed weights are what gets exported.
    state = jax.tree.map(lambda x: x * 2, d.state)
    dataclasses.replace(d, state=state).save(str(tmp_path / "scaled"))
    jax_to_hf(str(tmp_path / "scaled"), str(tmp_path / "hf2"))
    got, want = read_tensors(str(tmp_path / "hf2")), read_tensors(src)
    assert all(np.array_equal(got[k], want[k] * 2) for k in want)



def test_share_with_target_stores_no_embeddings_and_reloads_from_target(tmp_path):
    from deepspec_jax.checkpoint import CheckpointError
    from deepspec_jax.target import load_target
    from train_helpers import TINY_TARGET

    src = next(d for d in draft_dirs() if "dspark_gated" in d and "distilled" not in d)
    target = load_target(TINY_TARGET, dtype="float32")
    draft = load_draft(src, dtype="float32")
    draft.save(str(tmp_path / "shared"), share_with_target=True)
    draft.save(str(tmp_path / "full"))
    import json, os
    m = json.load(open(os.path.join(tmp_path / "shared", "deepspec_jax.json")))
    assert m["shared_from_target"] == ["embed", "lm_head"]
    with pytest.raises(CheckpointError, match="shared with the target"):
        load_draft(str(tmp_path / "shared"))
    back = load_draft(str(tmp_path / "shared"), target=target)
    got, want = flat_variables(back.state), flat_variables(draft.state)
    assert set(got) == set(want)
    for p in want:
        if p == "embed":
            ref = target.model.embed.get_value()
        elif p == "lm_head":
            ref = target.model.lm_head_weight()
        else:
            ref = want[p].get_value()
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(ref), err_msg=p)
    shared_bytes = sum(f.stat().st_size for f in (tmp_path / "shared").rglob("*") if f.is_file())
    full_bytes = sum(f.stat().st_size for f in (tmp_path / "full").rglob("*") if f.is_file())
    assert shared_bytes < full_bytes
