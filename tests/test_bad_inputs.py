"""Bad inputs to decoding fail loudly instead of producing garbage.

* A prompt plus max_new_tokens beyond the target's max_position_embeddings: ValueError
  (``Target.generate``, ``speculative_generate``, the regenerate CLI's generator).
* ``Target.extend`` past the cache capacity: ValueError (the compiled write would clamp
  and overwrite valid entries, or drop); the jitted decode loops (plain, chain, tree)
  never write past their caches -- every cache write they make is recorded and checked.
* NaN/inf target logits while decoding (a NaN/inf row in the embedding table):
  NonFiniteLogitsError naming the row and the first token (and round) affected.

Plain, chain and tree decoding each compile once here (~6 + 10 + 15 s on a 2-core CPU)
and every test reuses those compilations (same static arguments).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_sets, load_manifest, write_llama_gguf
from deepspec_jax import load_draft, load_target, speculative_generate
from deepspec_jax.models.transformer import CausalLM
from deepspec_jax.spec_decode import _first_nonfinite
from deepspec_jax.target import NonFiniteLogitsError

FS = fixture_sets()[0]
TARGET_DIR = os.path.join(FS, load_manifest(FS)["global"]["target_dir"])
PROMPT_LENS = (13, 7)
MAX_NEW = 24
# prompt_bucket=1, cache_bucket=1: caches get no rounding slack, only what the loops
# allocate themselves. No other test module uses these static arguments, so the loops
# are traced here, with the recording ``extend`` below in place.
KW = dict(max_new_tokens=MAX_NEW, prompt_bucket=1, cache_bucket=1)
MODES = ("generate", "chain", "tree")
# Distilled drafts (both families): with these prompts the longer row accepts several
# drafts in its last round and then keeps running, finished, while the other row
# decodes on -- the loops' worst case for cache writes.
DRAFTS = {"chain": "eagle3_distilled", "tree": "dspark_gated_distilled"}
PROMPT_SEED = 15
TREE = (2, 4)

WRITES: list[tuple[str, np.ndarray, int, int]] = []   # (method, lengths [B], T, max_len)


def _record(method: str, t: int, max_len: int, lengths) -> None:
    WRITES.append((method, np.asarray(lengths).copy(), t, max_len))


@pytest.fixture(scope="module", autouse=True)
def record_cache_writes():
    """Every target KV-cache write traced in this module reports (lengths, T, max_len):
    ``extend`` and ``extend_tree`` write T positions at each row's length."""
    extend, extend_tree = CausalLM.extend, CausalLM.extend_tree

    def recording_extend(self, cache, input_ids, *args, **kw):
        jax.debug.callback(functools.partial(_record, "extend", input_ids.shape[1],
                                             cache.max_len), cache.lengths)
        return extend(self, cache, input_ids, *args, **kw)

    def recording_extend_tree(self, cache, input_ids, *args, **kw):
        jax.debug.callback(functools.partial(_record, "extend_tree", input_ids.shape[1],
                                             cache.max_len), cache.lengths)
        return extend_tree(self, cache, input_ids, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CausalLM, "extend", recording_extend)
        mp.setattr(CausalLM, "extend_tree", recording_extend_tree)
        yield


@pytest.fixture(scope="module")
def target():
    return load_target(TARGET_DIR)


@functools.lru_cache(maxsize=None)
def _draft(name: str):
    return load_draft(os.path.join(FS, name))


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    return [rng.integers(0, vocab - 1, n).tolist() for n in PROMPT_LENS]


def _decode(target, mode: str, prompts) -> list[list[int]]:
    if mode == "generate":
        return target.generate(prompts, **KW)
    res = speculative_generate(target, _draft(DRAFTS[mode]), prompts, **KW,
                               tree=TREE if mode == "tree" else None)
    return [r.tokens for r in res]


@pytest.fixture(scope="module")
def ref(target) -> list[list[int]]:
    """Plain greedy decoding of the test prompts (what every mode must reproduce)."""
    return _decode(target, "generate", _prompts(target.config.vocab_size))


# ---------------------------------------------------------------------------
# context length
# ---------------------------------------------------------------------------

def test_prompt_plus_new_tokens_beyond_the_context_is_refused(target):
    limit = target.config.max_position_embeddings
    assert limit == 512   # the fixture's config.json
    prompts = [[1] * 5, [2] * 500]
    msg = (r"prompt_ids\[1\]: 500 prompt tokens \+ max_new_tokens=20 = 520 exceeds the "
           r"target's max_position_embeddings=512 .*shorten that prompt to at most 492 tokens "
           r"or lower max_new_tokens to at most 12")
    with pytest.raises(ValueError, match=msg):
        target.generate(prompts, max_new_tokens=20)
    for tree in (None, TREE):
        with pytest.raises(ValueError, match=msg):
            speculative_generate(target, _draft("eagle3"), prompts, max_new_tokens=20, tree=tree)
    # the boundary: the committed sequence may fill the context exactly
    target.check_context([5, 492], 20)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: 493 .* = 513"):
        target.check_context([5, 493], 20)
    with pytest.raises(ValueError, match=r"2 prompts exceed it \(indices \[0, 1\]\)"
                                         r".*max_new_tokens alone exceeds the limit"):
        target.check_context([1, 3], 600)


def test_gguf_context_length_is_the_limit(tmp_path):
    """GGUF targets take the limit from ``llama.context_length``."""
    from deepspec_jax.config import target_config_from_dict
    from deepspec_jax.weights.gguf_loader import read_gguf

    path = write_llama_gguf(str(tmp_path / "ctx.gguf"), "token_embd.weight",
                            np.zeros((64, 32), np.float32), context_length=777)
    raw, _ = read_gguf(path)
    assert target_config_from_dict(raw, path).max_position_embeddings == 777


def test_regenerate_records_an_over_long_prompt_alone(target):
    """The regenerate CLI checks each prompt: one over the context is recorded as its own
    error, the rest of its batch is generated."""
    from absl.testing import flagsaver

    from deepspec_jax.data import regenerate

    class Tok:
        def apply_chat_template(self, msgs, **kw):
            return [3] * int(msgs[-1]["content"])

        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    calls = []

    def generate(prompts, *args, **kw):   # the decode itself is tested elsewhere
        calls.append(prompts)
        return [[7] * 16 for _ in prompts]

    t = dataclasses.replace(target, tokenizer=Tok())
    t.generate = generate
    gen = regenerate.JaxGenerator(t)
    batch = [("a:1", [{"role": "user", "content": "6"}]),
             ("a:2", [{"role": "user", "content": "500"}])]
    flags = regenerate.FLAGS
    with flagsaver.flagsaver():
        flags(["regenerate", "--prompts=unused.jsonl", "--output=unused.jsonl", "--max_new_tokens=16"])
        try:
            ok, bad = gen(batch, seed=0)
        finally:
            flags.unparse_flags()
    assert isinstance(bad, ValueError)
    assert "prompt: 500 prompt tokens + max_new_tokens=16 = 516 exceeds" in str(bad)
    assert calls == [[[3] * 6]] and ok[1:] == ("length", 16)


# ---------------------------------------------------------------------------
# KV-cache capacity
# ---------------------------------------------------------------------------

def test_extend_past_the_cache_capacity_is_refused(target):
    rng = np.random.default_rng(1)
    seq = rng.integers(0, target.config.vocab_size - 1, (2, 16)).astype(np.int32)
    cache = target.init_cache(2, 16)
    _, cache = target.extend(cache, seq[:, :8], np.array([8, 5]))
    # row 1 has room for its 1 real token, but all 9 positions are written
    with pytest.raises(ValueError, match=r"row 0 holds 8 cached tokens and this call writes 9 "
                                         r"new positions \(input_ids.shape\[1\], 1 of them real\), "
                                         r"17 > the cache capacity max_len=16"
                                         r".*init_cache\(batch, max_len>=17\)"):
        target.extend(cache, np.zeros((2, 9), np.int32), np.array([1, 1]))
    with pytest.raises(ValueError, match=r"num_new\[1\] = 9: must lie in \[0, 8\]"):
        target.extend(cache, seq[:, 8:], np.array([8, 9]))
    with pytest.raises(ValueError, match=r"input_ids has 2 rows but the cache has 3"):
        target.extend(target.init_cache(3, 16), seq[:, :4], np.array([4, 4]))
    # the refused calls consumed nothing: the rows fill the cache exactly, correctly (row 1
    # wrote all 8 positions of seq before, so they are valid once its length says so)
    cache = cache._replace(lengths=np.array([8, 8], np.int32))
    out, cache = target.extend(cache, seq[:, 8:], np.array([8, 8]))
    full = np.asarray(target.forward(seq).logits)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, 8:], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [16, 16])


@pytest.mark.parametrize("mode", MODES)
def test_decode_loops_never_write_past_their_cache(target, ref, mode):
    """Every cache write of a whole decode (both rows run to max_new_tokens, so the last
    rounds start at the end of the committed range) stays inside the cache."""
    WRITES.clear()
    out = _decode(target, mode, _prompts(target.config.vocab_size))
    jax.effects_barrier()
    assert out == ref and all(len(row) == MAX_NEW for row in out)   # lossless, full length
    methods = {w[0] for w in WRITES}
    assert methods == ({"extend", "extend_tree"} if mode == "tree" else {"extend"}), methods
    assert len(WRITES) >= MAX_NEW // 8, "the loop's cache writes were not recorded"
    for method, lengths, t, max_len in WRITES:
        end = lengths + t
        assert (end <= max_len).all(), (
            f"{mode}: {method} writes {t} positions at lengths {lengths.tolist()}, past "
            f"max_len={max_len}")
    if mode != "generate":   # the worst case happened: a finished row ran on past its limit
        limit = np.asarray(PROMPT_LENS) + MAX_NEW
        assert any((w[1] > limit).any() for w in WRITES), "no row overshot its limit"


# ---------------------------------------------------------------------------
# non-finite logits
# ---------------------------------------------------------------------------

def _with_embedding_row(target, token: int, value: float):
    """A copy of ``target`` whose embedding of ``token`` is ``value`` (NaN/inf): logits
    turn non-finite exactly once that token is fed to the target."""
    model = nnx.merge(target.graphdef, target.state, copy=True)
    model.embed.set_value(model.embed.get_value().at[token].set(value))
    graphdef, state = nnx.split(model)
    return dataclasses.replace(target, graphdef=graphdef, state=state)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_logits_raise_naming_row_and_token(target, ref, mode):
    prompts = _prompts(target.config.vocab_size)
    # a token that row 0 generates at step k (k >= 2) and nobody fed before
    seen = set(prompts[0]) | set(prompts[1]) | set(ref[1])
    k = next(i for i in range(2, MAX_NEW) if ref[0][i] not in seen | set(ref[0][:i]))
    for value in (np.nan, np.inf):
        bad = _with_embedding_row(target, ref[0][k], value)
        with pytest.raises(FloatingPointError) as e:
            _decode(bad, mode, prompts)
        assert isinstance(e.value, NonFiniteLogitsError)
        msg = str(e.value)
        # the logits after feeding token k decide new token k + 1
        want = f"row 0: new token {k + 1}" + ("" if mode == "generate" else " (round ")
        assert want in msg and "non-finite (NaN/inf) logits" in msg, msg
        assert "corrupt weights in the checkpoint" in msg, msg
        # a prompt holding that token: the prefill's logits already are non-finite
        with pytest.raises(NonFiniteLogitsError) as e:
            _decode(bad, mode, [prompts[0][:-1] + [ref[0][k]], prompts[1]])
        want = "row 0: new token 0" + ("" if mode == "generate" else " (prefill)")
        assert want in str(e.value), str(e.value)
    assert _decode(target, mode, prompts) == ref   # the clean target is untouched


def test_a_round_checks_only_the_logits_it_used():
    """Positions 0..acc decide a round's tokens (0..acc-1 when a stop token was accepted:
    no next token); later positions (rejected drafts) are not checked."""
    bad = np.zeros((4, 5), bool)
    bad[0, 3] = True          # acc 2: position 3 unused
    bad[1, 2] = True          # acc 2: position 2 drew the next token
    bad[2, 2] = True          # acc 2, stopped: position 2 unused
    bad[3, [1, 4]] = True     # acc 4: the first used one counts
    acc = np.array([2, 2, 2, 4])
    stopped = np.array([False, False, True, False])
    pos, prompt_len = np.array([10, 20, 30, 40]), np.array([5, 5, 5, 5])
    got = _first_nonfinite(bad, acc, stopped, pos, prompt_len)
    # new-token index: the current token at pos is new token pos - prompt_len
    np.testing.assert_array_equal(got, [-1, 20 - 5 + 1 + 2, -1, 40 - 5 + 1 + 1])
