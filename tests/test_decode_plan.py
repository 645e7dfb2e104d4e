"""The eval's decode programs compile for a TPU slice from abstract shapes
(deepspec_jax/plan/decode.py): Qwen3-4B tensor-sharded 4 ways on v5e-4 with its DSpark
draft. CI compiles the tree program at full depth (36 layers): the prefill, the draft,
its tree verify loop with the Mosaic tree kernel in shard_map (the larger of the two
decode programs: 6.80 vs the chain's 5.94 GiB per chip). About 1.2 min on an idle
2-core machine (the XLA TPU compile of the unrolled target dominates); the chain program
is the same prefill and draft with a dense verify (`python -m deepspec_jax.plan
--programs=decode` compiles both).

Sizes: the eval's protocol (max_new_tokens 2048) with prompts padded to 2048 tokens and
a batch of 8 (``DecodeSettings`` defaults): cache 4352 slots, trees of 32 nodes."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import jax.numpy as jnp

import pytest
from flax import nnx

from conftest import REPO

from deepspec_jax.config import target_config_from_dict
from deepspec_jax.errors import ConfigError
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.plan.decode import DecodeSettings, decode_thunks
from deepspec_jax.plan.targets import abstract_model
from deepspec_jax.plan.topology import GENERATIONS, compile_only_devices
from deepspec_jax.sharding import make_mesh
from deepspec_jax.train.draft_init import spec_for_run

# Qwen/Qwen3-4B config.json (the facts the plan needs).
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 9728,
            "max_position_embeddings": 40960, "num_attention_heads": 32,
            "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": True,
            "vocab_size": 151936}
V5E_HBM = GENERATIONS["v5e"].hbm_bytes   # 15.75 GiB


def run_config(path: str):
    spec = importlib.util.spec_from_file_location("_decode_plan_cfg", os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def param_bytes(build, mesh) -> tuple[int, int]:
    """(total bytes, bytes on device 0) of a model's parameters placed on ``mesh``."""
    _, state = abstract_model(build, mesh)
    total = per_device = 0
    for x in jax.tree.leaves(state):
        total += x.size * x.dtype.itemsize
        per_device += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total, per_device


@pytest.fixture(scope="module")
def qwen3_4b():
    tcfg = target_config_from_dict(QWEN3_4B, "Qwen/Qwen3-4B config.json")
    draft = spec_for_run(run_config("configs/dspark/dspark_qwen3_4b.py"), tcfg)
    mesh = make_mesh(1, 1, 4, devices=compile_only_devices("v5e-4"))
    return tcfg, draft, mesh


def test_qwen3_4b_decode_fits_v5e4_tensor_sharded(qwen3_4b):
    tcfg, draft, mesh = qwen3_4b
    thunks = decode_thunks(tcfg, draft, mesh, DecodeSettings(programs=("tree",)))
    results = {}
    for name, thunk in thunks.items():
        compiled = thunk()
        mem = compiled.memory_analysis()
        results[name] = compiled, mem
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        print(f"{name} program per chip: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, "
              f"temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB")
        assert peak <= V5E_HBM, f"{name} decode needs {peak / 2**30:.2f} GiB per chip > 15.75 GiB"
        # the prefill projects only each row's last prompt token: no float32 logits of
        # the whole prompt ([8, 2048, vocab / 4] per chip, 2.3 GiB) anywhere in the program
        prompt_logits = re.findall(rf"f32\[8,2048,({tcfg.vocab_size}|{tcfg.vocab_size // 4})\]",
                                   compiled.as_text())
        assert not prompt_logits, f"{name}: whole-prompt logits {prompt_logits[:2]}"
        # with them the chain/tree programs planned 11.44/11.48 GiB per chip, without 5.94/6.80
        assert peak < 9 * 2**30, f"{name}: {peak / 2**30:.2f} GiB per chip (5.94-6.80 expected)"

    # Weights split 4 ways: the tree program's arguments (it uses every weight of both
    # models; jit drops unused ones) are (almost only) a quarter of the bf16 weights.
    compiled, mem = results["tree"]
    dt = jnp.bfloat16
    t_total, t_dev = param_bytes(lambda: CausalLM(tcfg, dtype=dt, param_dtype=dt,
                                                  rngs=nnx.Rngs(0)), mesh)
    d_total, _ = param_bytes(lambda: draft.build_fn(draft.config, dtype=dt, param_dtype=dt,
                                                    rngs=nnx.Rngs(0)), mesh)
    assert 7.5e9 < t_total < 8.5e9, t_total            # Qwen3-4B: ~4.0B parameters in bf16
    assert t_dev < 0.26 * t_total, (t_dev, t_total)     # everything but the norms split 4 ways
    weights = (t_total + d_total) / 4
    assert 0.97 * weights < mem.argument_size_in_bytes < 1.05 * weights, (
        mem.argument_size_in_bytes, weights)

    # The tree kernel runs in shard_map in every layer: each chip sees K/4 = 2 KV heads.
    calls = [line for line in compiled.as_text().splitlines()
             if "tpu_custom_call" in line and "tree_attention_tpu" in line]
    assert len(calls) == tcfg.num_hidden_layers, len(calls)
    assert all(f"bf16[8,{tcfg.num_key_value_heads // 4}," in c for c in calls), calls[0][:200]


def test_decode_settings_errors(qwen3_4b):
    tcfg, draft, mesh = qwen3_4b
    with pytest.raises(ConfigError, match="choose from"):
        decode_thunks(tcfg, draft, mesh, DecodeSettings(programs=("verify",)))
    with pytest.raises(ConfigError, match="needs tree="):
        decode_thunks(tcfg, draft, mesh, DecodeSettings(tree=None, programs=("tree",)))
    other = target_config_from_dict(dict(QWEN3_4B, num_hidden_layers=28), "other")
    with pytest.raises(ConfigError, match="num_target_layers"):   # the eval's own check
        decode_thunks(other, draft, mesh, DecodeSettings(programs=("chain",)))
