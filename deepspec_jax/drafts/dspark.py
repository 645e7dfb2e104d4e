"""DSpark / DFlash parallel block drafter (Flax NNX).

DFlash is exactly DSpark with ``markov_rank=0`` and no confidence head, so one module
and one code path serve both. The draft attends from a block of ``block_size`` tokens
(``[anchor, mask, ...]``) to the target's projected hidden features (the "context")
and, bidirectionally, to its own block.

Attention is computed in two pieces that are merged with one shared softmax
normaliser: block -> context (a positional mask ``kv < anchor``, never a dense float
mask) and block -> own block (block-diagonal, so only ``block x block`` per anchor).
Nothing of size ``[anchors*block, seq + anchors*block]`` is built.

Training-only code (anchor sampling, labels, losses) lives in ``dspark_train``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.config import TargetConfig, load_config_json
from deepspec_jax.drafts.common import (DraftFamily, DraftLayers, Frozen, Proposal,
                                        add_vocab_map, draft_layer_config, vocab_map_of,
                                        vocab_rules)
from deepspec_jax.draft_vocab import parse_draft_vocab_size, scatter_to_target, to_target_ids
from deepspec_jax.dtypes import compute_dtype
from deepspec_jax.errors import ConfigError
from deepspec_jax.kernels.attention import dense_attention, merge_attention, span_attention
from deepspec_jax.layers import apply_rope, embed_lookup, linear, softcap
from deepspec_jax.models.transformer import _param, layer_finish, layer_qkv, norm
from deepspec_jax.sampling import SamplingParams, sample_with_probs
from deepspec_jax.sharding import make_mesh
from deepspec_jax.tree.build import DraftTree, build_tree
from deepspec_jax.weights.loader import stream_params
from deepspec_jax.weights.name_map import TARGET_IGNORABLE, Rule, layer_rules
from deepspec_jax.weights.safetensors_io import TensorSource

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
# the draft's layer model_type (its target's text model type) -> DeepSpec's class name
ARCHITECTURES = {"qwen3": "Qwen3DSparkModel", "gemma4_text": "Gemma4DSparkModel",
                 "gemma4_unified_text": "Gemma4DSparkModel"}


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DSparkConfig:
    """A DSpark/DFlash draft's ``config.json`` (field names as in the reference)."""

    layer: TargetConfig                 # the draft's own decoder layers (the target's text
                                        # config copy: Qwen3, or Gemma-4 with full layers)
    block_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    num_anchors: int
    enable_confidence_head: bool
    confidence_head_with_markov: bool
    markov_rank: int
    markov_head_type: str | None
    draft_vocab_size: int | None = None  # reduced draft vocabulary K (None: the target's V)
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.layer.vocab_size

    @property
    def out_vocab_size(self) -> int:
        """Columns of lm_head / markov_w2: K with a reduced draft vocabulary, else V."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @property
    def logit_softcap(self) -> float | None:
        """Gemma's final_logit_softcapping (draft and aligned target logits); None = none."""
        return self.layer.final_logit_softcap

    @property
    def num_layers(self) -> int:
        return self.layer.num_hidden_layers

    @property
    def num_features(self) -> int:
        """Width of the concatenated target features, ``len(ids) * hidden``."""
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def conf_in(self) -> int:
        return self.hidden_size + (self.markov_rank if self.confidence_head_with_markov else 0)


@dataclasses.dataclass(frozen=True)
class DSparkLossConfig:
    """Training-loss weights (settings of a run, not of the checkpoint)."""

    ce_alpha: float = 0.1
    l1_alpha: float = 0.9
    confidence_alpha: float = 1.0
    loss_decay_gamma: float = 4.0

    @classmethod
    def dflash(cls) -> "DSparkLossConfig":
        return cls(ce_alpha=1.0, l1_alpha=0.0, confidence_alpha=0.0)

    @classmethod
    def default_for(cls, cfg: DSparkConfig) -> "DSparkLossConfig":
        """The reference's shipped defaults: DSpark weights when any head exists."""
        return cls() if (cfg.markov_rank > 0 or cfg.enable_confidence_head) else cls.dflash()


def _need(raw: dict, field: str, source: str, example: str):
    if field not in raw or raw[field] is None:
        raise ConfigError(f"{source}: missing field {field!r} required by a DSpark/DFlash draft; "
                          f"add it, e.g. \"{field}\": {example}.")
    return raw[field]


def _check_layer_ids(ids: tuple[int, ...], n: int, source: str) -> None:
    if not ids:
        raise ConfigError(f"{source}: field 'target_layer_ids' is empty; list the target "
                          "layers whose outputs feed the draft, e.g. [1, 9, 17, 25, 33].")
    for lid in ids:
        if lid == n - 1:
            raise ConfigError(
                f"{source}: field 'target_layer_ids' contains {lid}, the target's last decoder "
                f"layer (num_target_layers={n}); the final layer cannot be a draft feature. "
                f"Use ids in [-1, {n - 2}].")
        if not -1 <= lid < n - 1:
            raise ConfigError(
                f"{source}: field 'target_layer_ids' entry {lid} is out of range [-1, {n - 1}) "
                f"for num_target_layers={n} (-1 = embedding output); fix the id or "
                "num_target_layers.")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)} must be strictly "
                          "increasing; sort it and drop duplicates.")


def dspark_config_from_dict(raw: dict, source: str = "config.json") -> DSparkConfig:
    """Parse and validate a DSpark/DFlash draft config; errors name ``source`` and the field."""
    layer = draft_layer_config(FAMILY, raw, source)
    block_size = int(_need(raw, "block_size", source, "7"))
    if block_size < 1:
        raise ConfigError(f"{source}: field 'block_size' = {block_size} must be >= 1.")
    n_target = int(_need(raw, "num_target_layers", source, "36"))
    ids = tuple(int(i) for i in _need(raw, "target_layer_ids", source, "[1, 9, 17, 25, 33]"))
    _check_layer_ids(ids, n_target, source)
    mask_id = int(_need(raw, "mask_token_id", source, "151669"))
    if not 0 <= mask_id < layer.vocab_size:
        raise ConfigError(f"{source}: field 'mask_token_id' = {mask_id} is outside the vocabulary "
                          f"[0, {layer.vocab_size}); use a reserved token id below vocab_size.")
    num_anchors = int(_need(raw, "num_anchors", source, "512"))
    if num_anchors < 1:
        raise ConfigError(f"{source}: field 'num_anchors' = {num_anchors} must be >= 1.")
    rank = int(_need(raw, "markov_rank", source, "256"))
    if rank < 0:
        raise ConfigError(f"{source}: field 'markov_rank' = {rank} must be >= 0 (0 = no head).")
    head_type = None
    if rank > 0:
        head_type = _need(raw, "markov_head_type", source, "\"vanilla\"")
        if head_type not in MARKOV_HEAD_TYPES:
            raise ConfigError(f"{source}: field 'markov_head_type' = {head_type!r} is unknown; "
                              f"use one of {list(MARKOV_HEAD_TYPES)}.")
    conf = bool(_need(raw, "enable_confidence_head", source, "true"))
    conf_markov = bool(raw.get("confidence_head_with_markov", False)) and conf
    if conf_markov and rank == 0:
        raise ConfigError(f"{source}: field 'confidence_head_with_markov' is true but "
                          "markov_rank is 0; set it false or give the draft a Markov head.")
    return DSparkConfig(layer=layer, block_size=block_size, num_target_layers=n_target,
                        target_layer_ids=ids, mask_token_id=mask_id, num_anchors=num_anchors,
                        enable_confidence_head=conf, confidence_head_with_markov=conf_markov,
                        markov_rank=rank, markov_head_type=head_type,
                        draft_vocab_size=parse_draft_vocab_size(raw, layer.vocab_size, source),
                        raw=dict(raw))


# ---------------------------------------------------------------------------
# attention pieces
# ---------------------------------------------------------------------------

def context_kv(lc: TargetConfig, p: dict, ctx: jax.Array, positions: jax.Array, inv_freq):
    """Keys/values of the projected context ``ctx`` [B,S,d] for one layer: the key/value
    half of ``layer_qkv`` (no query).

    The reference feeds the context straight into k/v_proj (no input_layernorm), then
    k_norm and RoPE at the token positions; Gemma-4 also the scale-free v_norm, and with
    ``attention_k_eq_v`` the values are the raw keys.
    """
    b, s, _ = ctx.shape
    K, D = lc.layer_kv_heads(0), lc.layer_head_dim(0)
    k = linear(ctx, p["k_proj"])
    v = linear(ctx, p["v_proj"]) if "v_proj" in p else k
    if lc.attention_bias:
        k = k + p["k_bias"]
        v = v + p["v_bias"] if "v_bias" in p else k
    k, v = k.reshape(b, s, K, D), v.reshape(b, s, K, D)
    k = norm(lc, k, p["k_norm"])
    if lc.v_norm:
        v = norm(lc, v, None)
    return apply_rope(k, positions, inv_freq), v


# Query rows per block of the context span: the jnp path holds a few [block, S] logits
# per head at a time (tests/test_attention_memory.py). At S=2048, 512 anchors x 7 the
# tiny fixture draft's backbone (fwd+bwd) plans 96 MiB of temporaries with 256, 125
# with 512 (and 506 with the dense logits this replaced); 256 is whole TPU tiles.
CONTEXT_BLOCK_Q = 256


def block_attention(q, kb, vb, kc, vc, anchors, keep, scale=None):
    """Attention of each block to the context before its anchor and to itself.

    q [B,N,K,H,D]; kb/vb [B,N,K,Kh,D] (the block's own keys); kc/vc [B,S,Kh,D] (context);
    anchors [B,N] (context position j is visible iff j < anchor); keep [B,N] bool.
    Two pieces merged into one softmax (``merge_attention``): the context is a span
    (key 0..anchor-1, nothing for a dummy block) over all N*K queries at once, through
    ``span_attention`` (the flash kernel on TPU, query blocks in jnp: never the whole
    [N*K, S] logits, forward or backward); the block's own K keys are a dense piece
    (bidirectional, N folded into the batch). Rows with no visible key (dummy blocks)
    output zero, as the reference's flex-attention does. ``scale``: softmax scale
    (None = D**-0.5; Gemma-4: 1).
    """
    B, N, K, H, D = q.shape
    Kh = kb.shape[3]
    stop = jnp.repeat(jnp.where(keep, anchors, 0).astype(jnp.int32), K, axis=1)   # [B,N*K]
    ctx = span_attention(q.reshape(B, N * K, H, D), kc, vc, jnp.zeros_like(stop), stop,
                         scale=scale, block_q=CONTEXT_BLOCK_Q)
    own_out, own_lse = dense_attention(q.reshape(B * N, K, H, D), kb.reshape(B * N, K, Kh, D),
                                       vb.reshape(B * N, K, Kh, D), keep.reshape(B * N, 1, 1),
                                       scale)
    out, _ = merge_attention([ctx, (own_out.reshape(B, N * K, H, D),
                                    own_lse.reshape(B, N * K, H))])
    return out.reshape(B, N, K, H, D).astype(q.dtype)


# Rematerialised as a whole inside the layer scan: otherwise the scan's backward keeps
# the context mask of every query block (it depends only on the anchors), and XLA plans
# ~25% more temporaries for a DSpark train step (S=2048, 512 anchors x 7).
_block_attention_remat = jax.checkpoint(block_attention, static_argnums=(7,))


# ---------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------

def _frozen(rngs: nnx.Rngs, shape, axes, dtype) -> Frozen:
    return Frozen(_param(rngs, shape, axes, dtype).get_value(), logical_axes=tuple(axes))


class DraftCache(NamedTuple):
    """Per-layer keys/values of the projected target context, ``[L,B,S_max,Kh,D]``.

    ``lengths[b]`` = committed tokens of row b; entries at or past it are ignored, so a
    rejected tail is rolled back by lowering ``lengths``.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array


class DSparkDraft(nnx.Module):
    """Parameters and forward passes of a DSpark/DFlash draft (see module docstring)."""

    def __init__(self, cfg: DSparkConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        lc = cfg.layer
        d, V, r = lc.hidden_size, lc.vocab_size, cfg.markov_rank
        Vo = cfg.out_vocab_size   # output vocabulary (K when reduced); inputs stay over V
        p = lambda shape, axes, init="normal": _param(rngs, shape, axes, param_dtype, init)  # noqa: E731
        self.embed = _frozen(rngs, (V, d), ("vocab", "embed"), param_dtype)
        self.lm_head = _frozen(rngs, (d, Vo), ("embed", "vocab"), param_dtype)
        add_vocab_map(self, cfg.draft_vocab_size, V)
        self.fc = p((cfg.num_features, d), ("feature", "embed"))
        self.hidden_norm = p((d,), ("norm",), "ones")
        self.norm = p((d,), ("norm",), "ones")
        self.layers = DraftLayers(lc, param_dtype=param_dtype, rngs=rngs)
        if r > 0:
            self.markov_w1 = p((V, r), ("vocab", "rank"))
            self.markov_w2 = p((r, Vo), ("rank", "vocab"))
            if cfg.markov_head_type == "gated":
                self.gate_w = p((d + r, r), ("feature", "rank"))
                self.gate_b = p((r,), ("rank",), "zeros")
            elif cfg.markov_head_type == "rnn":
                self.joint_w = p((2 * r + d, 3 * r), ("feature", "rank"))
                self.joint_b = p((3 * r,), ("rank",), "zeros")
        if cfg.enable_confidence_head:
            self.conf_w = p((cfg.conf_in, 1), ("feature", None))
            self.conf_b = p((1,), (None,), "zeros")
        # every draft layer is a full-attention layer: layer 0's head size, RoPE, scale
        self.head_dim = lc.layer_head_dim(0)
        self.attn_scale = lc.attention_scale(self.head_dim)
        self.inv_freq = tuple(float(f) for f in lc.layer_inv_freq(0))

    # ---- small pieces ---------------------------------------------------------
    def _w(self, name: str) -> jax.Array:
        return getattr(self, name).get_value().astype(self.dtype)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return embed_lookup(self.embed.get_value(), ids, self.dtype, self.cfg.layer.embed_scale)

    def project_context(self, features: jax.Array) -> jax.Array:
        """C = hidden_norm(fc(features)): [.., n_feat*d] -> [.., d]."""
        c = features.astype(self.dtype) @ self._w("fc")
        return norm(self.cfg.layer, c, self._w("hidden_norm"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Base logits U = lm_head(h) in fp32, softcapped when the config has a cap (the
        reference's ``compute_logits``; the Markov bias is added after it)."""
        z = jnp.einsum("...d,dv->...v", hidden, self._w("lm_head"),
                       preferred_element_type=jnp.float32)
        return softcap(z, self.cfg.logit_softcap)

    def markov_embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.markov_w1.get_value(), ids, axis=0).astype(self.dtype)

    def markov_step(self, e: jax.Array, h: jax.Array, s: jax.Array | None):
        """One Sequential-head step: (u, s') where the logit bias is ``u @ W2``.

        ``e`` = W1[x_{k-1}], ``h`` = draft hidden state of slot k, ``s`` = RNN state
        (ignored by vanilla/gated). Works on any leading shape.
        """
        kind = self.cfg.markov_head_type
        if kind == "vanilla":
            return e, s
        if kind == "gated":
            g = jax.nn.sigmoid(jnp.concatenate([h, e], -1) @ self._w("gate_w") + self._w("gate_b"))
            return g * e, s
        z = jnp.concatenate([s, e, h], -1) @ self._w("joint_w") + self._w("joint_b")
        gate, cand, out = jnp.split(z, 3, axis=-1)
        gate = jax.nn.sigmoid(gate)
        return jnp.tanh(out), gate * s + (1.0 - gate) * jnp.tanh(cand)

    def markov_bias(self, u: jax.Array) -> jax.Array:
        return jnp.einsum("...r,rv->...v", u, self._w("markov_w2"),
                          preferred_element_type=jnp.float32)

    def markov_features(self, hidden: jax.Array, prev_ids: jax.Array) -> jax.Array:
        """Teacher-forced head vectors u [..., K, r] for hidden [..., K, d] (axis -2 = slot)."""
        e = self.markov_embed(prev_ids)
        if self.cfg.markov_head_type != "rnn":
            return self.markov_step(e, hidden, None)[0]

        def step(s, xs):
            u, s = self.markov_step(xs[0], xs[1], s)
            return s, u

        s0 = jnp.zeros(e.shape[:-2] + e.shape[-1:], e.dtype)
        _, u = jax.lax.scan(step, s0, (jnp.moveaxis(e, -2, 0), jnp.moveaxis(hidden, -2, 0)))
        return jnp.moveaxis(u, 0, -2)

    def confidence(self, hidden: jax.Array, prev_ids: jax.Array) -> jax.Array | None:
        """Confidence logits c [...] (fp32) from h (and W1[x_{k-1}]); None without a head."""
        if not self.cfg.enable_confidence_head:
            return None
        x = hidden
        if self.cfg.confidence_head_with_markov:
            x = jnp.concatenate([hidden, self.markov_embed(prev_ids)], -1)
        return (jnp.einsum("...i,io->...o", x, self._w("conf_w"),
                           preferred_element_type=jnp.float32)[..., 0]
                + self.conf_b.get_value()[0].astype(jnp.float32))

    def block_ids(self, anchor_tokens: jax.Array, keep: jax.Array) -> jax.Array:
        """Block inputs ``[anchor, mask, ...]`` [B,N,K]; dummy blocks are all mask."""
        mask = self.cfg.mask_token_id
        ids = jnp.full(anchor_tokens.shape + (self.cfg.block_size,), mask, jnp.int32)
        return ids.at[..., 0].set(jnp.where(keep, anchor_tokens, mask).astype(jnp.int32))

    # ---- backbone -------------------------------------------------------------
    def backbone(self, block_ids, anchors, keep, ctx_kv_fn, ctx_xs) -> jax.Array:
        """Draft hidden states ``norm(h)`` [B,N,K,d] for block inputs ``block_ids`` [B,N,K].

        ``ctx_kv_fn(p, xs_l) -> (kc, vc)`` gives the context keys/values of one layer
        from its params and its slice of ``ctx_xs`` (scanned with the layer params).
        """
        lc = self.cfg.layer
        B, N, K = block_ids.shape
        H, D = lc.num_attention_heads, self.head_dim
        Kh = lc.layer_kv_heads(0)
        h = self.embed_tokens(block_ids).reshape(B, N * K, -1)
        pos = (anchors[:, :, None] + jnp.arange(K, dtype=jnp.int32)).reshape(B, N * K)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        params = self.layers.stacked(self.dtype)

        def body(h, xs):
            p, xs_l = xs
            x = norm(lc, h, p["input_norm"])
            q, kb, vb = layer_qkv(lc, p, x, pos, inv_freq)
            kc, vc = ctx_kv_fn(p, xs_l)
            attn = _block_attention_remat(q.reshape(B, N, K, H, D),
                                          kb.reshape(B, N, K, Kh, D), vb.reshape(B, N, K, Kh, D),
                                          kc.astype(q.dtype), vc.astype(q.dtype), anchors, keep,
                                          self.attn_scale)
            return layer_finish(lc, p, h, attn.reshape(B, N * K, H, D)), None

        # Each layer is recomputed in the backward from its input (the scan carry, which
        # the scan saves per layer): otherwise the backward keeps every layer's MLP and
        # attention intermediates, e.g. six bf16 [layers, B, N*K, intermediate] buffers,
        # ~2 GB per sequence at the Qwen3-4B reference size (4096 tokens, 512 x 7).
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable,
                              prevent_cse=False)
        h, _ = jax.lax.scan(body, h, (params, ctx_xs))
        h = norm(lc, h, self._w("norm"))
        return h.reshape(B, N, K, -1)

    def train_hidden(self, input_ids, features, anchors, keep) -> jax.Array:
        """Training backbone: all anchors of a sequence in one pass, [B,N,K,d]."""
        b, s = input_ids.shape
        ctx = self.project_context(features)
        ctx_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        anchor_tok = jnp.take_along_axis(input_ids, anchors, axis=1)
        fn = lambda p, _: context_kv(self.cfg.layer, p, ctx, ctx_pos, inv_freq)  # noqa: E731
        xs = jnp.arange(self.cfg.num_layers)
        return self.backbone(self.block_ids(anchor_tok, keep), anchors, keep, fn, xs)

    # ---- inference --------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> DraftCache:
        lc = self.cfg.layer
        shape = (lc.num_hidden_layers, batch, max_len, lc.layer_kv_heads(0), self.head_dim)
        return DraftCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                          jnp.zeros((batch,), jnp.int32))

    def extend_context(self, cache: DraftCache, features: jax.Array, num_new: jax.Array) -> DraftCache:
        """Append target features [B,T,n_feat*d] at each row's length (first num_new[b] real)."""
        b, t, _ = features.shape
        ctx = self.project_context(features)
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        params = self.layers.stacked(self.dtype)
        k, v = jax.vmap(lambda p: context_kv(self.cfg.layer, p, ctx, positions, inv_freq))(params)
        # Padding slots (>= num_new) are written too but stay beyond ``lengths``.
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        ck = cache.k.at[:, rows, positions].set(k.astype(cache.k.dtype), mode="drop")
        cv = cache.v.at[:, rows, positions].set(v.astype(cache.v.dtype), mode="drop")
        new_len = jnp.minimum(cache.lengths + num_new.astype(jnp.int32), cache.k.shape[2])
        return DraftCache(ck, cv, new_len)

    def propose_hidden(self, cache: DraftCache, current: jax.Array) -> jax.Array:
        """Block hidden states [B,K,d]: anchor = current token at position ``lengths``."""
        b = current.shape[0]
        anchors = cache.lengths[:, None]
        keep = jnp.ones((b, 1), bool)
        fn = lambda p, kv: kv  # noqa: E731
        h = self.backbone(self.block_ids(current[:, None], keep), anchors, keep, fn,
                          (cache.k, cache.v))
        return h[:, 0]

    def propose(self, cache: DraftCache, current: jax.Array, key: jax.Array,
                sp: SamplingParams = SamplingParams()) -> Proposal:
        """Draft a block left to right with the Markov correction and confidences
        (``Proposal.logits`` are the Markov-corrected ``U_k + B_k``).

        ``sp`` (static) is the target's sampling setting: each token is drawn from
        ``sampling.sample_with_probs`` (temperature, top-k, top-p: the same draft
        distribution as ``tree_propose`` and Eagle3), which also returns the
        distribution rejection sampling must divide by (one-hot when greedy). The RNN
        state is carried across positions (the reference's single-step helper does not).
        A reduced draft vocabulary samples over its K ids and maps each drawn id to its
        target id (``draft_vocab.to_target_ids``) before it feeds the Markov head or
        anything else; ``dists`` are the K probabilities scattered into V.
        """
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"propose: sp must be a SamplingParams, got {type(sp).__name__} "
                            "(pass SamplingParams(temperature, top_k, top_p)).")
        hidden = self.propose_hidden(cache, current)           # [B,K,d]
        base = self.logits(hidden)                             # [B,K,Vo]
        cfg = self.cfg
        r = max(cfg.markov_rank, 1)
        keys = jax.random.split(key, cfg.block_size)
        d2t = vocab_map_of(self)

        def step(carry, xs):
            prev, s = carry
            h_k, base_k, key_k = xs
            logits = base_k
            if cfg.markov_rank > 0:
                u, s = self.markov_step(self.markov_embed(prev), h_k, s)
                logits = logits + self.markov_bias(u)
            conf = self.confidence(h_k, prev)
            conf = jnp.zeros(prev.shape, jnp.float32) if conf is None else conf
            tok, probs = sample_with_probs(logits, key_k, sp)
            p_tok = jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
            tok = to_target_ids(tok, d2t)
            return (tok, s), (tok, logits, probs, p_tok, conf)

        s0 = jnp.zeros(current.shape + (r,), self.dtype)
        xs = (jnp.moveaxis(hidden, 1, 0), jnp.moveaxis(base, 1, 0), keys)
        _, outs = jax.lax.scan(step, (current.astype(jnp.int32), s0), xs)
        tok, logits, probs, token_probs, conf = (jnp.moveaxis(x, 0, 1) for x in outs)
        probs = scatter_to_target(probs, d2t, cfg.vocab_size)
        return Proposal(tok, logits, probs, token_probs, conf)

    def tree_propose(self, cache: DraftCache, current: jax.Array, key: jax.Array, sp,
                     topk: int, num_nodes: int, threshold=0.0, conf_scale=None):
        """Draft a tree (``deepspec_jax.tree.DraftTree``) instead of a chain.

        One backbone pass gives the hidden states of all block slots (they do not
        depend on the drafted tokens); a node at depth d gets its children's logits
        ``U_{d+1} + B_{d+1}`` from the Sequential head applied to its own token and (RNN)
        its path's state, so every child is conditioned on its parent. Children are the
        top-k (greedy) or k draws without replacement (T>0); the EAGLE-2 style builder
        keeps the best ``num_nodes``. With a confidence head and ``threshold`` > 0 a
        node whose children's confidence ``sigmoid(c)`` is below the threshold gets no
        children (the chain's early stop, per branch; it depends only on the parent,
        so verification stays lossless); ``conf_scale`` [block] (1 / the STS
        temperatures) multiplies the confidence logit of each depth first. The confidence is not used as the children's
        acceptance prior in the score: on the fixture drafts that made sampled trees
        shallower and lowered tau below the chain's, while the default prior (1)
        always keeps the chain of first draws. A reduced draft vocabulary draws children
        over its K ids; ``build_tree`` maps them to target ids (``d2t``) before they are
        expanded and scatters the log-distributions into V.
        """
        cfg = self.cfg
        hidden = self.propose_hidden(cache, current)                     # [B,K,d]
        base = self.logits(hidden)                                       # [B,K,V]
        b = current.shape[0]
        r = max(cfg.markov_rank, 1)
        threshold = jnp.asarray(threshold, jnp.float32)

        def step(slot, prev, s):
            """Children logits / prior (0, or -inf = pruned) / child state of nodes with
            tokens ``prev`` [B,F] at depth ``slot``."""
            f = prev.shape[1]
            h = jnp.broadcast_to(hidden[:, slot][:, None], (b, f, hidden.shape[-1]))
            logits = jnp.broadcast_to(base[:, slot][:, None], (b, f, base.shape[-1]))
            if cfg.markov_rank > 0:
                u, s = self.markov_step(self.markov_embed(prev), h, s)
                logits = logits + self.markov_bias(u)
            conf = self.confidence(h, prev)
            prior = None
            if conf is not None and conf_scale is not None:
                conf = conf * jnp.asarray(conf_scale, conf.dtype)[slot]
            if conf is not None:
                keep = (threshold <= 0) | (jax.nn.sigmoid(conf) >= threshold)
                prior = jnp.where(keep, 0.0, -jnp.inf)
            return logits, prior, s

        s0 = jnp.zeros((b, 1, r), self.dtype)
        logits0, prior0, s1 = step(0, current.astype(jnp.int32)[:, None], s0)

        def expand(level, tokens, states, anc, carry):
            logits, prior, s = step(level, tokens, states)
            return logits, prior, s, carry

        return build_tree(logits0[:, 0], None if prior0 is None else prior0[:, 0], s1[:, 0],
                          expand, None, topk=topk, num_nodes=num_nodes,
                          max_depth=cfg.block_size, sp=sp, key=key,
                          d2t=vocab_map_of(self), vocab_size=cfg.vocab_size)


# ---------------------------------------------------------------------------
# checkpoint names and loading
# ---------------------------------------------------------------------------

def dspark_rules(cfg: DSparkConfig) -> list[Rule]:
    """Our parameter paths <-> the reference's HF keys (torch Linear is [out, in])."""
    rules = [Rule("embed", "embed_tokens.weight"), Rule("lm_head", "lm_head.weight", True),
             Rule("fc", "fc.weight", True), Rule("hidden_norm", "hidden_norm.weight"),
             Rule("norm", "norm.weight")]
    rules += layer_rules("", "layers.", qk_norm=True, attention_bias=cfg.layer.attention_bias,
                         cfg=cfg.layer)
    if cfg.markov_rank > 0:
        rules += [Rule("markov_w1", "markov_head.markov_w1.weight"),
                  Rule("markov_w2", "markov_head.markov_w2.weight", True)]
        if cfg.markov_head_type == "gated":
            rules += [Rule("gate_w", "markov_head.gate_proj.weight", True),
                      Rule("gate_b", "markov_head.gate_proj.bias")]
        elif cfg.markov_head_type == "rnn":
            rules += [Rule("joint_w", "markov_head.joint_proj.weight", True),
                      Rule("joint_b", "markov_head.joint_proj.bias")]
    if cfg.enable_confidence_head:
        rules += [Rule("conf_w", "confidence_head.proj.weight", True),
                  Rule("conf_b", "confidence_head.proj.bias")]
    return rules + vocab_rules(cfg.draft_vocab_size)


def build_dspark(cfg: DSparkConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs) -> DSparkDraft:
    return DSparkDraft(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def load_dspark_config(path: str) -> DSparkConfig:
    cfg_path = os.path.join(path, "config.json")
    return dspark_config_from_dict(load_config_json(cfg_path), cfg_path)


def load_dspark_checkpoint(path: str, mesh: Mesh | None = None, dtype: str = "float32",
                           source=None) -> DSparkDraft:
    """Load a reference DSpark/DFlash checkpoint directory into a sharded DSparkDraft.

    ``source`` (a TensorSource-like object) overrides the directory's tensors (tests).
    """
    jdt = compute_dtype(dtype)
    cfg = load_dspark_config(path)
    mesh = mesh if mesh is not None else make_mesh()
    source = source if source is not None else TensorSource.from_dir(path)
    abstract = nnx.eval_shape(lambda: DSparkDraft(cfg, dtype=jdt, param_dtype=jdt, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return stream_params(graphdef, state, dspark_rules(cfg), source, cfg.num_layers, mesh, jdt,
                         TARGET_IGNORABLE, "DSpark draft checkpoint")


# ---------------------------------------------------------------------------
# the family record: decode interface for the speculative-decoding loop
# ---------------------------------------------------------------------------

def dspark_kind(cfg: DSparkConfig) -> str:
    """"dflash" for a draft without Markov and confidence heads, else "dspark"."""
    return "dspark" if (cfg.markov_rank > 0 or cfg.enable_confidence_head) else "dflash"


def decode_init(model: DSparkDraft, batch: int, cache_len: int, prompt, prompt_len, first,
                feats) -> DraftCache:
    """Draft cache after prefill: the prompt's target features are its context."""
    return model.extend_context(model.init_cache(batch, cache_len), feats, prompt_len)


def decode_propose(model: DSparkDraft, cache: DraftCache, current, key,
                   sp: SamplingParams) -> tuple[Proposal, DraftCache]:
    """A block from the current token; the cache is unchanged (proposing writes nothing)."""
    return model.propose(cache, current, key, sp), cache


def decode_commit(model: DSparkDraft, cache: DraftCache, feats, committed, num_new) -> DraftCache:
    """Append the target features of [current, accepted drafts] (``committed`` unused:
    the block's anchor is the next current token)."""
    return model.extend_context(cache, feats, num_new)


def decode_tree(model: DSparkDraft, cache: DraftCache, current, key, sp, topk: int,
                num_nodes: int, threshold, conf_scale=None) -> DraftTree:
    return model.tree_propose(cache, current, key, sp, topk, num_nodes, threshold, conf_scale)


FAMILY = DraftFamily(
    name="dspark", architectures=ARCHITECTURES, kinds=("dspark", "dflash"), kind_of=dspark_kind,
    config_from_dict=dspark_config_from_dict, build=build_dspark, rules=dspark_rules,
    num_layers=lambda cfg: cfg.num_layers, lowest_layer_id=-1,
    width=lambda cfg: int(cfg.block_size),
    has_confidence=lambda cfg: bool(cfg.enable_confidence_head),
    init=decode_init, propose=decode_propose, commit=decode_commit, tree=decode_tree)
