"""Long attention never materialises whole [queries, keys] logits (issue 12).

Compile-only (no execution): DSpark's block attention (forward + backward) and the
target's full forward at S=2048 on CPU, asserting XLA's planned temporaries stay
below ONE fp32 logits tensor of the old dense path ([B,H,N*K,S] resp. [B,H,S,S]); the
dense path needed several of them. Sizes: H=4, D=16 (the tiny fixture target)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import fixture_sets
from deepspec_jax.config import load_config_json, target_config_from_dict
from deepspec_jax.drafts.dspark import block_attention
from deepspec_jax.models.transformer import CausalLM

S = 2048


def _fixture(name: str) -> str:
    return os.path.join(fixture_sets()[0], name)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_dspark_train_attention_memory():
    """Block attention, forward + backward, at N*K = 3584 queries (512 anchors x block
    7, the reference's) over S=2048 context keys."""
    B, N, K, H, Kh, D = 1, 512, 7, 4, 2, 16
    sds = jax.ShapeDtypeStruct

    def loss(q, kb, vb, kc, vc, anchors, keep):
        return jnp.sum(block_attention(q, kb, vb, kc, vc, anchors, keep))

    args = (sds((B, N, K, H, D), jnp.float32), sds((B, N, K, Kh, D), jnp.float32),
            sds((B, N, K, Kh, D), jnp.float32), sds((B, S, Kh, D), jnp.float32),
            sds((B, S, Kh, D), jnp.float32), sds((B, N), jnp.int32), sds((B, N), jnp.bool_))
    temp = _temp_bytes(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
    logits = B * H * N * K * S * 4
    assert temp < logits, (f"DSpark block attention (fwd+bwd) plans {temp / 2**20:.0f} MiB of "
                           "temporaries, not below one [B,H,N*K,S] fp32 logits tensor "
                           f"({logits / 2**20:.0f} MiB): it materialises the context logits")


def test_target_forward_attention_memory():
    path = os.path.join(_fixture("target_qwen3_tiny"), "config.json")
    cfg = target_config_from_dict(load_config_json(path), path)
    B, H = 1, cfg.num_attention_heads
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, layer_ids=(1, 3)).features

    temp = _temp_bytes(forward, state, jax.ShapeDtypeStruct((B, S), jnp.int32))
    logits = B * H * S * S * 4
    assert temp < logits, (f"target forward plans {temp / 2**20:.0f} MiB of temporaries, not "
                           f"below one [B,H,S,S] fp32 logits tensor ({logits / 2**20:.0f} MiB)")
