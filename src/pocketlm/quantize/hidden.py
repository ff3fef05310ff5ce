"""The calibration windows' hidden states, in memory up to a limit and in a temporary file beyond.

Layer-at-a-time calibration keeps the hidden states of every calibration window between
layers: tokens x hidden width x 4 bytes, twice while a layer's outputs replace its inputs.
That is 0.27 GB for 8192 tokens at 8B, but 4 GB for 64k tokens, more than the rest of a
gptq run holds. Beyond POCKETLM_CALIB_MEMORY (default 1 GiB) per set, windows go to an
unlinked temporary file and are read back when their turn comes (sequentially, one window at
a time, so the page cache and the disk's read-ahead do the work). The values are the same
bytes either way: what is written is what comes back.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import IO, Iterator, overload

import torch

from ..errors import PocketError

DEFAULT_LIMIT = 1 << 30


def memory_limit() -> int:
    """Bytes of hidden states one set keeps in memory (POCKETLM_CALIB_MEMORY, a size like 512MB)."""
    text = os.environ.get("POCKETLM_CALIB_MEMORY")
    if not text:
        return DEFAULT_LIMIT
    from .budget import parse_size

    try:
        return parse_size(text)
    except PocketError as exc:
        raise PocketError(f"POCKETLM_CALIB_MEMORY: {exc}") from None


class HiddenStates(Sequence[torch.Tensor]):
    """A list of per-window tensors (append, len, index, slice, iterate) that spills past `limit` bytes."""

    def __init__(self, limit: int | None = None):
        self.limit = memory_limit() if limit is None else limit
        self._items: list[torch.Tensor | tuple[int, torch.Size, torch.dtype]] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self._end = 0

    @classmethod
    def of(cls, tensors, limit: int | None = None) -> "HiddenStates":
        out = cls(limit)
        for t in tensors:
            out.append(t)
        return out

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        size = t.numel() * t.element_size()
        if self._held + size <= self.limit or t.device.type != "cpu":  # a GPU's states stay where they are
            self._items.append(t)
            self._held += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="pocketlm-hidden-")
        fd = self._file.fileno()
        data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < size:
            done += os.pwrite(fd, data[done:], self._end + done)
        self._items.append((self._end, t.shape, t.dtype))
        self._end += size

    @property
    def spilled_bytes(self) -> int:
        return self._end

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        offset, shape, dtype = item
        assert self._file is not None
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the calibration spill file ended early ({offset + done} bytes)")
            done += got
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        self._items.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()
