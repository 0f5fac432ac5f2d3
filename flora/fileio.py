"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file in the same directory (so the rename
stays on one file system), is fsynced, then ``os.replace``d over ``path``;
on any failure the temporary file is removed and ``path`` is untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (``indent``) plus a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
