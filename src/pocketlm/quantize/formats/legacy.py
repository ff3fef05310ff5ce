"""ggml's 32-element block types: one float16 scale (and for *_1 a float16 minimum) per block."""
from __future__ import annotations

import numpy as np

from .base import BlockFormat, BlockParams, f16, from_f16, nibbles, unnibble
from .searches import fit_scale, fit_scale_min


class _Symmetric(BlockFormat):
    """value = d * level; bytes: d (f16) + the format's packed indices."""
    block_size = sub_size = 32

    search_steps = 5

    def choose(self, x, w):
        d, _ = f16(fit_scale(x, w, self.levels, steps=self.search_steps))
        return BlockParams(d[:, None], np.zeros_like(d)[:, None])

    def pack(self, idx, params):
        _, d = f16(params.scale[:, 0])
        return np.concatenate([d, self.pack_indices(idx)], axis=-1)

    def unpack(self, data):
        d = from_f16(data[:, :2])
        return self.unpack_indices(data[:, 2:]), BlockParams(d[:, None], np.zeros_like(d)[:, None])


class _WithMin(BlockFormat):
    """value = d * q + m, q in 0..2^bits-1; bytes: d, m (f16) + packed indices."""
    block_size = sub_size = 32

    def choose(self, x, w):
        s, m = fit_scale_min(x, w, len(self.levels) - 1, offset_le_zero=False, coarse_grid=True)
        return BlockParams(f16(s)[0][:, None], f16(m)[0][:, None])

    def pack(self, idx, params):
        return np.concatenate([f16(params.scale[:, 0])[1], f16(params.offset[:, 0])[1], self.pack_indices(idx)], axis=-1)

    def unpack(self, data):
        d, m = from_f16(data[:, :2]), from_f16(data[:, 2:4])
        return self.unpack_indices(data[:, 4:]), BlockParams(d[:, None], m[:, None])


class _FourBit:
    def pack_indices(self, idx):
        return nibbles(idx)

    def unpack_indices(self, b):
        return unnibble(b)


class _FiveBit:
    """qh: a little-endian 32-bit mask of each index's fifth bit, then the low nibbles."""
    def pack_indices(self, idx):
        qh = np.packbits((idx >> 4).astype(np.uint8), axis=-1, bitorder="little")
        return np.concatenate([qh, nibbles(idx & 0x0F)], axis=-1)

    def unpack_indices(self, b):
        high = np.unpackbits(b[:, :4], axis=-1, bitorder="little").astype(np.int64)
        return unnibble(b[:, 4:]) | (high << 4)


class Q8_0(_Symmetric):
    name, type_size = "Q8_0", 34
    search_steps = 1  # 256 levels: rounding error is already tiny, a wider search buys nothing
    levels = np.arange(-128, 128, dtype=np.float32)

    def pack_indices(self, idx):
        return (idx - 128).astype(np.int8).view(np.uint8)

    def unpack_indices(self, b):
        return b.view(np.int8).astype(np.int64) + 128


class Q4_0(_FourBit, _Symmetric):
    name, type_size = "Q4_0", 18
    levels = np.arange(-8, 8, dtype=np.float32)


class Q5_0(_FiveBit, _Symmetric):
    name, type_size = "Q5_0", 22
    levels = np.arange(-16, 16, dtype=np.float32)


class IQ4_NL(_FourBit, _Symmetric):
    """Like Q4_0 but the 16 levels follow ggml's non-uniform table (denser near zero)."""
    name, type_size = "IQ4_NL", 18
    levels = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


class Q4_1(_FourBit, _WithMin):
    name, type_size = "Q4_1", 20
    levels = np.arange(16, dtype=np.float32)


class Q5_1(_FiveBit, _WithMin):
    name, type_size = "Q5_1", 24
    levels = np.arange(32, dtype=np.float32)
