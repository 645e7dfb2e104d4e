"""The train step: one pure function, jitted over a Mesh with explicit shardings.

``state -> state'`` for one global batch: gradient accumulation over micro-batches with
``lax.scan`` (in online mode the frozen target runs inside the scan body, on one
micro-batch at a time, so peak memory follows the micro-batch, not the global batch),
global-norm clipping + AdamW, and a finite-loss guard: a step whose loss or gradient
norm is not finite leaves the parameters and optimizer untouched and reports ``ok = 0``,
so the host can stop with the last good state intact. The state buffers are donated.

Sharding: the batch is split over the mesh's batch axes (``data``, ``fsdp``); every
micro-batch stays split over them (``micro_take``) and the gradient accumulator keeps
the parameters' shardings (their logical axes on ``StepConfig.mesh``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepspec_jax.drafts.dspark import DSparkLossConfig
from deepspec_jax.drafts.dspark_train import DSparkBatch, dspark_loss, sample_anchors, train_forward
from deepspec_jax.drafts.eagle3_train import eagle3_loss, logit_tile
from deepspec_jax import xla_cpu
from deepspec_jax.errors import ConfigError
from deepspec_jax.sharding import batch_axes, batch_sharding, shardings_of


class TrainState(NamedTuple):
    step: jax.Array      # int32 []
    params: dict         # trainable parameters (pure nested dict, fp32 master copy)
    opt_state: Any
    rng: jax.Array       # uint32 [2]: raw key data, so checkpoints hold plain arrays


@dataclasses.dataclass(frozen=True)
class StepConfig:
    family: str                      # drafts.registry family: "dspark" (also DFlash) | "eagle3"
    graphdef: Any                    # draft graphdef (static)
    layer_ids: tuple[int, ...]       # target features the draft reads
    num_micro: int                   # micro-batches per step (gradient accumulation)
    online: bool                     # target forward inside the step
    mesh: Mesh                       # the step's mesh: micro-batch and gradient shardings
    target_graphdef: Any = None
    dspark_loss: DSparkLossConfig | None = None
    num_anchors: int = 0
    eagle3_corrected: bool = False
    token_chunk: int = 2048          # DSpark loss: rows of [rows, vocab] logits per chunk
    vocab_grad: str = "fused"        # vocabulary losses' gradient: "fused" | "recompute"
    cpu_library_fusion: str = "dot"  # XLA:CPU only: what YNNPACK fuses (deepspec_jax.xla_cpu)


def check_micro_batch(mesh: Mesh, global_batch: int, num_micro: int) -> None:
    """Raise unless every micro-batch splits evenly over the batch mesh axes."""
    axes = batch_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    if global_batch % num_micro or (global_batch // num_micro) % n:
        raise ConfigError(
            f"train step: a global batch of {global_batch} sequences (train.global_batch_size) in "
            f"{num_micro} micro-batches (train.micro_batch_size per host x processes) gives "
            f"micro-batches of {global_batch / num_micro:g} sequences, which must be a multiple "
            f"of the batch mesh axes {' x '.join(axes) or 'data x fsdp'} = {n} "
            f"(mesh {dict(mesh.shape)}); raise train.micro_batch_size or change "
            "--config.mesh.data/fsdp.")


def micro_take(sc: StepConfig, x: jax.Array, j: jax.Array) -> jax.Array:
    """Micro-batch ``j`` of the global batch ``x`` [G, ...]: rows j, j+a, j+2a, ... (a =
    micro-batches), so every device's rows of the batch-sharded input divide evenly over
    the micro-batches and each micro-batch stays sharded over the batch axes. Taken inside
    the micro-batch loop (the reshape is free, the slice copies one micro-batch): a
    pre-split ``[a, G/a, ...]`` loop input made XLA copy the whole batch (e.g. the cached
    features, 6.25 GiB per chip for Qwen3-4B at global batch 512 on v5e-8) into a new
    layout."""
    a = sc.num_micro
    y = x.reshape((x.shape[0] // a, a) + x.shape[1:])
    y = jax.lax.dynamic_index_in_dim(y, j, axis=1, keepdims=False)
    return jax.lax.with_sharding_constraint(y, NamedSharding(sc.mesh, P(batch_axes(sc.mesh) or None)))


def _target_features(sc: StepConfig, tstate, input_ids):
    """The frozen target's (features, last hidden) of one micro-batch, no gradient."""
    model = nnx.merge(sc.target_graphdef, tstate)
    with jax.named_scope("target_forward"):  # names its ops in the HLO (tests, profiles)
        out = model(input_ids, sc.layer_ids)   # logits are unused: XLA drops the lm_head
    sh = batch_sharding(sc.mesh, 3, input_ids.shape[0])
    fix = lambda x: jax.lax.with_sharding_constraint(jax.lax.stop_gradient(x), sh)
    return fix(out.features), fix(out.last_hidden)


def with_target_features(sc: StepConfig, tstate, mb: dict) -> dict:
    """``mb`` with the target's features: computed here in online mode, read as given
    (from the feature cache) otherwise."""
    if not sc.online:
        return mb
    # tie the target's weights to this micro-batch: their per-layer all-gathers (fsdp) then
    # stay inside the loop instead of being hoisted out of it as loop invariants, which
    # would hold a gathered copy of the whole target for the whole step
    tstate, ids = jax.lax.optimization_barrier((tstate, mb["input_ids"]))
    feats, last = _target_features(sc, tstate, ids)
    return dict(mb, features=feats, target_last_hidden=last)


def grad_shardings(sc: StepConfig, params: dict, rest) -> dict:
    """The trainable parameters' shardings (their logical axes on ``sc.mesh``), the
    layout the gradient accumulator keeps."""
    _, p, _ = nnx.split(nnx.merge(sc.graphdef, nnx.State(params), rest), nnx.Param, ...)
    return shardings_of(p, sc.mesh)


def micro_loss(sc: StepConfig, params, rest, mb: dict, key):
    """(loss, metrics) of one micro-batch; ``mb`` holds input_ids, loss_mask, features,
    target_last_hidden."""
    model = nnx.merge(sc.graphdef, nnx.State(params), rest)
    feats = mb["features"].astype(model.dtype)
    if sc.family == "dspark":
        anchors, keep = sample_anchors(key, mb["loss_mask"], sc.num_anchors)
        batch = DSparkBatch(mb["input_ids"], mb["loss_mask"], feats, mb["target_last_hidden"])
        res = dspark_loss(model, train_forward(model, batch, anchors, keep), sc.dspark_loss,
                          sc.token_chunk, sc.vocab_grad)
        metrics = {k: v for k, v in res.terms.items() if not k.endswith(("_num", "_den"))}
        metrics.update(res.metrics)
        return res.total, metrics
    # the default logit tile holds TILE_ELEMS per device: the batch (and so the tile's rows)
    # is split over the batch axes, and per-device tiles of a few rows would re-read the
    # whole lm_head once per handful of rows
    shards = math.prod(sc.mesh.shape[a] for a in batch_axes(sc.mesh))
    rows = logit_tile(model.cfg.out_vocab_size)[1] * shards
    res = eagle3_loss(model, mb["input_ids"], feats, mb["target_last_hidden"], mb["loss_mask"],
                      mb["attention_mask"], corrected=sc.eagle3_corrected, row_chunk=rows,
                      constrain=lambda x: jax.lax.with_sharding_constraint(
                          x, batch_sharding(sc.mesh, x.ndim, x.shape[0])),
                      vocab_grad=sc.vocab_grad)
    m = res.metrics
    ttt = model.cfg.ttt_length
    metrics = {"loss": res.loss}
    for s in range(ttt):
        v = jnp.maximum(m[f"valid_tokens@{s}"], 1.0)
        metrics[f"accept_rate@{s}"] = m[f"accept_rate@{s}"] / v
        metrics[f"accuracy@{s}"] = m[f"accuracy@{s}"] / v
        metrics[f"ploss_{s}"] = m[f"ploss_{s}"]
    metrics["tau_probabilistic"] = m["tau_probabilistic"] / jnp.maximum(m["valid_tokens@0"], 1.0)
    return res.loss, metrics


def train_step(sc: StepConfig, tx: optax.GradientTransformation, schedule: Callable,
               state: TrainState, rest, tstate, batch: dict):
    """One optimizer step over ``batch`` (global arrays, leading dim = global batch)."""
    a = sc.num_micro
    check_micro_batch(sc.mesh, batch["input_ids"].shape[0], a)
    key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    fields = ("input_ids", "loss_mask", "attention_mask")
    if not sc.online:
        fields += ("features", "target_last_hidden")
    micro = lambda j: {k: micro_take(sc, batch[k], j) for k in fields}
    keys = jax.random.split(step_key, a)
    g_sh = grad_shardings(sc, state.params, rest)
    keep_sharded = lambda g: jax.lax.with_sharding_constraint(g, g_sh)
    grad_fn = jax.value_and_grad(lambda p, mb, k: micro_loss(sc, p, rest, mb, k), has_aux=True)

    def body(acc, xs):
        j, k = xs
        mb = micro(j)
        (loss, metrics), g = grad_fn(state.params, with_target_features(sc, tstate, mb), k)
        acc_g, acc_m = acc
        return (keep_sharded(jax.tree.map(jnp.add, acc_g, g)),
                jax.tree.map(jnp.add, acc_m, dict(metrics, total_loss=loss))), None

    zeros_g = keep_sharded(jax.tree.map(jnp.zeros_like, state.params))
    first = micro(0)
    m_shape = jax.eval_shape(lambda: micro_loss(sc, state.params, rest,
                                                with_target_features(sc, tstate, first), keys[0]))[1]
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in list(m_shape) + ["total_loss"]}
    (grads, msum), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(a), keys))
    grads = jax.tree.map(lambda g: g / a, grads)
    metrics = {k: v / a for k, v in msum.items()}
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), ok=ok.astype(jnp.float32),
                   tokens=jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32))
    new_state = TrainState(state.step + 1, keep_old(new_params, state.params),
                           keep_old(new_opt, state.opt_state), jax.random.key_data(key))
    return new_state, metrics


def batch_shardings(mesh, batch: dict) -> dict:
    """Field -> sharding of a global batch array (``batch`` values need ``.shape``, ``.ndim``)."""
    return {k: batch_sharding(mesh, v.ndim, v.shape[0]) for k, v in batch.items()}


def compile_step(sc: StepConfig, tx, schedule, state_shardings, rest_shardings, tstate_shardings,
                 batch_shardings_: dict):
    """The jitted step with explicit in/out shardings and the state donated."""
    def fn(state, rest, tstate, batch):
        # Traced under the run's mesh: the attention kernels (Pallas calls, which XLA
        # cannot partition) find it there and run per device inside shard_map, and a CPU
        # host compiling for compile-only TPU devices picks the TPU kernels
        # (deepspec_jax/kernels/sharded.py).
        with jax.sharding.use_abstract_mesh(sc.mesh.abstract_mesh):
            return train_step(sc, tx, schedule, state, rest, tstate, batch)

    return jax.jit(fn, in_shardings=(state_shardings, rest_shardings, tstate_shardings, batch_shardings_),
                   out_shardings=(state_shardings, None), donate_argnums=(0,),
                   compiler_options=xla_cpu.compiler_options(sc.mesh, sc.cpu_library_fusion))
