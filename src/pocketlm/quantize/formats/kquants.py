"""ggml's k-quants: 256-element super-blocks of 16 or 32-element sub-blocks whose scales are
themselves quantized against one float16 super-scale. Layouts follow ggml-common.h."""
from __future__ import annotations

import numpy as np

from .base import BlockFormat, BlockParams, f16, from_f16
from .searches import fit_scale, fit_scale_min, fit_unsigned_codes, quantize_codes, refine_scale_min_codes, refine_signed_codes

QK = 256


def _crumbs(idx2: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values -> (n, 64) bytes: element 128h+32g+l in bits 2g of byte 32h+l."""
    v = idx2.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def _uncrumbs(b: np.ndarray) -> np.ndarray:
    v = b.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (v & 3).reshape(-1, QK).astype(np.int64)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    """(n, 256) single bits -> (n, 32) bytes: element 32b+l in bit b of byte l."""
    v = bits.reshape(-1, 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(v << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)


def _unbitplane(b: np.ndarray) -> np.ndarray:
    return ((b.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK).astype(np.int64)


def _nibbles64(idx4: np.ndarray) -> np.ndarray:
    """(n, 256) 4-bit values -> (n, 128): each 64-element chunk c fills bytes 32c.. with its
    first 32 elements in low nibbles and the next 32 in high nibbles."""
    v = idx4.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(-1, 128)


def _unnibbles64(b: np.ndarray) -> np.ndarray:
    v = b.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (v & 0x0F).reshape(-1, QK).astype(np.int64)


def _pack_scale_min_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into 12 bytes (the packing Q4_K and Q5_K share)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _unpack_scale_min_6bit(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


class _ScaleMinK(BlockFormat):
    """value = d*sc*q - dmin*mn per sub-block (Q2_K, Q4_K, Q5_K)."""
    block_size = activation_block = QK
    scale_bits: int

    def choose(self, x, w):
        n = x.shape[0]
        rows, wrows = x.reshape(-1, self.sub_size), w.reshape(-1, self.sub_size)
        s, m = fit_scale_min(rows, wrows, len(self.levels) - 1, offset_le_zero=True)
        sub_weight = wrows.sum(-1).reshape(n, -1)  # how much each sub-block's scale and min matter
        d, sc = fit_unsigned_codes(s.reshape(n, -1), self.scale_bits, sub_weight)
        dmin, mn = fit_unsigned_codes(-m.reshape(n, -1), self.scale_bits, sub_weight)
        sc, mn = refine_scale_min_codes(x.reshape(n, -1, self.sub_size), w.reshape(n, -1, self.sub_size),
                                        len(self.levels) - 1, d, sc, dmin, mn, 2 ** self.scale_bits - 1)
        return BlockParams(d[:, None] * sc, -dmin[:, None] * mn, {"d": d, "dmin": dmin, "sc": sc, "mn": mn})

    def _params(self, d, dmin, sc, mn):
        # raw fields too, so a file's blocks re-pack to the same bytes (quantize/fakequant.py trains them)
        return BlockParams((d[:, None] * sc).astype(np.float32), (-dmin[:, None] * mn).astype(np.float32),
                           {"d": d, "dmin": dmin, "sc": sc.astype(np.int64), "mn": mn.astype(np.int64)})


class Q2_K(_ScaleMinK):
    name, type_size, sub_size, scale_bits = "Q2_K", 84, 16, 4
    levels = np.arange(4, dtype=np.float32)

    def pack(self, idx, p):
        scales = (p.raw["sc"] | (p.raw["mn"] << 4)).astype(np.uint8)
        return np.concatenate([scales, _crumbs(idx), f16(p.raw["d"])[1], f16(p.raw["dmin"])[1]], axis=-1)

    def unpack(self, data):
        scales = data[:, :16]
        d, dmin = from_f16(data[:, 80:82]), from_f16(data[:, 82:84])
        return _uncrumbs(data[:, 16:80]), self._params(d, dmin, (scales & 15).astype(np.float32), (scales >> 4).astype(np.float32))


class Q4_K(_ScaleMinK):
    name, type_size, sub_size, scale_bits = "Q4_K", 144, 32, 6
    levels = np.arange(16, dtype=np.float32)

    def pack(self, idx, p):
        return np.concatenate([f16(p.raw["d"])[1], f16(p.raw["dmin"])[1], _pack_scale_min_6bit(p.raw["sc"], p.raw["mn"]),
                               _nibbles64(idx)], axis=-1)

    def unpack(self, data):
        d, dmin = from_f16(data[:, 0:2]), from_f16(data[:, 2:4])
        sc, mn = _unpack_scale_min_6bit(data[:, 4:16])
        return _unnibbles64(data[:, 16:144]), self._params(d, dmin, sc, mn)


class Q5_K(_ScaleMinK):
    name, type_size, sub_size, scale_bits = "Q5_K", 176, 32, 6
    levels = np.arange(32, dtype=np.float32)

    def pack(self, idx, p):
        return np.concatenate([f16(p.raw["d"])[1], f16(p.raw["dmin"])[1], _pack_scale_min_6bit(p.raw["sc"], p.raw["mn"]),
                               _bitplane(idx >> 4), _nibbles64(idx & 15)], axis=-1)

    def unpack(self, data):
        d, dmin = from_f16(data[:, 0:2]), from_f16(data[:, 2:4])
        sc, mn = _unpack_scale_min_6bit(data[:, 4:16])
        idx = _unnibbles64(data[:, 48:176]) | (_unbitplane(data[:, 16:48]) << 4)
        return idx, self._params(d, dmin, sc, mn)


class _SignedScaleK(BlockFormat):
    """value = d*sc*level with signed sub-block scales, 16-element sub-blocks (Q3_K, Q6_K)."""
    block_size, sub_size, activation_block = QK, 16, QK
    scale_bits: int
    code_reach: int  # how far refine_signed_codes searches: all codes where that is affordable

    def choose(self, x, w):
        n = x.shape[0]
        s = fit_scale(x.reshape(-1, 16), w.reshape(-1, 16), self.levels)
        d, sc = quantize_codes(s.reshape(n, -1), self.scale_bits, signed=True)
        sc = refine_signed_codes(x.reshape(n, -1, 16), w.reshape(n, -1, 16), self.levels, d, sc, self.scale_bits, self.code_reach)
        return BlockParams(d[:, None] * sc, np.zeros((n, 16), np.float32), {"d": d, "sc": sc})

    def _params(self, d, sc):
        return BlockParams((d[:, None] * sc).astype(np.float32), np.zeros_like(sc, dtype=np.float32),
                           {"d": d, "sc": sc.astype(np.int64)})


class Q3_K(_SignedScaleK):
    name, type_size, scale_bits, code_reach = "Q3_K", 110, 6, 32
    levels = np.arange(-4, 4, dtype=np.float32)  # index n: low two bits in qs, n >> 2 in hmask

    def pack(self, idx, p):
        c = (p.raw["sc"] + 32).astype(np.uint8)
        scales = np.concatenate([(c[:, :8] & 15) | ((c[:, 8:] & 15) << 4),
                                 np.bitwise_or.reduce(((c >> 4) & 3).reshape(-1, 4, 4)
                                                      << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1), axis=1)],
                                axis=-1)
        return np.concatenate([_bitplane(idx >> 2), _crumbs(idx & 3), scales, f16(p.raw["d"])[1]], axis=-1)

    def unpack(self, data):
        hmask, qs, sb, d = data[:, :32], data[:, 32:96], data[:, 96:108], from_f16(data[:, 108:110])
        low = np.concatenate([sb[:, :8] & 15, sb[:, :8] >> 4], axis=-1)
        high = ((sb[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3).reshape(-1, 16)
        sc = (low | (high << 4)).astype(np.float32) - 32
        return _uncrumbs(qs) | (_unbitplane(hmask) << 2), self._params(d, sc)


class Q6_K(_SignedScaleK):
    name, type_size, scale_bits, code_reach = "Q6_K", 210, 8, 16
    levels = np.arange(-32, 32, dtype=np.float32)

    def pack(self, idx, p):
        v = idx.reshape(-1, 2, 2, 64).astype(np.uint8)  # half, (first|second 64), element
        ql = ((v[:, :, 0] & 15) | ((v[:, :, 1] & 15) << 4)).reshape(-1, 128)
        qh = _crumbs(idx >> 4)
        return np.concatenate([ql, qh, p.raw["sc"].astype(np.int8).view(np.uint8), f16(p.raw["d"])[1]], axis=-1)

    def unpack(self, data):
        ql, qh = data[:, :128].reshape(-1, 2, 1, 64), data[:, 128:192]
        low = ((ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(-1, QK).astype(np.int64)
        sc = data[:, 192:208].view(np.int8).astype(np.float32)
        return low | (_uncrumbs(qh) << 4), self._params(from_f16(data[:, 208:210]), sc)
