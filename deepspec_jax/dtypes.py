"""The one table of dtype names used across the package (checkpoints, loaders, CLIs).

Names are numpy's (``"float32"``, ``"bfloat16"`` via ml_dtypes, ...); HF configs'
short aliases (``"bf16"``, ``"fp32"``, ...) map onto them. ``COMPUTE_DTYPES`` are the
names a model may compute in.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Aliases HF configs use for the same dtypes.
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "float": "float32"}


def dtype_name(dt) -> str:
    """The table's name of a dtype, dtype name or alias (numpy's name outside the table)."""
    dt = np_dtype(dt) if isinstance(dt, str) else np.dtype(dt)
    for name, d in DTYPES.items():
        if d == dt:
            return name
    return dt.name


def np_dtype(name: str) -> np.dtype:
    """The dtype of a table name or alias, or of any other name numpy knows."""
    name = ALIASES.get(name, name)
    return DTYPES[name] if name in DTYPES else np.dtype(name)


def parse_dtype(dtype, what: str = "dtype") -> np.dtype | None:
    """``None``/"keep" -> None (keep stored dtypes); a name or numpy/jax dtype -> np.dtype.
    ValueError naming ``what`` for an unknown name."""
    if dtype is None or (isinstance(dtype, str) and dtype == "keep"):
        return None
    if isinstance(dtype, str):
        name = ALIASES.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"{what} must be 'keep' or one of {sorted(DTYPES)}, got {dtype!r}.")
        return DTYPES[name]
    return np.dtype(dtype)


def compute_dtype(dtype, what: str = "dtype") -> np.dtype:
    """A dtype a model computes in (one of ``COMPUTE_DTYPES``, by name or dtype)."""
    dt = parse_dtype(dtype, what) if dtype is not None else None
    if dt is None or dtype_name(dt) not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}.")
    return dt


def castable(dtype) -> bool:
    """Whether a parameter of this dtype follows a load/export dtype cast: floating ones
    only (a reduced-vocabulary draft's d2t/t2d index buffers never change dtype)."""
    dt = np.dtype(dtype)
    return bool(np.issubdtype(dt, np.floating) or dt == DTYPES["bfloat16"])
