"""The timing loop shared by the micro-benchmarks: median wall time of a jitted call."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after one untimed call
    (compile and warm-up); every call waits for its results."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
