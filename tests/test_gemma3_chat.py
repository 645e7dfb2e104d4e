"""The Gemma-3-270M GGUF ships no chat template and names only ``<eos>`` as EOS; the target
loader fills in Gemma-3's template and ``<end_of_turn>`` stop (deepspec_jax/target.py
``_gemma3_chat_defaults``), without which chat prompts cannot be rendered and generation
runs past the end of the answer. Tokenizer and config only (no weights)."""

from __future__ import annotations

from deepspec_jax import target as target_mod
from deepspec_jax.config import target_config_from_dict
from deepspec_jax.target import gemma3_gguf_path
from deepspec_jax.weights.gguf_loader import _gemma3_config, gguf_tokenizer, open_gguf


def test_gemma3_gguf_gets_chat_template_and_end_of_turn_stop():
    path = gemma3_gguf_path()
    reader = open_gguf(path)
    raw = _gemma3_config(reader, path, {t.name for t in reader.tensors})  # no dequantizing
    tok = gguf_tokenizer(path, reader)
    target_mod._gemma3_chat_defaults(tok, raw)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    # google/gemma-3-270m-it's template: <bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n
    assert tok.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ids.count(tok.bos_token_id) == 1
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot == 106
    assert target_config_from_dict(raw, path).eos_token_ids == (1, 106)
    assert target_mod._stop_ids_from(raw, None, tok) == (1, 106)
