"""Content hashes that key caches: the same bytes give the same key wherever they live."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: str | os.PathLike) -> str:
    """Hash of every file's relative path and content, so renaming the folder keeps the key."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(folder)).encode())
            digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def array_sha256(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
