"""``python -m deepspec_jax.plan``: slice names, FLOP counting of TPU programs, and the
train step of a tiny run compiled for a TPU slice (libtpu, compile only) and for cpu-8.

The tiny run is the Qwen3-4B DSpark reference config with a 4-layer, 128-wide target
architecture (--target_config) and short sequences: every code path of the reference
plan, compiled in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from deepspec_jax.config import target_config_from_dict
from deepspec_jax.plan.__main__ import main as plan_main
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.plan.flops import hlo_matmul_flops, target_forward_flops, target_matmul_params
from deepspec_jax.plan.programs import with_fields
from deepspec_jax.plan.report import Measurement, largest_fitting, parse_oom, predicted_start
from deepspec_jax.plan.targets import TargetArch, abstract_target, resolve_target_arch
from deepspec_jax.plan.topology import GIB, compile_only_devices, cpu_device_count, parse_slice
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train.trainer import setup_draft, setup_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TARGET = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "tie_word_embeddings": True,
    "rope_theta": 1000000, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
    "bos_token_id": 1, "eos_token_id": 2}

# Gemma-4 geometry in small: sliding layers (head 16, 2 KV heads) and full layers (head
# 32, k_eq_v with 1 KV head, no v_proj), the last two layers KV-shared (no k/v
# projections) with a double-wide MLP, untied output projection.
TINY_GEMMA4 = {
    "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1,
    "attention_k_eq_v": True, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "sliding_window": 8, "vocab_size": 512, "tie_word_embeddings": False,
    "hidden_size_per_layer_input": 0, "final_logit_softcapping": 30.0,
    "rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                           "partial_rotary_factor": 0.25},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(TINY_TARGET))
    return ["--config=" + os.path.join(REPO, "configs/dspark/dspark_qwen3_4b.py"),
            f"--target_config={path}", "--config.draft.target_layer_ids=(0,1,2)",
            "--config.draft.mask_token_id=1000", "--config.data.max_length=128",
            "--config.draft.num_anchors=8", "--config.train.global_batch_size=16",
            "--config.train.micro_batch_size=8", "--nosearch",
            # data-parallel (the reference configs default to fsdp): the argument-bytes
            # arithmetic of test_tiny_run_compiles_for_v5e_8_in_both_modes counts replicas
            "--config.mesh.data=-1", "--config.mesh.fsdp=1"]


def test_slice_names_map_to_libtpu_topologies():
    cases = {"v5e-8": ("v5e:2x4", 1), "v5e-16": ("v5e:4x4", 4), "v6e-4": ("v6e:2x2", 1),
             "v5p-8": ("v5:2x2x1", 1), "v5p-32": ("v5:2x2x4", 4), "v4-8": ("v4:2x2x1", 1),
             "v5litepod-8": ("v5e:2x4", 1)}
    for name, (topo, hosts) in cases.items():
        sl = parse_slice(name)
        assert (sl.topology_name, sl.hosts) == (topo, hosts), name
    for bad, why in [("v5e", "use <generation>-<size>"), ("v7-8", "use <generation>-<size>"),
                     ("v5p-7", "multiple of 2"), ("v5e-12", "power-of-two"), ("cpu-0", "N >= 1")]:
        with pytest.raises(ValueError, match=why):
            cpu_device_count(bad) if bad.startswith("cpu") else parse_slice(bad)
    assert cpu_device_count("cpu-8") == 8 and cpu_device_count("v5e-8") is None
    # v4 runs megacore on TPU VMs: one device per chip with the chip's 32 GiB
    v4 = compile_only_devices("v4-8")
    assert len(v4) == 4 and v4[0].num_cores == 2
    assert len({d.process_index for d in compile_only_devices("v5e-16")}) == 4


def test_flops_count_tpu_matmuls_and_loop_trips():
    dev = compile_only_devices("v5e-4")[0]
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=SingleDeviceSharding(dev))

    # a scan of 4 x 2 matmuls (one square, one not): XLA's cost analysis counts the loop
    # body once, we count it 4x
    def g(x, w, v):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), c @ v), x, None, length=4)[1]

    hlo = jax.jit(g).lower(sds(128, 256), sds(256, 256), sds(256, 384)).compile().as_text()
    got = hlo_matmul_flops(hlo)
    assert got.flops == 4 * 2 * 128 * 256 * (256 + 384), got
    # batched dot_generals become convolutions with the batch as dilated spatial dims
    att = lambda q, k: jnp.einsum("bhqd,bkhd->bhqk", q, k)
    hlo = jax.jit(att).lower(sds(4, 2, 64, 32), sds(4, 128, 2, 32)).compile().as_text()
    assert hlo_matmul_flops(hlo).flops == 2 * 4 * 2 * 64 * 128 * 32
    assert not got.unhandled


def test_analytic_target_flops_match_the_compiled_gemma4_forward():
    """target_forward_flops follows each layer's geometry: the XLA:CPU forward of a tiny
    Gemma-4 target (one attention tile: every [S, S] pair computed) has exactly its
    matmul FLOPs."""
    cfg = target_config_from_dict(TINY_GEMMA4, "tiny gemma4")
    model = CausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, s = 2, 32
    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids).logits)
    hlo = fwd.lower(state, jnp.zeros((b, s), jnp.int32)).compile().as_text()
    got = hlo_matmul_flops(hlo)
    assert not got.unhandled and got.unknown_trip_loops == 0, got
    assert got.flops == target_forward_flops(cfg, b, s), (got.flops, target_forward_flops(cfg, b, s))
    params = sum(x.size for k, x in nnx.to_flat_state(state)
                 if x.value.ndim == 2 and "embed" not in str(k))
    assert target_matmul_params(cfg) == params


def test_oom_message_and_search():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (77.26G) exceeds available HBM (15.75G).")
    got = parse_oom(msg)
    assert got["what"] == "HLO temporaries"
    assert got["required"] == int(77.26 * GIB) and got["available"] == int(15.75 * GIB)
    calls = []
    fits = lambda m: calls.append(m) or m <= 24
    cands = [1, 2, 4, 8, 16, 32, 48, 64, 128]
    assert largest_fitting(cands, fits, 2) == 16 and len(calls) <= 5
    assert largest_fitting(cands, lambda m: m <= 6, 64) == 4
    assert largest_fitting(cands, lambda m: False, 8) is None
    assert largest_fitting(cands, lambda m: True, 8) == 128


def test_search_starts_near_the_answer():
    """The micro-batch search starts at the size the measured temporaries scale to, so a
    plan compiles about one fitting and one failing size (fitting compiles take minutes)."""
    cands = [1, 2, 4, 8, 16, 32, 64, 128]
    # 8 per host: 10 GiB fixed (state, batch) + 4 GiB temporaries of 95 GiB
    m = Measurement(True, 1.0, temp_bytes=4 * GIB, peak_bytes=14 * GIB, capacity_bytes=95 * GIB)
    assert predicted_start(cands, 8, m) == 128     # 10 + 4 * 128 / 8 = 74 GiB
    m.capacity_bytes = 40 * GIB
    assert predicted_start(cands, 8, m) == 32      # 10 + 16 = 26 fits, 64 -> 42 does not
    true_temp = lambda mb: 1 * GIB + 3 * GIB * mb / 8     # part of the temporaries is fixed
    calls = []
    fits = lambda mb: calls.append(mb) or 10 * GIB + true_temp(mb) <= 40 * GIB
    assert largest_fitting(cands, fits, predicted_start(cands, 8, m)) == 64
    assert calls == [32, 64, 128]                   # doubling from 8 would also try 16
    # does not fit at the configured size: start below it
    m = Measurement(False, 1.0, temp_bytes=20 * GIB, peak_bytes=30 * GIB, capacity_bytes=15 * GIB)
    assert predicted_start(cands, 8, m) == 2       # 10 + 20 * 2 / 8 = 15
    assert predicted_start(cands, 8, Measurement(True, 1.0)) == 8   # no figures: configured


def test_tiny_run_compiles_for_v5e_8_in_both_modes(tiny_args, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = [a for a in tiny_args if a != "--nosearch"]   # one more compile per mode: micro 16
    assert plan_main(args + ["--topology=v5e-8", f"--json={out}"]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"cached", "online"}
    for r in rows.values():
        assert r["fits"] and r["capacity_bytes"] == int(15.75 * GIB)
        assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                   - r["alias_bytes"])
        assert 0 < r["peak_bytes"] < r["capacity_bytes"] and r["flops"] > 0
        assert (r["micro_batch_size"], r["num_micro"], r["seqs_per_device"]) == (8, 2, 1)
        assert r["searched"] and r["largest_micro_batch"] == 16   # the whole host batch fits
    # online also runs the target's forward (more FLOPs) and takes its bf16 weights as
    # inputs (replicated: fsdp=1); cached takes the global batch's features instead
    assert rows["online"]["flops"] > rows["cached"]["flops"]
    d, i, v, n = 128, 256, 1024, 4
    layer = 2 * d * d + 2 * d * 64 + 3 * d * i + 2 * d + 2 * 32
    target = 2 * (v * d + n * layer + d)
    feats = 2 * (16 // 8) * 128 * (3 * d + d)   # [B, S, (3 layers + last hidden) x d] per device
    diff = rows["online"]["argument_bytes"] - rows["cached"]["argument_bytes"]
    assert diff == pytest.approx(target - feats, rel=0.02)   # TPU tiles pad small arrays
    assert "train    cached" in capsys.readouterr().out


def test_tiny_eagle3_online_step_compiles_for_v5p_8(tiny_args, tmp_path):
    """Eagle3's online step (the target's forward inside the step) on its reference
    config's mesh, in seconds. tests/test_plan_reference.py compiles the real-depth
    online step for DSpark only: the target's part is the same program for the three
    Qwen3-4B configs (same layers, batch, micro-batch and mesh) and each draft's part is
    its v5e-8 cached case; DFlash runs DSpark's step code (family "dspark"), Eagle3 its
    own loss, whose online compile for TPU this keeps."""
    target = tmp_path / "config.json"   # Eagle3 reads exactly 5 target layers
    target.write_text(json.dumps(dict(TINY_TARGET, num_hidden_layers=6)))
    drop = ("--config=", "--target_config=", "--config.draft.", "--config.mesh.")
    args = [f"--config={os.path.join(REPO, 'configs/eagle3/eagle3_qwen3_4b.py')}",
            f"--target_config={target}", "--config.draft.target_layer_ids=(0,1,2,3,4)",
            "--config.draft.ttt_length=2",   # 2 unrolled TTT steps compile faster than 7
            *(a for a in tiny_args if not a.startswith(drop))]   # the config's own mesh
    out = tmp_path / "plan.json"
    assert plan_main(args + ["--topology=v5p-8", "--mode=online", f"--json={out}"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mode"] == "online" and row["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}, row
    assert row["fits"] and 0 < row["peak_bytes"] < row["capacity_bytes"] and row["flops"] > 0


def test_a_micro_batch_too_large_exits_nonzero_naming_the_knob(tiny_args, tmp_path, capsys):
    args = [a for a in tiny_args if "batch_size" not in a and "max_length" not in a]
    rc = plan_main(args + ["--topology=v5e-8", "--mode=cached", "--config.data.max_length=128",
                           "--config.train.global_batch_size=262144",
                           "--config.train.micro_batch_size=262144", f"--json={tmp_path / 'p.json'}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "train/cached of dspark_qwen3_4b does not fit on v5e-8" in err
    assert "Turn: train.micro_batch_size" in err
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    # the compiler's RESOURCE_EXHAUSTED figures: its temporaries + the step's inputs
    assert not row["fits"] and row["temp_bytes"] > row["capacity_bytes"]
    assert row["peak_bytes"] == row["temp_bytes"] + row["argument_bytes"]


def test_cpu_8_reports_an_estimate_against_the_budget(tiny_args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)   # the CLI itself starts the CPU backend with 8 devices
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, "-m", "deepspec_jax.plan", "--topology=cpu-8", "--mode=cached",
           *tiny_args]
    ok = subprocess.run(cmd + ["--hbm_gb=80", f"--json={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "ESTIMATE" in ok.stdout and "8 devices" in ok.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["estimate"] and row["devices"] == 8 and row["capacity_bytes"] == 80 * GIB
    assert 0 < row["peak_bytes"] < row["capacity_bytes"] and row["fits"]
    bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--hbm_gb" in bad.stderr


def test_abstract_draft_state_shards_adam_moments_like_the_params(tiny_args):
    """The plan's abstract state is the trainer's: on an fsdp mesh the optimizer's
    moments are sharded like the parameters (not replicated fp32 copies)."""
    cfg = json.loads(json.dumps(TINY_TARGET))
    arch = TargetArch(target_config_from_dict(cfg, "tiny"), "tiny")
    mesh = make_mesh(1, 8, 1, devices=compile_only_devices("v5e-8"))
    spec = importlib.util.spec_from_file_location(
        "_plan_cfg", os.path.join(REPO, "configs/dspark/dspark_qwen3_4b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c = with_fields(c, draft__target_layer_ids=(0, 1, 2), draft__mask_token_id=1000)
    ts = setup_target(c, mesh, target=abstract_target(arch, "bfloat16", mesh))
    dr = setup_draft(c, ts, 10, mesh, shapes_only=True)
    params = dr.state.params
    mu = [s for s in jax.tree.leaves(dr.state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
    sharded = 0
    for p, m, v in zip(jax.tree.leaves(params), jax.tree.leaves(mu.mu), jax.tree.leaves(mu.nu)):
        assert m.sharding == p.sharding and v.sharding == p.sharding
        sharded += "fsdp" in str(p.sharding.spec)
    assert sharded > 0   # the check means something: some parameters are fsdp-sharded


def _gemma4_12b(depth: int = 48):
    """The shipped google/gemma-4-12B architecture as the planner resolves the reference
    configs' placeholder path (``.../gemma-4-12B-it`` names the same architecture), cut to
    ``depth`` layers. Its config.json is the multimodal ``gemma4_unified`` wrapper."""
    arch = resolve_target_arch("/path/to/gemma-4-12B-it")
    assert arch.source.endswith("google/gemma-4-12B.json")
    assert arch.config.model_type == "gemma4_unified_text"
    cfg = arch.config
    return dataclasses.replace(cfg, num_hidden_layers=depth, layer_types=cfg.layer_types[:depth])


@pytest.fixture(scope="module")
def gemma4_12b_target():
    """(config, abstract bf16 target on the configs' v5p-8 fsdp mesh), built once, 12
    of the 48 layers (10 sliding, 2 full: building all takes 30 s)."""
    cfg = _gemma4_12b(12)
    mesh = make_mesh(1, -1, 1, devices=compile_only_devices("v5p-8"))
    return cfg, mesh, abstract_target(TargetArch(cfg, "gemma-4-12B.json"), "bfloat16", mesh)


def test_gemma4_12b_architecture(gemma4_12b_target):
    """48 layers, 8 of them full attention with 512-wide heads and one shared key/value
    head, ~12B parameters; the built model's parameters are the analytic count's
    matmul weights plus norms and layer scalars."""
    full = _gemma4_12b()
    assert full.layer_types.count("full_attention") == 8
    assert 11.5e9 < target_matmul_params(full) < 12.5e9     # "12B"
    cfg, _, target = gemma4_12b_target
    assert [cfg.layer_head_dim(i) for i in (0, 5)] == [256, 512]
    assert [cfg.layer_kv_heads(i) for i in (0, 5)] == [8, 1]
    total = sum(x.size for x in jax.tree.leaves(target.state))
    matmul = target_matmul_params(cfg)
    assert matmul <= total < matmul + 1e-4 * total


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_gemma4_12b_reference_configs_build_abstractly(gemma4_12b_target, kind):
    """The three Gemma-4-12B reference configs set up their target and draft (shapes
    only) on the shipped architecture with their own mesh."""
    cfg, mesh, target = gemma4_12b_target
    spec = importlib.util.spec_from_file_location(
        f"_plan_{kind}", os.path.join(REPO, f"configs/{kind}/{kind}_gemma4_12b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    assert max(c.draft.target_layer_ids) == 46                 # of the 48 layers
    c = with_fields(c, draft__target_layer_ids=(1, 3, 5, 7, 9))  # of the 12 built
    ts = setup_target(c, mesh, target=target)
    dr = setup_draft(c, ts, 10, mesh, shapes_only=True)
    assert sum(x.size for x in jax.tree.leaves(dr.state.params)) > 0
