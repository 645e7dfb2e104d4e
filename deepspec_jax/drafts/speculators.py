"""vLLM ``speculators`` (0.9.0) draft format <-> DeepSpec's draft format.

A speculators directory is an HF-style checkpoint whose ``config.json`` carries
``speculators_model_type`` ("eagle3" | "dflash" | "dspark"), the draft's decoder-layer
config under ``transformer_layer_config`` and the verifier under
``speculators_config.verifier``. Its tensors carry DeepSpec's names (the same module
paths: ``fc``, ``hidden_norm``, ``norm``, ``layers.{i}.*``, ``markov_head.*``,
``confidence_head.*``), so the mapping is a config translation plus the tensors one
side leaves out:

* DFlash/DSpark files omit ``embed_tokens`` and, at full vocabulary, ``lm_head``
  (speculators reloads both from the verifier); Eagle3 files keep them.
* A reduced draft vocabulary (``draft_vocab``) is the same in both: config field
  ``draft_vocab_size`` = K (speculators writes V for the full one), ``lm_head`` [K,d],
  DSpark ``markov_head.markov_w2`` [K,r], buffers ``d2t`` int64 [K] / ``t2d`` bool [V].
* ``verifier_lm_head`` / ``verifier_norm`` (training-only copies of the verifier's)
  are never stored; a file that has them is read without them.

Config fields (docs/FORMATS.md has the table): speculators' aux layer ids index HF
``hidden_states`` (0 = embeddings), DeepSpec's ``target_layer_ids`` index decoder
layer outputs (-1 = embeddings), so ``aux = target_layer_id + 1``. DeepSpec's block
slot k predicts token anchor+k+1 (speculators ``sample_from_anchor: true``). Whatever
one side cannot express is refused field by field (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from deepspec_jax.checkpoint import Loaded, load_hf_dir, read_config
from deepspec_jax.draft_vocab import D2T, FIELD, T2D
from deepspec_jax.drafts.common import DRAFT_ONLY_FIELDS
from deepspec_jax.drafts.eagle3 import NUM_FEATURE_LAYERS
from deepspec_jax.drafts.registry import resolve_spec
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.weights.safetensors_io import TensorSource

SPECULATORS_VERSION = "0.9.0"
KINDS = ("eagle3", "dflash", "dspark")
# speculators_model_type -> the class name its save_pretrained writes in "architectures"
SPEC_ARCHITECTURES = {"eagle3": "Eagle3DraftModel", "dflash": "DFlashDraftModel",
                      "dspark": "DSparkDraftModel"}
# our architecture per kind (speculators 0.9.0 builds Qwen3 draft layers only)
OUR_ARCHITECTURES = {"eagle3": "Qwen3Eagle3Model", "dflash": "Qwen3DSparkModel",
                     "dspark": "Qwen3DSparkModel"}
# tensors of a speculators file that are training-only copies of the verifier's
VERIFIER_ONLY = ("verifier_lm_head.weight", "verifier_norm.weight")
SHARED = {"embed": "embed_tokens.weight", "lm_head": "lm_head.weight"}
# fields of our raw config that are not the layers' and not the draft's (provenance, dtype)
_NOT_LAYER = frozenset(DRAFT_ONLY_FIELDS) | {"dtype", "torch_dtype", "transformers_version",
                                             "_name_or_path", "auto_map"}
DEFAULT_NUM_ANCHORS = 512   # DeepSpec's training default; speculators stores no such field


def shared_params(config) -> tuple[str, ...]:
    """Our parameters a speculators DFlash/DSpark file leaves out (the verifier's): embed,
    and lm_head unless the vocabulary is reduced (a reduced lm_head is stored)."""
    return ("embed",) if getattr(config, FIELD, None) is not None else ("embed", "lm_head")


def is_speculators_config(raw: Any) -> bool:
    """A speculators ``config.json`` (it has ``speculators_model_type``)."""
    return isinstance(raw, dict) and "speculators_model_type" in raw


def _fail(source: str, field: str, value, why: str) -> ConfigError:
    return ConfigError(f"{source}: field {field!r} = {value!r}: {why}")


# ---------------------------------------------------------------------------
# speculators config -> DeepSpec config
# ---------------------------------------------------------------------------

def _layer_config(raw: dict, source: str) -> dict:
    """``transformer_layer_config`` completed with transformers' Qwen3 defaults (speculators
    stores ``to_diff_dict``, so a field at its default is absent and the class default is
    what its model uses), after refusing what our draft layers cannot run."""
    tl = raw.get("transformer_layer_config")
    if not isinstance(tl, dict):
        raise _fail(source, "transformer_layer_config", tl, "expected the draft decoder-layer "
                    "config object.")
    mt = tl.get("model_type", "qwen3")
    if mt != "qwen3":
        raise _fail(source, "transformer_layer_config.model_type", mt,
                    "deepspec_jax reads speculators drafts with Qwen3 layers (q/k norms) only; "
                    "a Llama-layer draft has no q/k norms and cannot be mapped.")
    from transformers import Qwen3Config  # noqa: PLC0415 (heavy; only for this format)

    full = Qwen3Config(**tl).to_diff_dict()   # what HF's save_pretrained writes
    n = int(full["num_hidden_layers"])
    types = full.get("layer_types") or ["full_attention"] * n
    if any(t != "full_attention" for t in types) or full.get("use_sliding_window"):
        raise _fail(source, "transformer_layer_config.layer_types", types,
                    "sliding-window draft layers are not implemented here (every draft layer "
                    "attends to the full context); use full_attention layers.")
    if full.get("attention_bias"):
        raise _fail(source, "transformer_layer_config.attention_bias", True,
                    "draft layers with attention biases (q/k/v/o_proj.bias) are not "
                    "implemented here; use attention_bias false.")
    return {k: v for k, v in full.items() if k not in _NOT_LAYER and not k.startswith("_")}


def _num_target_layers(raw: dict, source: str, target_layers: int | None) -> int:
    """The target's depth: from the target passed in, else the verifier's local config."""
    if target_layers is not None:
        return int(target_layers)
    ver = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    if ver and os.path.isfile(os.path.join(ver, "config.json")):
        vraw, _ = read_config(ver)
        vraw = vraw.get("text_config", vraw) if isinstance(vraw.get("text_config"), dict) else vraw
        if "num_hidden_layers" in vraw:
            return int(vraw["num_hidden_layers"])
    raise ConfigError(
        f"{source}: field 'speculators_config.verifier.name_or_path' = {ver!r} is not a local "
        "checkpoint directory, and the target's depth (DeepSpec's num_target_layers) is needed; "
        "load with the target: load_draft(path, target=load_target(...)).")


def _our_layer_ids(aux, field: str, source: str, n_target: int) -> list[int]:
    if not isinstance(aux, list) or not aux:
        raise _fail(source, field, aux, "speculators then picks default layers from the verifier "
                    "at load time; set the aux hidden-state layer ids explicitly.")
    if n_target in aux:
        raise _fail(source, field, aux, f"id {n_target} is the verifier's final hidden state "
                    f"(num_hidden_layers = {n_target}); DeepSpec drafts never read the last "
                    "layer's output.")
    return [int(i) - 1 for i in aux]


def _speculative_tokens(raw: dict, source: str) -> int:
    sc = raw.get("speculators_config") or {}
    methods = sc.get("proposal_methods") or []
    default = sc.get("default_proposal_method")
    for m in methods:
        if m.get("proposal_type") == default and m.get("speculative_tokens"):
            return int(m["speculative_tokens"])
    raise _fail(source, "speculators_config.proposal_methods", methods,
                "no proposal method with speculative_tokens matches default_proposal_method "
                f"{default!r}; the Eagle3 draft depth (DeepSpec's ttt_length) comes from it.")


def deepspec_config(raw: dict, source: str, target_layers: int | None = None) -> dict:
    """DeepSpec's draft ``config.json`` dict for a speculators config dict ``raw``
    (``source`` names the file in errors; ``target_layers``: the target's depth when a
    target is at hand)."""
    kind = raw.get("speculators_model_type")
    if kind not in KINDS:
        raise _fail(source, "speculators_model_type", kind,
                    f"deepspec_jax reads speculators drafts of types {list(KINDS)} "
                    "(dflash2, peagle, mtp, xpress and others have no DeepSpec counterpart).")
    layer = _layer_config(raw, source)
    vocab = int(layer["vocab_size"])
    dv = raw.get(FIELD, vocab)
    if isinstance(dv, bool) or not isinstance(dv, int) or not 0 < dv <= vocab:
        raise _fail(source, FIELD, dv, f"must be an integer in [1, {vocab}] (the target's "
                    "transformer_layer_config.vocab_size; equal = the full vocabulary).")
    ths = raw.get("target_hidden_size")
    if ths is not None and int(ths) != int(layer["hidden_size"]):
        raise _fail(source, "target_hidden_size", ths, "DeepSpec drafts read target features of "
                    f"the draft's own width (hidden_size {layer['hidden_size']}).")
    n_target = _num_target_layers(raw, source, target_layers)
    ver = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    out = dict(layer)
    out.update({"architectures": [OUR_ARCHITECTURES[kind]], "num_target_layers": n_target,
                "tie_word_embeddings": False})
    if dv < vocab:
        out[FIELD] = dv        # reduced: lm_head over K, d2t/t2d in the file
    if ver:
        out["target_model_name_or_path"] = ver
    if raw.get("dtype"):
        out["dtype"] = raw["dtype"]
    if kind == "eagle3":
        for f in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
            if raw.get(f):
                raise _fail(source, f, raw[f], "DeepSpec's Eagle3 layer has no such norm "
                            "(residual on the raw hidden state, fc on raw features, the "
                            "un-normed hidden fed back); only false can be read.")
        if int(layer["num_hidden_layers"]) != 1:
            raise _fail(source, "transformer_layer_config.num_hidden_layers",
                        layer["num_hidden_layers"], "DeepSpec's Eagle3 draft has exactly one "
                        "decoder layer.")
        field = "eagle_aux_hidden_state_layer_ids"
        ids = _our_layer_ids(raw.get(field), field, source, n_target)
        if len(ids) != NUM_FEATURE_LAYERS or -1 in ids:
            raise _fail(source, field, raw[field], f"DeepSpec's Eagle3 reads exactly "
                        f"{NUM_FEATURE_LAYERS} decoder-layer outputs (ids 1..{n_target - 1}; 0, "
                        "the embeddings, is not one); such a draft cannot be mapped.")
        out.update({"target_layer_ids": ids, "draft_num_hidden_layers": 1,
                    "ttt_length": _speculative_tokens(raw, source)})
        return out
    if raw.get("sample_from_anchor", kind == "dspark") is not True:
        raise _fail(source, "sample_from_anchor", raw.get("sample_from_anchor", False),
                    "block slot k then predicts token anchor+k (the anchor slot unused); a "
                    "DeepSpec draft's slot k predicts anchor+k+1 (sample_from_anchor true), a "
                    "different network; retrain with sample_from_anchor true.")
    mask = raw.get("mask_token_id")
    if mask is None:
        raise _fail(source, "mask_token_id", None, "the block's mask token is required; set it "
                    "to the token id the draft was trained with.")
    ids = _our_layer_ids(raw.get("aux_hidden_state_layer_ids"), "aux_hidden_state_layer_ids",
                         source, n_target)
    rank = int(raw.get("markov_rank", 0)) if kind == "dspark" else 0
    conf = bool(raw.get("enable_confidence_head", True)) if kind == "dspark" else False
    out.update({"block_size": int(raw.get("block_size", 8)), "target_layer_ids": ids,
                "mask_token_id": int(mask), "num_anchors": DEFAULT_NUM_ANCHORS,
                "markov_rank": rank,
                "markov_head_type": raw.get("markov_head_type", "vanilla") if rank else None,
                "enable_confidence_head": conf,
                "confidence_head_with_markov": bool(raw.get("confidence_head_with_markov", True))
                and conf and rank > 0})
    return out


# ---------------------------------------------------------------------------
# loading a speculators directory
# ---------------------------------------------------------------------------

class _Source:
    """A speculators directory's tensors without the verifier-only ones, plus the
    parameters supplied by the target (``extra``: HF key -> array in DeepSpec layout)."""

    def __init__(self, base: TensorSource, extra: Mapping[str, np.ndarray]):
        self.base, self.extra, self.root = base, dict(extra), base.root
        self.files = base.files      # safetensors metadata is read from them
        self._keys = [k for k in base.keys() if k not in VERIFIER_ONLY] + list(self.extra)

    def keys(self):
        return list(self._keys)

    def __contains__(self, k):
        return k in self.extra or (k in self.base and k not in VERIFIER_ONLY)

    def file_of(self, k):
        return "the target" if k in self.extra else self.base.file_of(k)

    def info(self, k):
        if k in self.extra:
            return tuple(self.extra[k].shape), self.extra[k].dtype
        return self.base.info(k)

    def get(self, k):
        return self.extra[k] if k in self.extra else self.base.get(k)


@dataclasses.dataclass
class SpeculatorsLoad:
    loaded: Loaded
    from_target: tuple[str, ...]    # our parameter paths filled from the target


def load_speculators_dir(path: str, shared: Mapping[str, Any] | None, target_layers: int | None,
                         dtype=None, mesh=None) -> SpeculatorsLoad:
    """Load a speculators draft directory as a DeepSpec draft. ``shared``: the target's
    {"embed": [V,d], "lm_head": [d,V]} (``drafts.target_shared_params``), needed when the
    file lacks them (DFlash/DSpark at full vocabulary)."""
    raw, cfg_path = read_config(path)
    base = TensorSource.from_dir(path)
    missing = [p for p, k in SHARED.items() if k not in base]
    if missing and shared is None:
        ver = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
        raise CheckpointError(
            f"{path}: tensors {[SHARED[p] for p in missing]} are not stored (speculators reloads "
            f"them from the verifier {ver!r}); load the draft with its target: "
            "load_draft(path, target=load_target(...)).")
    spec = resolve_spec(deepspec_config(raw, cfg_path, target_layers), cfg_path)
    reduced = getattr(spec.config, FIELD, None) is not None
    if reduced and not all(k in base for k in (D2T, T2D)):
        raise CheckpointError(f"{path}: {FIELD} = {raw.get(FIELD)} but the tensors 'd2t'/'t2d' "
                              "are not stored; save the draft with its vocabulary mapping "
                              "(speculators: load_vocab_mappings before save_pretrained).")
    extra = {}
    for p in missing:
        a = np.asarray(shared[p])
        if p == "lm_head":       # ours [d,V] -> HF [V,d]; reduced: the K rows t2d marks
            a = a.T[base.get(T2D).astype(bool)] if reduced else a.T
        extra[SHARED[p]] = a
    loaded = load_hf_dir(path, spec, dtype, mesh, want_role="draft", source=_Source(base, extra))
    # a reduced lm_head derived from the target's is stored by a later save, not shared
    return SpeculatorsLoad(loaded, tuple(p for p in missing if p in shared_params(spec.config)))


# ---------------------------------------------------------------------------
# DeepSpec draft -> speculators config and tensors
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verifier:
    """What a speculators config records of the target."""

    name_or_path: str | None
    architectures: tuple[str, ...] = ()


def speculators_config(kind: str, config, raw: dict, verifier: Verifier, source: str) -> dict:
    """The speculators ``config.json`` dict of our draft (``config``: the family's parsed
    config, ``raw``: our config.json dict), as speculators' ``save_pretrained`` writes it.
    Refuses what speculators 0.9.0 cannot express."""
    layer_cfg = config.backbone if kind == "eagle3" else config.layer
    mt = raw.get("model_type")
    if mt != "qwen3":
        raise _fail(source, "model_type", mt, "speculators 0.9.0 builds Qwen3 (and, for Eagle3, "
                    "Llama) draft layers only; a Gemma-4 draft (sandwich norms, layer_scalar, "
                    "v_norm, scaled embeddings, final_logit_softcapping) has no speculators "
                    "counterpart. Export it with convert.jax_to_torch (DeepSpec format).")
    if layer_cfg.attention_bias:
        raise _fail(source, "attention_bias", True, "speculators' Qwen3 layers then also carry "
                    "an o_proj bias this draft does not have.")
    if layer_cfg.final_logit_softcap:
        raise _fail(source, "final_logit_softcapping", layer_cfg.final_logit_softcap,
                    "speculators drafts have no logit softcap.")
    tl = {k: v for k, v in raw.items() if k not in _NOT_LAYER}
    tl["head_dim"] = int(layer_cfg.layer_head_dim(0))    # Qwen3Config's default is 128
    tl["tie_word_embeddings"] = False
    ids = [int(i) + 1 for i in config.target_layer_ids]
    if kind == "eagle3":
        tl["num_hidden_layers"] = 1
        tokens = int(config.ttt_length)
        fields = {"eagle_aux_hidden_state_layer_ids": ids, "embed_requires_grad": False,
                  "fc_norm": False, "norm_before_fc": False, "norm_before_residual": False,
                  "norm_output": False}
    else:
        tokens = int(config.block_size)
        fields = {"aux_hidden_state_layer_ids": ids, "block_size": int(config.block_size),
                  "mask_token_id": int(config.mask_token_id), "sample_from_anchor": True,
                  "sliding_window_non_causal": False}
        if kind == "dspark":
            fields.update({"markov_rank": int(config.markov_rank),
                           "markov_head_type": config.markov_head_type or "vanilla",
                           "enable_confidence_head": bool(config.enable_confidence_head),
                           "confidence_head_with_markov": bool(config.confidence_head_with_markov)})
    out = {"architectures": [SPEC_ARCHITECTURES[kind]],
           FIELD: int(config.draft_vocab_size or layer_cfg.vocab_size),
           "speculators_config": {
               "algorithm": kind, "default_proposal_method": "greedy",
               "proposal_methods": [{"accept_tolerance": 0.0, "proposal_type": "greedy",
                                     "speculative_tokens": tokens, "verifier_accept_k": 1}],
               "verifier": {"architectures": list(verifier.architectures),
                            "name_or_path": verifier.name_or_path}},
           "speculators_model_type": kind, "speculators_version": SPECULATORS_VERSION,
           "target_hidden_size": None, "tie_word_embeddings": False,
           "transformer_layer_config": dict(sorted(tl.items())), **fields}
    for f in ("dtype", "transformers_version"):
        if f in raw:
            out[f] = raw[f]
    return out


def speculators_tensors(kind: str, config, hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our draft's HF-named tensors (``checkpoint.params_to_hf``) as a speculators file holds
    them: DFlash/DSpark without embed_tokens and (full vocabulary) lm_head; a reduced
    vocabulary's d2t (int64) / t2d (bool) under the same names."""
    if kind == "eagle3":
        return dict(hf)
    drop = {SHARED[p] for p in shared_params(config)}
    return {k: v for k, v in hf.items() if k not in drop}


__all__ = ["is_speculators_config", "deepspec_config", "load_speculators_dir",
           "speculators_config", "speculators_tensors", "Verifier", "SpeculatorsLoad"]
