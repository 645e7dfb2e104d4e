"""The programs a plan compiles, built by the trainer's own code from abstract state.

A program family (``train``; ``decode``: the eval's programs, deepspec_jax/plan/decode.py)
is a callable ``(PlanContext) -> {mode: Callable[[], jax.stages.Compiled]}``
registered in :data:`PROGRAMS`; the plan times each thunk's compile and reads its
memory and FLOPs. ``train`` compiles the real ``train/step.py`` step (state, optimizer
and batch shardings exactly as ``deepspec_jax.train.trainer.setup`` gives them) with
``.lower(...).compile()`` for the plan's devices:

* ``cached``: the target's features are batch inputs (as read from a feature cache);
* ``online``: the frozen target runs inside the step (its weights are step inputs).

Another family is a ``(PlanContext) -> {name: thunk}`` callable added to ``PROGRAMS``.

A thunk may carry ``argument_bytes`` (per device), reported when it runs out of memory.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from deepspec_jax.dtypes import DTYPES
from deepspec_jax.plan.decode import DecodeSettings, decode_thunks
from deepspec_jax.plan.report import per_device_bytes
from deepspec_jax.plan.targets import TargetArch, abstract_target
from deepspec_jax.train.draft_init import spec_for_run
from deepspec_jax.train.trainer import (DataSetup, batch_split, setup_draft, setup_target,
                                        step_for)

TRAIN_MODES = ("cached", "online")
# The learning-rate schedule's length only sets constants inside the step.
_SCHEDULE_STEPS = 1000


@dataclasses.dataclass
class PlanContext:
    config: ml_collections.ConfigDict   # the run config (never mutated: programs copy it)
    arch: TargetArch                    # the target's architecture
    mesh: Mesh
    processes: int                      # hosts of the slice (per-host batch semantics)
    modes: tuple[str, ...]              # train modes asked for
    cache_dtype: str = "bfloat16"       # dtype of cached features (cached mode)
    decode: DecodeSettings = DecodeSettings()   # shapes of the decode programs
    decode_mesh: Mesh | None = None     # the eval's mesh (None: ``mesh``)
    notes: list[str] = dataclasses.field(default_factory=list)   # printed under the table


Thunk = Callable[[], jax.stages.Compiled]
ProgramFamily = Callable[[PlanContext], dict[str, Thunk]]


def with_fields(c: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A copy of ``c`` (still locked: unknown fields are errors) with nested fields set
    (``train__micro_batch_size=8`` sets train.micro_batch_size)."""
    out = copy.deepcopy(c)
    for key, value in fields.items():
        node = out
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return out


def batch_struct(c, ts, online: bool, cache_dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's global batch as the data pipeline (and a feature cache) deliver it."""
    gbs, seq = int(c.train.global_batch_size), int(c.data.max_length)
    out = {k: jax.ShapeDtypeStruct((gbs, seq), jnp.int32)
           for k in ("input_ids", "loss_mask", "attention_mask")}
    if not online:
        d, dt = ts.target.config.hidden_size, DTYPES[cache_dtype]
        out["features"] = jax.ShapeDtypeStruct((gbs, seq, len(ts.layer_ids) * d), dt)
        out["target_last_hidden"] = jax.ShapeDtypeStruct((gbs, seq, d), dt)
    return out


def _with_mask_token(ctx: PlanContext, c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` with a concrete draft.mask_token_id: -1 means the trainer picks one from the
    tokenizer, which a plan does not load; the id changes no shape, memory or FLOPs."""
    if c.draft.kind == "eagle3" or int(c.draft.mask_token_id) >= 0:
        return c
    c = with_fields(c, draft__mask_token_id=ctx.arch.config.vocab_size - 1)
    note = ("draft.mask_token_id=-1 (chosen from the tokenizer by the trainer): the plan "
            "uses the last vocabulary id; the id changes no shape, memory or FLOPs.")
    if note not in ctx.notes:
        ctx.notes.append(note)
    return c


def train_step_thunk(ctx: PlanContext, mode: str, micro_batch_size: int | None = None) -> Thunk:
    """Compile thunk of the train step in ``mode`` (``micro_batch_size``: override
    train.micro_batch_size, per host as in the config)."""
    online = mode == "online"
    fields = {"data__feature_cache": "" if online else "<plan: abstract feature cache>"}
    if micro_batch_size is not None:
        fields["train__micro_batch_size"] = int(micro_batch_size)
    c = _with_mask_token(ctx, with_fields(ctx.config, **fields))
    mesh = ctx.mesh
    ts = setup_target(c, mesh, target=abstract_target(ctx.arch, c.target.dtype, mesh))
    local, num_micro = batch_split(c, ctx.processes)
    ds = DataSetup(None, None, None, online, local, num_micro, 0, _SCHEDULE_STEPS)
    dr = setup_draft(c, ts, _SCHEDULE_STEPS, mesh, shapes_only=True)
    batch = batch_struct(c, ts, online, ctx.cache_dtype)
    _, tstate, b_sh, step_fn = step_for(c, mesh, ts, ds, dr, {k: v.ndim for k, v in batch.items()})
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
    args = (dr.state, dr.rest, tstate, batch)

    def thunk() -> jax.stages.Compiled:
        return step_fn.lower(*args).compile()

    thunk.argument_bytes = per_device_bytes(args)   # reported when the compile runs out of memory
    return thunk


def train_programs(ctx: PlanContext) -> dict[str, Thunk]:
    return {mode: train_step_thunk(ctx, mode) for mode in ctx.modes}


def decode_programs(ctx: PlanContext) -> dict[str, Thunk]:
    """The eval's decode programs (deepspec_jax/plan/decode.py: prefill, chain, tree,
    autoregressive) for the run's draft on the target, in ``ctx.decode`` shapes, with
    target and draft weights in target.dtype sharded by their logical axes on the mesh."""
    c = _with_mask_token(ctx, ctx.config)
    spec = spec_for_run(c, ctx.arch.config)
    settings = dataclasses.replace(ctx.decode, dtype=str(c.target.dtype))
    return decode_thunks(ctx.arch.config, spec, ctx.decode_mesh or ctx.mesh, settings)


# name -> family
PROGRAMS: dict[str, ProgramFamily] = {"train": train_programs, "decode": decode_programs}


def register_program(name: str, family: ProgramFamily) -> None:
    PROGRAMS[name] = family


__all__ = ["PlanContext", "PROGRAMS", "register_program", "train_programs", "train_step_thunk",
           "TRAIN_MODES", "batch_struct", "with_fields", "Thunk", "ProgramFamily",
           "decode_programs"]
