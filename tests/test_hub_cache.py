"""Checkpoints in a Hugging Face hub cache layout (every snapshot file a relative symlink
into ``blobs/``, names without extension; ``refs/main``): load_draft, load_target, both
converters and eval's path handling read them as they read a plain directory, write
regular files, pick the snapshot of a repo root, and name a missing blob."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import FIXTURES_ROOT, hub_snapshot, write_llama_gguf
from convert import hf_to_jax, jax_to_hf
from convert import jax_to_torch, torch_to_jax
from deepspec_jax import eval as ev
from deepspec_jax import load_draft, load_target
from deepspec_jax.checkpoint import copy_extra_files
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.hub_cache import resolve_checkpoint_path
from deepspec_jax.plan.targets import resolve_target_arch
from deepspec_jax.target import resolve_target_path
from deepspec_jax.weights.gguf_loader import read_gguf
from deepspec_jax.weights.loader import flat_variables
from deepspec_jax.weights.safetensors_io import TensorSource

FIX = os.path.join(FIXTURES_ROOT, "deepspec_v1")
DSPARK = os.path.join(FIX, "dspark_gated")   # has the deepspec_model_args.json sidecar
EAGLE3 = os.path.join(FIX, "eagle3")
TARGET = os.path.join(FIX, "target_qwen3_tiny")  # generation_config.json, description.json
SIDECAR = "deepspec_model_args.json"


def _arrays(state) -> dict[str, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in flat_variables(state).items()}


def _assert_same_arrays(a, b) -> None:
    a, b = _arrays(a), _arrays(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def _files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; none may be a symlink."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            assert not os.path.islink(p), f"{p}: a symlink was copied"
            if name in files:
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
    return out


def _blob_of(link: str) -> str:
    return os.path.realpath(link)


def test_layout_is_a_hub_cache(tmp_path):
    snap = hub_snapshot(DSPARK, str(tmp_path))
    assert sorted(os.listdir(snap)) == sorted(os.listdir(DSPARK))
    for name in os.listdir(snap):
        link = os.path.join(snap, name)
        assert os.path.islink(link) and not os.path.isabs(os.readlink(link))
        assert "." not in os.path.basename(_blob_of(link))
    repo = os.path.dirname(os.path.dirname(snap))
    assert os.path.basename(repo) == "models--deepspec--model"
    with open(os.path.join(repo, "refs", "main"), encoding="utf-8") as f:
        assert f.read() == os.path.basename(snap)


@pytest.mark.parametrize("src", [DSPARK, EAGLE3], ids=os.path.basename)
def test_load_draft_from_snapshot_and_repo_root(src, tmp_path):
    snap = hub_snapshot(src, str(tmp_path))
    plain = load_draft(src)
    for path in (snap, os.path.dirname(os.path.dirname(snap))):
        d = load_draft(path)
        assert d.source == snap and d.kind == plain.kind and d.spec.raw == plain.spec.raw
        _assert_same_arrays(d.state, plain.state)


def test_load_target_from_snapshot_and_repo_root(tmp_path):
    snap = hub_snapshot(TARGET, str(tmp_path))
    plain = load_target(TARGET)
    for path in (snap, os.path.dirname(os.path.dirname(snap))):
        t = load_target(path)
        assert t.source == snap and t.config == plain.config
        _assert_same_arrays(t.state, plain.state)


@pytest.mark.parametrize("src", [DSPARK, TARGET], ids=os.path.basename)
def test_converters_roundtrip_from_snapshot_byte_identical(src, tmp_path):
    """torch_to_jax -> jax_to_torch from a snapshot (and, the JAX dir laid out as a hub
    cache too, from its repo root) writes the same bytes as from the plain directory,
    the sidecar files included, all as regular files."""
    hf_to_jax(src, str(tmp_path / "jax"))
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "hf"))
    want_hf = _files(str(tmp_path / "hf"))
    assert sorted(want_hf) == sorted(os.listdir(src))
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            assert want_hf[name] == f.read(), name
    snap = hub_snapshot(src, str(tmp_path / "cache"))
    assert torch_to_jax.main([f"--src={snap}", f"--dst={tmp_path / 'jax_s'}"]) == 0
    # config.json and extra/ the same bytes (orbax names its params/ files at random)
    got_jax, want_jax = ({k: v for k, v in _files(str(tmp_path / d)).items()
                          if not k.startswith("params/")} for d in ("jax_s", "jax"))
    assert sorted(got_jax) == sorted(want_jax) == sorted(
        ["config.json", "deepspec_jax.json"] + [f"extra/{n}" for n in os.listdir(src)
                                                if n not in ("config.json", "model.safetensors")])
    assert all(got_jax[k] == want_jax[k] for k in got_jax if k != "deepspec_jax.json")
    jax_snap = hub_snapshot(str(tmp_path / "jax_s"), str(tmp_path / "cache"), repo="deepspec/jax")
    jax_repo = os.path.dirname(os.path.dirname(jax_snap))
    assert jax_to_torch.main([f"--src={jax_repo}", f"--dst={tmp_path / 'hf_s'}"]) == 0
    assert _files(str(tmp_path / "hf_s")) == want_hf
    if src == DSPARK:
        assert SIDECAR in want_hf
        _assert_same_arrays(load_draft(jax_snap).state, load_draft(src).state)


def test_repo_root_snapshot_choice(tmp_path):
    """refs/main picks the snapshot; without it a single snapshot is used and several
    are an error naming them; a ref to an absent snapshot is an error."""
    cache = str(tmp_path)
    old = hub_snapshot(EAGLE3, cache, commit="a" * 40, ref=False)
    repo = os.path.dirname(os.path.dirname(old))
    assert resolve_checkpoint_path(repo) == old
    new = hub_snapshot(DSPARK, cache, commit="b" * 40, ref=False)
    with pytest.raises(ConfigError) as e:
        resolve_checkpoint_path(repo)
    assert old in str(e.value) and new in str(e.value) and "refs/main" in str(e.value)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w", encoding="utf-8") as f:
        f.write("a" * 40)
    assert resolve_checkpoint_path(repo) == old
    assert load_draft(repo).spec.raw["architectures"] == ["Qwen3Eagle3Model"]
    with open(os.path.join(repo, "refs", "main"), "w", encoding="utf-8") as f:
        f.write("c" * 40 + "\n")
    with pytest.raises(CheckpointError, match="c{40}.*does not exist"):
        load_draft(repo)


def test_missing_blob_is_named(tmp_path, capsys):
    """A snapshot link whose blob is gone fails every reader before loading, naming the
    link and the blob and saying to re-download; the sidecar is never silently dropped."""
    snap = hub_snapshot(DSPARK, str(tmp_path))
    sidecar, weights = os.path.join(snap, SIDECAR), os.path.join(snap, "model.safetensors")
    blob = _blob_of(sidecar)
    os.remove(blob)

    def check(e):
        msg = str(e.value)
        assert sidecar in msg and blob in msg and "re-download" in msg
        assert "huggingface-cli download deepspec/model" in msg

    for call in (lambda: load_draft(snap), lambda: hf_to_jax(snap, str(tmp_path / "j")),
                 lambda: load_draft(os.path.dirname(os.path.dirname(snap)))):
        with pytest.raises(CheckpointError) as e:
            call()
        check(e)
    assert not os.path.exists(tmp_path / "j")
    with pytest.raises(CheckpointError) as e:  # the copy itself refuses, too
        copy_extra_files(snap, str(tmp_path / "extra"))
    check(e)
    capsys.readouterr()
    try:  # eval fails before loading anything
        assert ev.main([f"--draft={snap}", f"--target={TARGET}"]) == 1
    finally:
        ev.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert "--draft:" in err and sidecar in err and blob in err
    os.remove(_blob_of(weights))
    with pytest.raises(CheckpointError, match="model.safetensors: symlink to .*re-download"):
        TensorSource.from_dir(snap)


def test_eval_resolves_both_paths(tmp_path):
    """eval's --draft and --target go through the same resolution as the loaders."""
    snap = hub_snapshot(EAGLE3, str(tmp_path))
    tsnap = hub_snapshot(TARGET, str(tmp_path), repo="org/target")
    ev.FLAGS.unparse_flags()
    ev.FLAGS(["eval", f"--draft={os.path.dirname(os.path.dirname(snap))}",
              f"--target={os.path.dirname(os.path.dirname(tsnap))}"])
    try:
        assert ev.resolve_paths(ev.FLAGS.target, ev.FLAGS.draft) == (tsnap, snap)
        os.remove(_blob_of(os.path.join(tsnap, "generation_config.json")))
        with pytest.raises(ev.SetupError, match="--target: .*generation_config.json: symlink"):
            ev.resolve_paths(ev.FLAGS.target, ev.FLAGS.draft)
    finally:
        ev.FLAGS.unparse_flags()


def test_sharded_snapshot_loads(tmp_path):
    """A sharded checkpoint (index + shards, all links) reads through the index."""
    hf_to_jax(DSPARK, str(tmp_path / "jax"))
    files = jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "hf"), max_shard_size=100_000)
    assert "model.safetensors.index.json" in files and len(files) > 4
    snap = hub_snapshot(str(tmp_path / "hf"), str(tmp_path / "cache"))
    _assert_same_arrays(load_draft(snap).state, load_draft(DSPARK).state)


def test_gguf_target_through_a_symlink(tmp_path):
    """A GGUF repo's snapshot: its root resolves to the single .gguf link, which reads as
    the plain file does; a missing blob is named."""
    path = write_llama_gguf(str(tmp_path / "m.gguf"), "token_embd.weight",
                            np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    snap = hub_snapshot(path, str(tmp_path / "cache"), repo="org/m-GGUF")
    link = os.path.join(snap, "m.gguf")
    assert resolve_target_path(os.path.dirname(os.path.dirname(snap))) == link
    (raw_a, ta), (raw_b, tb) = read_gguf(path), read_gguf(link)
    assert raw_a == raw_b and sorted(ta) == sorted(tb)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert resolve_target_arch(os.path.dirname(os.path.dirname(snap))).config == \
        resolve_target_arch(path).config
    shutil.copyfile(path, os.path.join(snap, "other.gguf"))
    with pytest.raises(ConfigError, match="2 GGUF files"):
        resolve_target_path(snap)
    os.remove(_blob_of(link))
    with pytest.raises(CheckpointError, match="m.gguf: symlink to .*re-download"):
        load_target(link)


@pytest.mark.slow
def test_load_target_gguf_symlink_equals_plain(tmp_path):
    """The embedded SmolLM2 GGUF loaded through a hub cache symlink (~30 s: two loads)."""
    from deepspec_jax.target import smollm2_gguf_path

    snap = hub_snapshot(smollm2_gguf_path(), str(tmp_path), repo="org/SmolLM2-GGUF")
    t = load_target(os.path.join(snap, os.path.basename(smollm2_gguf_path())))
    _assert_same_arrays(t.state, load_target().state)
