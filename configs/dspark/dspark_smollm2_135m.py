"""DSpark draft for SmolLM2-135M-Instruct, sized for a 2-core CPU.

Run::

    python -m deepspec_jax.train --config=configs/dspark/dspark_smollm2_135m.py

The sizes shared by the three SmolLM2 drafts, and why, are in configs/_recipes.py
(``smollm2_config``): float32, cached target features, 512 tokens, one draft layer, block
4 with 48 anchors, the reference's heads, loss and optimiser.

DSpark specifics: the [192, 49152] fp32 block logits stay ~38 MB per sequence, so one
micro-batch of 4 sequences per optimizer step fits; 6 passes over the cached features. A
gated Markov head of rank 32 (~3.2 M parameters, 2 x 49152 x 32, against the reference's
256 for 151k-token vocabularies) adds the prefix-dependent bias that DSpark's gain over
DFlash comes from, and the gate lets it depend on the draft hidden state. The confidence
head is on (with the Markov feature, as in the reference) so the eval can report
calibration.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)


def get_config():
    return _recipes.smollm2_config("dspark", batch_size=4, num_epochs=6,
                                   markov_rank=32, markov_head_type="gated")
