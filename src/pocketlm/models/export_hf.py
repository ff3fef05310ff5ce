"""Write a Hugging Face folder (config, safetensors, tokenizer) that transformers loads."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PocketError
from ..util.atomic import atomic_path
from .gguf_tokenizer import SIDECAR
from .load import LoadedModel, load

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def save_hf(loaded: LoadedModel, out: str | Path, dtype: str = "f32", extra_files: dict[str, str] | None = None) -> Path:
    import torch

    if dtype not in HF_DTYPES:
        raise PocketError(f"unknown --type {dtype!r} for a HF folder (choose one of {', '.join(HF_DTYPES)})")
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        model = loaded.model.to(getattr(torch, HF_DTYPES[dtype]))
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        if loaded.gguf_tokenizer:
            (tmp / SIDECAR).write_text(json.dumps(loaded.gguf_tokenizer))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def export_hf(source, out: str | Path, dtype: str = "f32") -> Path:
    return save_hf(load(source), out, dtype)
