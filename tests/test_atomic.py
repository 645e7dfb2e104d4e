"""``deepspec_jax.atomic``: a failed write leaves the old file whole and no temporary."""

from __future__ import annotations

import json
import os

import pytest

from deepspec_jax import atomic


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "manifest.json")
    atomic.write_json(path, {"step": 1}, sync_dir=True)

    def chunks():
        yield b'{"step": '
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        atomic.write_bytes(path, chunks())
    with open(path) as f:
        assert json.load(f) == {"step": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_writes_create_the_directory_and_replace(tmp_path):
    path = str(tmp_path / "new" / "a.txt")
    atomic.write_text(path, "first")
    atomic.write_text(path, "second ü")
    with open(path, encoding="utf-8") as f:
        assert f.read() == "second ü"
    atomic.write_json(path, {"b": 1, "a": 2}, indent=1, sort_keys=True)
    with open(path) as f:
        assert f.read() == '{\n "a": 2,\n "b": 1\n}\n'
