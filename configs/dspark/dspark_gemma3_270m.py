"""DSpark draft for Gemma-3-270M-it, a brief run sized for a shared 2-core CPU.

Run (after the data stages of scripts/train_gemma3_draft.sh)::

    python -m deepspec_jax.train --config=configs/dspark/dspark_gemma3_270m.py

The sizes, and why, are in configs/_recipes.py (``gemma3_270m_config``): float32, cached
target features, 256 tokens, one draft layer, block 4 with 16 anchors, the reference's
heads, loss and optimiser. The [64, 262144] fp32 block logits are ~67 MB per sequence,
so 4 sequences per optimizer step, 2 passes over the few hundred cached sequences: a
brief run that shows the pipeline end to end, not a tuned draft. The Markov head
(rank 32, gated) and confidence head are as in the SmolLM2 DSpark config.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)


def get_config():
    return _recipes.gemma3_270m_config("dspark", batch_size=4, num_epochs=2,
                                       markov_rank=32, markov_head_type="gated")
