"""The eval's decode programs compiled ahead for a mesh, from abstract shapes.

``python -m deepspec_jax.eval`` runs whole-loop jitted programs: ``speculative_generate``
compiles ``spec_decode._spec_generate`` (prefill, then chain propose/verify rounds in a
``lax.while_loop``) and, with ``--tree``, ``spec_decode._spec_generate_tree`` (tree
rounds: one target pass over the flattened tree with tree attention); the speedup
baseline is ``target._generate``. This module lowers exactly those functions with
``ShapeDtypeStruct``s (parameters placed by their logical axes on the mesh, inputs
batch-sharded as ``Target._put`` places them), so ``memory_analysis()`` of each
compiled program is the per-device HBM that decode setting needs, with no weights and
no TPU. ``prefill`` is the loops' first stage alone (target prefill, first token, draft
context), compiled separately to attribute its activations.

Mesh: the programs are traced under ``jax.set_mesh(mesh)``, as ``speculative_generate``
traces them, so the tree-attention kernel runs per device inside ``shard_map``
(deepspec_jax/kernels/sharded.py).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.checkpoint import ModelSpec
from deepspec_jax.config import TargetConfig
from deepspec_jax.dtypes import COMPUTE_DTYPES, DTYPES
from deepspec_jax.errors import ConfigError
from deepspec_jax.sampling import SamplingParams
from deepspec_jax.sharding import batch_sharding, replicated
from deepspec_jax.spec_decode import (_prefill, _proposal_width, _spec_generate,
                                      _spec_generate_tree, check_compatible, parse_tree,
                                      spec_cache_len)
from deepspec_jax.target import _generate, round_up
from deepspec_jax.plan.targets import TargetArch, abstract_model, abstract_target

DECODE_PROGRAMS = ("prefill", "chain", "tree", "autoregressive")
Thunk = Callable[[], jax.stages.Compiled]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The decode shapes to plan for. Defaults: the eval's protocol (max_new_tokens 2048,
    deepspec_jax/eval.py) with prompts padded to 2048 tokens (the longest eval prompts,
    bucketed), a batch of 8 prompts per call (the eval's --batch_size; the reference
    decodes one, which needs less), draft trees of top-4 children and 32 nodes, greedy,
    the bfloat16 target and draft."""

    batch_size: int = 8
    prompt_len: int = 2048                   # padded prompt width (the prompt bucket)
    max_new_tokens: int = 2048
    tree: tuple[int, int] | None = (4, 32)   # (topk, num_nodes); None: no tree program
    temperature: float = 0.0
    dtype: str = "bfloat16"                  # target and draft weights and compute
    cache_bucket: int = 256                  # as speculative_generate / Target.generate
    stop_ids: int = 2                        # how many stop token ids (their count is a shape)
    programs: tuple[str, ...] = DECODE_PROGRAMS

    def validate(self) -> "DecodeSettings":
        bad = [p for p in self.programs if p not in DECODE_PROGRAMS]
        if bad:
            raise ConfigError(f"decode programs {bad}: choose from {DECODE_PROGRAMS}.")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"decode dtype {self.dtype!r}: use one of {list(COMPUTE_DTYPES)}.")
        if "tree" in self.programs and self.tree is None:
            raise ConfigError("decode program 'tree' needs tree=(topk, num_nodes), e.g. (4, 32).")
        for f in ("batch_size", "prompt_len", "max_new_tokens", "cache_bucket", "stop_ids"):
            if getattr(self, f) < 1:
                raise ConfigError(f"decode setting {f}={getattr(self, f)} must be >= 1.")
        return self


@functools.partial(jax.jit, static_argnums=(0, 2, 4, 7, 8, 9, 11))
def _prefill_program(tgraphdef, tstate, dgraphdef, dstate, kind, prompt, prompt_len, cache_len,
                     sp, layer_ids, key, max_new):
    """The decode loops' first stage (``spec_decode._prefill``) as its own program."""
    return _prefill(nnx.merge(tgraphdef, tstate), nnx.merge(dgraphdef, dstate), kind, prompt,
                    prompt_len, cache_len, sp, layer_ids, key, max_new)


def decode_thunks(target_cfg: TargetConfig, draft: ModelSpec, mesh: Mesh,
                  settings: DecodeSettings = DecodeSettings()) -> dict[str, Thunk]:
    """name -> thunk compiling that decode program (``settings.programs``) for ``mesh``'s
    devices. ``draft``: the draft's ModelSpec (``drafts.registry.resolve_spec`` of its
    config.json, or ``train.draft_init.spec_for_run`` of a run config). Raises
    ConfigError when the draft was not built for this target (as the eval does)."""
    s = settings.validate()
    if draft.role != "draft" or draft.family is None:
        raise ConfigError(f"plan.decode: expected a draft ModelSpec, got role {draft.role!r} "
                          f"({draft.architecture}).")
    dt = DTYPES[s.dtype]
    target = abstract_target(TargetArch(target_cfg, "<plan.decode>"), s.dtype, mesh)
    tgraphdef, tstate = target.graphdef, target.state
    dgraphdef, dstate = abstract_model(
        lambda: draft.build_fn(draft.config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)), mesh)
    kind = draft.family.kind_of(draft.config)
    layer_ids = check_compatible(target, types.SimpleNamespace(
        config=draft.config, kind=kind, source=f"draft ({draft.architecture})"))
    tree = None if s.tree is None else parse_tree(s.tree, target_cfg.vocab_size)

    b, p = s.batch_size, s.prompt_len
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=batch_sharding(mesh, len(shape), b))
    rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(mesh))  # noqa: E731
    prompt, prompt_len = rows((b, p), jnp.int32), rows((b,), jnp.int32)
    stop_ids = rep((s.stop_ids,), jnp.int32)
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = rep(key_shape.shape, key_shape.dtype)
    sp = SamplingParams(float(s.temperature)).validate()
    loop_args = (tgraphdef, tstate, dgraphdef, dstate, kind, prompt, prompt_len, stop_ids,
                 (rep((), jnp.float32), rep((_proposal_width(kind, draft.config),), jnp.float32)),
                 int(s.max_new_tokens))

    def compile_(fn, *args) -> jax.stages.Compiled:
        with jax.set_mesh(mesh):
            lowered = fn.lower(*args)
        return lowered.compile()

    def chain_len(t):
        return spec_cache_len(kind, draft.config, p, s.max_new_tokens, t, s.cache_bucket)

    thunks = {
        "prefill": lambda: compile_(_prefill_program, tgraphdef, tstate, dgraphdef, dstate, kind,
                                    prompt, prompt_len, chain_len(None), sp, layer_ids, key,
                                    int(s.max_new_tokens)),
        "chain": lambda: compile_(_spec_generate, *loop_args, chain_len(None), sp, layer_ids,
                                  "exact", key),
        "tree": lambda: compile_(_spec_generate_tree, *loop_args, chain_len(tree), sp, layer_ids,
                                 "exact", key, *tree),
        "autoregressive": lambda: compile_(_generate, tgraphdef, tstate, prompt, prompt_len,
                                           stop_ids, int(s.max_new_tokens),
                                           round_up(p + s.max_new_tokens, s.cache_bucket), sp,
                                           key),
    }
    return {name: thunks[name] for name in s.programs}


def compile_decode_programs(target_cfg: TargetConfig, draft: ModelSpec, mesh: Mesh,
                            settings: DecodeSettings = DecodeSettings()
                            ) -> dict[str, jax.stages.Compiled]:
    """name -> compiled decode program (see ``decode_thunks``); each one's
    ``memory_analysis()`` is per device."""
    return {name: thunk() for name, thunk in decode_thunks(target_cfg, draft, mesh,
                                                           settings).items()}


__all__ = ["DecodeSettings", "DECODE_PROGRAMS", "decode_thunks", "compile_decode_programs"]
