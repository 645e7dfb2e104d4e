"""Decoder-only target LM (Llama, Qwen3) as a Flax NNX module.

One parameter layout on every backend: one weight buffer per layer (``TargetLayers``)
and one KV buffer per layer, the decoder an unrolled Python loop that writes each
layer's new keys/values into its buffer in place (as vllm-project/tpu-inference runs
its models: a list of layers, no scan). The target is frozen (forward only), so the
unrolled loop costs accelerators only compile time, while a stacked ``[L, ...]``
layout is 1.6-7.6x slower per decode step on XLA:CPU (docs/BENCHMARKS.md, "One
parameter layout?"). ``DecoderStack`` (stacked, for ``lax.scan``) remains for the
trained DSpark draft.

Every parameter carries ``logical_axes`` metadata; ``deepspec_jax.sharding`` maps
those names onto a ``Mesh`` (fsdp/tensor), so the model code never names mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepspec_jax.config import TargetConfig
from deepspec_jax.kernels.attention import causal_span, segment_attention, span_attention
from deepspec_jax.kernels.tree_attention import tree_attention
from deepspec_jax.layers import apply_rope, rms_norm, rope_inv_freq, swiglu


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def _layer_params(cfg: TargetConfig) -> list[tuple[str, tuple, tuple, str]]:
    """(name, shape, logical axes, init) of one decoder layer's parameters.
    Linear weights are stored input-major (``x @ W``); the HF name map transposes."""
    d, H, K, D, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.intermediate_size)
    out = [("input_norm", (d,), ("norm",), "ones"),
           ("post_attn_norm", (d,), ("norm",), "ones"),
           ("q_proj", (d, H * D), ("embed", "heads"), "normal"),
           ("k_proj", (d, K * D), ("embed", "kv_heads"), "normal"),
           ("v_proj", (d, K * D), ("embed", "kv_heads"), "normal"),
           ("o_proj", (H * D, d), ("heads", "embed"), "normal")]
    if cfg.attention_bias:
        out += [("q_bias", (H * D,), ("heads",), "zeros"),
                ("k_bias", (K * D,), ("kv_heads",), "zeros"),
                ("v_bias", (K * D,), ("kv_heads",), "zeros")]
    if cfg.qk_norm:
        out += [("q_norm", (D,), ("norm",), "ones"), ("k_norm", (D,), ("norm",), "ones")]
    return out + [("gate_proj", (d, I), ("embed", "mlp"), "normal"),
                  ("up_proj", (d, I), ("embed", "mlp"), "normal"),
                  ("down_proj", (I, d), ("mlp", "embed"), "normal")]


class TargetLayers(nnx.Module):
    """The target's decoder weights, one array per layer: ``self.<name>`` is an
    ``nnx.List`` (parameter path ``layers.<name>.<i>``). XLA:CPU copies every slice of
    a stacked array that a matmul reads, so per-layer buffers are the one layout that
    is read once per step on every backend (see the module docstring)."""

    def __init__(self, cfg: TargetConfig, *, param_dtype, rngs: nnx.Rngs):
        for name, shape, axes, init in _layer_params(cfg):
            setattr(self, name, nnx.List([_param(rngs, shape, axes, param_dtype, init)
                                          for _ in range(cfg.num_hidden_layers)]))

    def layer(self, i: int) -> dict[str, jax.Array]:
        """name -> layer ``i``'s array."""
        return {k: v[i].get_value() for k, v in vars(self).items() if isinstance(v, nnx.List)}


class DecoderStack(nnx.Module):
    """Decoder weights stacked on a leading ``layers`` axis, for a ``lax.scan`` over
    layers: the DSpark draft's layout (trained, so the scan keeps compile time and the
    rematerialised backward flat in depth). The target uses ``TargetLayers``."""

    def __init__(self, cfg: TargetConfig, *, param_dtype, rngs: nnx.Rngs):
        L = cfg.num_hidden_layers
        for name, shape, axes, init in _layer_params(cfg):
            setattr(self, name, _param(rngs, (L,) + shape, ("layers",) + axes, param_dtype, init))

    def stacked(self) -> dict[str, jax.Array]:
        """name -> [L, ...] array."""
        return {k: v.get_value() for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values and the number of valid positions per row.

    ``k``: L buffers [B, K, D, S_max] and ``v``: L buffers [B, K, S_max, D] -- the
    layouts in which the two attention matmuls read them without a transpose copy;
    ``lengths``: int32 [B]. Entries at positions >= ``lengths[b]`` are ignored by
    attention, so rolling back is just lowering ``lengths`` (speculative decoding's
    rejected tail).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.v[0].shape[-2]


def init_cache(cfg: TargetConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Empty cache: a tuple of per-layer key buffers and one of value buffers."""
    L, K, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    return KVCache(tuple(jnp.zeros((batch, K, D, max_len), dtype) for _ in range(L)),
                   tuple(jnp.zeros((batch, K, max_len, D), dtype) for _ in range(L)),
                   jnp.zeros((batch,), jnp.int32))


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array, axis: int) -> jax.Array:
    """``buf[b, ..., start[b] : start[b] + T, ...] = new[b]`` along ``axis`` for every row.

    One scatter with ``promise_in_bounds``, which XLA performs in place on a donated
    buffer (with out-of-range dropping it is not in place on CPU), and one op whatever
    the batch (one ``dynamic_update_slice`` per row unrolled B ops per layer: 16k-row
    batches then never finished compiling). Callers size caches so that
    ``start + T <= max_len`` (every decode loop here allocates that slack): an
    out-of-range write is undefined."""
    pos = start.astype(jnp.int32)[:, None] + jnp.arange(new.shape[axis], dtype=jnp.int32)[None]
    idx = (jnp.arange(buf.shape[0])[:, None],) + (slice(None),) * (axis - 1) + (pos,)
    return buf.at[idx].set(jnp.moveaxis(new, axis, 1).astype(buf.dtype), mode="promise_in_bounds")


def read_before_write(read: jax.Array) -> jax.Array:
    """A zero that depends on ``read``: adding it to the values written into a buffer
    that ``read`` was computed from makes XLA schedule the read first and update the
    buffer in place, instead of copying the buffer to keep its old contents alive.

    An exact zero even when the element read is NaN/inf (non-finite values are
    selected away before the multiply), so a non-finite row cannot leak into every
    other row's cache entries."""
    x = read.reshape(-1)[0]
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), read.dtype)) * jnp.zeros((), read.dtype)


def write_kv_after(ck: jax.Array, cv: jax.Array, kt: jax.Array, vt: jax.Array,
                   start: jax.Array, read: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write one layer's new keys [B,K,D,T] / values [B,K,T,D] at each row's ``start``
    into its cache buffers, in place and after ``read`` (the attention output computed
    from those buffers)."""
    after = read_before_write(read)
    return write_rows(ck, kt + after, start, 3), write_rows(cv, vt + after, start, 2)


def _causal_attend(b: int, t: int):
    """``attend`` of a causal forward over T tokens with no cache (full forward, fresh
    prefill): ``span_attention`` (the flash kernel on TPU; O(block_q x T) memory in the
    jnp path) instead of [T,T] logits. Every row sees its causal prefix, padding
    included, as the cache-segment path does."""
    start, stop = causal_span(jnp.full((b,), t, jnp.int32), t)

    def attend(q, kt, vt, ck, cv):
        k, v = kt.transpose(0, 3, 1, 2), vt.transpose(0, 2, 1, 3)  # back to [B,T,K,D]
        return span_attention(q, k, v, start, stop)[0].astype(q.dtype)

    return attend


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
        self.layers = TargetLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  param_dtype)
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                              cfg.rope_scaling))

    # ---- pieces shared with the drafts (frozen embedding / lm_head) ----
    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed.get_value(), ids, axis=0).astype(self.dtype)

    def lm_head_weight(self) -> jax.Array:
        """[d, V] output projection (the transposed embedding when tied)."""
        return self.embed.get_value().T if self.cfg.tie_word_embeddings else self.lm_head.get_value()

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:  # contract with [V, d] directly: no transpose copy
            return jnp.einsum("btd,vd->btv", hidden, self.embed.get_value().astype(self.dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", hidden, self.lm_head.get_value().astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def logits_at(self, out: ForwardOut, pos: jax.Array) -> jax.Array:
        """[B, V] float32 logits of position ``pos[b]`` of each row of a forward's output
        (a prefill's last prompt token). Projects that one hidden state: the [B, T, V]
        logits of the whole prompt are then unused and XLA drops them (at a 2048-token
        prompt, batch 8 and Qwen3's 151,936 tokens, ~9.3 GiB of float32)."""
        h = jnp.take_along_axis(out.last_hidden, pos.astype(jnp.int32)[:, None, None], axis=1)
        return self.logits(h)[:, 0]

    # ---- the decoder ----
    def _run(self, input_ids, positions, layer_ids, attend, cache: KVCache | None):
        """Embed, run the decoder layers, collect features; returns (ForwardOut, cache).

        ``attend(q, kt, vt, ck, cv)`` -> attention output, given the layer's new keys
        ``kt`` [B,K,D,T] / values ``vt`` [B,K,T,D] and its cache buffers (None without
        a cache); it is the only difference between the full-sequence and the cached
        paths. With a cache, the new keys/values go to slots ``lengths[b] + j``.

        The layers run unrolled over per-layer buffers; each layer's new entries are
        written into its cache buffer in place after the attention read
        (``write_kv_after``)."""
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
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)

        start = None if cache is None else cache.lengths
        ks, vs = [], []
        for l in range(cfg.num_hidden_layers):
            p = {k: v.astype(self.dtype) for k, v in self.layers.layer(l).items()}
            x = rms_norm(h, p["input_norm"], cfg.rms_norm_eps)
            q, k, v = layer_qkv(cfg, p, x, positions, inv_freq)
            kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B,K,D,T], [B,K,T,D]
            ck, cv = (None, None) if cache is None else (cache.k[l], cache.v[l])
            attn = attend(q, kt, vt, ck, cv)
            h = layer_finish(cfg, p, h, attn)
            feats = jax.lax.dynamic_update_index_in_dim(feats, h, slots[l], axis=2)
            if cache is not None:
                ck, cv = write_kv_after(ck, cv, kt, vt, start, attn)
                ks.append(ck)
                vs.append(cv)
        if cache is not None:
            cache = KVCache(tuple(ks), tuple(vs), cache.lengths)
        last = rms_norm(h, self.final_norm.get_value().astype(self.dtype), cfg.rms_norm_eps)
        out = ForwardOut(self.logits(last), feats[:, :, :n].reshape(b, t, n * d), last)
        return out, cache

    def __call__(self, input_ids: jax.Array, layer_ids: Sequence[int] = ()) -> ForwardOut:
        """Full causal forward over right-padded ``input_ids`` [B, S] (no cache)."""
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out, _ = self._run(input_ids, positions, layer_ids, _causal_attend(b, s), None)
        return out

    def extend(self, cache: KVCache, input_ids: jax.Array, num_new: jax.Array,
               layer_ids: Sequence[int] = (), fresh: bool = False) -> tuple[ForwardOut, KVCache]:
        """Append ``input_ids`` [B, T] at each row's cache length and run them.

        Only the first ``num_new[b]`` tokens of row b are real (right padding); the
        row's length advances by ``num_new[b]``. Prefill is extend on an empty cache,
        decode is T=1, speculative verify is T=1+gamma. ``fresh=True`` (static) promises
        an empty cache and skips attending to it: a prefill then does not attend over
        (and XLA does not constant-fold) a fully masked cache.
        """
        b, t = input_ids.shape
        start = cache.lengths
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        s_max = cache.max_len
        old_mask = jnp.arange(s_max, dtype=jnp.int32)[None, None, :] < start[:, None, None]
        new_mask = jnp.tril(jnp.ones((t, t), bool))[None]

        # Attention reads the old cache and the new keys/values as separate segments,
        # so the cache is read before the new entries are written (in place, by _run).
        # A fresh prefill (long T) is a causal span over the new tokens alone.
        def attend(q, kt, vt, ck, cv):
            segments = [(ck.astype(q.dtype), cv.astype(q.dtype), old_mask), (kt, vt, new_mask)]
            return segment_attention(q, segments)[0].astype(q.dtype)

        out, cache = self._run(input_ids, positions, layer_ids,
                               _causal_attend(b, t) if fresh else attend, cache)
        new_len = jnp.minimum(start + num_new.astype(jnp.int32), s_max)
        return out, cache._replace(lengths=new_len)

    def extend_tree(self, cache: KVCache, input_ids: jax.Array, depths: jax.Array,
                    tree_bits: jax.Array, layer_ids: Sequence[int] = (),
                    attn_impl: str = "auto") -> tuple[ForwardOut, KVCache]:
        """Run a flattened draft tree ``input_ids`` [B, N] after each row's cache.

        Node i (topological order, node 0 = the current token) is written at cache slot
        ``lengths[b] + i`` with RoPE position ``lengths[b] + depths[b, i]`` and attends
        to the committed prefix plus its ancestors (``tree_bits`` [B, N, ceil(N/32)]
        uint32 from ``kernels.tree_attention.ancestor_bits``), through
        ``tree_attention`` (Pallas kernel on GPU/TPU, jnp reference elsewhere). Node i's
        outputs therefore equal a causal forward over the prefix and its root path.
        ``lengths`` is NOT advanced: the caller keeps the accepted path with
        ``deepspec_jax.tree.compact_kv_cache``.
        """
        start = cache.lengths
        positions = start[:, None] + depths.astype(jnp.int32)

        # The tree's own keys/values go to the kernel as ``k_tree``/``v_tree``, so it
        # reads only the committed prefix from the cache (written after, by _run).
        def attend(q, kt, vt, ck, cv):
            return tree_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), start, tree_bits,
                                  k_tree=kt, v_tree=vt, impl=attn_impl)

        return self._run(input_ids, positions, layer_ids, attend, cache)
