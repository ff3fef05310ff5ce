"""Load any supported source into a torch model + tokenizer, offline.

GGUF files go through transformers' GGUF loader, which dequantizes every tensor to float32;
the GGUF's tokenizer keys are kept beside the model so an export can restore them exactly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PocketError
from ..util.cache import drop_superseded
from .gguf_file import fast_gguf_for_transformers, field_value, open_gguf
from .gguf_tokenizer import SIDECAR, match_llamacpp_pre_tokenizer, sidecar_from_reader
from .hf_arch import ARCHS, SUPPORTED_GGUF_ARCHS
from .source import ModelSource, resolve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
LOAD_META = "pocketlm_load.json"  # what the GGUF said that a HF folder cannot (add_bos)

if TYPE_CHECKING:  # importing transformers takes seconds; the CLI's light commands never need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    source: ModelSource
    model: PreTrainedModel  # eval mode
    tokenizer: PreTrainedTokenizerBase
    gguf_tokenizer: dict | None = None  # tokenizer.* keys of the source GGUF, if any
    meta: dict = field(default_factory=dict)

    @property
    def add_bos(self) -> bool:
        return bool(self.meta.get("add_bos"))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load(source, dtype: str = "float32") -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    src = resolve(source)
    torch_dtype = getattr(torch, dtype)
    if src.is_gguf:
        return _load_gguf(src, torch_dtype)
    from .tensors import open_tensors

    open_tensors(src).check_shapes()  # transformers' own errors on a damaged folder are tracebacks
    config = json.loads((src.path / "config.json").read_text())
    model_type = (config.get("text_config") or config).get("model_type", config.get("model_type"))
    if model_type not in ARCHS:
        raise PocketError(f"unsupported architecture {model_type!r} in {src.path} (supported: {', '.join(sorted(ARCHS))})")
    side = src.path / SIDECAR
    sidecar = json.loads(side.read_text()) if side.exists() else None
    tokenizer = AutoTokenizer.from_pretrained(src.path)
    match_llamacpp_pre_tokenizer(tokenizer, sidecar)  # folders pocketlm wrote before this fix
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype)
    add_bos = _hf_adds_bos(tokenizer, sidecar)
    model.eval()
    return LoadedModel(src, model, tokenizer, sidecar, {"add_bos": add_bos})


def _gguf_cache_folder(src: ModelSource) -> Path:
    from ..util.cache import cache_dir, code_version, model_content_hash

    code = code_version("models/load", "models/gguf_file", "models/gguf_tokenizer", "models/hf_arch")
    return cache_dir() / "hf-from-gguf" / f"{model_content_hash(src)[:24]}-{code}"


def hf_folder(source) -> Path:
    """A HF folder holding the model: the folder itself, or for a GGUF its cached HF copy."""
    src = resolve(source)
    if not src.is_gguf:
        return src.path
    folder = _gguf_cache_folder(src)
    if not (folder / LOAD_META).exists():
        _build_gguf_cache(src, folder)
    return folder


def load_tokenizer(source) -> tuple[object, bool]:
    """(tokenizer, whether llama.cpp adds BOS) without loading any weights."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    src = resolve(source)
    folder = hf_folder(src)
    side = folder / SIDECAR
    sidecar = json.loads(side.read_text()) if side.exists() else None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    match_llamacpp_pre_tokenizer(tokenizer, sidecar)
    if src.is_gguf:
        return tokenizer, bool(json.loads((folder / LOAD_META).read_text()).get("add_bos"))
    return tokenizer, _hf_adds_bos(tokenizer, sidecar)


def _build_gguf_cache(src: ModelSource, folder: Path) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..util.atomic import atomic_path

    reader = open_gguf(src.path)
    arch = field_value(reader, "general.architecture", "unknown")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise PocketError(f"unsupported architecture {arch!r} in {src.path} (supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))})")
    sidecar = sidecar_from_reader(reader)
    meta = {"add_bos": bool(field_value(reader, "tokenizer.ggml.add_bos_token", False))}
    del reader
    try:
        with fast_gguf_for_transformers():
            tokenizer = AutoTokenizer.from_pretrained(src.path.parent, gguf_file=src.path.name)
            match_llamacpp_pre_tokenizer(tokenizer, sidecar)
            model = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PocketError(f"transformers cannot load {src.path}: {exc}") from None
    _forget_gguf_origin(model)
    with atomic_path(folder, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar))
        (tmp / LOAD_META).write_text(json.dumps(meta))
    drop_superseded(folder)
    model.eval()
    return LoadedModel(src, model, tokenizer, sidecar, meta)


def _load_gguf(src: ModelSource, torch_dtype) -> LoadedModel:
    """transformers' GGUF loader parses the whole vocabulary several times and dequantizes
    every tensor (~50 s for SmolLM2 on 2 cores); the result is kept as a float32 HF folder
    keyed by the file's content, so later loads of the same file take seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache_folder(src)
    if not (folder / LOAD_META).exists():
        built = _build_gguf_cache(src, folder)
        if torch_dtype == torch.float32:
            return built
    sidecar = json.loads((folder / SIDECAR).read_text())
    meta = json.loads((folder / LOAD_META).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    match_llamacpp_pre_tokenizer(tokenizer, sidecar)  # caches written before this fix
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    model.eval()
    return LoadedModel(src, model, tokenizer, sidecar, meta)


def _forget_gguf_origin(model) -> None:
    """transformers tags GGUF-loaded models as quantized and then refuses to save them, though
    their weights are plain float tensors after loading; drop the tag."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr) and not callable(getattr(model, attr)):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


def _hf_adds_bos(tokenizer, sidecar: dict | None) -> bool:
    if sidecar and "tokenizer.ggml.add_bos_token" in sidecar:
        return bool(sidecar["tokenizer.ggml.add_bos_token"][0])
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id
