"""Output folders: paths kept inside their root, and files written atomically.

Case identifiers come from DICOM headers and user tables; they are never
trusted as path components without :func:`inside`.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of an identifier (no separators, no leading dots)."""
    name = _UNSAFE.sub("_", str(text)).lstrip(".")
    if not name:
        raise ValueError(f"identifier {text!r} gives an empty file name")
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """``root/parts...``, refusing any result outside ``root`` (``..``, absolute parts, links)."""
    root_path = Path(root).resolve()
    path = root_path.joinpath(*parts).resolve()
    if path != root_path and root_path not in path.parents:
        raise ValueError(f"output path {path} would leave the output folder {root_path}")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write via a temporary file in the same folder and rename: readers see the
    old file or the new one, never half of one (a killed worker loses nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)
