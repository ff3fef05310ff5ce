"""Write float GGUF files (f32/f16/bf16) that llama.cpp loads: from a HF folder or a GGUF.

From a GGUF source every key/value pair is copied verbatim and only tensor bytes change, so
any architecture llama.cpp knows survives. From a HF folder, hyperparameters come from
config.json and tensor names from gguf-py's own name map.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import PocketError
from ..util.atomic import atomic_path
from .gguf_file import copy_metadata, finish_writer, open_gguf
from .gguf_tokenizer import add_hf_tokenizer_to_writer
from .hf_arch import arch_for, check_rope_scaling, interleave_rotary_rows, rope_theta
from .source import ModelSource, resolve

FLOAT_TYPES = ("f32", "f16", "bf16")
log = logging.getLogger(__name__)


def _ggml_type(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}[name]


def _file_type(name: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16}[name]


def encode_float(values: np.ndarray, dtype: str) -> tuple[np.ndarray, object]:
    """Tensor bytes (as uint8 rows) and their ggml type. 1-D tensors (norms, biases) stay f32,
    as llama.cpp keeps them."""
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1 or dtype == "f32":
        return values, gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    import torch

    as_bf16 = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint8).numpy()
    return as_bf16, gguf.GGMLQuantizationType.BF16


def _add_encoded(writer, name: str, data: np.ndarray, ggml_type) -> None:
    if data.dtype in (np.float32, np.float16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=ggml_type)


def export_gguf(source, out: str | Path, dtype: str = "f16") -> Path:
    if dtype not in FLOAT_TYPES:
        raise PocketError(f"unknown --type {dtype!r} (choose one of {', '.join(FLOAT_TYPES)})")
    src = resolve(source)
    out = Path(out)
    with atomic_path(out) as tmp:
        if src.is_gguf:
            _retype_gguf(src, tmp, dtype)
        else:
            _convert_hf(src, tmp, dtype)
    return out


def cached_gguf(source, dtype: str) -> Path:
    """A GGUF path for any source: GGUF files as they are, HF folders converted once to
    `dtype` and cached by content (so an edited folder gets a fresh conversion)."""
    from ..util.cache import cache_dir, model_content_hash

    src = resolve(source)
    if src.is_gguf:
        return src.path
    path = cache_dir() / "gguf" / f"{model_content_hash(src)[:24]}.{dtype}.gguf"
    if not path.exists():
        log.info("converting %s to GGUF (cached at %s)", src.path, path)
        export_gguf(src, path, dtype)
    return path


def _retype_gguf(src: ModelSource, tmp: Path, dtype: str) -> None:
    import gguf
    from gguf.quants import dequantize

    reader = open_gguf(src.path)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(tmp, arch)
    copy_metadata(reader, writer, skip=("general.file_type",))
    writer.add_file_type(_file_type(dtype))
    for t in tqdm(reader.tensors, desc=f"export {dtype}", unit="tensor", leave=False):
        shape = tuple(int(x) for x in reversed(t.shape))
        values = dequantize(t.data, t.tensor_type).reshape(shape)
        data, ggml_type = encode_float(values, dtype)
        _add_encoded(writer, t.name, data, ggml_type)
    finish_writer(writer)


def _convert_hf(src: ModelSource, tmp: Path, dtype: str) -> None:
    import gguf
    from transformers import AutoConfig

    from .load import load_hf_state_dict

    cfg = AutoConfig.from_pretrained(src.path)
    cfg = getattr(cfg, "text_config", None) or cfg
    spec = arch_for(cfg.model_type)
    check_rope_scaling(cfg)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf_arch)
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    writer = gguf.GGUFWriter(tmp, spec.gguf_arch)
    writer.add_name(src.path.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if spec.writes_head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.gguf_arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_file_type(_file_type(dtype))
    add_hf_tokenizer_to_writer(writer, src.path, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    state = load_hf_state_dict(src.path)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in tqdm(state.items(), desc=f"export {dtype}", unit="tensor", leave=False):
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name.removeprefix("model.language_model.").removeprefix("language_model."),
                                   try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PocketError(f"no GGUF name for tensor {hf_name} of architecture {cfg.model_type}")
        values = tensor.float().numpy()
        if spec.permute_qk and hf_name.endswith("q_proj.weight"):
            values = interleave_rotary_rows(values, n_heads)
        elif spec.permute_qk and hf_name.endswith("k_proj.weight"):
            values = interleave_rotary_rows(values, n_kv)
        if spec.norm_plus_one and hf_name.endswith("norm.weight"):
            values = values + 1.0
        data, ggml_type = encode_float(values, dtype)
        _add_encoded(writer, gguf_name, data, ggml_type)
    finish_writer(writer)
