"""Chat tokenisation with assistant loss masks, the tokenisation CLI and the token store.

Masks are checked against an independent reference: the official turn formats written
out by hand as (text, supervised) pieces, each piece tokenised on its own."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepspec_jax.data.chat_templates import TEMPLATES
from deepspec_jax.data.jsonl import DataError
from deepspec_jax.data.token_store import TokenStore, TokenStoreWriter, write_token_store
from deepspec_jax.data.tokenize import ChatTokenizer, tokenize_conversation, tokenize_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>",
            "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer(specials=SPECIALS, chat_template=None):
    """A tiny byte-level BPE fast tokenizer (trained in milliseconds, no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2/Llama-3 style split, then bytes
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = ["Hello! How can I help you today? The answer is 42.", "You are a helpful assistant.",
              "def f(x):\n    return x * 2\n", "<think>\nreasoning here\n</think>\n\n", "What is 2 + 2?"]
    tk.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<|endoftext|>",
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def reference(tok, pieces):
    ids, mask = [], []
    for text, sup in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [sup] * len(t)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


SYS, Q1, A1, Q2, A2 = ("You are a helpful assistant.", "Hi", "Hello! How can I help you today?",
                       "What is 2 + 2?", "The answer is 4.")
CONV1 = [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
CONV2 = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
         {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
         {"role": "assistant", "content": A2}]
SMOL_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# (template, thinking, conversation) -> official rendering as (text, supervised) pieces
CASES = {
    ("chatml", False, 2): [
        (f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", 0),
        (A1, 1), ("<|im_end|>", 1), (f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", 0),
        (A2, 1), ("<|im_end|>", 1), ("\n", 0)],
    ("smollm2", False, 1): [
        (f"<|im_start|>system\n{SMOL_SYS}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n"
         "<|im_start|>assistant\n", 0), (A2, 1), ("<|im_end|>", 1), ("\n", 0)],
    ("qwen3", False, 1): [
        (f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", 0),
        (A2, 1), ("<|im_end|>", 1), ("\n", 0)],
    ("qwen3", True, 1): [
        (f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\n" + A2, 1), ("<|im_end|>", 1), ("\n", 0)],
    ("qwen3", False, 2): [  # only the turn after the last user message carries the think block
        (f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", 0),
        (A1, 1), ("<|im_end|>", 1),
        (f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", 0),
        (A2, 1), ("<|im_end|>", 1), ("\n", 0)],
    ("gemma", False, 2): [
        (f"<bos><start_of_turn>user\n{SYS}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n", 0),
        (A1, 1), ("<end_of_turn>", 1), (f"\n<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n", 0),
        (A2, 1), ("<end_of_turn>", 1), ("\n", 0)],
    ("gemma4", False, 2): [
        (f"<bos><|turn>system\n{SYS}<turn|>\n<|turn>user\n{Q1}<turn|>\n<|turn>model\n", 0),
        (A1, 1), ("<turn|>", 1),
        (f"\n<|turn>user\n{Q2}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>", 0),
        (A2, 1), ("<turn|>", 1), ("\n", 0)],
    ("gemma4", True, 1): [
        (f"<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n{Q2}<turn|>\n<|turn>model\n", 0),
        (A2, 1), ("<turn|>", 1), ("\n", 0)],
    ("llama3", False, 2): [
        (f"<bos><|start_header_id|>system<|end_header_id|>\n\n{SYS}<|eot_id|><|start_header_id|>user"
         f"<|end_header_id|>\n\n{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        (A1, 1), ("<|eot_id|>", 1),
        (f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|><|start_header_id|>assistant"
         "<|end_header_id|>\n\n", 0), (A2, 1), ("<|eot_id|>", 1)],
}


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}-think{int(k[1])}-conv{k[2]}")
def test_builtin_templates_mask_matches_reference(tok, key):
    name, thinking, which = key
    conv = CONV1 if which == 1 else CONV2
    want_ids, want_mask = reference(tok, CASES[key])
    chat = ChatTokenizer(tok, name, thinking)
    assert chat.render(conv) == "".join(t for t, _ in CASES[key])
    ids, mask = chat(conv, 4096)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    chat.verify(conv)  # our tokenisation == the template's own tokenize=True output


def test_generation_prompt_is_the_unsupervised_prefix(tok):
    """What a served model sees (prompt + generation prompt) is exactly the unsupervised head."""
    for name in TEMPLATES:
        for thinking in (False, True):
            chat = ChatTokenizer(tok, name, thinking)
            ids, mask = chat(CONV1, 4096)
            prompt = tok.apply_chat_template(CONV1[:1], chat_template=chat.template.jinja, tokenize=True,
                                             return_dict=False, add_generation_prompt=True,
                                             enable_thinking=thinking)
            first = int(np.argmax(mask))
            assert list(ids[:first]) == list(prompt), (name, thinking)


def test_thinking_answer_is_fully_supervised(tok):
    conv = [{"role": "user", "content": Q2},
            {"role": "assistant", "content": "<think>\nreasoning here\n</think>\n\nThe answer is 4."}]
    ids, mask = tokenize_conversation(tok, conv, max_length=4096, chat_template="qwen3", thinking=True)
    want = reference(tok, [(f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", 0),
                           ("<think>\nreasoning here\n</think>\n\nThe answer is 4.", 1),
                           ("<|im_end|>", 1), ("\n", 0)])
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(mask, want[1])


def test_tokenizer_own_template_and_end_detection():
    own = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok = make_tokenizer(chat_template=own)
    ids, mask = tokenize_conversation(tok, CONV1, max_length=4096)
    want = reference(tok, [(f"<|user|>\n{Q2}<|endoftext|>\n<|assistant|>\n", 0), (A2, 1),
                           ("<|endoftext|>", 1), ("\n", 0)])
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(mask, want[1])
    # no special token after the answer: only the answer is supervised
    plain = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }} END\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:\n{% endif %}")
    tok2 = make_tokenizer(chat_template=plain)
    ids, mask = tokenize_conversation(tok2, CONV1, max_length=4096)
    want = reference(tok2, [(f"user:\n{Q2} END\nassistant:\n", 0), (A2, 1), (" END\n", 0)])
    np.testing.assert_array_equal(mask, want[1])


def test_truncation_and_last_end_of_turn(tok):
    full_ids, full_mask = tokenize_conversation(tok, CONV2, max_length=4096, chat_template="chatml")
    ids, mask = tokenize_conversation(tok, CONV2, max_length=20, chat_template="chatml")
    assert len(ids) == 20
    np.testing.assert_array_equal(ids, full_ids[:20])
    np.testing.assert_array_equal(mask, full_mask[:20])
    chat = ChatTokenizer(tok, "chatml")
    _, cut = chat(CONV2, 4096, supervise_last_end=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(full_ids == im_end)
    assert full_mask[ends[-1]] == 1 and cut[ends[-1]] == 0  # last turn's end not supervised
    np.testing.assert_array_equal(np.delete(cut, ends[-1]), np.delete(full_mask, ends[-1]))


def test_errors(tok):
    with pytest.raises(DataError, match="unknown chat template 'vicuna'.*chatml.*gemma.*llama3.*qwen3"):
        ChatTokenizer(tok, "vicuna")
    with pytest.raises(DataError, match="has no chat template.*--chat_template"):
        ChatTokenizer(tok, None)
    bare = make_tokenizer(specials=["<|endoftext|>", "<bos>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(DataError, match="'llama3' needs the special token.*<|eot_id|>"):
        ChatTokenizer(bare, "llama3")
    upper = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}")
    with pytest.raises(DataError, match="does not appear verbatim"):
        tokenize_conversation(upper, CONV1, max_length=64)


# ---------------------------------------------------------------------------
# token store
# ---------------------------------------------------------------------------

def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(1, 30))
        out.append((rng.integers(0, 1000, L).astype(np.int32), (rng.random(L) < 0.5).astype(np.uint8)))
    return out


def test_token_store_roundtrip(tmp_path):
    samples = _samples(25)
    path = write_token_store(str(tmp_path / "store"), samples, max_length=64, target="t", chat_template="c",
                             sources=["a.jsonl"])
    store = TokenStore(path, verify=True)
    assert len(store) == 25
    np.testing.assert_array_equal(store.lengths, [len(s[0]) for s in samples])
    for i, (ids, mask) in enumerate(samples):
        got = store[i]
        assert got["input_ids"].dtype == np.int32 and got["loss_mask"].dtype == np.uint8
        np.testing.assert_array_equal(got["input_ids"], ids)
        np.testing.assert_array_equal(got["loss_mask"], mask)
    np.testing.assert_array_equal(store[-1]["input_ids"], samples[-1][0])
    assert isinstance(store.input_ids, np.memmap)
    m = store.manifest
    assert (m["num_samples"], m["num_tokens"], m["num_supervised"]) == (
        25, sum(len(s[0]) for s in samples), sum(int(s[1].sum()) for s in samples))
    assert (m["target"], m["chat_template"], m["sources"], m["max_length"]) == ("t", "c", ["a.jsonl"], 64)
    with pytest.raises(IndexError):
        store[25]
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        TokenStoreWriter(path, max_length=64)


def test_token_store_atomic_and_corruption(tmp_path):
    path = str(tmp_path / "store")
    with pytest.raises(RuntimeError):
        with TokenStoreWriter(path, max_length=64) as w:
            w.add(*_samples(1)[0])
            raise RuntimeError("crash")
    assert not os.path.exists(path) and not os.listdir(tmp_path)  # nothing left behind
    write_token_store(path, _samples(5), max_length=64)
    write_token_store(path, _samples(3, seed=1), max_length=64, overwrite=True)
    assert len(TokenStore(path)) == 3 and sorted(os.listdir(tmp_path)) == ["store"]

    with open(os.path.join(path, "input_ids.npy"), "r+b") as f:  # truncated data file
        f.truncate(os.path.getsize(os.path.join(path, "input_ids.npy")) - 8)
    with pytest.raises(DataError, match="input_ids.npy"):
        TokenStore(path)
    write_token_store(path, _samples(3, seed=1), max_length=64, overwrite=True)
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    json.dump({**m, "num_samples": 4}, open(mpath, "w"))
    with pytest.raises(DataError, match="offsets.npy"):
        TokenStore(path)
    json.dump({**m, "num_supervised": m["num_supervised"] + 1}, open(mpath, "w"))
    TokenStore(path)
    with pytest.raises(DataError, match="loss_mask.npy.*corrupt"):
        TokenStore(path, verify=True)
    os.remove(mpath)
    with pytest.raises(DataError, match="manifest.json: missing"):
        TokenStore(path)


# ---------------------------------------------------------------------------
# the tokenisation CLI
# ---------------------------------------------------------------------------

def _write_jsonl(path, lines):
    with open(path, "w") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")


def test_tokenize_files(tok, tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    _write_jsonl(a, [{"id": "x:1", "conversations": CONV1, "finish_reason": "stop"},
                     "{not json",
                     {"id": "x:3", "conversations": CONV2, "finish_reason": "length"}])
    _write_jsonl(b, [{"conversations": CONV1[:1]},  # no assistant turn: dropped
                     {"conversations": CONV2}])
    out = str(tmp_path / "tokens")
    msgs = []
    counts = tokenize_files([a, b], out, tok, max_length=4096, chat_template="chatml", on_error="skip",
                            report=msgs.append, progress=False, target_name="tiny")
    assert counts["samples"] == 3 and counts["dropped_no_loss"] == 1 and counts["skipped_errors"] == 1
    assert any(f"{a}:2" in m for m in msgs)
    store = TokenStore(out, verify=True)
    chat = ChatTokenizer(tok, "chatml")
    want = [chat(CONV1, 4096), chat(CONV2, 4096, supervise_last_end=False), chat(CONV2, 4096)]
    for i, (ids, mask) in enumerate(want):
        np.testing.assert_array_equal(store[i]["input_ids"], ids)
        np.testing.assert_array_equal(store[i]["loss_mask"], mask)
    assert store.manifest["sources"] == [a, b] and store.manifest["chat_template"] == "chatml"
    with pytest.raises(DataError, match=f"{a}:2"):
        tokenize_files([a], str(tmp_path / "t2"), tok, max_length=64, chat_template="chatml",
                       on_error="raise", progress=False)
    assert not os.path.exists(tmp_path / "t2")


@pytest.mark.slow  # a subprocess importing jax + transformers (~10 s)
def test_tokenize_cli(tok, tmp_path):
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    src = str(tmp_path / "a.jsonl")
    _write_jsonl(src, [{"conversations": CONV1}, "[1, 2]", {"conversations": CONV2}])
    out = str(tmp_path / "tokens")
    cmd = [sys.executable, "-m", "deepspec_jax.data.tokenize", f"--input={src}", f"--output={out}",
           f"--target={tok_dir}", "--max_length=30", "--chat_template=gemma"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{src}:2" in r.stderr and "wrote 2 samples" in r.stdout
    store = TokenStore(out)
    assert len(store) == 2 and store.lengths.max() == 30  # CONV2 truncated


# ---------------------------------------------------------------------------
# the real tokenizer of the embedded default target
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_mask_is_assistant_text_plus_im_end():
    from deepspec_jax.data.tokenize import load_tokenizer

    tok = load_tokenizer("smollm2-135m")  # GGUF tokenizer only, no weights
    chat = ChatTokenizer(tok)
    answer = "Sure! 12 * 7 = 84.\n\n```python\nprint(12 * 7)\n```\nThe answer is **84**."
    conv = [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": answer}]
    for c in (conv, [{"role": "system", "content": "Be brief."}] + conv + conv):
        ids, mask = chat(c, 4096)
        chat.verify(c)
        sup = mask.astype(bool)
        n_turns = sum(m["role"] == "assistant" for m in c)
        assert tok.decode(ids[sup]) == (answer + "<|im_end|>") * n_turns
        # each supervised run decodes to exactly one answer + <|im_end|>
        edges = np.flatnonzero(np.diff(np.r_[0, mask, 0]))
        runs = [tok.decode(ids[s:e]) for s, e in zip(edges[::2], edges[1::2])]
        assert runs == [answer + "<|im_end|>"] * n_turns
        prompt = tok.apply_chat_template(c[:-1], tokenize=True, return_dict=False, add_generation_prompt=True)
        assert list(ids[:len(prompt)]) == list(prompt)
        assert edges[-2] == len(prompt)  # the last answer starts right after the generation prompt
