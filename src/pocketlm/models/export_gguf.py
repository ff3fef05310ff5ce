"""Write float GGUF files (f32/f16/bf16) that llama.cpp loads: from a HF folder or a GGUF.

From a GGUF source every key/value pair is copied verbatim and only tensor bytes change, so
any architecture llama.cpp knows survives. From a HF folder, hyperparameters come from
ModelFacts and tensor names from gguf-py's own name map. Tensors are read lazily and
streamed into the output (models/tensors.py, models/gguf_stream.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import PocketError
from ..util.atomic import atomic_path
from .gguf_file import copy_metadata
from .gguf_stream import StreamingGGUF, check_disk_space, row_blocks
from .gguf_tokenizer import add_hf_tokenizer_to_writer
from .hf_arch import check_rope_scaling, rope_theta
from .source import ModelSource, resolve
from .tensors import open_tensors

FLOAT_TYPES = ("f32", "f16", "bf16")
log = logging.getLogger(__name__)


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


def export_gguf(source, out: str | Path, dtype: str = "f16", progress: bool = True) -> Path:
    """Tensor by tensor, a block of rows at a time: memory holds one block, disk the output."""
    if dtype not in FLOAT_TYPES:
        raise PocketError(f"unknown --type {dtype!r} (choose one of {', '.join(FLOAT_TYPES)})")
    ts = open_tensors(source)
    if not ts.source.is_gguf:
        ts.check_shapes()
    if ts.source.is_gguf:  # the copied file type is replaced, at the end as before
        writer = metadata_writer(ts, skip=("general.file_type",))
        writer.add_file_type(_file_type(dtype))
    else:
        writer = metadata_writer(ts, dtype=dtype)
    out = Path(out)
    with atomic_path(out) as tmp:
        stream = StreamingGGUF(tmp, writer)
        types = {n: _float_type(dtype, ts.shape(n)) for n in ts.names}
        for name in ts.names:
            stream.add_tensor_info(name, types[name], ts.shape(name))
        check_disk_space(out, stream.total_bytes())
        stream.begin()
        try:
            for name in tqdm(ts.names, desc=f"export {dtype}", unit="tensor", leave=False, disable=not progress):
                at = 0
                for rows in row_blocks(ts.shape(name)):
                    data, _ = encode_float(ts.values(name, rows), dtype)
                    stream.write(name, data, at)
                    at += data.nbytes
            stream.finish()
        finally:
            stream.close()
    return out


def _float_type(dtype: str, shape) -> str:
    return "F32" if len(shape) == 1 or dtype == "f32" else dtype.upper()


def cached_gguf(source, dtype: str) -> Path:
    """A GGUF path for any source: GGUF files as they are, HF folders converted once to
    `dtype` and cached by content (so an edited folder gets a fresh conversion)."""
    from ..util.cache import cache_dir, code_version, drop_superseded, model_content_hash

    src = resolve(source)
    if src.is_gguf:
        return src.path
    path = cache_dir() / "gguf" / f"{model_content_hash(src)[:24]}-{code_version('models')}.{dtype}.gguf"
    if not path.exists():
        log.info("converting %s to GGUF (cached at %s)", src.path, path)
        export_gguf(src, path, dtype, progress=False)
        drop_superseded(path, suffix=f".{dtype}.gguf")
    return path


def header_bytes(ts) -> int:
    """Bytes before the tensor data in the float GGUF of this model (what a quantized file's
    header costs, within a few bytes)."""
    if ts.source.is_gguf:
        return int(ts.reader.data_offset)
    from .gguf_stream import header_size

    return header_size(metadata_writer(ts, dtype="f32"), [(n, "F32", ts.shape(n)) for n in ts.names])


def metadata_writer(ts, skip: tuple[str, ...] = (), dtype: str = "f32"):
    """A GGUFWriter holding the output's key/values (no file yet): a GGUF source's copied
    verbatim, a HF folder's built from its config and tokenizer as llama.cpp's converter does.
    Keys in `skip` are left out, so the caller adds its own at the end (the order the
    whole-file writer produced, kept so files stay byte-identical)."""
    import gguf

    if ts.source.is_gguf:
        writer = gguf.GGUFWriter(None, ts.facts.arch)
        copy_metadata(ts.reader, writer, skip=skip)
        return writer
    writer = _hf_metadata(ts.source, ts.facts, dtype)
    for key in skip:
        writer.kv_data[0].pop(key, None)
    return writer


def _hf_metadata(src: ModelSource, facts, dtype: str):
    import gguf

    from .facts import hf_config

    cfg = hf_config(src.path)
    cfg = getattr(cfg, "text_config", None) or cfg
    spec = facts.spec
    check_rope_scaling(cfg)
    writer = gguf.GGUFWriter(None, spec.gguf_arch)
    writer.add_name(src.path.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(facts.hidden)
    writer.add_block_count(facts.n_layers)
    writer.add_feed_forward_length(facts.ffn)
    writer.add_head_count(facts.n_heads)
    writer.add_head_count_kv(facts.n_kv_heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(facts.vocab)
    writer.add_rope_dimension_count(facts.head_dim)
    if spec.writes_head_dim:
        writer.add_key_length(facts.head_dim)
        writer.add_value_length(facts.head_dim)
    if spec.gguf_arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_file_type(_file_type(dtype))
    add_hf_tokenizer_to_writer(writer, src.path, facts.vocab)
    return writer
