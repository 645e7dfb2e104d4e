"""Decoder-only target LM (Llama, Qwen3) as a Flax NNX module.

Layer parameters are stacked on a leading ``layers`` axis and the decoder runs as a
``lax.scan``: compile time stays flat in depth (SmolLM2 has 30 layers) and the KV
cache is one ``[L, B, S, K, D]`` buffer updated in place inside the scan carry.

Every parameter carries ``logical_axes`` metadata; ``deepspec_jax.sharding`` maps
those names onto a ``Mesh`` (fsdp/tensor), so the model code never names mesh axes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepspec_jax.config import TargetConfig
from deepspec_jax.layers import apply_rope, masked_attention, rms_norm, rope_inv_freq, swiglu


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class DecoderStack(nnx.Module):
    """All decoder layers' weights, stacked on a leading layer axis.

    Linear weights are stored input-major (``x @ W``); the HF name map transposes.
    """

    def __init__(self, cfg: TargetConfig, *, param_dtype, rngs: nnx.Rngs):
        L, d, H, K, D, I = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
        p = lambda shape, axes, init="normal": _param(rngs, shape, axes, param_dtype, init)  # noqa: E731
        self.input_norm = p((L, d), ("layers", "norm"), "ones")
        self.post_attn_norm = p((L, d), ("layers", "norm"), "ones")
        self.q_proj = p((L, d, H * D), ("layers", "embed", "heads"))
        self.k_proj = p((L, d, K * D), ("layers", "embed", "kv_heads"))
        self.v_proj = p((L, d, K * D), ("layers", "embed", "kv_heads"))
        self.o_proj = p((L, H * D, d), ("layers", "heads", "embed"))
        if cfg.attention_bias:
            self.q_bias = p((L, H * D), ("layers", "heads"), "zeros")
            self.k_bias = p((L, K * D), ("layers", "kv_heads"), "zeros")
            self.v_bias = p((L, K * D), ("layers", "kv_heads"), "zeros")
        if cfg.qk_norm:
            self.q_norm = p((L, D), ("layers", "norm"), "ones")
            self.k_norm = p((L, D), ("layers", "norm"), "ones")
        self.gate_proj = p((L, d, I), ("layers", "embed", "mlp"))
        self.up_proj = p((L, d, I), ("layers", "embed", "mlp"))
        self.down_proj = p((L, I, d), ("layers", "mlp", "embed"))

    def stacked(self) -> dict[str, jax.Array]:
        return {k: v.value for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values and the number of valid positions per row.

    ``k``/``v``: [L, B, S_max, K, D]; ``lengths``: int32 [B]. Entries at positions
    >= ``lengths[b]`` are ignored by attention, so rolling back is just lowering
    ``lengths`` (speculative decoding's rejected tail).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: TargetConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class ForwardOut(NamedTuple):
    logits: jax.Array        # [B, T, V] float32
    features: jax.Array      # [B, T, len(layer_ids) * d] raw layer outputs (id -1 = embeddings)
    last_hidden: jax.Array   # [B, T, d] after the final norm


def layer_qkv(cfg: TargetConfig, p: dict, x: jax.Array, positions: jax.Array, inv_freq):
    b, t, _ = x.shape
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = x @ p["q_proj"], x @ p["k_proj"], x @ p["v_proj"]
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q, k, v = q.reshape(b, t, H, D), k.reshape(b, t, K, D), v.reshape(b, t, K, D)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def layer_finish(cfg: TargetConfig, p: dict, h: jax.Array, attn: jax.Array) -> jax.Array:
    b, t = attn.shape[:2]
    h = h + attn.reshape(b, t, -1) @ p["o_proj"]
    x = rms_norm(h, p["post_attn_norm"], cfg.rms_norm_eps)
    return h + swiglu(x, p["gate_proj"], p["up_proj"], p["down_proj"])


def feature_slots(layer_ids: Sequence[int], num_layers: int) -> tuple[tuple[int, ...], int]:
    """Map decoder layer index -> slot in the feature buffer (``len(ids)`` = discard)."""
    n = len(layer_ids)
    slots = [n] * num_layers
    for j, lid in enumerate(layer_ids):
        if lid >= 0:
            slots[lid] = j
    emb_slot = layer_ids.index(-1) if -1 in layer_ids else n
    return tuple(slots), emb_slot


class CausalLM(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = DecoderStack(cfg, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  param_dtype)
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                              cfg.rope_scaling))

    # ---- pieces shared with the drafts (frozen embedding / lm_head) ----
    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed.value, ids, axis=0).astype(self.dtype)

    def lm_head_weight(self) -> jax.Array:
        """[d, V] output projection (the transposed embedding when tied)."""
        return self.embed.value.T if self.cfg.tie_word_embeddings else self.lm_head.value

    def logits(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("btd,dv->btv", hidden, self.lm_head_weight().astype(self.dtype),
                          preferred_element_type=jnp.float32)

    # ---- the decoder ----
    def _run(self, input_ids, positions, layer_ids, attend, carry_extra):
        """Embed, scan the decoder layers, collect features. ``attend(l, q, k, v, extra)``
        returns ``(attn_out, extra)``: it is the only difference between the
        full-sequence and the cached paths."""
        cfg = self.cfg
        layer_ids = tuple(layer_ids)
        for lid in layer_ids:
            if not -1 <= lid < cfg.num_hidden_layers:
                raise ValueError(
                    f"layer_ids: {lid} is out of range for a target with "
                    f"{cfg.num_hidden_layers} decoder layers; use -1 (embeddings) or "
                    f"0..{cfg.num_hidden_layers - 1}.")
        slots, emb_slot = feature_slots(layer_ids, cfg.num_hidden_layers)
        h = self.embed_tokens(input_ids)
        b, t, d = h.shape
        n = len(layer_ids)
        feats = jnp.zeros((b, t, n + 1, d), self.dtype)
        feats = feats.at[:, :, emb_slot].set(h)
        params = {k: v.astype(self.dtype) for k, v in self.layers.stacked().items()}
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)

        def body(carry, xs):
            h, feats, extra = carry
            p, l, slot = xs
            x = rms_norm(h, p["input_norm"], cfg.rms_norm_eps)
            q, k, v = layer_qkv(cfg, p, x, positions, inv_freq)
            attn, extra = attend(l, q, k, v, extra)
            h = layer_finish(cfg, p, h, attn)
            feats = jax.lax.dynamic_update_index_in_dim(feats, h, slot, axis=2)
            return (h, feats, extra), None

        xs = (params, jnp.arange(cfg.num_hidden_layers), jnp.asarray(slots, jnp.int32))
        (h, feats, extra), _ = jax.lax.scan(body, (h, feats, carry_extra), xs)
        last = rms_norm(h, self.final_norm.value.astype(self.dtype), cfg.rms_norm_eps)
        out = ForwardOut(self.logits(last), feats[:, :, :n].reshape(b, t, n * d), last)
        return out, extra

    def __call__(self, input_ids: jax.Array, layer_ids: Sequence[int] = ()) -> ForwardOut:
        """Full causal forward over right-padded ``input_ids`` [B, S] (no cache)."""
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        causal = jnp.tril(jnp.ones((s, s), bool))[None]

        def attend(l, q, k, v, extra):
            return masked_attention(q, k, v, causal), extra

        out, _ = self._run(input_ids, positions, layer_ids, attend, ())
        return out

    def extend(self, cache: KVCache, input_ids: jax.Array, num_new: jax.Array,
               layer_ids: Sequence[int] = ()) -> tuple[ForwardOut, KVCache]:
        """Append ``input_ids`` [B, T] at each row's cache length and run them.

        Only the first ``num_new[b]`` tokens of row b are real (right padding); the
        row's length advances by ``num_new[b]``. Prefill is extend on an empty cache,
        decode is T=1, speculative verify is T=1+gamma.
        """
        b, t = input_ids.shape
        start = cache.lengths
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        s_max = cache.max_len
        kv_pos = jnp.arange(s_max, dtype=jnp.int32)
        mask = kv_pos[None, None, :] <= positions[:, :, None]  # causal over cache + new
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))

        def attend(l, q, k, v, extra):
            ck, cv = extra
            ck = ck.at[l, rows, positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[l, rows, positions].set(v.astype(cv.dtype), mode="drop")
            lk = jax.lax.dynamic_index_in_dim(ck, l, 0, keepdims=False).astype(q.dtype)
            lv = jax.lax.dynamic_index_in_dim(cv, l, 0, keepdims=False).astype(q.dtype)
            return masked_attention(q, lk, lv, mask), (ck, cv)

        out, (ck, cv) = self._run(input_ids, positions, layer_ids, attend, (cache.k, cache.v))
        new_len = jnp.minimum(start + num_new.astype(jnp.int32), s_max)
        return out, KVCache(ck, cv, new_len)
