"""Stream checkpoint tensors into an abstract NNX model's sharded parameters.

The model is built abstractly (``nnx.eval_shape``: shapes and logical axes, no
memory), then each parameter is assembled on the host from its HF tensors and placed
with ``jax.make_array_from_callback``, so every device receives only its own shard.
Afterwards every parameter must have been loaded and every checkpoint tensor used
(or explicitly ignorable); anything else is an error naming the key and file.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.errors import CheckpointError
from deepspec_jax.sharding import named_sharding
from deepspec_jax.weights.name_map import Rule


class DictSource:
    """In-memory tensors with the ``TensorSource`` interface (GGUF, tests, exports)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], origin: str):
        self.tensors, self.origin = dict(tensors), origin

    def keys(self):
        return list(self.tensors)

    def __contains__(self, k):
        return k in self.tensors

    def file_of(self, k):
        return self.origin

    def info(self, k):
        t = self.tensors[k]
        return tuple(t.shape), t.dtype

    def get(self, k):
        return self.tensors[k]


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): v for path, v in state.flat_state()}


def _assemble(rule: Rule, source, num_layers: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    keys = rule.hf_keys(num_layers)
    want = shape[1:] if rule.stacked else shape
    out = np.empty(shape, dtype) if rule.stacked else None
    for i, key in enumerate(keys):
        t = rule.to_ours(source.get(key))
        if tuple(t.shape) != tuple(want):
            got = tuple(t.T.shape) if rule.transpose else tuple(t.shape)
            exp = tuple(reversed(want)) if rule.transpose else tuple(want)
            raise CheckpointError(
                f"{source.file_of(key)}: tensor {key!r} has shape {got}, expected {exp} from "
                "the config; the checkpoint does not match its config.json (check "
                "hidden_size / heads / intermediate_size / vocab_size).")
        if rule.stacked:
            out[i] = t.astype(dtype, copy=False)
        else:
            out = t.astype(dtype, copy=False)
    return out


def stream_params(graphdef, abstract_state: nnx.State, rules: Sequence[Rule], source,
                  num_layers: int, mesh: Mesh, dtype, ignorable: Iterable[re.Pattern] = (),
                  what: str = "checkpoint", allow_missing: Callable[[str], bool] | None = None):
    """Fill ``abstract_state`` from ``source`` and return the merged NNX model."""
    variables = flat_variables(abstract_state)
    by_ours = {r.ours: r for r in rules}
    unmapped = [p for p in variables if p not in by_ours]
    if unmapped:
        raise CheckpointError(f"internal: parameters {unmapped} have no name-map rule.")
    root = getattr(source, "root", None) or source.file_of(next(iter(source.keys()), ""))
    missing = [k for r in rules if r.ours in variables for k in r.hf_keys(num_layers)
               if k not in source]
    if allow_missing:
        missing = [k for k in missing if not allow_missing(k)]
    if missing:
        raise CheckpointError(
            f"{root}: {what} is missing {len(missing)} tensor(s), e.g. {missing[:5]}; "
            "the checkpoint is incomplete or belongs to another architecture.")
    used = {k for r in rules if r.ours in variables for k in r.hf_keys(num_layers)}
    ignorable = tuple(ignorable)
    extra = [k for k in source.keys() if k not in used and not any(p.match(k) for p in ignorable)]
    if extra:
        raise CheckpointError(
            f"{root}: {what} has {len(extra)} tensor(s) that no parameter uses, e.g. "
            f"{extra[:5]}; the config.json does not describe this checkpoint (wrong "
            "num_hidden_layers, tie_word_embeddings or architecture?).")
    for path, var in variables.items():
        rule = by_ours[path]
        shape = tuple(var.value.shape)
        host = _assemble(rule, source, num_layers, shape, np.dtype(dtype))
        sharding = named_sharding(var.get_metadata().get("logical_axes", (None,) * len(shape)),
                                  shape, mesh)
        var.value = jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx])
        del host
    return nnx.merge(graphdef, abstract_state)


def export_tensors(model: nnx.Module, rules: Sequence[Rule], num_layers: int,
                   dtype=None) -> dict[str, np.ndarray]:
    """Inverse of ``stream_params``: our parameters -> HF-named host tensors."""
    _, state = nnx.split(model)
    variables = flat_variables(state)
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.ours not in variables:
            continue
        arr = np.asarray(jax.device_get(variables[rule.ours].value))
        if dtype is not None:
            arr = arr.astype(dtype)
        if rule.stacked:
            for i, key in enumerate(rule.hf_keys(num_layers)):
                out[key] = rule.to_hf(arr[i])
        else:
            out[rule.hf] = rule.to_hf(arr)
    return out
