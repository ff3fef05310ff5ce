"""Reference top-k log-probs, computed once per (reference, tokens, scheme) and cached on disk.

Comparing ten quantized files against one original then costs one reference pass.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.atomic import atomic_path
from ..util.hashing import array_sha256, file_sha256, tree_sha256
from ..models.source import ModelSource

DEFAULT_TOPK = 256


def cache_dir() -> Path:
    base = os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm"
    return Path(base)


def model_content_hash(src: ModelSource) -> str:
    """Keyed by bytes, not path: a copied or renamed model still hits the cache."""
    if src.is_gguf:
        return file_sha256(src.path)
    return tree_sha256(src.path)


@dataclass
class ReferenceLogits:
    top_logp: np.ndarray  # (n_windows, ctx-1, k) float32
    top_idx: np.ndarray  # (n_windows, ctx-1, k) int32
    nll: np.ndarray  # (n_windows, ctx-1) the reference's own loss on the targets


def reference_key(src: ModelSource, inputs: np.ndarray, k: int, backend: str) -> str:
    return array_sha256(
        np.frombuffer(model_content_hash(src).encode(), dtype=np.uint8),
        inputs,
        np.frombuffer(f"{k}|{backend}".encode(), dtype=np.uint8),
    )[:32]


def load_cached(key: str) -> ReferenceLogits | None:
    path = cache_dir() / "reference" / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            return ReferenceLogits(z["top_logp"], z["top_idx"], z["nll"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is recomputed, never trusted


def store(key: str, ref: ReferenceLogits, about: dict) -> None:
    folder = cache_dir() / "reference"
    with atomic_path(folder / f"{key}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, top_logp=ref.top_logp, top_idx=ref.top_idx, nll=ref.nll)
    with atomic_path(folder / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(about, indent=2))
