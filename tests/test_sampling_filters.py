"""top-k / top-p thresholds by bisection equal the sort-based definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspec_jax.sampling import SamplingParams, processed_logits


def sorted_reference(logits, sp):
    x = np.asarray(logits, np.float64) / sp.temperature
    keep = np.ones_like(x, bool)
    for r in range(x.shape[0]):
        row = x[r]
        if sp.top_k:
            keep[r] &= row >= np.sort(row)[::-1][sp.top_k - 1]
        if sp.top_p < 1:
            z = np.where(keep[r], row, -np.inf)
            p = np.exp(z - z.max()); p /= p.sum()
            above = np.array([p[p > v].sum() for v in p])  # mass strictly above each token
            keep[r] &= above < sp.top_p
    return keep


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("sp", [SamplingParams(0.7, 0, 0.9), SamplingParams(1.0, 20, 1.0),
                                SamplingParams(0.5, 50, 0.8), SamplingParams(1.0, 1, 1.0),
                                SamplingParams(1.0, 0, 0.05)])
def test_filters_match_sorted_definition(scale, sp):
    x = jax.random.normal(jax.random.key(3), (6, 700)) * scale
    x = x.at[:, 5:9].set(x[:, 4:5])  # exact ties
    got = np.isfinite(np.asarray(processed_logits(x, sp)))
    np.testing.assert_array_equal(got, sorted_reference(x, sp))


def test_filters_keep_negative_and_infinite_logits_ordered():
    x = jnp.array([[-1e30, -3.0, -jnp.inf, -2.5, 0.0, 7.0]])
    kept = np.isfinite(np.asarray(processed_logits(x, SamplingParams(1.0, 3, 1.0))))
    np.testing.assert_array_equal(kept[0], [False, False, False, True, True, True])
