"""Our JAX checkpoint directory ("JAX dir"), HF checkpoint streaming, and the
``ModelSpec`` both are read and written through (``load_draft`` and the ``convert``
tools). This module knows no model family: callers resolve a config.json into a
``ModelSpec`` (``deepspec_jax.drafts.registry.resolve_spec``) and pass it, or the
resolver, in.

A JAX dir holds

* ``config.json`` -- the HF config dict, byte-for-byte what an HF export writes, so
  every field (including ones we do not parse) survives a round trip;
* ``params/`` -- an orbax checkpoint of the parameter tree: a nested dict keyed by our
  parameter paths (``layers.q_proj`` -> ``{"layers": {"q_proj": ...}}``), each array
  in its stored dtype;
* ``extra/`` (optional) -- auxiliary files of the HF directory it came from
  (tokenizer, generation_config.json, ...), copied back verbatim on export;
* ``deepspec_jax.json`` -- the manifest, written LAST: format version, kind
  ("target" | "draft", the ``ModelSpec.role``), architecture, shape/dtype of every parameter and the HF dtype of every HF tensor,
  so an export reproduces the original safetensors exactly. A directory without a
  valid manifest is an incomplete write and is refused.

Nothing here unpickles: configs and manifests are JSON, weights are safetensors or
orbax (tensorstore).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax import atomic
from deepspec_jax.config import load_config_json
from deepspec_jax.dtypes import castable, dtype_name, np_dtype, parse_dtype
from deepspec_jax.errors import CheckpointError, ConfigError
from deepspec_jax.hub_cache import checked_file, copy_file
from deepspec_jax.sharding import make_mesh, named_sharding
from deepspec_jax.version import __version__
from deepspec_jax.weights.loader import flat_variables, rule_for_path, stream_params
from deepspec_jax.weights.name_map import Rule
from deepspec_jax.weights.safetensors_io import TensorSource

MANIFEST_NAME = "deepspec_jax.json"
PARAMS_DIR = "params"
EXTRA_DIR = "extra"
CONFIG_NAME = "config.json"
FORMAT = "deepspec_jax.checkpoint"
# 2: decoder-layer linear weights stored [out, in] (as HF); version 1 stored them [in, out]
FORMAT_VERSION = 2

# Files of an HF directory that are weights (re-written from params) or pickles (never read).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|pkl|pickle|ckpt|h5|msgpack|gguf)$")
_HF_INDEX = re.compile(r".*\.safetensors\.index\.json$")


# ---------------------------------------------------------------------------
# what to build and how its weights are named
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model abstractly and map its HF tensor names.

    ``rules`` is the single name map used in both directions (HF -> ours on load,
    ours -> HF on export)."""

    role: str                      # "target" | "draft" (the manifest's "kind" field)
    architecture: str              # HF architectures[0] (or model_type for targets without it)
    config: Any                    # TargetConfig or the draft family's config dataclass
    raw: dict                      # the HF config dict, unchanged
    rules: tuple[Rule, ...]
    num_layers: int
    ignorable: tuple[re.Pattern, ...]
    build_fn: Callable             # (config, *, dtype, param_dtype, rngs) -> nnx.Module
    family: Any = None             # drafts.common.DraftFamily for drafts

    def abstract(self, dtype=jnp.float32):
        """(graphdef, abstract state) of the model: shapes and logical axes, no memory."""
        model = nnx.eval_shape(lambda: self.build_fn(self.config, dtype=dtype, param_dtype=dtype,
                                                     rngs=nnx.Rngs(0)))
        return nnx.split(model)

    def param_hf_keys(self) -> dict[str, tuple[list[str], bool]]:
        """Parameter path -> (its HF keys, whether the array stacks them on axis 0), in
        rule order, for both storages of a per-layer rule: stacked (``layers.q_proj``,
        the DSpark draft) and one array per layer (``layers.q_proj.3``, the target)."""
        out = {}
        for r in self.rules:
            keys = r.hf_keys(self.num_layers)
            out[r.ours] = (keys, r.stacked)
            if r.stacked:
                out.update({f"{r.ours}.{i}": ([k], False) for i, k in enumerate(keys)})
        return out


def read_config(root: str) -> tuple[dict, str]:
    path = os.path.join(root, CONFIG_NAME)
    if not os.path.isdir(root):
        raise ConfigError(f"{root}: not a directory; pass a checkpoint directory holding config.json.")
    return load_config_json(path), path


def _set_abstract_dtype(var: nnx.Variable, dt: np.dtype) -> None:
    v = var.get_value()
    var.set_value(jax.ShapeDtypeStruct(v.shape, dt))


def _cast_hf_dtypes(hf_dtypes: Mapping[str, str], cast) -> dict[str, str]:
    """HF dtypes after a cast to ``cast``: floating tensors take it, others keep theirs."""
    return {k: dtype_name(cast) if castable(np_dtype(v)) else v for k, v in hf_dtypes.items()}


def _compute_dtype(dtypes) -> np.dtype:
    dts = [np.dtype(d) for d in dtypes if castable(d)]
    if not dts:
        return np.dtype(np.float32)
    out = dts[0] if all(d == dts[0] for d in dts) else np.dtype(np.float32)
    return out if jnp.issubdtype(out, jnp.floating) else np.dtype(np.float32)


# ---------------------------------------------------------------------------
# HF directory -> sharded model state
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Loaded:
    """A model state loaded from a checkpoint directory, plus what an exact re-export needs."""

    spec: ModelSpec
    graphdef: Any
    state: nnx.State
    compute_dtype: np.dtype
    hf_dtypes: dict[str, str]      # HF key -> dtype name the HF side stores it in
    hf_metadata: dict[str, str]    # safetensors __metadata__ of the source
    dropped: list[str]             # HF tensors that no parameter uses (ignorable buffers)


def load_hf_dir(root: str, spec: ModelSpec, dtype=None, mesh: Mesh | None = None,
                want_role: str | None = None, source=None) -> Loaded:
    """Stream the HF checkpoint ``spec`` describes (resolved from ``root``'s config.json)
    into sharded parameters. ``dtype=None`` keeps every tensor's stored dtype (no cast,
    so a bf16 release stays bf16 bit for bit). ``source`` (a ``TensorSource``-like
    object) replaces the directory's tensors (a speculators dir plus the target's)."""
    mesh = mesh if mesh is not None else make_mesh()
    _check_role(spec, want_role, root)
    source = TensorSource.from_dir(root) if source is None else source
    cast = parse_dtype(dtype)
    # Stored dtype of each parameter (a stack of layers takes the widest of its tensors).
    keys_of = {p: [k for k in ks if k in source] for p, (ks, _) in spec.param_hf_keys().items()}
    stored = {p: np.result_type(*[source.info(k)[1] for k in ks]) for p, ks in keys_of.items() if ks}
    compute = cast if cast is not None else _compute_dtype(stored.values())
    graphdef, abstract_state = spec.abstract(compute)
    variables = flat_variables(abstract_state)
    if cast is None:
        for path, var in variables.items():
            if (path in stored and stored[path] != var.get_value().dtype
                    and castable(var.get_value().dtype)):
                _set_abstract_dtype(var, stored[path])
    hf_dtypes = {k: dtype_name(source.info(k)[1]) for p in variables for k in keys_of.get(p, [])}
    if cast is not None:
        hf_dtypes = _cast_hf_dtypes(hf_dtypes, cast)
    what = f"{spec.role} checkpoint ({spec.architecture})"
    model = stream_params(graphdef, abstract_state, spec.rules, source, spec.num_layers, mesh,
                          None, spec.ignorable, what)
    graphdef, state = nnx.split(model)
    used = set(hf_dtypes)
    dropped = sorted(k for k in source.keys() if k not in used)
    metadata = {}
    for f in source.files.values():
        metadata.update(f.metadata)
    return Loaded(spec, graphdef, state, np.dtype(compute), hf_dtypes, metadata, dropped)


def _check_role(spec: ModelSpec, want_role: str | None, root: str) -> None:
    if want_role and spec.role != want_role:
        hint = "deepspec_jax.load_target" if spec.role == "target" else "deepspec_jax.load_draft"
        raise ConfigError(
            f"{os.path.join(root, CONFIG_NAME)}: field 'architectures' = "
            f"{spec.raw.get('architectures')!r} describes a {spec.role}, not a {want_role}; "
            f"load it with {hint}.")


# ---------------------------------------------------------------------------
# JAX dir
# ---------------------------------------------------------------------------

def is_jax_dir(path: str) -> bool:
    """A directory written by ``save_jax_dir`` (complete or interrupted)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, MANIFEST_NAME))
                                    or os.path.isdir(os.path.join(path, PARAMS_DIR)))


def config_json_text(raw: dict) -> str:
    """The exact text HF's ``PretrainedConfig.save_pretrained`` writes for ``raw``."""
    return json.dumps(raw, indent=2, sort_keys=True) + "\n"


def with_dtype_field(raw: dict, hf_dtypes: Mapping[str, str]) -> dict:
    """``raw`` with its weight-dtype field(s) ("dtype", older "torch_dtype") set to the
    HF tensors' dtype when they all share one, as save_pretrained records it."""
    names = set(hf_dtypes.values())
    if len(names) != 1:
        return raw
    (name,) = names
    present = [f for f in ("dtype", "torch_dtype") if f in raw]
    if all(raw[f] == name for f in present) and present:
        return raw
    return {**raw, **{f: name for f in (present or ["dtype"])}}


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, p + "."))
        else:
            out[p] = v
    return out


def read_manifest(root: str) -> dict:
    """The manifest of a JAX dir, validated; errors name the file and the fix."""
    path = os.path.join(root, MANIFEST_NAME)
    fix = ("re-run the conversion (python -m convert.torch_to_jax) or the save that "
           "produced this directory")
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path}: manifest not found; the JAX checkpoint is incomplete (an interrupted "
            f"write leaves {PARAMS_DIR}/ without it) -- {fix}.")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e}); {fix}.") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a deepspec_jax manifest (field 'format' must be "
                              f"{FORMAT!r}); {fix}.")
    if m.get("format_version") == 1:
        raise CheckpointError(
            f"{path}: field 'format_version' = 1: written by a deepspec_jax release that stored "
            "decoder-layer linear weights [in, out] (version 2 stores them [out, in], as HF "
            "checkpoints do); export it to HF with that release (python -m convert.jax_to_torch) "
            "and convert the result with this one (python -m convert.torch_to_jax).")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' = {m.get('format_version')!r}, this deepspec_jax "
            f"reads version {FORMAT_VERSION}; convert the checkpoint with the matching release.")
    for field, typ in (("kind", str), ("architecture", str), ("params", dict), ("hf", dict)):
        if not isinstance(m.get(field), typ):
            raise CheckpointError(f"{path}: field {field!r} is missing or not a "
                                  f"{typ.__name__}; {fix}.")
    if m["kind"] not in ("target", "draft"):
        raise CheckpointError(f"{path}: field 'kind' = {m['kind']!r}, expected 'target' or 'draft'; {fix}.")
    return m


def save_params(directory: str, flat: Mapping[str, Any]) -> None:
    """Write a flat {dotted path: array} tree as an orbax checkpoint (replacing any)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), _nest(flat), force=True)
    ckptr.wait_until_finished()


def params_metadata(directory: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{dotted path: (shape, dtype)} of an orbax parameter checkpoint, without reading data."""
    try:
        meta = ocp.StandardCheckpointer().metadata(os.path.abspath(directory))
        item = getattr(meta, "item_metadata", meta)
        tree = getattr(item, "tree", item)
    except Exception as e:  # orbax raises several types for a damaged directory
        raise CheckpointError(f"{directory}: unreadable orbax checkpoint ({type(e).__name__}: "
                              f"{e}); re-run the conversion that produced it.") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{directory}: orbax checkpoint without parameter metadata (damaged "
                              "or partially copied); re-run the conversion that produced it.")
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flatten(tree).items()}


def restore_params(directory: str, abstract: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore a flat tree straight into the shardings/dtypes of ``abstract``
    (each device reads only its shard; a dtype differing from the stored one casts)."""
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.abspath(directory), _nest(abstract))
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore parameters ({type(e).__name__}: {e}); "
                              "re-run the conversion that produced this checkpoint.") from e
    return _flatten(tree)


def copy_extra_files(src: str, dst: str) -> list[str]:
    """Copy the auxiliary files of a checkpoint directory (tokenizer, generation config,
    model card, ...): every top-level file except config.json, the manifest, weights,
    weight indexes and pickles. Symlinks (every file of a hub cache snapshot) count as
    the file they lead to and are copied as regular files; one to a missing blob raises."""
    names = []
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if (name in (CONFIG_NAME, MANIFEST_NAME) or _WEIGHT_FILE.match(name)
                or _HF_INDEX.match(name) or ".tmp." in name or not os.path.isfile(checked_file(p))):
            continue
        os.makedirs(dst, exist_ok=True)
        copy_file(p, os.path.join(dst, name))
        names.append(name)
    return names


def save_jax_dir(dst: str, spec: ModelSpec, state: nnx.State, hf_dtypes: Mapping[str, str] | None = None,
                 hf_metadata: Mapping[str, str] | None = None, extra_from: str | None = None,
                 source: str = "", config_text: str | None = None,
                 shared_from_target: Sequence[str] = ()) -> dict:
    """Write a JAX dir: config.json, params/, extra/, manifest last. Returns the manifest.

    ``hf_dtypes`` (HF key -> dtype name) records what the HF side stores; when omitted
    (a model trained here) every HF tensor takes its parameter's dtype. ``config_text``
    keeps the source config.json verbatim (default: HF's serialisation of ``spec.raw``
    with its dtype field matching the tensors). Multi-host: every process joins the
    orbax save; process 0 writes the JSON files."""
    main = jax.process_index() == 0
    os.makedirs(dst, exist_ok=True)
    manifest_path = os.path.join(dst, MANIFEST_NAME)
    if main and os.path.exists(manifest_path):  # must not look complete mid-write
        os.remove(manifest_path)
    flat = {p: v.get_value() for p, v in flat_variables(state).items()}
    unknown = [p for p in shared_from_target if p not in flat]
    if unknown:
        raise ValueError(f"shared_from_target {unknown} are not parameters of this model.")
    keys_of = spec.param_hf_keys()
    fixed = {r.ours: r.hf_dtype for r in spec.rules if r.hf_dtype}
    params = {p: {"shape": list(np.shape(a)), "dtype": dtype_name(a.dtype)} for p, a in flat.items()}
    hf = {}
    for p, info in params.items():
        for k in keys_of[p][0]:
            hf[k] = (hf_dtypes or {}).get(k, fixed.get(p, info["dtype"]))
    if config_text is None:
        config_text = config_json_text(with_dtype_field(spec.raw, hf))
    if main:
        atomic.write_text(os.path.join(dst, CONFIG_NAME), config_text)
    save_params(os.path.join(dst, PARAMS_DIR), {p: a for p, a in flat.items() if p not in shared_from_target})
    extra_dir = os.path.join(dst, EXTRA_DIR)
    extra = []
    if main:
        if os.path.isdir(extra_dir):
            shutil.rmtree(extra_dir)
        extra = copy_extra_files(extra_from, extra_dir) if extra_from else []
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": spec.role,
        "architecture": spec.architecture, "deepspec_jax_version": __version__,
        "source": source, "params": params,
        "hf": {"tensors": dict(sorted(hf.items())), "metadata": dict(hf_metadata or {"format": "pt"})},
        "extra_files": extra,
    }
    if shared_from_target:  # e.g. a draft's frozen embed/lm_head: filled from the target on load
        manifest["shared_from_target"] = sorted(shared_from_target)
    if main:
        atomic.write_json(manifest_path, manifest, indent=2)
    return manifest


def load_jax_dir(root: str, resolve: Callable[[dict, str], ModelSpec], dtype=None,
                 mesh: Mesh | None = None, want_role: str | None = None, host: bool = False,
                 shared: Mapping[str, Any] | None = None) -> tuple[Loaded, dict]:
    """Restore a JAX dir into the shardings of its abstract model (``host=True``: onto one
    CPU device, for exports); ``resolve(raw config, source)`` gives its ModelSpec.
    ``dtype=None`` keeps the stored dtypes. Checks the stored tree against the tree
    config.json implies, naming any mismatch."""
    manifest = read_manifest(root)
    raw, cfg_path = read_config(root)
    spec = resolve(raw, cfg_path)
    if spec.role != manifest["kind"] or spec.architecture != manifest["architecture"]:
        raise CheckpointError(
            f"{os.path.join(root, MANIFEST_NAME)}: kind/architecture "
            f"{manifest['kind']}/{manifest['architecture']} disagree with {cfg_path} "
            f"({spec.role}/{spec.architecture}); config.json was edited after the "
            "conversion -- restore it or re-convert.")
    _check_role(spec, want_role, root)
    cast = parse_dtype(dtype)
    params_dir = os.path.join(root, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: parameter directory missing; the checkpoint is "
                              "incomplete -- re-run the conversion.")
    stored = params_metadata(params_dir)
    compute = cast if cast is not None else _compute_dtype(dt for _, dt in stored.values())
    graphdef, abstract_state = spec.abstract(compute)
    variables = flat_variables(abstract_state)
    by_ref = list(manifest.get("shared_from_target", []))
    if by_ref:
        if shared is None or any(p not in shared for p in by_ref):
            raise CheckpointError(
                f"{os.path.join(root, MANIFEST_NAME)}: parameters {by_ref} are not stored here but "
                "shared with the target (field 'shared_from_target'); load the draft with its "
                "target: load_draft(path, target=load_target(...)).")
        for p in by_ref:
            want = tuple(variables[p].get_value().shape)
            if tuple(np.shape(shared[p])) != want:
                raise CheckpointError(
                    f"{root}: the target's {p!r} has shape {tuple(np.shape(shared[p]))} but this draft "
                    f"needs {want}; the draft was trained for a different target.")
            stored[p] = (want, np.dtype(shared[p].dtype))
    missing = [p for p in variables if p not in stored]
    extra = [p for p in stored if p not in variables]
    if missing or extra:
        raise CheckpointError(
            f"{params_dir}: parameters {missing[:5]} missing and {extra[:5]} unexpected for "
            f"the model {cfg_path} describes; the checkpoint and config.json do not match.")
    mesh = mesh if mesh is not None else (None if host else make_mesh())
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]) if host else None
    abstract = {}
    for path, var in variables.items():
        shape = tuple(var.get_value().shape)
        s_shape, s_dtype = stored[path]
        if s_shape != shape:
            raise CheckpointError(
                f"{params_dir}: parameter {path!r} has shape {s_shape}, but {cfg_path} implies "
                f"{shape}; the config.json does not describe this checkpoint (check "
                "hidden_size / heads / intermediate_size / vocab_size / layer counts).")
        dt = s_dtype if cast is None or not castable(s_dtype) else cast
        sharding = cpu or named_sharding(var.get_metadata().get("logical_axes", (None,) * len(shape)),
                                         shape, mesh)
        abstract[path] = jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    values = restore_params(params_dir, {p: a for p, a in abstract.items() if p not in by_ref})
    for p in by_ref:
        values[p] = jax.device_put(jnp.asarray(shared[p], abstract[p].dtype), abstract[p].sharding)
    for path, var in variables.items():
        var.set_value(values[path])
    hf_dtypes = dict(manifest["hf"].get("tensors", {}))
    if cast is not None:
        hf_dtypes = _cast_hf_dtypes(hf_dtypes, cast)
    loaded = Loaded(spec, graphdef, abstract_state, np.dtype(compute), hf_dtypes,
                    dict(manifest["hf"].get("metadata", {})), [])
    return loaded, manifest


def params_to_hf(spec: ModelSpec, state: nnx.State, hf_dtypes: Mapping[str, str] | None = None
                 ) -> dict[str, np.ndarray]:
    """Our parameters -> HF-named host tensors through the same rules as loading,
    each cast to its recorded HF dtype (lossless when it is the stored one)."""
    variables = flat_variables(state)
    out: dict[str, np.ndarray] = {}
    rule_of = {r.ours: r for r in spec.rules}
    for path, (keys, stacked) in spec.param_hf_keys().items():
        if path not in variables:
            continue
        rule, _ = rule_for_path(path, rule_of)
        arr = np.asarray(jax.device_get(variables[path].get_value()))
        for i, key in enumerate(keys):
            a = arr[i] if stacked else arr
            want = (hf_dtypes or {}).get(key) or rule.hf_dtype
            a = rule.to_hf(a)
            out[key] = a if want is None else a.astype(np_dtype(want), copy=False)
    return out
