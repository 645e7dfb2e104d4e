"""Eagle3 draft (1 layer, training-time test unrolled 7 steps) for Qwen/Qwen3-8B:
the reference hyper-parameters.

Run (override the placeholder paths)::

    python -m deepspec_jax.train --config=configs/eagle3/eagle3_qwen3_8b.py \
        --config.target.path=/models/Qwen3-8B \
        --config.data.train="('data/qwen3_8b/tokens',)"

Reference: deepseek-ai/DeepSpec ``config/eagle3/eagle3_qwen3_8b.py``. configs/_recipes.py
(``reference_config``) sets its values with their sources, configs/_targets.py the target's.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)

REF = "config/eagle3/eagle3_qwen3_8b.py"  # in deepseek-ai/DeepSpec


def get_config():
    return _recipes.reference_config("eagle3", "qwen3_8b")
