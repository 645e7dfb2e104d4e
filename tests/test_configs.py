"""The training configs under configs/: they load, fit the schema and match the reference.

Fast: no model is loaded. The expected values below are written out independently of
configs/_targets.py and configs/_recipes.py (target depths from the targets' config.json,
hyper-parameters from deepseek-ai/DeepSpec's config/<arch>/<arch>_<target>.py), so a wrong
edit to either side fails here.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from deepspec_jax.errors import ConfigError
from deepspec_jax.models.registry import family_for
from deepspec_jax.drafts.registry import KINDS as ARCHITECTURES
from deepspec_jax.train.config import base_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Target decoder depth (HF config.json num_hidden_layers).
DEPTH = {"qwen3_4b": 36, "qwen3_8b": 36, "qwen3_14b": 40, "gemma4_12b": 48, "smollm2_135m": 30,
         "gemma3_270m": 18}
# Targets with configs for some architectures only (the brief Gemma-3-270M CPU run).
ONLY_ARCHS = {"gemma3_270m": ("dspark",)}
REFERENCE_TARGETS = ("qwen3_4b", "qwen3_8b", "qwen3_14b", "gemma4_12b")

REF_LAYER_IDS = {
    "qwen3_4b": (1, 9, 17, 25, 33), "qwen3_8b": (1, 9, 17, 25, 33),
    "qwen3_14b": (1, 10, 19, 28, 37), "gemma4_12b": (5, 17, 29, 41, 46),
}
REF_MASK_TOKEN = {"qwen3_4b": 151669, "qwen3_8b": 151669, "qwen3_14b": 151669, "gemma4_12b": 4}

# Shared by all 12 reference configs (train=dict, data=dict; AdamW betas/eps are torch's
# defaults because deepspec/utils/optim.py passes none).
REF_COMMON = {
    "train.lr": 6e-4, "train.warmup_ratio": 0.04, "train.min_lr_ratio": 0.0,
    "train.weight_decay": 0.0, "train.adam_b1": 0.9, "train.adam_b2": 0.999,
    "train.adam_eps": 1e-8, "train.max_grad_norm": 1.0, "train.global_batch_size": 512,
    "train.num_epochs": 10, "train.max_steps": 0, "train.compute_dtype": "bfloat16",
    "target.dtype": "bfloat16", "data.max_length": 4096, "train.log_every": 10,
    "train.checkpoint_every": 3000,
}
REF_ARCH = {
    "dspark": {
        "draft.num_hidden_layers": 5, "draft.block_size": 7, "draft.num_anchors": 512,
        "draft.markov_rank": 256, "draft.markov_head_type": "vanilla",
        "draft.enable_confidence_head": True, "draft.confidence_head_with_markov": True,
        "loss.ce_alpha": 0.1, "loss.l1_alpha": 0.9, "loss.confidence_alpha": 1.0,
        "loss.loss_decay_gamma": 4.0, "train.seed": 42,
    },
    "dflash": {
        "draft.num_hidden_layers": 5, "draft.block_size": 7, "draft.num_anchors": 512,
        "draft.markov_rank": 0, "draft.enable_confidence_head": False,
        "loss.ce_alpha": 1.0, "loss.l1_alpha": 0.0, "loss.confidence_alpha": 0.0,
        "loss.loss_decay_gamma": 4.0, "train.seed": 42,
    },
    "eagle3": {
        "draft.num_hidden_layers": 1, "draft.ttt_length": 7, "draft.step_loss_decay": 0.8,
        "loss.eagle3_corrected": False, "train.seed": 0,
    },
}

EXPECTED_FILES = sorted(f"{a}/{a}_{t}.py" for a in ARCHITECTURES for t in DEPTH
                        if a in ONLY_ARCHS.get(t, ARCHITECTURES))


def _config_files():
    return sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.glob("*/*.py"))


def _load(rel: str):
    path = CONFIG_DIR / rel
    spec = importlib.util.spec_from_file_location(f"_test_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _split(rel: str):
    arch, stem = rel.split("/")
    target = stem[:-3].split("_", 1)[1]
    return arch, target


def test_all_config_files_present():
    assert _config_files() == EXPECTED_FILES


@pytest.mark.parametrize("rel", EXPECTED_FILES)
def test_config_matches_schema(rel):
    arch, target = _split(rel)
    c = _load(rel)
    assert c.is_locked, f"configs/{rel}: get_config() must return a locked ConfigDict"
    base = _flat(base_config(arch))
    flat = _flat(c)
    assert flat.keys() == base.keys(), f"configs/{rel}: fields differ from base_config"
    for key, value in flat.items():
        assert type(value) is type(base[key]), f"configs/{rel}: {key} has type {type(value)}"
    assert c.draft.kind == arch
    assert c.name == f"{arch}_{target}"


@pytest.mark.parametrize("rel", EXPECTED_FILES)
def test_layers_blocks_and_batches_are_sane(rel):
    arch, target = _split(rel)
    c = _load(rel)
    ids = tuple(c.draft.target_layer_ids)
    last = DEPTH[target] - 1
    assert list(ids) == sorted(set(ids)), f"configs/{rel}: target_layer_ids not increasing"
    assert last not in ids, f"configs/{rel}: target_layer_ids contain the last layer {last}"
    assert all(-1 <= i < last for i in ids), f"configs/{rel}: {ids} out of range"
    if arch == "eagle3":
        assert len(ids) == 5 and -1 not in ids, "Eagle3 takes exactly 5 decoder layers"
    else:
        assert 2 <= c.draft.block_size <= 16
        assert 1 <= c.draft.num_anchors < c.data.max_length
        assert c.draft.mask_token_id >= -1
        has_markov = c.draft.markov_rank > 0
        assert has_markov == (c.draft.markov_head_type in ("vanilla", "gated", "rnn"))
        assert has_markov == (arch == "dspark")
        assert c.draft.enable_confidence_head == (c.loss.confidence_alpha > 0)
        if c.draft.confidence_head_with_markov:
            assert c.draft.enable_confidence_head and has_markov
        if arch == "dflash":
            assert not c.draft.enable_confidence_head and c.loss.l1_alpha == 0.0
    micro = c.train.micro_batch_size
    assert micro >= 0 and (micro == 0 or c.train.global_batch_size % micro == 0)
    assert c.draft.num_hidden_layers >= 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("target", REFERENCE_TARGETS)
def test_reference_values(arch, target):
    c = _flat(_load(f"{arch}/{arch}_{target}.py"))
    expected = {**REF_COMMON, **REF_ARCH[arch], "draft.target_layer_ids": REF_LAYER_IDS[target]}
    if arch != "eagle3":
        expected["draft.mask_token_id"] = REF_MASK_TOKEN[target]
    for key, value in expected.items():
        ok = c[key] == (pytest.approx(value) if isinstance(value, float) else value)
        assert ok, f"configs/{arch}/{arch}_{target}.py: {key} = {c[key]!r}, reference {value!r}"
    assert c["target.path"].startswith("/path/to/"), "reference targets use a placeholder path"
    # not the reference's data-parallel: fsdp over all devices, so a 16 GB TPU chip (v5e)
    # holds the draft, its AdamW state and its share of the batch (configs/_recipes.py)
    mesh = (c["mesh.data"], c["mesh.fsdp"], c["mesh.tensor"])
    assert mesh == (1, -1, 1), (f"configs/{arch}/{arch}_{target}.py: mesh data/fsdp/tensor = "
                                f"{mesh}, want (1, -1, 1) (reference_run in configs/_recipes.py)")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_smollm2_configs_fit_a_cpu(arch):
    c = _load(f"{arch}/{arch}_smollm2_135m.py")
    assert c.target.path == "smollm2-135m"
    assert c.target.dtype == "float32" and c.train.compute_dtype == "float32"
    assert tuple(c.data.train) == ("data/smollm2/tokens",)
    assert c.data.max_length <= 512
    assert c.train.global_batch_size <= 16 and 0 <= c.train.max_steps <= 1000
    assert c.train.num_epochs <= 10 and c.data.feature_cache  # cached features: reused each epoch
    assert c.draft.num_hidden_layers == 1
    if arch == "dspark":
        # a block of 3-7 drafts: a CPU verifies up to 8 tokens at ~1.2-1.5x the cost of 1
        assert 3 <= c.draft.block_size <= 7 and c.draft.markov_head_type == "gated"
        assert c.draft.enable_confidence_head
    if arch != "eagle3":
        assert c.draft.mask_token_id == -1
        assert c.draft.num_anchors * c.draft.block_size <= c.data.max_length


def test_gemma3_config_fits_a_cpu():
    """The brief Gemma-3-270M run: the packaged GGUF, its <mask> token (id 4), fewer draft
    rows than SmolLM2's since its 262k vocabulary makes each row ~5x dearer."""
    c = _load("dspark/dspark_gemma3_270m.py")
    smol = _load("dspark/dspark_smollm2_135m.py")
    assert c.target.path == "gemma3-270m" and tuple(c.data.train) == ("data/gemma3/tokens",)
    assert c.target.dtype == "float32" and c.train.compute_dtype == "float32"
    assert c.draft.mask_token_id == 4 and c.draft.num_hidden_layers == 1
    assert c.data.feature_cache and c.train.num_epochs <= 10 and c.train.global_batch_size <= 16
    rows = c.draft.num_anchors * c.draft.block_size
    assert rows <= c.data.max_length and 3 * rows <= smol.draft.num_anchors * smol.draft.block_size


def test_recipes_refuse_unknown_names():
    """A typo in a SmolLM2 file's draft overrides, or a non-reference target, is an error
    naming the field, not a silently added key."""
    spec = importlib.util.spec_from_file_location("_test_recipes", CONFIG_DIR / "_recipes.py")
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    with pytest.raises(ConfigError, match="markov_rnak"):
        recipes.smollm2_config("dspark", batch_size=4, num_epochs=1, markov_rnak=32)
    with pytest.raises(ConfigError, match="gemma3_270m.*markov_rnak"):
        recipes.gemma3_270m_config("dspark", batch_size=4, num_epochs=1, markov_rnak=32)
    with pytest.raises(ConfigError, match="smollm2_135m"):
        recipes.reference_config("dspark", "smollm2_135m")
    c = recipes.smollm2_config("dflash", batch_size=4, num_epochs=1, block_size=5)
    assert c.is_locked and c.draft.block_size == 5 and c.train.micro_batch_size == 4


def test_target_families_resolve_and_unknown_ones_are_refused():
    """Gemma-3/Gemma-4 targets are model families now; an unknown model_type is still an
    error that names the field."""
    assert family_for("gemma4").gemma == 4 and family_for("gemma4_text").gemma == 4
    assert family_for("gemma3_text").gemma == 3 and family_for("qwen3").gemma == 0
    with pytest.raises(ConfigError, match="model_type"):
        family_for("mistral")


def _parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_config_flags_loading_and_overrides():
    path = str(CONFIG_DIR / "dspark" / "dspark_smollm2_135m.py")
    c = _parse(["prog", f"--config={path}", "--config.train.lr=0.001",
                "--config.draft.target_layer_ids=(2,4)"])
    assert c.train.lr == 0.001 and tuple(c.draft.target_layer_ids) == (2, 4)
    with pytest.raises((AttributeError, KeyError, flags.Error)):
        _parse(["prog", f"--config={path}", "--config.train.lrr=0.001"])


def test_tpu_launcher_dry_run_round_trips(tmp_path):
    """The per-worker command that --dry_run prints runs the trainer with the exact flags."""
    script = CONFIG_DIR.parent / "scripts" / "launch_tpu_pod.sh"
    fake = tmp_path / "w" / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$PWD" "$FOO" "$@"\n')
    fake.chmod(0o755)
    extra = ["--config.train.lr=3e-4", "--config.data.train=('data/a b/tokens',)"]
    out = subprocess.run(
        ["bash", str(script), "--tpu", "pod", "--zone", "z", "--workdir", str(tmp_path / "w"),
         "--config", "configs/dspark/dspark_qwen3_4b.py", "--env", "FOO=x 'y'", "--dry_run",
         "--", *extra], check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith("# on each worker (all) of pod")
    assert out[3].startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all")
    ran = subprocess.run(["bash", "-c", out[1]], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout.splitlines()
    assert ran == [str(tmp_path / "w"), "x 'y'", "-m", "deepspec_jax.train",
                   "--config=configs/dspark/dspark_qwen3_4b.py", "--multihost", *extra]
    bad = subprocess.run(["bash", str(script), "--zone", "z", "--config", "c.py"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "TPU_NAME" in bad.stderr
