"""DSpark draft (block drafter + Markov head + confidence head) for Qwen/Qwen3-4B:
the reference hyper-parameters.

Run (override the placeholder paths)::

    python -m deepspec_jax.train --config=configs/dspark/dspark_qwen3_4b.py \
        --config.target.path=/models/Qwen3-4B \
        --config.data.train="('data/qwen3_4b/tokens',)"

Reference: deepseek-ai/DeepSpec ``config/dspark/dspark_qwen3_4b.py``. configs/_recipes.py
(``reference_config``) sets its values with their sources, configs/_targets.py the target's.
"""

import importlib.util
import pathlib

# configs/ is not a package: load the shared recipes (configs/_recipes.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_recipes", pathlib.Path(__file__).resolve().parents[1] / "_recipes.py")
_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipes)

REF = "config/dspark/dspark_qwen3_4b.py"  # in deepseek-ai/DeepSpec


def get_config():
    return _recipes.reference_config("dspark", "qwen3_4b")
