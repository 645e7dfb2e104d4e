"""Atomic file writes: the one way the package writes a file that readers may open.

A reader (a resumed run, a test, the next session's loader) sees either the old file or
the whole new one, never a torn one: the bytes go to a temporary file in the same
directory (unique per process), are fsynced, and replace the target in one rename.
``sync_dir`` also fsyncs the directory, for files that mark other files complete
(manifests), so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def write_bytes(path: str, data: bytes | Iterable[bytes], sync_dir: bool = False) -> str:
    """Writes ``data`` (bytes, or an iterable of chunks) to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if sync_dir:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_text(path: str, text: str, sync_dir: bool = False) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def write_json(path: str, obj: Any, sync_dir: bool = False, **dumps_kwargs) -> str:
    """Writes ``json.dumps(obj, **dumps_kwargs)`` and a newline to ``path`` atomically."""
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n", sync_dir=sync_dir)
