"""Eagle3 draft for SmolLM2-135M-Instruct, sized for a 2-core CPU.

Run::

    python -m deepspec_jax.train --config=configs/eagle3/eagle3_smollm2_135m.py

The sizes shared by the three SmolLM2 drafts, and why, are in configs/_recipes.py
(``smollm2_config``): float32, cached target features, 512 tokens, one draft layer, the
reference's loss and optimiser.

Eagle3 specifics: TTT length 4 (the reference's 7), the block drafts' block size,
with the reference's step decay 0.8. TTT unrolls the draft 4 times over all 512
positions, so one sequence produces 4 x [512, 49152] fp32 logits (~400 MB, twice that
with the softmaxes kept for the backward pass): batches of 2 sequences keep peak memory
near 2 GB; one pass over the cached features.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)


def get_config():
    return _recipes.smollm2_config("eagle3", batch_size=2, num_epochs=1, ttt_length=4)
