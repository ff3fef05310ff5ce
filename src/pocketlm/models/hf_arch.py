"""How each supported Hugging Face architecture maps onto llama.cpp's GGUF conventions.

Facts about llama.cpp's layouts live here and nowhere else:
- Llama/Mistral: llama.cpp applies rotary embeddings to adjacent pairs, HF to split halves,
  so Q and K rows are interleaved back when writing (and transformers undoes it on load).
- Gemma: HF stores RMSNorm weights as w with the norm computing x * (1 + w); llama.cpp
  multiplies by the stored weight, so GGUF holds 1 + w.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PocketError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # llama.cpp's architecture name
    permute_qk: bool = False
    norm_plus_one: bool = False
    writes_head_dim: bool = False  # head_dim need not equal hidden/heads (Qwen3, Gemma 3)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3", writes_head_dim=True),
    "gemma3_text": ArchSpec("gemma3", norm_plus_one=True, writes_head_dim=True),
}
SUPPORTED_GGUF_ARCHS = {"llama", "qwen2", "qwen3", "gemma3"}


def arch_for(model_type: str) -> ArchSpec:
    spec = ARCHS.get(model_type)
    if spec is None:
        raise PocketError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHS))})"
        )
    return spec


def interleave_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's [first half | second half] to adjacent pairs."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def deinterleave_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of interleave_rotary_rows (GGUF layout back to HF's)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # Gemma 3: one set per layer kind
        params = params["full_attention"]
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def check_rope_scaling(cfg) -> None:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default", "linear"):
        raise PocketError(f"rope scaling type {kind!r} is not supported by the GGUF exporter yet")
