"""The one contract every GGUF block type implements, and the registry they join.

Every ggml block type we write decodes as   value = scale[sub] * levels[idx] + offset[sub]
with one (scale, offset) per sub-block of `sub_size` elements. A format therefore only says
how it stores (scale, offset, idx) in bytes (`pack`/`unpack`) and how it picks scales
(`choose`); assigning each value to its nearest level is shared, which is what lets GPTQ
quantize column by column inside an exact GGUF block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REGISTRY: dict[str, "BlockFormat"] = {}


@dataclass
class BlockParams:
    """Chosen scales of n blocks: effective per-sub-block scale/offset (exactly as decoded)
    and whatever raw fields the format stores (f16 bytes, packed 6-bit codes...)."""
    scale: np.ndarray  # (n_blocks, n_sub) float32
    offset: np.ndarray  # (n_blocks, n_sub) float32
    raw: dict = field(default_factory=dict)


class BlockFormat:
    name: str
    block_size: int
    type_size: int
    sub_size: int
    levels: np.ndarray  # grid of integer-coded values, ascending
    # llama.cpp's CPU dot product for this type rounds its input activations to 8 bits, one
    # scale per this many values (ggml-cpu's vec_dot_type: Q8_0/Q8_1 blocks of 32 for the
    # legacy types, Q8_K blocks of 256 for the k-quants). Part of the file's error that no
    # weight quantizer sees: the size budget counts it (quantize/sensitivity.py).
    activation_block: int = 32

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            REGISTRY[cls.name] = cls()

    @property
    def ggml_type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def n_sub(self) -> int:
        return self.block_size // self.sub_size

    # -- what each format implements ------------------------------------------------------
    def choose(self, x: np.ndarray, w: np.ndarray) -> BlockParams:
        """Scales for blocks x (n, block_size) minimising sum w * (x - decoded)^2."""
        raise NotImplementedError

    def pack(self, idx: np.ndarray, params: BlockParams) -> np.ndarray:
        """(n, block_size) level indices + params -> (n, type_size) uint8, ggml's layout."""
        raise NotImplementedError

    def unpack(self, data: np.ndarray) -> tuple[np.ndarray, BlockParams]:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def expand(self, per_sub: np.ndarray) -> np.ndarray:
        return np.repeat(per_sub, self.sub_size, axis=-1)

    def assign(self, x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Nearest level for each value given its (already expanded) scale and offset."""
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(scale != 0, (x - offset) / np.where(scale == 0, 1, scale), 0.0)
        if self.levels[-1] - self.levels[0] == len(self.levels) - 1:  # uniform grid: rounding
            return np.clip(np.rint(t - self.levels[0]), 0, len(self.levels) - 1).astype(np.int64)
        mids = (self.levels[1:] + self.levels[:-1]) / 2  # a negative scale just mirrors the grid
        return np.searchsorted(mids, t).astype(np.int64)

    def decode_values(self, idx: np.ndarray, params: BlockParams) -> np.ndarray:
        return (self.levels[idx] * self.expand(params.scale) + self.expand(params.offset)).astype(np.float32)

    def quantize(self, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.block_size)
        w = default_weights(x) if w is None else np.asarray(w, dtype=np.float32).reshape(x.shape)
        params = self.choose(x, w)
        from .searches import assign_blocks

        idx = assign_blocks(self, x, params.scale, params.offset)
        return self.pack(idx, params)

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data, dtype=np.uint8).reshape(-1, self.type_size)
        idx, params = self.unpack(data)
        return self.decode_values(idx, params)


def default_weights(x: np.ndarray) -> np.ndarray:
    """Importance without data: large weights matter more, small ones still count (the
    weighting llama.cpp's k-quants use when no importance matrix is given)."""
    rms = np.sqrt((x * x).mean(axis=-1, keepdims=True))
    return rms + np.abs(x)


def get(name: str) -> BlockFormat:
    from ...errors import PocketError
    from . import _all  # noqa: F401  (importing registers every format)

    fmt = REGISTRY.get(name.upper())
    if fmt is None:
        raise PocketError(f"unknown GGUF block type {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return fmt


def f16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values rounded to float16 (as stored) and their little-endian bytes (n, 2)."""
    h = np.asarray(values, dtype=np.float32).astype(np.float16)
    return h.astype(np.float32), h.reshape(-1, 1).view(np.uint8).reshape(-1, 2)


def from_f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def nibbles(idx: np.ndarray) -> np.ndarray:
    """(n, 32k) indices < 16 -> (n, 16k) bytes: element j in the low nibble, j+half in the high."""
    half = idx.shape[-1] // 2
    return (idx[..., :half] | (idx[..., half:] << 4)).astype(np.uint8)


def unnibble(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0x0F, b >> 4], axis=-1).astype(np.int64)


def codec_fingerprint() -> str:
    """A hash of what every registered format writes for a fixed input, plain and importance-
    weighted. Caches of values the codecs produced (sensitivity tables, compress steps) carry it
    in their key, so a codec whose output changes (an edit, a numpy upgrade, a test patching it)
    never meets its old results. Not memoised: a few milliseconds."""
    import hashlib

    from . import _all  # noqa: F401  (importing registers every format)

    rng = np.random.default_rng(20261130)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[:, ::37] *= 8  # a few heavy values, as real weight rows have
    w = np.abs(rng.standard_normal((4, 256))).astype(np.float32) + 0.1
    digest = hashlib.sha256()
    for name in sorted(REGISTRY):
        fmt = REGISTRY[name]
        digest.update(name.encode())
        digest.update(fmt.quantize(x).tobytes())
        digest.update(fmt.quantize(x, w).tobytes())
    return digest.hexdigest()[:16]
