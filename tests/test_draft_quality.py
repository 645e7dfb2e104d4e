"""Quality guard of the shipped default draft: greedy acceptance on held-out samples.

Reruns the recorded command (``deepspec_jax/assets/default_draft_quality.json``, written
by ``scripts/record_draft_quality.py``) and requires the mean acceptance length over the
datasets to stay within the recorded tolerance (0.1) of the recorded value: a code change
that degrades drafting, or a re-shipped draft that was not re-recorded, fails here.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO


def _recorder():
    spec = importlib.util.spec_from_file_location(
        "record_draft_quality", os.path.join(REPO, "scripts", "record_draft_quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_default_draft_acceptance_matches_record(tmp_path):
    rec_mod = _recorder()
    rec = rec_mod.load_recorded()
    got = rec_mod.measure(rec["eval_args"], str(tmp_path))
    assert got["num_samples"] == rec["num_samples"]
    assert got["mean_acceptance_length"] == pytest.approx(
        rec["mean_acceptance_length"], abs=rec["tolerance"]), (got, rec)
    assert rec["mean_acceptance_length"] > 1.0      # the record itself is a working draft
