"""Presets: which GGUF type each tensor gets, with llama.cpp's names and meanings.

The rules mirror llama.cpp's per-tensor choice (checked against its quantizer's output on
SmolLM2: see tests/test_plan.py): attn_v and ffn_down get more bits in the _M/_L presets on
the layers `more_bits` picks, the output projection (or a tied token embedding) is Q6_K, and
a k-quant on a row whose length is not a multiple of 256 falls back as llama.cpp falls back.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from ..errors import PocketError

PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_NL",
           "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
BASE_TYPE = {p: p.split("_K")[0] + "_K" if "_K" in p else p for p in PRESETS}
K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FILE_TYPE = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q4_K_S": 14,
             "Q4_0": 2, "Q4_1": 3, "IQ4_NL": 25, "Q3_K_L": 13, "Q3_K_M": 12, "Q3_K_S": 11, "Q2_K": 10}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    name: str
    type: str  # a block format name, or F32 / F16 for tensors kept in float


def block_size_of(type_name: str) -> int:
    return BLOCK.get(type_name, 32 if type_name not in ("F32", "F16") else 1)


def fits(type_name: str, row: int) -> bool:
    return row % block_size_of(type_name) == 0


def _fallback(type_name: str, row: int) -> str:
    if fits(type_name, row):
        return type_name
    alt = K_FALLBACK.get(type_name, type_name)
    return alt if fits(alt, row) else "F16"


def _preset_type(preset: str, kind: str, layer: int | None, n_layers: int, n_gqa: int, is_output: bool) -> str:
    base = BASE_TYPE[preset]
    if is_output:
        return "Q8_0" if preset == "Q8_0" else "Q6_K"
    if layer is None:
        return base
    if kind == "attn_v":
        if preset == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and more_bits(layer, n_layers):
            return "Q6_K"
        if preset == "Q4_K_S" and layer < 4:
            return "Q5_K"
        if preset == "IQ4_NL" and n_gqa >= 4:
            return "Q5_K"
        return base
    if kind == "ffn_down":
        if preset == "Q2_K":
            return "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset in ("Q4_K_M", "Q5_K_M") and more_bits(layer, n_layers):
            return "Q6_K"
        if preset in ("Q4_K_S", "IQ4_NL") and layer < n_layers // 8:
            return "Q5_K"
        return base
    if kind == "attn_output":
        if preset == "Q3_K_M":
            return "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset == "Q2_K":
            return "Q3_K"
    return base


def plan(tensors: list[tuple[str, tuple[int, ...]]], preset: str, n_layers: int, n_gqa: int = 1,
         keep: dict[str, str] | None = None) -> list[TensorPlan]:
    """tensors: (GGUF name, PyTorch-order shape). keep: {glob pattern: type} overrides."""
    preset = preset.upper()
    if preset not in PRESETS:
        raise PocketError(f"unknown --type {preset!r} (choose one of {', '.join(PRESETS)})")
    names = {n for n, _ in tensors}
    has_output = "output.weight" in names
    out = []
    for name, shape in tensors:
        if len(shape) < 2:
            out.append(TensorPlan(name, "F32"))  # norms and biases stay exact, as in llama.cpp
            continue
        m = _LAYER.match(name)
        layer, kind = (int(m.group(1)), m.group(2)) if m else (None, name.removesuffix(".weight"))
        is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
        wanted = _fallback(_preset_type(preset, kind, layer, n_layers, n_gqa, is_output), shape[-1])
        for pattern, forced in (keep or {}).items():
            if fnmatch.fnmatch(name, pattern):
                wanted = forced.upper()
                if not fits(wanted, shape[-1]):
                    raise PocketError(f"{name} has rows of {shape[-1]} values; {wanted} needs a multiple of {block_size_of(wanted)}")
        out.append(TensorPlan(name, wanted))
    return out


def tensor_bytes(type_name: str, shape) -> int:
    """Bytes of one tensor's data in a GGUF file at `type_name` (shape in PyTorch order)."""
    from ..models.gguf_stream import tensor_nbytes

    return tensor_nbytes(type_name, shape)


def preset_bytes(tensors: list[tuple[str, tuple[int, ...]]], preset: str, n_layers: int, n_gqa: int = 1) -> int:
    """Tensor bytes of a preset's file, from the same per-tensor plan quantize follows."""
    return sum(tensor_bytes(p.type, shape) for p, (_, shape) in zip(plan(tensors, preset, n_layers, n_gqa), tensors))


def parse_keep(items) -> dict[str, str]:
    keep = {}
    for item in items or ():
        if "=" not in item:
            raise PocketError(f"--keep wants PATTERN=TYPE, got {item!r}")
        pattern, type_name = item.split("=", 1)
        from .formats import get

        if type_name.upper() not in ("F32", "F16"):
            get(type_name)  # unknown types fail here with the list of known ones
        keep[pattern] = type_name.upper()
    return keep
