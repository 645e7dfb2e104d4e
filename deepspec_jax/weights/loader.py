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

from deepspec_jax.dtypes import castable
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
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def rule_for_path(path: str, by_ours: Mapping[str, Rule]) -> tuple[Rule | None, int | None]:
    """The rule of a parameter path, and the layer index for per-layer storage
    (``layers.q_proj.3`` is layer 3 of the stacked rule ``layers.q_proj``)."""
    if path in by_ours:
        return by_ours[path], None
    base, _, idx = path.rpartition(".")
    rule = by_ours.get(base)
    if idx.isdigit() and rule is not None and rule.stacked:
        return rule, int(idx)
    return None, None


def _assemble(rule: Rule, source, num_layers: int, shape: tuple[int, ...], dtype,
              layer: int | None = None) -> np.ndarray:
    stacked = rule.stacked and layer is None
    keys = [rule.hf.format(i=layer)] if layer is not None else rule.hf_keys(num_layers)
    want = shape[1:] if stacked else shape
    out = np.empty(shape, dtype) if stacked else None
    for i, key in enumerate(keys):
        t = rule.to_ours(source.get(key))
        if tuple(t.shape) != tuple(want):
            got = tuple(t.T.shape) if rule.transpose else tuple(t.shape)
            exp = tuple(reversed(want)) if rule.transpose else tuple(want)
            raise CheckpointError(
                f"{source.file_of(key)}: tensor {key!r} has shape {got}, expected {exp} from "
                "the config; the checkpoint does not match its config.json (check "
                "hidden_size / heads / intermediate_size / vocab_size).")
        if stacked:
            out[i] = t.astype(dtype, copy=False)
        else:
            out = t.astype(dtype, copy=False)
    return out


def stream_params(graphdef, abstract_state: nnx.State, rules: Sequence[Rule], source,
                  num_layers: int, mesh: Mesh, dtype, ignorable: Iterable[re.Pattern] = (),
                  what: str = "checkpoint", allow_missing: Callable[[str], bool] | None = None):
    """Fill ``abstract_state`` from ``source`` and return the merged NNX model.

    ``dtype`` casts every parameter; ``None`` keeps each abstract variable's dtype."""
    variables = flat_variables(abstract_state)
    by_ours = {r.ours: r for r in rules}
    located = {p: rule_for_path(p, by_ours) for p in variables}
    unmapped = [p for p, (r, _) in located.items() if r is None]
    if unmapped:
        raise CheckpointError(f"internal: parameters {unmapped} have no name-map rule.")
    present = {r.ours for r, _ in located.values()}
    root = getattr(source, "root", None) or source.file_of(next(iter(source.keys()), ""))
    missing = [k for r in rules if r.ours in present for k in r.hf_keys(num_layers)
               if k not in source]
    if allow_missing:
        missing = [k for k in missing if not allow_missing(k)]
    if missing:
        raise CheckpointError(
            f"{root}: {what} is missing {len(missing)} tensor(s), e.g. {missing[:5]}; "
            "the checkpoint is incomplete or belongs to another architecture.")
    used = {k for r in rules if r.ours in present for k in r.hf_keys(num_layers)}
    ignorable = tuple(ignorable)
    extra = [k for k in source.keys() if k not in used and not any(p.match(k) for p in ignorable)]
    if extra:
        raise CheckpointError(
            f"{root}: {what} has {len(extra)} tensor(s) that no parameter uses, e.g. "
            f"{extra[:5]}; the config.json does not describe this checkpoint (wrong "
            "num_hidden_layers, tie_word_embeddings or architecture?).")
    for path, var in variables.items():
        rule, layer = located[path]
        shape = tuple(var.get_value().shape)
        # dtype=None keeps each variable's own (abstract) dtype, so a checkpoint can be
        # loaded in its stored dtypes, mixed ones included, without casting.
        # Integer/bool buffers (a draft's d2t/t2d) are never cast.
        own = np.dtype(var.get_value().dtype)
        want = own if dtype is None or not castable(own) else np.dtype(dtype)
        host = _assemble(rule, source, num_layers, shape, want, layer)
        sharding = named_sharding(var.get_metadata().get("logical_axes", (None,) * len(shape)),
                                  shape, mesh)
        var.set_value(jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx]))
        del host
    return nnx.merge(graphdef, abstract_state)


def _rule_order(key: str, rules: Sequence[Rule]) -> tuple[int, int]:
    for n, r in enumerate(rules):
        if not r.stacked and r.hf == key:
            return (n, 0)
        if r.stacked:
            pre, _, post = r.hf.partition("{i}")
            if key.startswith(pre) and key.endswith(post) and key[len(pre):len(key) - len(post)].isdigit():
                return (n, int(key[len(pre):len(key) - len(post)]))
    return (len(rules), 0)


def export_tensors(model: nnx.Module, rules: Sequence[Rule], num_layers: int,
                   dtype=None) -> dict[str, np.ndarray]:
    """Inverse of ``stream_params``: our parameters -> HF-named host tensors."""
    _, state = nnx.split(model)
    by_ours = {r.ours: r for r in rules}
    out: dict[str, np.ndarray] = {}
    for path, var in flat_variables(state).items():
        rule, layer = rule_for_path(path, by_ours)
        if rule is None:
            continue
        arr = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            arr = arr.astype(dtype)
        if layer is not None:
            out[rule.hf.format(i=layer)] = rule.to_hf(arr)
        elif rule.stacked:
            for i, key in enumerate(rule.hf_keys(num_layers)):
                out[key] = rule.to_hf(arr[i])
        else:
            out[rule.hf] = rule.to_hf(arr)
    return dict(sorted(out.items(), key=lambda kv: _rule_order(kv[0], rules)))
