"""Eagle3 draft (``Qwen3Eagle3Model``): config, parameters, name map, decode interface.

The draft is one Qwen3 decoder layer whose attention input is the concatenation
``[input_layernorm(embed(token)), hidden_norm(h)]`` (2d wide), with the residual on
``h``. ``h`` is ``fc(target_features)`` for a committed position and the draft's own
previous output hidden state while it proposes. Logits are ``lm_head(norm(h))``.

Pairing convention (training and decoding alike): the target feature at position i
goes with token i+1 and RoPE position i, so the output at position i predicts token
i+2. TTT training lives in ``eagle3_train``; this module holds the pieces shared by
training and the speculative-decoding loop (``extend`` / ``propose``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepspec_jax.config import TargetConfig, load_config_json
from deepspec_jax.draft_vocab import parse_draft_vocab_size, scatter_to_target, to_target_ids
from deepspec_jax.drafts.common import (DraftFamily, DraftLayers, Frozen, Proposal,
                                        add_vocab_map, draft_layer_config, vocab_map_of,
                                        vocab_rules)
from deepspec_jax.errors import ConfigError
from deepspec_jax.kernels.attention import dense_attention, merge_attention
from deepspec_jax.layers import embed_lookup, softcap
from deepspec_jax.models.transformer import _param, layer_finish, layer_qkv, norm
from deepspec_jax.sampling import SamplingParams, sample_with_probs
from deepspec_jax.sharding import make_mesh
from deepspec_jax.tree.build import DraftTree, build_tree
from deepspec_jax.weights.loader import stream_params
from deepspec_jax.weights.name_map import Rule, layer_rules
from deepspec_jax.weights.safetensors_io import TensorSource

NUM_FEATURE_LAYERS = 5  # Eagle3 v1 fuses exactly five target layers
# the draft's layer model_type (its target's text model type) -> DeepSpec's class name
ARCHITECTURES = {"qwen3": "Qwen3Eagle3Model", "gemma4_text": "Gemma4Eagle3Model",
                 "gemma4_unified_text": "Gemma4Eagle3Model"}


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """Draft config: the Qwen3 backbone fields plus the Eagle3 fields of config.json."""

    backbone: TargetConfig          # hidden/heads/vocab/rope of the draft layer
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    draft_num_hidden_layers: int = 1
    draft_vocab_size: int | None = None  # reduced draft vocabulary K (None: the target's V)
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    # Convenience views of the backbone (keeps model code short).
    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def logit_softcap(self) -> float | None:
        """Gemma's final_logit_softcapping (draft and target logits); None = none."""
        return self.backbone.final_logit_softcap

    @property
    def vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def out_vocab_size(self) -> int:
        """Columns of lm_head: K with a reduced draft vocabulary, else V."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def feature_size(self) -> int:
        return len(self.target_layer_ids) * self.backbone.hidden_size


def _field(raw: dict, name: str, source: str, fix: str):
    if name not in raw:
        raise ConfigError(f"{source}: missing field {name!r}; {fix}")
    return raw[name]


def validate_target_layer_ids(ids, num_target_layers: int, source: str) -> tuple[int, ...]:
    """Eagle3 reads exactly five real decoder layers, never the last one (its output
    is what the draft must predict) and never the embeddings (-1)."""
    if not isinstance(ids, (list, tuple)):
        raise ConfigError(f"{source}: field 'target_layer_ids' must be a list of "
                          f"{NUM_FEATURE_LAYERS} layer indices, got {ids!r}.")
    ids = tuple(int(i) for i in ids)
    fix = (f"set 'target_layer_ids' to {NUM_FEATURE_LAYERS} strictly increasing indices in "
           f"0..{num_target_layers - 2} (e.g. spread over the target's depth).")
    if len(ids) != NUM_FEATURE_LAYERS:
        raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)} has {len(ids)} "
                          f"entries; Eagle3 needs exactly {NUM_FEATURE_LAYERS}; {fix}")
    if -1 in ids:
        raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)} contains -1 "
                          f"(embeddings), which Eagle3 does not support; {fix}")
    for i in ids:
        if not 0 <= i < num_target_layers:
            raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)}: {i} is out "
                              f"of range for a target with num_target_layers="
                              f"{num_target_layers}; {fix}")
    if num_target_layers - 1 in ids:
        raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)} contains the "
                          f"target's last layer {num_target_layers - 1}; {fix}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ConfigError(f"{source}: field 'target_layer_ids' = {list(ids)} is not "
                          f"strictly increasing; {fix}")
    return ids


def eagle3_config_from_dict(raw: dict, source: str = "config.json") -> Eagle3Config:
    """Parse a DeepSpec Eagle3 draft config.json (a Qwen3 config plus Eagle3 fields)."""
    n_target = int(_field(raw, "num_target_layers", source,
                          "add the target's num_hidden_layers as 'num_target_layers'."))
    ids = validate_target_layer_ids(
        _field(raw, "target_layer_ids", source,
               f"add the {NUM_FEATURE_LAYERS} target layers the draft reads."), n_target, source)
    n_draft = int(raw.get("draft_num_hidden_layers", raw.get("num_hidden_layers", 1)))
    if n_draft != 1:
        raise ConfigError(f"{source}: field 'draft_num_hidden_layers' = {n_draft}; the Eagle3 "
                          "draft has exactly one decoder layer; set it to 1.")
    ttt = int(raw.get("ttt_length", 7))
    if ttt < 1:
        raise ConfigError(f"{source}: field 'ttt_length' = {ttt} must be >= 1.")
    backbone = draft_layer_config(FAMILY, raw, source, num_hidden_layers=n_draft)
    return Eagle3Config(backbone=backbone, target_layer_ids=ids, num_target_layers=n_target,
                        ttt_length=ttt, step_loss_decay=float(raw.get("step_loss_decay", 0.8)),
                        draft_num_hidden_layers=n_draft,
                        draft_vocab_size=parse_draft_vocab_size(raw, backbone.vocab_size, source),
                        raw=dict(raw))


# ---------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------


def eagle3_layers(cfg: Eagle3Config, *, param_dtype, rngs: nnx.Rngs) -> DraftLayers:
    """The decoder layer(s), stacked (HF ``layers.{i}.``): a target layer of the backbone
    config whose q/k/v read the 2d-wide concatenated input, plus ``hidden_norm``."""
    d = cfg.hidden_size
    return DraftLayers(cfg.backbone, param_dtype=param_dtype, rngs=rngs, in_width=2 * d,
                       extra=(("hidden_norm", (d,), ("norm",), "ones"),))


class Eagle3Draft(nnx.Module):
    def __init__(self, cfg: Eagle3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        d, V = cfg.hidden_size, cfg.vocab_size
        frozen = lambda shape, axes: Frozen(  # noqa: E731
            _param(rngs, shape, axes, param_dtype).get_value(), logical_axes=axes)
        self.embed = frozen((V, d), ("vocab", "embed"))
        self.lm_head = frozen((d, cfg.out_vocab_size), ("embed", "vocab"))
        add_vocab_map(self, cfg.draft_vocab_size, V)
        self.fc = _param(rngs, (cfg.feature_size, d), ("feature", "embed"), param_dtype)
        self.norm = _param(rngs, (d,), ("norm",), param_dtype, "ones")
        self.layers = eagle3_layers(cfg, param_dtype=param_dtype, rngs=rngs)
        b = cfg.backbone
        # the draft layer is a full-attention layer: layer 0's head size, RoPE, scale
        self.head_dim = b.layer_head_dim(0)
        self.kv_heads = b.layer_kv_heads(0)
        self.attn_scale = b.attention_scale(self.head_dim)
        self.inv_freq = tuple(float(f) for f in b.layer_inv_freq(0))

    # ---- small pure pieces used by training and decoding ----
    def project_features(self, features: jax.Array) -> jax.Array:
        """[..., 5d] concatenated target layer outputs -> draft hidden [..., d]."""
        return features.astype(self.dtype) @ self.fc.get_value().astype(self.dtype)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return embed_lookup(self.embed.get_value(), ids, self.dtype, self.cfg.backbone.embed_scale)

    def final_hidden(self, h: jax.Array) -> jax.Array:
        """norm(h): the lm_head input (kept separate so losses can chunk the vocab)."""
        return norm(self.cfg.backbone, h, self.norm.get_value().astype(self.dtype))

    def logits(self, h: jax.Array) -> jax.Array:
        """softcap(lm_head(norm(h))) in fp32 (the reference's ``compute_logits``)."""
        return softcap(jnp.einsum("...d,dv->...v", self.final_hidden(h),
                                  self.lm_head.get_value().astype(self.dtype),
                                  preferred_element_type=jnp.float32), self.cfg.logit_softcap)

    def qkv(self, ids: jax.Array, h: jax.Array, positions: jax.Array):
        """Queries/keys/values of the layer for tokens ``ids`` [B,T] paired with hidden
        states ``h`` [B,T,d] at RoPE ``positions`` [B,T]."""
        b = self.cfg.backbone
        p = self.layers.layer(0, self.dtype)
        x = jnp.concatenate([norm(b, self.embed_tokens(ids), p["input_norm"]),
                             norm(b, h, p["hidden_norm"])], axis=-1)
        return layer_qkv(b, p, x, positions, jnp.asarray(self.inv_freq, jnp.float32))

    def finish(self, h: jax.Array, attn: jax.Array) -> jax.Array:
        """Residual on h, then the MLP block (the target layer's): the layer's output."""
        return layer_finish(self.cfg.backbone, self.layers.layer(0, self.dtype), h, attn)


def build_eagle3(cfg: Eagle3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs) -> Eagle3Draft:
    return Eagle3Draft(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def eagle3_rules(cfg: Eagle3Config) -> list[Rule]:
    """Our parameter paths <-> DeepSpec ``Qwen3Eagle3Model`` / ``Gemma4Eagle3Model``
    state-dict keys (the layer names follow the backbone's family)."""
    return [
        Rule("embed", "embed_tokens.weight"),
        Rule("lm_head", "lm_head.weight", True),
        Rule("fc", "fc.weight", True),
        Rule("norm", "norm.weight"),
        Rule("layers.hidden_norm", "layers.{i}.hidden_norm.weight"),
    ] + layer_rules("", "layers.", qk_norm=True, attention_bias=cfg.backbone.attention_bias,
                    cfg=cfg.backbone) + vocab_rules(cfg.draft_vocab_size)


EAGLE3_IGNORABLE = (re.compile(r".*rotary_emb\.inv_freq$"),)


def load_eagle3(path: str, *, mesh=None, dtype=jnp.float32, source=None) -> Eagle3Draft:
    """Load a DeepSpec Eagle3 draft directory (config.json + safetensors), parameters
    streamed into their shardings on ``mesh`` (default: all devices, fsdp).
    ``source`` overrides the tensors (any ``TensorSource``-like object)."""
    cfg_path = os.path.join(path, "config.json")
    cfg = eagle3_config_from_dict(load_config_json(cfg_path), cfg_path)
    source = TensorSource.from_dir(path) if source is None else source
    abstract = nnx.eval_shape(lambda: Eagle3Draft(cfg, dtype=dtype, param_dtype=dtype,
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return stream_params(graphdef, state, eagle3_rules(cfg), source, cfg.draft_num_hidden_layers,
                         mesh if mesh is not None else make_mesh(), dtype, EAGLE3_IGNORABLE,
                         what="Eagle3 draft checkpoint")


# ---------------------------------------------------------------------------
# decoding: draft KV cache, extend with committed tokens, propose
# ---------------------------------------------------------------------------


class Eagle3State(NamedTuple):
    """Draft decode state. ``k``/``v`` [B, S_max, K, D] hold keys of committed
    positions (< ``lengths``); entries at or past ``lengths`` are scratch (proposals),
    so rolling back is lowering ``lengths``. ``hidden`` [B, d] is the layer output at
    each row's last committed position: it yields the first proposed token."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    hidden: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def init_state(cfg: Eagle3Config, batch: int, max_len: int, dtype=jnp.float32) -> Eagle3State:
    b = cfg.backbone
    shape = (batch, max_len, b.layer_kv_heads(0), b.layer_head_dim(0))
    return Eagle3State(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, b.hidden_size), dtype))


def _cached_step(model: Eagle3Draft, state: Eagle3State, ids: jax.Array, h: jax.Array,
                 start: jax.Array):
    """Run tokens ``ids`` [B,T] with hidden ``h`` [B,T,d] at positions start+0..T-1,
    writing their keys into the cache; returns (layer output [B,T,d], k, v)."""
    B, T = ids.shape
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    q, k, v = model.qkv(ids, h, positions)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    ck = state.k.at[rows, positions].set(k.astype(state.k.dtype), mode="drop")
    cv = state.v.at[rows, positions].set(v.astype(state.v.dtype), mode="drop")
    kv_pos = jnp.arange(state.max_len, dtype=jnp.int32)
    mask = kv_pos[None, None, :] <= positions[:, :, None]
    attn, _ = dense_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, model.attn_scale)
    return model.finish(h, attn.astype(q.dtype)), ck, cv


def extend(model: Eagle3Draft, state: Eagle3State, tokens: jax.Array, features: jax.Array,
           num_new: jax.Array) -> Eagle3State:
    """Commit ``num_new[b]`` positions per row starting at ``state.lengths``.

    ``features`` [B,T,5d] are the target features at those positions (prefill or the
    verify pass) and ``tokens`` [B,T] the tokens that follow them (feature at i pairs
    with token i+1). After a verify with ``a`` accepted drafts call this with the
    verify features of positions 0..a and tokens [d_1..d_a, bonus], num_new = a+1;
    no rollback step is needed because ``propose`` never advances ``lengths`` (its
    scratch keys are overwritten here). Right padding beyond ``num_new`` is ignored.
    """
    h_in = model.project_features(features)
    out, ck, cv = _cached_step(model, state, tokens, h_in, state.lengths)
    num_new = num_new.astype(jnp.int32)
    last = jnp.clip(num_new - 1, 0, tokens.shape[1] - 1)
    h_last = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]
    hidden = jnp.where((num_new > 0)[:, None], h_last.astype(state.hidden.dtype), state.hidden)
    lengths = jnp.minimum(state.lengths + num_new, state.max_len)
    return Eagle3State(ck, cv, lengths, hidden)


def propose(model: Eagle3Draft, state: Eagle3State, num_steps: int, key: jax.Array,
            sp: SamplingParams = SamplingParams()) -> tuple[Proposal, Eagle3State]:
    """Draft ``num_steps`` tokens autoregressively from the last committed position.

    Token 1 comes from ``state.hidden``; token j+1 from running token j with the
    previous output hidden at position lengths+j-1. That is num_steps-1 layer
    forwards (no forward after the last token). The returned state has the proposal
    keys written past ``lengths`` but the same ``lengths``: nothing is committed.
    Eagle3 has no confidence head: ``confidence_logits`` are zeros. A reduced draft
    vocabulary samples over its K ids and maps each drawn id to its target id before
    it is embedded for the next step; ``dists`` are scattered into V.
    """
    keys = jax.random.split(key, num_steps)
    d2t = vocab_map_of(model)

    def draw(h, k):
        logits = model.logits(h)
        tok, dist = sample_with_probs(logits, k, sp)
        p = jnp.take_along_axis(dist, tok[..., None], axis=-1)[..., 0]
        return to_target_ids(tok, d2t), logits, dist, p

    tok, logit, dist, p0 = draw(state.hidden, keys[0])

    def body(carry, xs):
        ck, cv, h, tok = carry
        j, k = xs
        st = Eagle3State(ck, cv, state.lengths, h)
        out, ck, cv = _cached_step(model, st, tok[:, None], h[:, None], state.lengths + j)
        h = out[:, 0]
        nxt, logits, dist, p = draw(h, k)
        return (ck, cv, h, nxt), (nxt, logits, dist, p)

    carry = (state.k, state.v, state.hidden, tok)
    (ck, cv, _, _), (toks, logits, dists, p) = jax.lax.scan(
        body, carry, (jnp.arange(num_steps - 1, dtype=jnp.int32), keys[1:]))
    first = lambda x0, xs: jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)  # noqa: E731
    toks, logits, dists, p = first(tok, toks), first(logit, logits), first(dist, dists), first(p0, p)
    dists = scatter_to_target(dists, d2t, model.cfg.vocab_size)
    return (Proposal(toks, logits, dists, p, jnp.zeros(toks.shape, jnp.float32)),
            Eagle3State(ck, cv, state.lengths, state.hidden))


# ---------------------------------------------------------------------------
# tree drafting (EAGLE-2 style dynamic trees)
# ---------------------------------------------------------------------------


def tree_step(model: Eagle3Draft, state: Eagle3State, tokens: jax.Array, h_in: jax.Array,
              positions: jax.Array, scratch: tuple, slots: jax.Array, visible: jax.Array):
    """One draft step for F tree nodes at once.

    ``tokens`` [B,F] run with their parents' output hidden ``h_in`` [B,F,d] at RoPE
    ``positions`` [B,F]; each attends to the committed cache (< ``lengths``) and to the
    scratch keys ``scratch`` ([B,R,K,D] k, v) marked in ``visible`` [B,F,R] (itself and
    its expanded ancestors). Its own key/value is written at scratch slot ``slots``
    [F] first. The committed cache is never written: rolling back a tree is free.
    Returns (output hidden [B,F,d], scratch)."""
    q, k, v = model.qkv(tokens, h_in, positions)
    sk, sv = scratch
    sk = sk.at[:, slots].set(k.astype(sk.dtype))
    sv = sv.at[:, slots].set(v.astype(sv.dtype))
    kv_pos = jnp.arange(state.max_len, dtype=jnp.int32)
    committed = kv_pos[None, None, :] < state.lengths[:, None, None]
    c = lambda x: x.astype(q.dtype)  # noqa: E731
    s = model.attn_scale
    attn, _ = merge_attention([dense_attention(q, c(state.k), c(state.v), committed, s),
                               dense_attention(q, c(sk), c(sv), visible, s)])
    return model.finish(h_in, attn.astype(q.dtype)), (sk, sv)


def tree_propose(model: Eagle3Draft, state: Eagle3State, key: jax.Array, sp: SamplingParams,
                 topk: int, num_nodes: int):
    """Draft an EAGLE-2 dynamic tree (``deepspec_jax.tree.DraftTree``) of depth
    ``ttt_length``: the root's children come from ``state.hidden``; each later level
    runs its ``topk`` best nodes in one batched step (``tree_step``) at position
    ``lengths + depth - 1``, as the chain proposer runs its j-th token at
    ``lengths + j``. ``state`` is unchanged (scratch keys are local)."""
    cfg = model.cfg
    D, k = int(cfg.ttt_length), int(topk)
    b = state.hidden.shape[0]
    R = max((D - 1) * k, 1)
    scratch = (jnp.zeros((b, R, model.kv_heads, model.head_dim), state.k.dtype),
               jnp.zeros((b, R, model.kv_heads, model.head_dim), state.v.dtype))

    def expand(level, tokens, h_parent, anc, scratch):
        f = tokens.shape[1]
        pos = jnp.broadcast_to(state.lengths[:, None] + (level - 1), (b, f))
        slots = (level - 1) * k + jnp.arange(f, dtype=jnp.int32)
        h, scratch = tree_step(model, state, tokens, h_parent, pos, scratch, slots, anc)
        return model.logits(h), None, h, scratch

    return build_tree(model.logits(state.hidden), None, state.hidden, expand, scratch,
                      topk=k, num_nodes=num_nodes, max_depth=D, sp=sp, key=key,
                      d2t=vocab_map_of(model), vocab_size=cfg.vocab_size)


# ---------------------------------------------------------------------------
# the family record: decode interface for the speculative-decoding loop
# ---------------------------------------------------------------------------


def decode_init(model: Eagle3Draft, batch: int, cache_len: int, prompt, prompt_len, first,
                feats) -> Eagle3State:
    """Draft state after prefill. The feature at position i pairs with token i+1: the
    prompt shifted left by one, with the first generated token after each row's last
    prompt token."""
    st = init_state(model.cfg, batch, cache_len, model.dtype)
    toks = jnp.roll(prompt, -1, axis=1).at[jnp.arange(batch), prompt_len - 1].set(first)
    return extend(model, st, toks, feats, prompt_len)


def decode_propose(model: Eagle3Draft, state: Eagle3State, current, key,
                   sp: SamplingParams) -> tuple[Proposal, Eagle3State]:
    """``ttt_length`` tokens from the last committed position (``current`` is implied by
    the state: its hidden state was computed when it was committed)."""
    return propose(model, state, int(model.cfg.ttt_length), key, sp)


def decode_commit(model: Eagle3Draft, state: Eagle3State, feats, committed, num_new) -> Eagle3State:
    """Target features of [current, accepted drafts] paired with the tokens that follow
    them (``committed``: the accepted drafts, then the new current token)."""
    return extend(model, state, committed, feats, num_new)


def decode_tree(model: Eagle3Draft, state: Eagle3State, current, key, sp, topk: int,
                num_nodes: int, threshold, conf_scale=None) -> DraftTree:
    """``threshold``/``conf_scale`` are unused: Eagle3 has no confidence head."""
    return tree_propose(model, state, key, sp, topk, num_nodes)


FAMILY = DraftFamily(
    name="eagle3", architectures=ARCHITECTURES, kinds=("eagle3",),
    kind_of=lambda cfg: "eagle3", config_from_dict=eagle3_config_from_dict, build=build_eagle3,
    rules=eagle3_rules, num_layers=lambda cfg: cfg.draft_num_hidden_layers, lowest_layer_id=0,
    width=lambda cfg: int(cfg.ttt_length), has_confidence=lambda cfg: False,
    init=decode_init, propose=decode_propose, commit=decode_commit, tree=decode_tree)
