"""Eagle3 draft (1 layer, training-time test unrolled 7 steps) for google/gemma-4-12B-it:
the reference hyper-parameters. The checkpoint's config.json is model_type
``gemma4_unified`` (deepspec_jax.config reads ``gemma4`` / ``gemma4_text``; see
configs/_targets.py and docs/BENCHMARKS.md's planning rows).

Run (override the placeholder paths)::

    python -m deepspec_jax.train --config=configs/eagle3/eagle3_gemma4_12b.py \
        --config.target.path=/models/Gemma-4-12B-it \
        --config.data.train="('data/gemma4_12b/tokens',)"

Reference: deepseek-ai/DeepSpec ``config/eagle3/eagle3_gemma4_12b.py``. configs/_recipes.py
(``reference_config``) sets its values with their sources, configs/_targets.py the target's.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)

REF = "config/eagle3/eagle3_gemma4_12b.py"  # in deepseek-ai/DeepSpec


def get_config():
    return _recipes.reference_config("eagle3", "gemma4_12b")
