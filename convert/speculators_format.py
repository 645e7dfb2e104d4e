"""Our drafts <-> vLLM ``speculators`` directories (the format vLLM serves drafts from).

``to_speculators`` writes what speculators' own ``save_pretrained`` writes for the
same draft: ``config.json`` (``speculators_model_type``, ``transformer_layer_config``,
``speculators_config.verifier``; see ``deepspec_jax.drafts.speculators``) then
``model.safetensors`` (DFlash/DSpark without embed_tokens/lm_head, which speculators
and vLLM take from the verifier). ``from_speculators`` writes our JAX dir through
``load_draft`` + ``Draft.save``. docs/FORMATS.md lists the field and tensor mapping.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from convert.common import write_hf_weights
from deepspec_jax import atomic
from deepspec_jax.checkpoint import (CONFIG_NAME, config_json_text,
                                     params_to_hf, read_config, with_dtype_field)
from deepspec_jax.drafts import Draft, load_draft, target_shared_params
from deepspec_jax.drafts.speculators import (SHARED, Verifier, is_speculators_config,
                                             shared_params, speculators_config,
                                             speculators_tensors)
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.hub_cache import resolve_checkpoint_path
from deepspec_jax.target import Target, load_target


def _verifier(draft: Draft, target: str | None, name_or_path: str | None) -> Verifier:
    """The verifier a speculators config names: ``name_or_path`` (e.g. a hub id), else the
    target path given, else the draft's recorded ``target_model_name_or_path``; the
    architectures come from the target's config.json when it is a directory."""
    name = name_or_path or target or draft.raw_config.get("target_model_name_or_path")
    archs: tuple = ()
    for d in (target, name):
        if d and os.path.isfile(os.path.join(d, CONFIG_NAME)):
            archs = tuple(read_config(d)[0].get("architectures") or ())
            break
    return Verifier(name, archs)


def _check_against_target(draft: Draft, tgt: Target, src: str, target: str) -> None:
    """The draft must belong to ``tgt``; a DFlash/DSpark draft's embed/lm_head must be the
    target's exactly (the speculators file omits them and reloads the verifier's)."""
    n = tgt.config.num_hidden_layers
    if draft.config.num_target_layers != n:
        raise ConfigError(f"{src}: field 'num_target_layers' = {draft.config.num_target_layers} but "
                          f"the target {target} has {n} layers; pass the draft's own target.")
    if draft.kind == "eagle3":
        return
    shared = target_shared_params(tgt)
    model = draft.model
    for p in shared_params(draft.config):
        key = SHARED[p]
        ours = np.asarray(getattr(model, p).get_value())
        if not np.array_equal(ours, np.asarray(shared[p]).astype(ours.dtype)):
            raise CheckpointError(
                f"{src}: the draft's {key} differs from the target's ({target}); a speculators "
                f"{draft.kind} file stores no {key} (speculators and vLLM load the verifier's), "
                "so this draft cannot be expressed. Export it in DeepSpec's format "
                "(convert.jax_to_torch) or copy the target's embed/lm_head into the draft.")


def to_speculators(src: str, dst: str, target: str | None = None,
                   verifier_name_or_path: str | None = None, dtype: str | None = None) -> list[str]:
    """Export our draft (DeepSpec HF dir or JAX dir) to a speculators directory; returns
    the files written. ``target``: the target checkpoint (checks the draft against it,
    supplies embed/lm_head to JAX dirs saved with ``share_with_target``, names the
    verifier); ``verifier_name_or_path`` overrides the verifier name written (a hub id);
    ``dtype`` (None/"keep": the stored dtypes) casts every floating tensor."""
    src, dst = resolve_checkpoint_path(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--dst must differ from --src ({src}).")
    if os.path.isfile(os.path.join(src, CONFIG_NAME)) and is_speculators_config(read_config(src)[0]):
        raise ConfigError(f"{src}: already a speculators directory (config.json has "
                          "'speculators_model_type').")
    tgt = load_target(target) if target else None
    draft = load_draft(src, dtype=dtype, target=tgt)
    raw = with_dtype_field(draft.raw_config, draft.hf_dtypes)
    cfg = speculators_config(draft.kind, draft.config, raw,
                             _verifier(draft, target, verifier_name_or_path),
                             os.path.join(src, CONFIG_NAME))
    if tgt is not None:
        _check_against_target(draft, tgt, src, target)
    elif draft.kind != "eagle3":
        warnings.warn(f"{src}: no --target given: the {draft.kind} draft's embed_tokens/lm_head "
                      "are left out unchecked (speculators and vLLM use the verifier's).")
    hf = params_to_hf(draft.spec, draft.state, draft.hf_dtypes)
    tensors = speculators_tensors(draft.kind, draft.config, hf)
    os.makedirs(dst, exist_ok=True)
    atomic.write_text(os.path.join(dst, CONFIG_NAME), config_json_text(cfg))
    # Weights last: the directory is loadable only once complete.
    return [CONFIG_NAME] + write_hf_weights(dst, tensors, metadata={"format": "pt"})


def from_speculators(src: str, dst: str, target: str | None = None) -> dict:
    """Convert a speculators directory into our JAX dir; returns its manifest. Parameters
    the file lacks (DFlash/DSpark embed/lm_head) come from ``target`` and are stored as
    shared with it (the JAX dir then loads with ``load_draft(dst, target=...)``)."""
    src, dst = resolve_checkpoint_path(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--dst must differ from --src ({src}).")
    if not is_speculators_config(read_config(src)[0]):
        raise ConfigError(f"{src}: config.json has no 'speculators_model_type'; not a "
                          "speculators directory (DeepSpec HF dirs convert with "
                          "convert.torch_to_jax).")
    draft = load_draft(src, target=load_target(target) if target else None)
    return draft.save(dst)
