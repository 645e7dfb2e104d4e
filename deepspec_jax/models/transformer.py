"""Decoder-only target LM (Llama, Qwen3, Gemma-3, Gemma-4) as a Flax NNX module.

One parameter layout on every backend: one weight buffer per layer (``TargetLayers``)
and one KV buffer per layer, the decoder an unrolled Python loop that writes each
layer's new keys/values into its buffer in place (as vllm-project/tpu-inference runs
its models: a list of layers, no scan). The target is frozen (forward only), so the
unrolled loop costs accelerators only compile time, while a stacked ``[L, ...]``
layout is 1.6-7.6x slower per decode step on XLA:CPU (docs/BENCHMARKS.md, "One
parameter layout?"). The trained drafts stack their layers for a ``lax.scan``
(``drafts.common.DraftLayers``, built from this module's ``_layer_params``).

Every parameter carries ``logical_axes`` metadata; ``deepspec_jax.sharding`` maps
those names onto a ``Mesh`` (fsdp/tensor), so the model code never names mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepspec_jax.config import TargetConfig
from deepspec_jax.kernels.attention import (causal_span, filled_cache_attention,
                                            span_attention)
from deepspec_jax.kernels.tree_attention import tree_attention, tree_visibility
from deepspec_jax.layers import apply_rope, embed_lookup, gated_mlp, linear, rms_norm, softcap
from deepspec_jax.layers.linear import weight_first

# The tied output projection ([V, d] embedding) goes weight-first (``layers.linear``) from
# this many rows: a verify's 2-32 rows gain (49,152 rows at 8 tokens: 14.1 -> 8.1 ms; 5
# tokens are padded to 8), one row (the plain step) does not (4.3 vs 5.0 ms;
# benchmarks/lm_head.py, docs/BENCHMARKS.md).
LOGITS_WEIGHT_FIRST_MIN_ROWS = 2


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def _layer_params(cfg: TargetConfig, i: int = 0) -> list[tuple[str, tuple, tuple, str]]:
    """(name, shape, logical axes, init) of decoder layer ``i``'s parameters. Linear
    weights are [out, in] as in HF/PyTorch checkpoints (``layers.linear``). Gemma
    layers differ by type (head size, KV heads, MLP width) and KV-shared layers have
    no key/value weights, so the list depends on ``i``."""
    d, H, K, D, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.layer_kv_heads(i),
                     cfg.layer_head_dim(i), cfg.layer_intermediate(i))
    norm_init = "zeros" if cfg.norm_offset else "ones"
    own_kv = i < cfg.first_kv_shared
    out = [("input_norm", (d,), ("norm",), norm_init),
           ("post_attn_norm", (d,), ("norm",), norm_init),
           ("q_proj", (H * D, d), ("heads", "embed"), "normal")]
    if own_kv:
        out.append(("k_proj", (K * D, d), ("kv_heads", "embed"), "normal"))
        if not cfg.layer_k_eq_v(i):
            out.append(("v_proj", (K * D, d), ("kv_heads", "embed"), "normal"))
    out.append(("o_proj", (d, H * D), ("embed", "heads"), "normal"))
    if cfg.attention_bias:
        out.append(("q_bias", (H * D,), ("heads",), "zeros"))
        if own_kv:
            out.append(("k_bias", (K * D,), ("kv_heads",), "zeros"))
            if not cfg.layer_k_eq_v(i):
                out.append(("v_bias", (K * D,), ("kv_heads",), "zeros"))
    if cfg.qk_norm:
        out.append(("q_norm", (D,), ("norm",), norm_init))
        if own_kv:
            out.append(("k_norm", (D,), ("norm",), norm_init))
    if cfg.sandwich_norm:
        out += [("pre_ff_norm", (d,), ("norm",), norm_init),
                ("post_ff_norm", (d,), ("norm",), norm_init)]
    if cfg.layer_scalar:
        out.append(("layer_scalar", (1,), (None,), "ones"))
    return out + [("gate_proj", (I, d), ("mlp", "embed"), "normal"),
                  ("up_proj", (I, d), ("mlp", "embed"), "normal"),
                  ("down_proj", (d, I), ("embed", "mlp"), "normal")]


def layer_param_layers(cfg: TargetConfig) -> dict[str, tuple[int, ...]]:
    """name -> the layers that have that parameter (all of them for Llama/Qwen3;
    Gemma-4's KV-shared layers have no k/v weights, k_eq_v layers no v_proj)."""
    out: dict[str, list[int]] = {}
    for i in range(cfg.num_hidden_layers):
        for name, *_ in _layer_params(cfg, i):
            out.setdefault(name, []).append(i)
    return {k: tuple(v) for k, v in out.items()}


class TargetLayers(nnx.Module):
    """The target's decoder weights, one array per layer: ``self.<name>`` is an
    ``nnx.List`` over the layers (parameter path ``layers.<name>.<i>``), or, for a
    parameter only some layers have (Gemma-4 KV sharing), an ``nnx.Dict`` keyed by the
    layer index (same path). XLA:CPU copies every slice of a stacked array that a
    matmul reads, so per-layer buffers are the one layout that is read once per step
    on every backend (see the module docstring)."""

    def __init__(self, cfg: TargetConfig, *, param_dtype, rngs: nnx.Rngs):
        n = cfg.num_hidden_layers
        specs = [{name: (shape, axes, init) for name, shape, axes, init in _layer_params(cfg, i)}
                 for i in range(n)]
        for name, layers in layer_param_layers(cfg).items():
            made = {i: _param(rngs, specs[i][name][0], specs[i][name][1], param_dtype,
                                specs[i][name][2]) for i in layers}
            setattr(self, name, nnx.List([made[i] for i in range(n)]) if len(layers) == n
                    else nnx.Dict({str(i): made[i] for i in layers}))

    def layer(self, i: int) -> dict[str, jax.Array]:
        """name -> layer ``i``'s array (the names layer ``i`` has)."""
        out = {}
        for k, v in vars(self).items():
            if isinstance(v, nnx.List):
                out[k] = v[i].get_value()
            elif isinstance(v, nnx.Dict) and str(i) in v:
                out[k] = v[str(i)].get_value()
        return out


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values and the number of valid positions per row.

    ``k``: per-layer buffers [B, K, D, S_max] and ``v``: [B, K, S_max, D] -- the
    layouts in which the two attention matmuls read them without a transpose copy --
    one per layer with its own keys/values (Gemma-4's KV-shared layers read their
    source layer's; K and D may differ by layer type);
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
    """Empty cache: a tuple of per-layer key buffers and one of value buffers (the
    layers with their own keys/values). Sliding-window layers keep full-length
    buffers: a window is a mask, so rollback and tree compaction stay one code path."""
    dims = [(cfg.layer_kv_heads(i), cfg.layer_head_dim(i)) for i in range(cfg.first_kv_shared)]
    return KVCache(tuple(jnp.zeros((batch, K, D, max_len), dtype) for K, D in dims),
                   tuple(jnp.zeros((batch, K, max_len, D), dtype) for K, D in dims),
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


def write_new_kv(cache: KVCache, new_kv, num_new: jax.Array, read: jax.Array) -> KVCache:
    """Store ``extend_packed(..., write=False)``'s new keys/values at each row's length,
    in place, after ``read`` (a result computed from the old cache), and advance the
    lengths by ``num_new``."""
    ks, vs = new_kv
    bufs = [write_kv_after(ck, cv, kt, vt, cache.lengths, read)
            for ck, cv, kt, vt in zip(cache.k, cache.v, ks, vs)]
    return KVCache(tuple(b[0] for b in bufs), tuple(b[1] for b in bufs),
                   jnp.minimum(cache.lengths + num_new.astype(jnp.int32), cache.max_len))


def window_start(positions: jax.Array, window: int | None) -> jax.Array | int:
    """First key position a query at ``positions`` sees: 0, or for a sliding-window
    layer ``position - window + 1`` (HF: key k is visible iff q - k < window)."""
    return 0 if window is None else jnp.maximum(positions - (window - 1), 0)


def _causal_attend(b: int, t: int):
    """``attend`` of a causal forward over T tokens with no cache (full forward, fresh
    prefill): ``span_attention`` (the flash kernel on TPU; O(block_q x T) memory in the
    jnp path) instead of [T,T] logits. Every row sees its causal prefix, padding
    included, as the cache-segment path does; a sliding layer's span starts at its
    window."""
    _, stop = causal_span(jnp.full((b,), t, jnp.int32), t)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def attend(q, kt, vt, ck, cv, window, scale):
        k, v = kt.transpose(0, 3, 1, 2), vt.transpose(0, 2, 1, 3)  # back to [B,T,K,D]
        start = jnp.broadcast_to(window_start(pos, window), (b, t)).astype(jnp.int32)
        return span_attention(q, k, v, start, stop, scale=scale)[0].astype(q.dtype)

    return attend


def _filled_attend(q, kt, vt, ck, cv, *, start, positions, new_mask, window, scale,
                   zero_hidden=False):
    """Attention of new tokens (``positions`` [B, T]) over each row's first ``start``
    cached slots, read only up to the longest row's (block by block), plus the new keys
    where ``new_mask`` [B or 1, T, T] allows; a sliding layer also hides keys before
    each query's window. The chain verify's path, and the tree verify's for windowed
    layers."""
    b, t = positions.shape
    first = None
    if window is not None:
        first = window_start(positions, window)[:, :, None]          # [B, T, 1]
        new_mask = new_mask & (positions[:, None, :] >= first)        # new key j at positions[b, j]

    def cache_mask(slots):                                            # [B, T, n]
        m = jnp.broadcast_to(slots[None, None, :] < start[:, None, None], (b, t, slots.shape[0]))
        return m if first is None else m & (slots[None, None, :] >= first)

    return filled_cache_attention(q, ck, cv, cache_mask, jnp.max(start), (kt, vt, new_mask),
                                  scale=scale, zero_hidden=zero_hidden).astype(q.dtype)


def _cache_attend(start: jax.Array, positions: jax.Array):
    """``attend`` of ``extend``: T new tokens per row (``positions`` [B, T]) after each
    row's ``start`` cached ones.

    Attention reads the old cache and the new keys/values as separate segments, so the
    cache is read before the new entries are written (in place, by ``_run``), and reads
    it only up to the longest row's length: a step costs what the context holds, not
    what the cache could (``_filled_attend``)."""
    t = positions.shape[1]
    new_mask = jnp.tril(jnp.ones((t, t), bool))[None]

    def attend(q, kt, vt, ck, cv, window, scale):
        return _filled_attend(q, kt, vt, ck, cv, start=start, positions=positions,
                              new_mask=new_mask, window=window, scale=scale)

    return attend


def packed_layout(num_new: jax.Array, width: int, size: int):
    """Where the real tokens of a [B, width] batch go in a packed sequence of ``size``
    tokens: rows one after another, row b's first ``num_new[b]`` tokens. Returns
    (row [size], slot [size]) of each packed token -- row = B (out of range: dropped by
    scatters) for the padding past sum(num_new) -- and ``gather`` [B, width], the packed
    index of each row's slot (clamped into range past ``num_new[b]``)."""
    b = num_new.shape[0]
    ends = jnp.cumsum(num_new)
    starts = ends - num_new
    p = jnp.arange(size, dtype=jnp.int32)
    row = jnp.sum(p[:, None] >= ends[None, :], axis=1).astype(jnp.int32)
    slot = p - starts[jnp.minimum(row, b - 1)]
    gather = jnp.minimum(starts[:, None] + jnp.arange(width, dtype=jnp.int32)[None], size - 1)
    return row, slot, gather


class ForwardOut(NamedTuple):
    logits: jax.Array        # [B, T, V] float32
    features: jax.Array      # [B, T, len(layer_ids) * d] raw layer outputs (id -1 = embeddings)
    last_hidden: jax.Array   # [B, T, d] after the final norm


def norm(cfg: TargetConfig, x: jax.Array, weight: jax.Array | None) -> jax.Array:
    """The family's RMSNorm (Gemma: fp32 scale by offset + w; ``weight=None`` unscaled)."""
    return rms_norm(x, weight, cfg.rms_norm_eps, offset=cfg.norm_offset,
                    scale_fp32=cfg.sandwich_norm)


def layer_qkv(cfg: TargetConfig, p: dict, x: jax.Array, positions: jax.Array, inv_freq):
    """q [B,T,H,D] and, for a layer with its own keys/values, k/v [B,T,K,D] (None for
    a Gemma-4 KV-shared layer). The head size comes from the weights (Gemma layers
    differ by type)."""
    b, t, _ = x.shape
    H = cfg.num_attention_heads
    D = p["q_proj"].shape[0] // H
    q = linear(x, p["q_proj"])
    if cfg.attention_bias:
        q = q + p["q_bias"]
    q = q.reshape(b, t, H, D)
    if cfg.qk_norm:
        q = norm(cfg, q, p["q_norm"])
    q = apply_rope(q, positions, inv_freq)
    if "k_proj" not in p:
        return q, None, None
    k = linear(x, p["k_proj"])
    v = linear(x, p["v_proj"]) if "v_proj" in p else k   # Gemma-4 k_eq_v: values = raw keys
    if cfg.attention_bias:
        k = k + p["k_bias"]
        v = v + p["v_bias"] if "v_bias" in p else k
    K = k.shape[-1] // D
    k, v = k.reshape(b, t, K, D), v.reshape(b, t, K, D)
    if cfg.qk_norm:
        k = norm(cfg, k, p["k_norm"])
    if cfg.v_norm:
        v = norm(cfg, v, None)
    return q, apply_rope(k, positions, inv_freq), v


def layer_finish(cfg: TargetConfig, p: dict, h: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection, residuals and MLP: pre-norm (Llama/Qwen3: post_attn_norm is
    the MLP's input norm) or Gemma's sandwich (post_attn_norm on the attention output,
    pre/post feed-forward norms), then Gemma-4's per-layer scalar."""
    b, t = attn.shape[:2]
    a = linear(attn.reshape(b, t, -1), p["o_proj"])
    if cfg.sandwich_norm:
        h = h + norm(cfg, a, p["post_attn_norm"])
        m = gated_mlp(norm(cfg, h, p["pre_ff_norm"]), p["gate_proj"], p["up_proj"],
                      p["down_proj"], cfg.activation)
        h = h + norm(cfg, m, p["post_ff_norm"])
    else:
        h = h + a
        x = norm(cfg, h, p["post_attn_norm"])
        h = h + gated_mlp(x, p["gate_proj"], p["up_proj"], p["down_proj"], cfg.activation)
    if cfg.layer_scalar:
        h = h * p["layer_scalar"]
    return h


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
        # Per-layer RoPE inverse frequencies (static floats: Gemma's layer types differ).
        self.inv_freq = tuple(tuple(float(f) for f in cfg.layer_inv_freq(i))
                              for i in range(cfg.num_hidden_layers))

    # ---- pieces shared with the drafts (frozen embedding / lm_head) ----
    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Token embeddings, times ``embed_scale`` (Gemma: sqrt(hidden), rounded to the
        compute dtype as HF rounds it to the weight dtype)."""
        return embed_lookup(self.embed.get_value(), ids, self.dtype, self.cfg.embed_scale)

    def lm_head_weight(self) -> jax.Array:
        """[d, V] output projection (the transposed embedding when tied)."""
        return self.embed.get_value().T if self.cfg.tie_word_embeddings else self.lm_head.get_value()

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits, softcapped where the config says so (Gemma)."""
        if self.cfg.tie_word_embeddings:  # contract with [V, d] directly: no transpose copy
            w = self.embed.get_value().astype(self.dtype)
            if weight_first(hidden, w, LOGITS_WEIGHT_FIRST_MIN_ROWS):
                z = linear(hidden, w, min_rows=LOGITS_WEIGHT_FIRST_MIN_ROWS)
            else:
                z = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            z = jnp.einsum("btd,dv->btv", hidden, self.lm_head.get_value().astype(self.dtype),
                           preferred_element_type=jnp.float32)
        return softcap(z, self.cfg.final_logit_softcap)

    def logits_at(self, out: ForwardOut, pos: jax.Array) -> jax.Array:
        """[B, V] float32 logits of position ``pos[b]`` of each row of a forward's output
        (a prefill's last prompt token). Projects that one hidden state: the [B, T, V]
        logits of the whole prompt are then unused and XLA drops them (at a 2048-token
        prompt, batch 8 and Qwen3's 151,936 tokens, ~9.3 GiB of float32)."""
        h = jnp.take_along_axis(out.last_hidden, pos.astype(jnp.int32)[:, None, None], axis=1)
        return self.logits(h)[:, 0]

    # ---- the decoder ----
    def _run(self, input_ids, positions, layer_ids, attend, cache: KVCache | None,
             regroup=None, write: bool = True):
        """Embed, run the decoder layers, collect features; returns (ForwardOut, cache).

        ``attend(q, kt, vt, ck, cv, window, scale)`` -> attention output, given the
        layer's new keys ``kt`` [B,K,D,T] / values ``vt`` [B,K,T,D], its cache buffers
        (None without a cache), its sliding window (None = full) and softmax scale; it
        is the only difference between the full-sequence, cached and tree paths. With a
        cache, the new keys/values go to slots ``lengths[b] + j``.

        The layers run unrolled over per-layer buffers; each layer's new entries are
        written into its cache buffer in place after the attention read
        (``write_kv_after``); a Gemma-4 KV-shared layer attends to its source layer's
        new keys/values and buffer, which is written after the last such reader (the
        readers are sequential, so that one's output depends on all earlier reads).
        ``regroup(kt, vt)`` (packed verification) maps the new keys/values from the
        token layout of ``input_ids`` to the per-row layout the cache is written in.
        ``write=False`` leaves the cache untouched and returns, in its place, the new
        (keys, values) per layer with its own (``write_new_kv`` stores them)."""
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

        start = None if cache is None else cache.lengths
        # A layer's cache buffer is written after its *last* reader (itself, or the last
        # KV-shared layer borrowing it), so every reader sees the old buffer and the
        # write is still in place.
        last_reader = {cfg.kv_source(l): l for l in range(cfg.num_hidden_layers)}
        new_kv, bufs = {}, {}   # layer -> (kt, vt) / its cache buffers
        for l in range(cfg.num_hidden_layers):
            p = {k: v.astype(self.dtype) for k, v in self.layers.layer(l).items()}
            x = norm(cfg, h, p["input_norm"])
            q, k, v = layer_qkv(cfg, p, x, positions, jnp.asarray(self.inv_freq[l], jnp.float32))
            src = cfg.kv_source(l)
            if k is not None:
                new_kv[l] = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B,K,D,T], [B,K,T,D]
                if regroup is not None:
                    new_kv[l] = regroup(*new_kv[l])
            kt, vt = new_kv[src]
            ck, cv = (None, None) if cache is None else (cache.k[src], cache.v[src])
            attn = attend(q, kt, vt, ck, cv, cfg.layer_window(l),
                          cfg.attention_scale(q.shape[-1]))
            h = layer_finish(cfg, p, h, attn)
            feats = jax.lax.dynamic_update_index_in_dim(feats, h, slots[l], axis=2)
            if cache is not None and write and last_reader[src] == l:
                bufs[src] = write_kv_after(ck, cv, kt, vt, start, attn)
        if cache is not None and not write:
            cache = (tuple(new_kv[l][0] for l in range(cfg.first_kv_shared)),
                     tuple(new_kv[l][1] for l in range(cfg.first_kv_shared)))
        elif cache is not None:
            cache = KVCache(tuple(bufs[l][0] for l in range(cfg.first_kv_shared)),
                            tuple(bufs[l][1] for l in range(cfg.first_kv_shared)),
                            cache.lengths)
        last = norm(cfg, h, self.final_norm.get_value().astype(self.dtype))
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
        out, cache = self._run(input_ids, positions, layer_ids,
                               _causal_attend(b, t) if fresh else _cache_attend(start, positions),
                               cache)
        new_len = jnp.minimum(start + num_new.astype(jnp.int32), cache.max_len)
        return out, cache._replace(lengths=new_len)

    def extend_packed(self, cache: KVCache, input_ids: jax.Array, num_new: jax.Array,
                      size: int, layer_ids: Sequence[int] = (), write: bool = True,
                      grid: int | None = None):
        """``extend`` that computes only the real tokens: row b's first ``num_new[b]``
        tokens of ``input_ids`` [B, T] (0 allowed) are packed into one sequence of
        ``size`` (static, >= sum(num_new)) tokens for the per-token work (projections,
        MLP, lm_head), so verifying fewer tokens costs less (``packed_layout``).
        Attention and the cache writes regroup them into the [B, T] layout of
        ``extend``, whose results this equals at every real position. Outputs are in
        that [B, T] layout; entries past ``num_new[b]`` are unspecified (finite).
        Returns (ForwardOut, cache) -- or with ``write=False`` (static) (ForwardOut, new
        keys/values per layer in the cache layout) for ``write_new_kv``: a caller that
        picks ``size`` at run time (``lax.switch``) keeps the cache out of the branches,
        which would otherwise copy it.

        ``grid`` (static, default T): the attention runs over a [B, grid] layout, so
        its cost follows the widest row rather than T; the caller promises
        ``num_new <= grid`` (e.g. 1 when no row verifies a draft). The new keys/values
        (and the cache writes) then have ``grid`` slots per row."""
        b, t = input_ids.shape
        g = t if grid is None else int(grid)
        if not 1 <= g <= t:
            raise ValueError(f"extend_packed: grid={g} must be in 1..{t} (the row width).")
        start = cache.lengths
        num_new = num_new.astype(jnp.int32)
        row, slot, gather = packed_layout(num_new, t, size)
        rc, sc = jnp.minimum(row, b - 1), jnp.minimum(slot, g - 1)
        positions = start[:, None] + jnp.arange(g, dtype=jnp.int32)[None]
        attend_rows = _cache_attend(start, positions)

        def to_rows(x, axis):   # packed [1, ..., size (at axis), ...] -> [B, ..., g, ...]
            x = jnp.moveaxis(x[0], axis - 1, 0)                      # [size, ...]
            out = jnp.zeros((b, g) + x.shape[1:], x.dtype).at[row, slot].set(x, mode="drop")
            return jnp.moveaxis(out, 1, axis)

        def regroup(kt, vt):    # [1,K,D,size] / [1,K,size,D] -> [B,K,D,g] / [B,K,g,D]
            return to_rows(kt, 3), to_rows(vt, 2)

        def attend(q, kt, vt, ck, cv, window, scale):
            o = attend_rows(to_rows(q, 1), kt, vt, ck, cv, window, scale)  # [B,g,H,D]
            return o[rc, sc][None]

        out, cache = self._run(input_ids[rc, sc][None], (start[rc] + slot)[None], layer_ids,
                               attend, cache, regroup=regroup, write=write)
        out = ForwardOut(*(x[0][gather] for x in out))
        if not write:
            return out, cache
        return out, cache._replace(lengths=jnp.minimum(start + num_new, cache.max_len))

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
        # Sliding-window layers (Gemma) go through the chain verify's filled-length
        # segments with the window and the ancestor mask spelled out: the tree kernel
        # has no window, and a tree is short, so these layers cost what a chain verify
        # step costs.
        def attend(q, kt, vt, ck, cv, window, scale):
            if window is None:
                return tree_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), start,
                                      tree_bits, k_tree=kt, v_tree=vt, scale=scale,
                                      impl=attn_impl)
            return _filled_attend(q, kt, vt, ck, cv, start=start, positions=positions,
                                  new_mask=tree_visibility(tree_bits), window=window,
                                  scale=scale, zero_hidden=True)

        return self._run(input_ids, positions, layer_ids, attend, cache)
