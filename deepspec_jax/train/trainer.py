"""The training loop: set-up from a run config, resume, step, log, checkpoint, export.

Set-up is four stages, each usable (and tested) alone: :func:`setup_target` (the frozen
target and the draft spec derived from it), :func:`setup_data` (token stores, optional
feature cache, the per-host batch iterator and the step counts), :func:`setup_draft`
(the draft's parameters and optimizer state placed on the mesh) and
:func:`open_checkpoints`; :func:`setup` chains them, compiles the step and resumes.

Everything numeric happens in the jitted ``step.train_step``; this module wires the
data pipeline, the mesh and the persistence around it. The loop never waits on the
device except to read the previous step's finite-loss flag (one step behind, so the
next step is already queued) and the metrics of logging steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm import tqdm

from convert.common import jax_to_hf
from deepspec_jax.checkpoint import ModelSpec, save_jax_dir
from deepspec_jax.data.feature_cache import FeatureCache, target_name
from deepspec_jax.data.pipeline import BatchIterator, make_batches
from deepspec_jax.data.token_store import TokenStore
from deepspec_jax.draft_vocab import (D2T, FIELD as DRAFT_VOCAB_FIELD, T2D, carry_columns,
                                     selected_ids)
from deepspec_jax.drafts import OUTPUT_VOCAB_PARAMS, load_draft, restrict_vocab
from deepspec_jax.drafts.dspark import DSparkLossConfig
from deepspec_jax.drafts.registry import family_for_kind
from deepspec_jax.dtypes import compute_dtype
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import make_mesh, replicated, shardings_of
from deepspec_jax.target import Target, load_target
from deepspec_jax.train.checkpoints import Checkpoints
from deepspec_jax.train.draft_init import build_draft, draft_vocab_for_run, spec_for_run
from deepspec_jax.train.optimizer import make_optimizer
from deepspec_jax.train.step import (StepConfig, TrainState, batch_shardings, check_micro_batch,
                                    compile_step)

class NonFiniteLoss(RuntimeError):
    """Training hit a NaN/inf loss or gradient; the last good checkpoint is kept."""


def _dtype(name: str, field: str):
    try:
        return jnp.dtype(compute_dtype(name, f"config field {field}"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


class ConcatSource:
    """Several token stores read as one."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.lengths = np.concatenate([np.asarray(s.lengths) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[j][int(i - self.offsets[j])]


class WithFeatures:
    """A token source whose samples also carry cached target features."""

    def __init__(self, tokens, cache):
        if len(tokens) != len(cache):
            raise ConfigError(f"feature cache {cache.path} has {len(cache)} samples but the token "
                              f"data has {len(tokens)}; build the cache from the same token store.")
        self.tokens, self.cache = tokens, cache
        self.lengths = tokens.lengths

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {**self.tokens[i], **self.cache[i]}


# ---- stage 1: the frozen target and the draft spec derived from it -------------------

@dataclasses.dataclass
class TargetSetup:
    target: Target
    name: str                    # recorded in feature caches and the draft config
    spec: ModelSpec              # the draft's config, derived from the target's
    layer_ids: tuple[int, ...]   # target layers the draft reads (validated)


def setup_target(c, mesh, *, target: Target | None = None) -> TargetSetup:
    """Load the target on ``mesh`` and derive the draft spec from run config ``c``
    (``target``: one built already, e.g. the plan's abstract one)."""
    family_for_kind(c.draft.kind, "config field draft.kind")
    target = target or load_target(c.target.path, dtype=c.target.dtype, mesh=mesh)
    name = c.target.name or target_name(c.target.path)
    spec = spec_for_run(c, target.config, target.tokenizer, name)
    return TargetSetup(target, name, spec, target.validate_layer_ids(spec.config.target_layer_ids))


# ---- stage 2: data --------------------------------------------------------------------

@dataclasses.dataclass
class DataSetup:
    source: object              # random access samples (tokens, plus cached features if any)
    data: BatchIterator         # this host's batches
    lengths: np.ndarray         # token count of every sample of source
    online: bool                # no feature cache: the target runs inside the step
    local_batch: int            # rows per step on this host
    num_micro: int              # micro-batches per step (gradient accumulation)
    total_steps: int            # steps of this run (max_steps caps the data's length)
    schedule_steps: int         # steps the learning-rate schedule spans (the whole data)


def setup_data(c, ts: TargetSetup | None = None, *, process_index: int | None = None,
               process_count: int | None = None) -> DataSetup:
    """Token stores (+ feature cache) -> this host's batch iterator and the step counts.

    ``ts`` is only read to check a feature cache against the target (online runs may
    pass None); the process index/count default to jax's."""
    if not c.data.train:
        raise ConfigError("config field data.train is empty; list token-store directories made by "
                          "`python -m deepspec_jax.data.tokenize`.")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    online = not c.data.feature_cache
    stores = [TokenStore(p) for p in c.data.train]
    if not online:
        caches = feature_cache_paths(c.data.feature_cache)
        if len(caches) != len(stores):
            raise ConfigError(f"data.feature_cache lists {len(caches)} cache(s) "
                              f"({c.data.feature_cache!r}) but data.train {len(stores)} token "
                              "store(s): each cache is built from one store, so list one cache per "
                              "store, comma-separated in data.train's order.")
        if ts is None:
            raise ValueError("setup_data: a run with data.feature_cache needs the TargetSetup to "
                             "check the cache against.")
        stores = [WithFeatures(store, FeatureCache.open(path, expect={
            "layer_ids": list(ts.layer_ids), "hidden_size": ts.target.config.hidden_size,
            "target": ts.name, "token_store": store})) for store, path in zip(stores, caches)]
    source = stores[0] if len(stores) == 1 else ConcatSource(stores)

    gbs = int(c.train.global_batch_size)
    local, num_micro = batch_split(c, pc)
    data = make_batches(source, global_batch_size=gbs, seq_len=int(c.data.max_length),
                        seed=int(c.data.shuffle_seed), process_index=pi, process_count=pc,
                        bucket_boundaries=tuple(c.data.bucket_boundaries) or None,
                        num_epochs=int(c.train.num_epochs))
    total = len(data) if c.train.max_steps <= 0 else min(len(data), int(c.train.max_steps))
    return DataSetup(source, data, np.asarray(source.lengths), online, local, num_micro, total,
                     len(data))


def feature_cache_paths(value: str) -> list[str]:
    """``data.feature_cache``: one cache directory, or several comma-separated, one per
    ``data.train`` store (data gathered in pieces keeps each piece's cache; nothing is
    rebuilt when a piece is added)."""
    paths = [p.strip() for p in str(value).split(",")]
    if not all(paths):
        raise ConfigError(f"data.feature_cache={value!r}: an empty entry; give cache "
                          "directories separated by single commas.")
    return [os.path.normpath(p) for p in paths]    # tensorstore refuses "a/./b"


def batch_split(c, process_count: int) -> tuple[int, int]:
    """(rows per step on each host, micro-batches per step): train.global_batch_size is
    split over the processes, each host's share into train.micro_batch_size rows."""
    gbs = int(c.train.global_batch_size)
    local = gbs // process_count
    mbs = int(c.train.micro_batch_size) or local
    if gbs % process_count or mbs <= 0 or local % mbs:
        raise ConfigError(f"train.global_batch_size={gbs} must split evenly over {process_count} "
                          f"processes and then into micro-batches of train.micro_batch_size={mbs}.")
    return local, local // mbs


# ---- stage 3: draft parameters and optimizer ------------------------------------------

@dataclasses.dataclass
class DraftSetup:
    graphdef: object
    state: TrainState           # step 0: params + optimizer state on the mesh, PRNG
    rest: dict                  # non-trainable draft variables
    rest_shardings: dict
    tx: object                  # the optax transformation
    schedule: object            # step -> learning rate


def setup_draft(c, ts: TargetSetup, schedule_steps: int, mesh, *, shapes_only: bool = False) -> DraftSetup:
    """A fresh (or ``draft.init_from`` warm-started) draft and its optimizer, created by
    one jitted init straight into the shardings its logical axes give on ``mesh``.
    ``shapes_only``: the same state as ShapeDtypeStructs carrying those shardings, nothing
    allocated (what ``python -m deepspec_jax.plan`` compiles the step against)."""
    spec = ts.spec
    compute = _dtype(c.train.compute_dtype, "train.compute_dtype")
    tx, schedule = make_optimizer(c.train, schedule_steps)
    if c.draft.init_grow_layers and (not c.draft.init_from or c.draft.kind == "eagle3"):
        raise ConfigError("draft.init_grow_layers=True needs draft.init_from (the shallower "
                          "draft to grow) and a block draft (kind dspark or dflash; Eagle3 "
                          f"runs one layer), got kind={c.draft.kind!r} and "
                          f"init_from={c.draft.init_from!r}; fix those or unset the flag.")
    init = None if shapes_only or not c.draft.init_from else \
        load_draft(c.draft.init_from, dtype="float32", mesh=mesh, target=ts.target)
    vocab = None if shapes_only else _run_vocab(c, spec, init)

    def init_fn(embed, lm_head_src):
        model = build_draft(spec, compute_dtype=compute, seed=int(c.train.seed),
                            embed=embed, lm_head=lm_head_src, vocab=vocab)
        _, p, r = nnx.split(model, nnx.Param, ...)
        return p.to_pure_dict(), r.to_pure_dict()

    abstract = nnx.eval_shape(lambda: spec.build_fn(spec.config, dtype=compute,
                                                    param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, abs_p, abs_r = nnx.split(abstract, nnx.Param, ...)
    p_sh, r_sh = shardings_of(abs_p, mesh), shardings_of(abs_r, mesh)

    def init_from_target(tstate):
        tmodel = nnx.merge(ts.target.graphdef, tstate)
        return init_fn(tmodel.embed.get_value(), tmodel.lm_head_weight())

    init_fresh = jax.jit(init_from_target, out_shardings=(p_sh, r_sh))
    if shapes_only:   # warm starting keeps shapes, dtypes and shardings: nothing to add
        return _abstract_draft(init_fresh.eval_shape(ts.target.state), graphdef, r_sh, tx,
                               schedule, mesh)
    params, rest = init_fresh(ts.target.state)
    if init is not None:
        params = _warm_start(init, c.draft.init_from, spec, params, vocab,
                             grow=bool(c.draft.init_grow_layers))
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
    rng = jax.random.key_data(jax.random.key(int(c.train.seed) + 1))
    rep = replicated(mesh)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), rep), params, opt_state,
                       jax.device_put(rng, rep))
    return DraftSetup(graphdef, state, rest, r_sh, tx, schedule)


def opt_state_shardings(tx, params, mesh):
    """The optimizer state's shardings: every copy of the parameter tree in it (Adam's
    moments) sharded like the parameters, the rest (step counts) replicated. Without
    them ``jit(tx.init)`` leaves the moments on one device (its only input is unused)
    and they end up replicated: two fp32 copies of the draft on every device."""
    rep = replicated(mesh)
    return optax.tree_map_params(tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params),
                                 params, transform_non_params=lambda _: rep)


def _abstract_draft(params_rest, graphdef, r_sh, tx, schedule, mesh) -> DraftSetup:
    """setup_draft's DraftSetup with ShapeDtypeStructs (with shardings) for arrays."""
    params, rest = params_rest
    rep = replicated(mesh)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    opt = jax.tree.map(sds, jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = TrainState(sds(jax.ShapeDtypeStruct((), jnp.int32), rep), params, opt, sds(rng, rep))
    return DraftSetup(graphdef, state, rest, r_sh, tx, schedule)


def _run_vocab(c, spec, init) -> tuple[np.ndarray, np.ndarray] | None:
    """(d2t, t2d) of the run's reduced draft vocabulary (None without one): a reduced
    ``init`` draft's own (fine-tuning keeps the output space it was trained on; its size
    must be the run's ``draft.draft_vocab_size``), else, or with
    ``draft.init_reselect_vocab``, selected from data.train."""
    if init is None or not init.config.draft_vocab_size or c.draft.init_reselect_vocab:
        return draft_vocab_for_run(c, spec)
    k, have = getattr(spec.config, "draft_vocab_size", None), init.config.draft_vocab_size
    if k != have:
        raise ConfigError(f"draft.init_from={c.draft.init_from}: has a reduced vocabulary of "
                          f"{have} tokens but the run's draft.draft_vocab_size is {k or 0}; set "
                          f"it to {have} (the run keeps the draft's vocabulary), or set "
                          "draft.init_reselect_vocab=True to select the run's from data.train.")
    return tuple(np.asarray(jax.device_get(getattr(init.model, name).get_value()))
                 for name in (D2T, T2D))


def _warm_start(d, path, spec, params, vocab=None, grow=False):
    """Trainable parameters of the draft ``d`` loaded from ``path`` (a full-vocabulary one
    is restricted to the run's reduced vocabulary ``vocab`` first; a reduced one brought
    ``vocab`` itself). Loaded with the run's target, which supplies what a draft saved with
    ``share_with_target`` (the shipped default draft) leaves out; a reduced one re-selected
    (``draft.init_reselect_vocab``) carries its output-vocabulary columns over to the run's
    ids (``carry_columns``). ``grow``: ``d`` has fewer layers than the run
    (:func:`grow_layers`)."""
    if d.raw_config.get("architectures") != spec.raw.get("architectures"):
        raise ConfigError(f"draft.init_from={path}: architecture {d.raw_config.get('architectures')} "
                          f"differs from the run's {spec.raw.get('architectures')}.")
    if vocab is not None and d.config.draft_vocab_size is None:
        d = restrict_vocab(d, *vocab)
    _, p, _ = nnx.split(d.model, nnx.Param, ...)
    loaded = p.to_pure_dict()
    if d.config.draft_vocab_size is not None:
        loaded = _carry_vocab(loaded, selected_ids(getattr(d.model, D2T).get_value()),
                              np.arange(spec.config.vocab_size) if vocab is None
                              else selected_ids(vocab[0]))
    if grow:
        loaded = grow_layers(loaded, params, path)
    if jax.tree.structure(loaded) != jax.tree.structure(params):
        raise ConfigError(f"draft.init_from={path}: its parameters do not match the run's draft "
                          "config (layers, heads or head types differ).")
    shapes = jax.tree.map(lambda x: x.shape, loaded), jax.tree.map(lambda x: x.shape, params)
    if shapes[0] != shapes[1]:
        depth = _depths(loaded, params)
        hint = (f" It has {depth[0]} layers and the run {depth[1]}: set "
                "draft.num_hidden_layers to match, or draft.init_grow_layers=True to start the "
                "deeper run from it." if depth and depth[0] != depth[1] else "")
        raise ConfigError(f"draft.init_from={path}: its parameter shapes do not match the run's "
                          f"draft config (layers, hidden, intermediate or vocabulary sizes "
                          f"differ).{hint}")
    return jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                        loaded, params)


def _carry_vocab(loaded: dict, old_ids, new_ids) -> dict:
    """``loaded``'s output-vocabulary parameters (one column per draft token) moved from
    the target ids ``old_ids`` to ``new_ids``; unchanged when the two are the same."""
    old_ids, new_ids = np.asarray(old_ids), np.asarray(new_ids)
    if np.array_equal(old_ids, new_ids):
        return loaded
    return {k: jnp.asarray(carry_columns(v, old_ids, new_ids))
            if k in OUTPUT_VOCAB_PARAMS else v for k, v in loaded.items()}


# The outputs of a decoder layer's two residual branches: zero, the layer is the identity.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def _depths(loaded: dict, params: dict) -> tuple[int, int] | None:
    """(layers of ``loaded``, layers of ``params``): their stacked ``layers`` axes."""
    if not isinstance(loaded.get("layers"), dict) or not isinstance(params.get("layers"), dict):
        return None
    first = lambda t: next(iter(t["layers"].values())).shape[0]  # noqa: E731
    return first(loaded), first(params)


def grow_layers(loaded: dict, fresh: dict, path: str) -> dict:
    """``loaded`` (a draft's trainable parameters, layers stacked [L0, ...]) deepened to
    ``fresh``'s L > L0 layers: its layers come first; each added layer keeps its fresh
    initialisation except the residual-branch outputs (:data:`RESIDUAL_OUTPUTS`), zero,
    so the added layers are the identity and the deeper draft starts predicting exactly
    as ``loaded`` does (a warm start that cannot lose what the shallower draft learned;
    the zero outputs get gradients at once and open the layer up). Every non-layer
    parameter is ``loaded``'s; ``_warm_start`` checks the shapes."""
    depth = _depths(loaded, fresh)
    if depth is None:
        raise ConfigError(f"draft.init_from={path}: draft.init_grow_layers needs a block draft "
                          "(dspark, dflash) with stacked layers; unset it.")
    have, want = depth
    if have >= want:
        raise ConfigError(f"draft.init_from={path}: draft.init_grow_layers=True but it has "
                          f"{have} layers and the run's draft.num_hidden_layers is {want}; "
                          "growing needs more layers than the source has (or unset the flag).")
    if loaded["layers"].keys() != fresh["layers"].keys():
        raise ConfigError(f"draft.init_from={path}: its layers' parameters "
                          f"{sorted(loaded['layers'])} differ from the run's "
                          f"{sorted(fresh['layers'])}.")

    def deepen(name, old, new):
        if old.shape[1:] != new.shape[1:]:
            raise ConfigError(f"draft.init_from={path}: layer parameter {name} has shape "
                              f"{old.shape[1:]} per layer, the run's {new.shape[1:]}.")
        added = new[have:]
        if name in RESIDUAL_OUTPUTS:
            added = jnp.zeros_like(added)
        return jnp.concatenate([jnp.asarray(old, new.dtype), added], axis=0)

    layers = {k: deepen(k, v, fresh["layers"][k]) for k, v in loaded["layers"].items()}
    return {**loaded, "layers": layers}


# ---- stage 4: checkpoints ---------------------------------------------------------------

def output_dir(c) -> str:
    return c.output_dir or os.path.join("runs", c.name)


def open_checkpoints(c) -> Checkpoints:
    """The run's checkpoint manager (``<output_dir>/checkpoints``)."""
    return Checkpoints(os.path.join(output_dir(c), "checkpoints"), int(c.train.keep_checkpoints),
                       bool(c.train.async_checkpoint))


# ---- the whole set-up ---------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything set up for a run (also what tests poke at)."""
    config: object
    mesh: object
    target: object
    spec: object
    step_config: StepConfig
    state: TrainState
    rest: dict
    tstate: object
    step_fn: object
    data: object
    total_steps: int
    out_dir: str
    checkpoints: Checkpoints
    schedule: object
    lengths: np.ndarray       # token count of every sample of data.train
    batch_shardings: dict     # field -> sharding of the step's global batch arrays


def batch_field_ndims(source, online: bool) -> dict[str, int]:
    """Rank of each field of a step's batch (the cached feature fields follow the source)."""
    out = {"input_ids": 2, "loss_mask": 2, "attention_mask": 2}
    if not online:
        sample = source[0]
        out.update({k: 1 + np.ndim(sample[k]) for k in ("features", "target_last_hidden")})
    return out


def step_config(c, ts: TargetSetup, ds: DataSetup, graphdef, mesh) -> StepConfig:
    family = family_for_kind(c.draft.kind).name
    return StepConfig(family=family, graphdef=graphdef, layer_ids=ts.layer_ids, num_micro=ds.num_micro,
                      online=ds.online, mesh=mesh,
                      target_graphdef=ts.target.graphdef if ds.online else None,
                      dspark_loss=DSparkLossConfig(c.loss.ce_alpha, c.loss.l1_alpha,
                                                   c.loss.confidence_alpha, c.loss.loss_decay_gamma)
                      if family == "dspark" else None,
                      num_anchors=int(getattr(ts.spec.config, "num_anchors", 0) or 0),
                      eagle3_corrected=bool(c.loss.eagle3_corrected),
                      vocab_grad=str(c.loss.vocab_grad),
                      cpu_library_fusion=str(c.train.cpu_library_fusion))


def step_for(c, mesh, ts: TargetSetup, ds: DataSetup, dr: DraftSetup, field_ndims: dict):
    """(StepConfig, the target state the step reads or None, the batch shardings, the
    jitted step) of a run; ``field_ndims``: rank of each batch field. setup and
    ``python -m deepspec_jax.plan`` (abstract state) build the step here."""
    sc = step_config(c, ts, ds, dr.graphdef, mesh)
    tstate = ts.target.state if ds.online else None
    gbs = int(c.train.global_batch_size)
    b_sh = batch_shardings(mesh, {k: jax.ShapeDtypeStruct((gbs,) + (1,) * (n - 1), jnp.float32)
                                  for k, n in field_ndims.items()})
    sharding = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    step_fn = compile_step(sc, dr.tx, dr.schedule, sharding(dr.state), dr.rest_shardings,
                           sharding(tstate) if ds.online else None, b_sh)
    return sc, tstate, b_sh, step_fn


def setup(c, *, mesh=None, resume: bool = True) -> Run:
    """All four stages, the compiled step, and (``resume``) the latest checkpoint restored."""
    mesh = mesh or make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    ts = setup_target(c, mesh)
    ds = setup_data(c, ts)
    check_micro_batch(mesh, int(c.train.global_batch_size), ds.num_micro)
    dr = setup_draft(c, ts, ds.schedule_steps, mesh)
    sc, tstate, b_sh, step_fn = step_for(c, mesh, ts, ds, dr, batch_field_ndims(ds.source, ds.online))
    run = Run(c, mesh, ts.target, ts.spec, sc, dr.state, dr.rest, tstate, step_fn, ds.data,
              ds.total_steps, output_dir(c), open_checkpoints(c), dr.schedule, ds.lengths, b_sh)
    if resume:
        restore_latest(run)
    return run


def restore_latest(run: Run) -> bool:
    """Restore the latest complete checkpoint (state placed on the run's current mesh,
    data iterator positioned after its step); False when there is none."""
    if run.checkpoints.latest_step() is None:
        return False
    run.state, data_state, _ = run.checkpoints.restore(run.state)
    run.data.set_state(data_state)
    return True


def attention_mask(lengths: np.ndarray, indices: np.ndarray, seq_len: int) -> np.ndarray:
    """[b, S] int32: 1 on each row's real tokens (padding rows, index -1: none). Eagle3's
    loss needs it so the last real token is not trained towards padding."""
    idx = np.asarray(indices)
    n = np.where(idx >= 0, np.minimum(np.asarray(lengths)[np.maximum(idx, 0)], seq_len), 0)
    return (np.arange(seq_len)[None, :] < n[:, None]).astype(np.int32)


def to_global(batch: dict, shardings: dict, pc: int) -> dict:
    """Host-local rows -> global arrays laid out over the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(
        shardings[k], v, (v.shape[0] * pc,) + v.shape[1:]) for k, v in batch.items()}


def device_batch(run: Run, batch: dict) -> tuple[dict, np.ndarray]:
    """A pipeline batch (this host's rows) -> (the step's global input arrays, sample indices)."""
    batch = dict(batch)
    indices = batch.pop("index")
    batch["attention_mask"] = attention_mask(run.lengths, indices, batch["input_ids"].shape[1])
    return to_global(batch, run.batch_shardings, jax.process_count()), indices


def run_info(run: Run) -> dict:
    return {"name": run.config.name, "draft_config": run.spec.raw,
            "config": json.loads(run.config.to_json_best_effort())}


def exports_hf(run: Run) -> bool:
    """Whether :func:`export` also writes DeepSpec's HF format: configured, and the draft
    has the full vocabulary (DeepSpec's format has no reduced one)."""
    return bool(run.config.train.export_hf) and not run.spec.raw.get(DRAFT_VOCAB_FIELD)


def export(run: Run, dst: str | None = None) -> str:
    """Write the trained draft as a JAX dir (``<out>/final``) and, if configured, the
    DeepSpec HF format (``<out>/hf``)."""
    dst = dst or os.path.join(run.out_dir, "final")
    # the frozen embed/lm_head live in the compute dtype during training; the export is
    # float32 throughout, as the draft's config.json ("dtype") says
    rest = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        run.rest)
    model = nnx.merge(run.step_config.graphdef, nnx.State(run.state.params), nnx.State(rest))
    save_jax_dir(dst, run.spec, nnx.state(model), source=f"trained by deepspec_jax ({run.config.name})")
    if run.config.train.export_hf and jax.process_index() == 0:
        if not exports_hf(run):
            print(f"train: not exporting {run.out_dir}/hf: a reduced draft vocabulary "
                  f"({DRAFT_VOCAB_FIELD}) has no DeepSpec HF form; use python -m "
                  f"convert.to_speculators --src={dst} --dst=...")
        else:
            jax_to_hf(dst, os.path.join(run.out_dir, "hf"))
    return dst


def fmt_metrics(m: dict) -> str:
    keys = ["total_loss", "ce_loss", "l1_loss", "confidence_loss", "tau_probabilistic"]
    parts = [f"{k.replace('_loss', '')}={m[k]:.4f}" for k in keys if k in m]
    acc = [m[k] for k in sorted((k for k in m if k.startswith("accept_rate@")),
                                key=lambda s: int(s.split("@")[1]))]
    if acc:
        parts.append("acc@k=" + "/".join(f"{a:.2f}" for a in acc))
    parts.append(f"lr={m['lr']:.2e} gnorm={m['grad_norm']:.3f}")
    return " ".join(parts)


def train(run: Run, *, log=print, stop_after: int | None = None) -> dict:
    """Run steps until ``run.total_steps`` (or ``stop_after`` more). Returns the last metrics."""
    c = run.config
    main = jax.process_index() == 0
    writer = None
    if main and c.train.tensorboard:
        writer = SummaryWriter(os.path.join(run.out_dir, "tensorboard"))
    os.makedirs(run.out_dir, exist_ok=True)
    metrics_path = os.path.join(run.out_dir, "metrics.jsonl")
    step = int(jax.device_get(run.state.step))
    end = run.total_steps if stop_after is None else min(run.total_steps, step + stop_after)
    pending = None   # (step, ok flag, batch indices) of the previous step
    last = {}
    bar = tqdm(total=end, initial=step, unit="step", desc=c.name, disable=not main)
    t_last = time.perf_counter()
    try:
        while step < end:
            gb, indices = device_batch(run, next(run.data))
            run.state, metrics = run.step_fn(run.state, run.rest, run.tstate, gb)
            if pending is not None:
                _check_finite(run, *pending)
            pending = (step, metrics["ok"], indices)
            step += 1
            bar.update(1)
            if step % c.train.log_every == 0 or step == end:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(run, *pending)
                now = time.perf_counter()
                n = c.train.log_every if step % c.train.log_every == 0 else (step % c.train.log_every)
                m["step_time_s"] = (now - t_last) / max(n, 1)
                m["tokens_per_s"] = m["tokens"] / m["step_time_s"]
                t_last = now
                last = dict(m, step=step)
                if main:
                    log(f"step {step}/{run.total_steps} {fmt_metrics(m)} "
                        f"tok/s={m['tokens_per_s']:.0f} {m['step_time_s']:.2f}s/step")
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    if writer:
                        for k, v in m.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.flush()
            if step % c.train.checkpoint_every == 0 or step == end:
                _check_finite(run, *pending)  # never save past a non-finite step
                run.checkpoints.save(run.state, run.data.get_state(), run_info(run))
        run.checkpoints.wait()
    finally:
        bar.close()
        if writer:
            writer.close()
    return last


def _check_finite(run: Run, step: int, ok, indices) -> None:
    if float(jax.device_get(ok)) < 0.5:
        run.checkpoints.wait()
        rows = [int(i) for i in np.asarray(indices) if i >= 0]
        latest = run.checkpoints.latest_step()
        raise NonFiniteLoss(
            f"step {step + 1}: the loss or gradient norm is not finite (batch sample indices {rows} "
            f"of data.train); parameters were not updated. The last good checkpoint is step {latest} "
            f"in {run.checkpoints.directory}. Lower train.lr or inspect those samples.")


__all__ = ["setup", "setup_target", "setup_data", "setup_draft", "open_checkpoints", "restore_latest",
           "train", "export", "Run", "TargetSetup", "DataSetup", "DraftSetup", "NonFiniteLoss",
           "to_global", "ConcatSource", "WithFeatures", "batch_split",
           "opt_state_shardings", "step_config", "step_for", "batch_field_ndims"]
