"""Tensors by GGUF name, read lazily: one tensor (or a block of its rows) at a time.

A Hugging Face folder is read straight from its (sharded) safetensors by mmap, in bf16, f16 or
f32, and each tensor is turned into GGUF layout as it is read (llama.cpp's rotary row order,
Gemma's 1 + w norms); a GGUF file is read by mmap and dequantized row block by row block.
Nothing is converted ahead of time, so a 16 GB checkpoint costs no extra disk and only one
tensor's memory. The order of `names` is the order tensors are written to a GGUF, the same
order the whole-file conversion used, so files stay byte-identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PocketError
from .facts import ModelFacts
from .hf_arch import interleave_rotary_rows
from .source import ModelSource, resolve

FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # GGUF name
    shape: tuple[int, ...]  # (rows, cols) as torch and numpy see it
    type: str  # the stored type: "BF16", "F32", "Q4_1", ...
    key: str  # where it is: the HF name, or the GGUF name again


class TensorSource:
    facts: ModelFacts
    source: ModelSource
    entries: dict[str, TensorEntry]

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def values(self, name: str, rows: slice | None = None) -> np.ndarray:
        """float32 values in GGUF layout; `rows` reads only a block of rows."""
        raise NotImplementedError

    def n_params(self) -> int:
        return sum(int(np.prod(e.shape)) for e in self.entries.values())

    def check_shapes(self) -> None:
        """Every tensor the config implies, with the shape it implies; else one error line."""
        where = self.source.path
        for name, want in self.facts.expected_shapes().items():
            e = self.entries.get(name)
            if e is None:
                raise PocketError(f"{where}: tensor {name} is missing although the config implies it (shape {want})")
            if tuple(e.shape) != want:
                raise PocketError(f"{where}: tensor {name} ({e.key}) has shape {tuple(e.shape)}, the config implies {want}")


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsFile:
    """One safetensors file read with pread, not mmap: a mapped 16 GB checkpoint's touched pages
    count as the process's resident memory until the file is closed, so reading a model through
    mmap looked like holding all of it. The format is a length, a JSON header, then raw data."""

    DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

    def __init__(self, path: Path):
        import struct

        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self.base = 8 + n
            self.meta = {k: v for k, v in header.items() if k != "__metadata__"}
            self._check_layout(size - self.base)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise PocketError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None

    def _check_layout(self, data_bytes: int) -> None:
        """The rules of safetensors' own reader (which transformers uses later): every tensor's
        bytes match its shape and dtype, and the tensors tile the data region exactly, in order,
        with no gap, overlap or trailing bytes."""
        spans = []
        for name, info in self.meta.items():
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in self.DTYPES:
                raise ValueError(f"tensor {name} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name} has shape {shape!r}")
            if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != self.ITEM_BYTES[dtype] * _prod(shape):
                raise ValueError(f"tensor {name} ({dtype}, shape {shape}) has bytes {begin}..{end}")
            spans.append((begin, end, name))
        at = 0
        for begin, end, name in sorted(spans):
            if begin != at:
                raise ValueError(f"tensor {name} starts at byte {begin} of the data, not {at}")
            at = end
        if at != data_bytes:
            raise ValueError(f"the tensors cover {at} bytes of data, the file holds {data_bytes}")

    def keys(self) -> list[str]:
        return sorted(self.meta)  # the order safetensors' own reader lists them in

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in self.meta[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.meta[name]["dtype"]

    def read(self, name: str, rows: slice | None = None):
        import torch

        info = self.meta[name]
        dtype = getattr(torch, self.DTYPES[info["dtype"]])
        shape = list(self.shape(name))
        begin, end = info["data_offsets"]
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if f.readinto(buf) != len(buf):
                raise PocketError(f"{self.path}: tensor {name} is cut short")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class SafetensorsSource(TensorSource):
    def __init__(self, src: ModelSource, facts: ModelFacts | None = None):
        self.source = src
        self.facts = facts or ModelFacts.from_hf_folder(src.path)
        self._where: dict[str, SafetensorsFile] = {}
        self.files = [SafetensorsFile(f) for f in shard_files(src.path)]  # every shard, headers checked
        entries: dict[str, TensorEntry] = {}
        for handle in self.files:
            for hf_name in handle.keys():
                if self.facts.tied and hf_name == "lm_head.weight":
                    continue
                gname = self.facts.gguf_name(hf_name)
                if gname is None:
                    raise PocketError(f"no GGUF name for tensor {hf_name} of architecture {self.facts.model_type}")
                entries[gname] = TensorEntry(gname, handle.shape(hf_name), handle.dtype(hf_name), hf_name)
                self._where[hf_name] = handle
        self.entries = entries

    def hf_tensor(self, hf_name: str, rows: slice | None = None):
        """A tensor by its HF name, as stored (torch, the file's dtype)."""
        handle = self._where.get(hf_name)
        if handle is None:
            raise PocketError(f"{self.source.path} has no tensor {hf_name}")
        return handle.read(hf_name, rows)

    @property
    def hf_names(self) -> list[str]:
        return list(self._where)

    def values(self, name: str, rows: slice | None = None) -> np.ndarray:
        e = self.entries[name]
        heads = self.facts.permuted_heads(name)
        values = self.hf_tensor(e.key, None if heads else rows).float().numpy()
        if heads:  # the row interleave works on whole heads: read all, then slice
            values = interleave_rotary_rows(values, heads)
            values = values[rows] if rows is not None else values
        offset = self.facts.stored_offset(e.key)
        if offset:
            values = values + offset
        return np.ascontiguousarray(values, dtype=np.float32)


class GGUFSource(TensorSource):
    def __init__(self, src: ModelSource):
        from .gguf_file import open_gguf

        self.source = src
        self.reader = open_gguf(src.path)
        self.facts = ModelFacts.from_gguf(self.reader, str(src.path))
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.entries = {t.name: TensorEntry(t.name, tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name, t.name)
                        for t in self.reader.tensors}

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, (rows, bytes per row) uint8 for a matrix (a view of the file)."""
        data = np.asarray(self._tensors[name].data)
        return data.view(np.uint8).reshape(self.entries[name].shape[0], -1)

    def values(self, name: str, rows: slice | None = None) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = self.entries[name].shape
        data = t.data
        if rows is not None and len(shape) == 2:
            data = data.reshape(shape[0], -1)[rows]  # one row of blocks per tensor row
            shape = (data.shape[0], shape[1])
        return dequantize(data, t.tensor_type).reshape(shape).astype(np.float32)


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, sorted; with an index, every shard it names must exist."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PocketError(f"{index} is not a readable safetensors index ({type(exc).__name__}: {exc})") from None
        named: dict[str, int] = {}
        for shard in weight_map.values():
            named[shard] = named.get(shard, 0) + 1
        for shard, count in sorted(named.items()):
            if not (folder / shard).exists():
                raise PocketError(f"{folder}: shard {shard} is missing (the index places {count} tensors in it)")
    if not files:
        raise PocketError(f"{folder} holds no safetensors weights")
    return files


def open_tensors(source) -> TensorSource:
    src = resolve(source)
    return GGUFSource(src) if src.is_gguf else SafetensorsSource(src)
