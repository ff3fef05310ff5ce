"""A GGUF written tensor by tensor: header and tensor table first, then each tensor's bytes at
its own offset as soon as they exist, in any order.

gguf-py's GGUFWriter keeps every tensor in memory until the end (or copies them through a
temporary file); quantizing an 8B model that way holds the whole output twice. Every tensor's
size follows from its type and shape, so the offsets are known before any data is made, and
the file bytes equal what GGUFWriter would have written for the same tensors in the same order.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import PocketError

ROW_BLOCK = 1 << 22  # values read, encoded and written at once: the k-quant code searches hold ~150 bytes
# per value while they work (a 16M-value block of the 1B embedding took the process to 3.2 GiB)


def row_blocks(shape, whole: bool = False):
    """Row slices of at most ROW_BLOCK values covering a tensor; None means all rows at once."""
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 0
    if whole or not per_row or ROW_BLOCK // per_row >= shape[0]:
        yield None
        return
    step = max(1, ROW_BLOCK // per_row)
    for r0 in range(0, shape[0], step):
        yield slice(r0, min(r0 + step, shape[0]))


def tensor_nbytes(type_name: str, shape) -> int:
    """Bytes of a tensor of this GGML type and (rows, cols) shape, from gguf's own table."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n = int(np.prod(shape))
    if shape[-1] % block:
        raise PocketError(f"rows of {shape[-1]} values do not split into {type_name} blocks of {block}")
    return n // block * size


class StreamingGGUF:
    """Use: add_tensor_info() for every tensor, begin(), write() each tensor's bytes, finish()."""

    def __init__(self, path: Path, writer):
        self.path = Path(path)
        self.writer = writer  # a gguf.GGUFWriter holding the metadata (key/values) already
        self._order: list[str] = []
        self._info: dict[str, tuple[str, int]] = {}  # name -> (type, nbytes)
        self._offset: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._fd: int | None = None

    def add_tensor_info(self, name: str, type_name: str, shape) -> None:
        import gguf

        nbytes = tensor_nbytes(type_name, shape)
        self.writer.add_tensor_info(name, tuple(shape), np.float32, nbytes,
                                    raw_dtype=gguf.GGMLQuantizationType[type_name])
        self._order.append(name)
        self._info[name] = (type_name, nbytes)

    def total_bytes(self) -> int:
        """The finished file's size (header estimate + aligned data), before anything is written."""
        align = self.writer.data_alignment
        return sum((n + align - 1) // align * align for _, n in self._info.values())

    def begin(self) -> None:
        start = _write_head(self.writer, self.path)
        align = self.writer.data_alignment
        pos = start
        for name in self._order:
            self._offset[name] = pos
            pos += (self._info[name][1] + align - 1) // align * align
        self._fd = os.open(self.path, os.O_RDWR)
        os.ftruncate(self._fd, pos)  # padding and not-yet-written data read as zeros

    def write(self, name: str, data: np.ndarray, at: int = 0) -> None:
        """Bytes of tensor `name` starting `at` bytes into it (row blocks may come one by one)."""
        buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        nbytes = self._info[name][1]
        if at + buf.nbytes > nbytes:
            raise PocketError(f"internal: {name} got {at + buf.nbytes} bytes, its type and shape give {nbytes}")
        fd = self._open_fd()
        view = buf.data
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(fd, view[done:], self._offset[name] + at + done)
        self._written[name] = self._written.get(name, 0) + buf.nbytes

    def finish(self) -> None:
        missing = [n for n in self._order if self._written.get(n, 0) != self._info[n][1]]
        if missing:
            raise PocketError(f"internal: {len(missing)} tensors not fully written (first: {missing[0]})")
        os.fsync(self._open_fd())
        self.close()

    def _open_fd(self) -> int:
        if self._fd is None:
            raise PocketError(f"internal: {self.path} is not open for writing (begin() not called, or closed)")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_head(writer, path: Path) -> int:
    """Header, key/values and tensor table into `path`, padded; returns where data starts."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    fout.flush()
    start = fout.tell()
    writer.close()
    return start


def header_size(writer, tensors) -> int:
    """Bytes before the data of a GGUF with this writer's key/values and these (name, type, shape) tensors."""
    import tempfile

    stream = StreamingGGUF(Path("unused"), writer)
    for name, type_name, shape in tensors:
        stream.add_tensor_info(name, type_name, shape)
    with tempfile.TemporaryDirectory() as tmp:
        return _write_head(writer, Path(tmp) / "head.gguf")


def check_disk_space(out: Path, need: int) -> None:
    """Fail before any work when the output cannot fit where it is to be written."""
    folder = Path(out).parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PocketError(f"{out} needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free")
