"""Shared test helpers: fixture-set discovery (env DEEPSPEC_FIXTURES)."""

from __future__ import annotations

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES_ROOT = os.environ.get("DEEPSPEC_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))


def fixture_sets() -> list[str]:
    """Every directory under the fixtures root holding a manifest.json."""
    out = []
    for dirpath, _, files in os.walk(FIXTURES_ROOT):
        if "manifest.json" in files:
            out.append(os.path.abspath(dirpath))
    return sorted(out)


def load_manifest(fixture_set: str) -> dict:
    with open(os.path.join(fixture_set, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixture_set_dirs() -> list[str]:
    sets = fixture_sets()
    if not sets:
        raise RuntimeError(f"no fixture set (a directory with manifest.json) under {FIXTURES_ROOT}; "
                           "set DEEPSPEC_FIXTURES to the fixtures directory.")
    return sets
