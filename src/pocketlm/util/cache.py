"""Where derived artifacts are cached, and the content key they are cached under."""
from __future__ import annotations

import os
from pathlib import Path

from .hashing import file_sha256, tree_sha256


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm")


def model_content_hash(src) -> str:
    """Keyed by bytes, not path: a copied or renamed model still hits the cache."""
    return file_sha256(src.path) if src.is_gguf else tree_sha256(src.path)
