"""Where derived artifacts are cached, and the content key they are cached under."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .hashing import file_sha256, tree_sha256


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm")


def model_content_hash(src) -> str:
    """Keyed by bytes, not path: a copied or renamed model still hits the cache."""
    return file_sha256(src.path) if src.is_gguf else tree_sha256(src.path)


# The libraries whose arithmetic or parsing ends up in cached values.
LIBRARIES = ("numpy", "torch", "transformers", "tokenizers", "gguf", "llama_cpp_python")


@functools.cache
def code_version(*parts: str) -> str:
    """What produced a cached value, as far as code goes: the source of pocketlm's named
    subpackages or modules ("quantize", "models/load") and the versions of the libraries above.
    A hash of the source, not a version number: nobody forgets to bump it, and an edit that
    changes nothing it hashes (another subpackage) keeps the caches it does not feed."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in sorted(parts):
        where = root / part
        files = sorted(where.rglob("*.py")) if where.is_dir() else [where.with_suffix(".py")]
        if not files or not files[0].exists():
            raise ValueError(f"no pocketlm source at {part!r}")
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    for lib, v in library_versions(LIBRARIES).items():
        digest.update(f"{lib}={v}".encode())
    return digest.hexdigest()[:16]


def library_versions(names) -> dict:
    """Installed version of each distribution, None where it is absent."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def drop_superseded(entry: Path, suffix: str = "") -> int:
    """Removes the entries beside `entry` made from the same source by other code.

    Entries are named "<source digest>-<code version><suffix>" (the digest a fixed-length hex
    string, so no other source's name starts with it). Once the code version in the key has
    moved on, an older entry can never be read again, and each may be a whole model's float
    copy or gigabytes of reference log-probs: left alone they filled 34 GB here in a day.
    Returns how many were removed."""
    source = entry.name.split("-")[0]
    removed = 0
    for old in entry.parent.glob(f"{source}*{suffix}"):
        if old == entry or old.name.startswith("."):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        removed += 1
    return removed
