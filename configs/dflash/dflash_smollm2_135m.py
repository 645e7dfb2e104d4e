"""DFlash draft for SmolLM2-135M-Instruct, sized for a 2-core CPU.

Run::

    python -m deepspec_jax.train --config=configs/dflash/dflash_smollm2_135m.py

The sizes shared by the three SmolLM2 drafts, and why, are in configs/_recipes.py
(``smollm2_config``): float32, cached target features, 512 tokens, one draft layer, block
4 with 48 anchors, the reference's heads, loss and optimiser.

DFlash specifics: the DSpark run's sizes and batch (4 sequences, ~38 MB of fp32 block
logits each) without the Markov and confidence heads and with the reference's CE-only
loss, so the two drafts differ in what DSpark adds; 3 passes over the cached features.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)


def get_config():
    return _recipes.smollm2_config("dflash", batch_size=4, num_epochs=2)
