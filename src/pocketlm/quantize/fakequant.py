"""Fake quantization that is the deployed format, bit for bit, and can be trained.

Training a quantized model only helps when the simulated quantizer is the one that ships
(pytorch/ao #2419: a generic int4 fake-quant, converted to GGUF afterwards, measured no gain).
So the forward pass here computes exactly what llama.cpp decodes from the bytes: every
pocketlm block format decodes as scale[sub] * level[idx] + offset[sub] (formats/base.py), with
scale and offset made of stored fields (a float16 d, a float16 min, integer sub-block codes
times a float16 super-scale), evaluated in float32 in ggml's order, one rounding per product
and per sum. `to_bytes` packs the same fields, so the file decodes to the trained values with
no difference at all.

What trains (all in units of the block's starting step size, so one learning rate fits every
tensor and format, and every parameter starts at zero: the gptq file itself):
- each block's float16 scale, by a multiplier (1 + a / reach), a = 1 moving the grid's far end
  by about one step (for k-quants: the super-scale d, the sub-block codes kept);
- each block's offset (formats with a minimum), by b steps (k-quants: dmin, like d);
- with free codes, every weight by WEIGHT_RATE * c steps: the level of each value is re-chosen from the
  moved weight every forward (straight-through, LSQ's gradients for scale and offset);
- with sub_codes, the k-quants' integer sub-block scale (and min) codes, by e (and f) code
  units, rounded to the nearest code every forward (straight-through).
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import BlockFormat, BlockParams
from .formats.kquants import _ScaleMinK, _SignedScaleK
from .formats.legacy import _Symmetric, _WithMin
from .methods.gptq import torch_assign

# Weights move this much slower than scales at one learning rate (a parametrization, which Adam
# turns into a learning-rate ratio). Straight-through weights that move as fast as the scales
# flip levels back and forth around their thresholds (Nagel et al. 2022, "Overcoming
# oscillations in quantization-aware training"): in trials at 0.02 steps per update the
# error rose 20-70%; only weights near a threshold should cross it.
WEIGHT_RATE = 0.1
# How fast the sub-block codes (--qad-codes scales) move against the scales at one learning rate. Measured
# on a Q2_K file of an off-grid 512-wide student (bench/results/qad.md, student512-100k, lr 0.02, 100k
# tokens): at 1 no code moved half a unit, and the run equalled the frozen one to the last digit (KLD
# 0.2826, 0.82x gptq's); at 3 codes flipped and the file ended at 0.3334 (0.97x): coarse straight-through
# steps oscillate. So 1: the option stays what it was, and frozen stays the default.
SUB_CODE_RATE = 1.0


def family(fmt: BlockFormat) -> str:
    """How a format's scale and offset are stored (the four kinds formats/ implements)."""
    for kind, cls in (("symmetric", _Symmetric), ("with_min", _WithMin), ("scale_min_k", _ScaleMinK),
                      ("signed_k", _SignedScaleK)):
        if isinstance(fmt, cls):
            return kind
    raise TypeError(f"{fmt.name} has no fake-quant form")


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


class _Exact(torch.autograd.Function):
    """Forward: `exact` (what the file stores). Backward: the gradient goes to `cont`, the
    continuous value it was rounded from (straight-through). Written as a Function because
    cont + (exact - cont).detach() is not always exact in float arithmetic."""

    @staticmethod
    def forward(ctx, cont, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Decode(torch.autograd.Function):
    """value = level[idx] * scale (+ offset): two float32 roundings, as ggml decodes (never a
    fused multiply-add). Gradients: with `w` (free codes), straight-through to the weights
    inside the grid's range and LSQ's d/dscale = level - t, d/doffset = 0 inside, level and
    1 outside; with frozen codes, level and 1."""

    @staticmethod
    def forward(ctx, w, scale, offset, idx, levels):
        lv = levels[idx.long()]
        value = lv * scale
        if offset is not None:
            value = value + offset
        ctx.save_for_backward(w, scale, offset, lv, levels)
        return value

    @staticmethod
    def backward(ctx, g):
        w, scale, offset, lv, levels = ctx.saved_tensors
        if w is None:
            return None, g * lv, (g if offset is not None else None), None, None
        shifted = w if offset is None else w - offset
        t = torch.where(scale != 0, shifted / torch.where(scale == 0, torch.ones_like(scale), scale),
                        torch.zeros_like(w))
        lo, hi = torch.minimum(levels[0], levels[-1]), torch.maximum(levels[0], levels[-1])
        inside = (t >= lo) & (t <= hi) & (scale != 0)
        g_scale = g * torch.where(inside, lv - t, lv)
        g_offset = None if offset is None else torch.where(inside, torch.zeros_like(g), g)
        return torch.where(inside, g, torch.zeros_like(g)), g_scale, g_offset, None, None


class FakeQuant(torch.nn.Module):
    """One quantized weight matrix, made from its GGUF bytes, that decodes like llama.cpp and
    trains. `perm[i]`: the file row that is row i of the matrix the model multiplies by (llama's
    rotary Q/K rows are stored interleaved); None when the orders agree."""

    idx0: torch.Tensor  # every value's level index: the file's, or as frozen by freeze_codes

    def __init__(self, fmt: BlockFormat, data: np.ndarray, perm: np.ndarray | None = None,
                 free_codes: bool = True, sub_codes: bool = False):
        super().__init__()
        self.fmt, self.kind = fmt, family(fmt)
        self.is_kquant = self.kind in ("scale_min_k", "signed_k")  # a super-block scale over integer sub-block codes
        rows = data.shape[0]
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)
        self.blocks_per_row = data.shape[1] // fmt.type_size
        self.shape = (rows, self.blocks_per_row * fmt.block_size)
        self.perm = perm
        idx, params = fmt.unpack(data.reshape(-1, fmt.type_size))
        ns = self.blocks_per_row * fmt.n_sub

        def rows_of(a: np.ndarray, width: int) -> torch.Tensor:
            a = np.ascontiguousarray(a).reshape(rows, width)
            return torch.from_numpy(np.ascontiguousarray(a[perm] if perm is not None else a))

        self.register_buffer("levels", torch.from_numpy(np.asarray(fmt.levels, np.float32)), persistent=False)
        self.register_buffer("idx0", rows_of(idx.astype(np.uint8 if len(fmt.levels) <= 256 else np.int64),
                                             self.shape[1]), persistent=False)
        self.register_buffer("s0", rows_of(params.scale.astype(np.float32), ns), persistent=False)
        self.register_buffer("o0", rows_of(params.offset.astype(np.float32), ns), persistent=False)
        per_scale = ns  # how many trained scales a row has: one per sub-block, or per super-block (k-quants)
        if self.is_kquant:
            per_scale = self.blocks_per_row
            self.register_buffer("d", rows_of(params.raw["d"].astype(np.float32), per_scale), persistent=False)
            self.register_buffer("sc", rows_of(params.raw["sc"].astype(np.float32), ns), persistent=False)
            if self.kind == "scale_min_k":
                self.register_buffer("dmin", rows_of(params.raw["dmin"].astype(np.float32), per_scale), persistent=False)
                self.register_buffer("mn", rows_of(params.raw["mn"].astype(np.float32), ns), persistent=False)
        self.has_offset = self.kind in ("with_min", "scale_min_k")
        # a = 1 moves the grid's far end by about one step: how many steps lie between the
        # grid's zero (its offset, or its middle) and its end
        n = len(fmt.levels)
        self.reach = float(n - 1 if self.has_offset else n / 2)
        self.a = torch.nn.Parameter(torch.zeros(rows, per_scale))
        self.b = torch.nn.Parameter(torch.zeros(rows, per_scale)) if self.has_offset else None
        self.c = torch.nn.Parameter(torch.zeros(self.shape)) if free_codes else None
        # the k-quants' sub-block codes: the only freedom those formats have per 16 or 32 weights (without
        # them Q2_K trains 2 numbers per 256 weights)
        self.e = torch.nn.Parameter(torch.zeros(rows, ns)) if sub_codes and self.is_kquant else None
        self.f = torch.nn.Parameter(torch.zeros(rows, ns)) if sub_codes and self.kind == "scale_min_k" else None
        bits = int(getattr(fmt, "scale_bits", 0))
        self.code_range = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if self.kind == "signed_k" else (0, 2 ** bits - 1)
        self._assign = torch_assign(fmt)

    # -- the stored fields, from the trained values --------------------------------------
    def _sub(self, per_block: torch.Tensor) -> torch.Tensor:
        return per_block.repeat_interleave(self.fmt.n_sub, dim=1)

    def _expand(self, per_sub: torch.Tensor) -> torch.Tensor:
        return per_sub.repeat_interleave(self.fmt.sub_size, dim=1)

    def _code(self, start: torch.Tensor, moved: torch.Tensor | None) -> torch.Tensor:
        """An integer sub-block code: the file's, or the nearest one to start + moved (in the
        code's range), with straight-through gradients to `moved`."""
        if moved is None:
            return start
        cont = start + SUB_CODE_RATE * moved
        return _Exact.apply(cont, cont.detach().round().clamp(*self.code_range))

    def sub_codes(self) -> dict[str, torch.Tensor]:
        """The integer sub-block codes the file will store (k-quants): sc, and mn where it has one."""
        out = {"sc": self._code(self.sc, self.e)}
        if self.kind == "scale_min_k":
            out["mn"] = self._code(self.mn, self.f)
        return out

    def fields(self) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(scale, offset) per sub-block as the file will store them, with straight-through
        gradients through the float16 rounding, and the raw fields to pack.

        The k-quants train their two float16 super-scales (d, dmin), and keep gptq's integer
        sub-block codes unless sub_codes: a 4- or 6-bit code moves its sub-block's scale by
        2-30% at a time, and straight-through steps that coarse oscillated in an early trial
        (with free weights beside them, Q2_K's error rose where every other format's fell); d and
        dmin move in float16's 0.1% steps."""
        grow = 1 + self.a / self.reach
        if self.kind in ("symmetric", "with_min"):
            s_cont = self.s0 * grow
            scale = _Exact.apply(s_cont, _f16(s_cont.detach()))
            if self.kind == "symmetric":
                return scale, None, {}
            assert self.b is not None
            o_cont = self.o0 + self.s0.abs() * self.b
            return scale, _Exact.apply(o_cont, _f16(o_cont.detach())), {}
        d_cont = self.d * grow
        d = _Exact.apply(d_cont, _f16(d_cont.detach()))
        codes = self.sub_codes()
        scale = self._sub(d) * codes["sc"]  # float32 products, as ggml forms d * sc
        if self.kind == "signed_k":
            return scale, None, {"d": d}
        assert self.b is not None
        dmin_cont = self.dmin * (1 + self.b / self.reach)
        dmin = _Exact.apply(dmin_cont, _f16(dmin_cont.detach()))
        return scale, -(self._sub(dmin) * codes["mn"]), {"d": d, "dmin": dmin}

    def weight_and_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, offset, _ = self.fields()
        return self._decode(scale, offset)

    def _decode(self, scale: torch.Tensor, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, level indices) for these per-sub-block fields: the file's levels with frozen
        codes, else each moved weight's nearest level."""
        se = self._expand(scale)
        oe = None if offset is None else self._expand(offset)
        if self.c is None:
            return _Decode.apply(None, se, oe, self.idx0, self.levels), self.idx0
        w = self.w_latent()
        with torch.no_grad():
            t = (w - oe) if oe is not None else w
            zero = se == 0
            idx = self._assign(t / torch.where(zero, torch.ones_like(se), se), zero)
        return _Decode.apply(w, se, oe, idx, self.levels), idx

    def w_latent(self) -> torch.Tensor:
        """The starting values (the file's decoded weights) moved by WEIGHT_RATE * c steps."""
        if self.c is None:
            raise RuntimeError("codes are frozen: there are no latent weights")
        start = self.levels[self.idx0.long()] * self._expand(self.s0)
        if self.has_offset:
            start = start + self._expand(self.o0)
        return start + self._expand(self.s0.abs()) * (WEIGHT_RATE * self.c)

    def forward(self) -> torch.Tensor:
        return self.weight_and_codes()[0]

    def freeze_codes(self) -> None:
        """Keep every value's level as it is now; only scales and offsets train from here."""
        with torch.no_grad():
            idx = self.weight_and_codes()[1]
        self.idx0 = idx.to(self.idx0.dtype)
        self.c = None

    # -- back to bytes --------------------------------------------------------------------
    def in_file_order(self, a: np.ndarray) -> np.ndarray:
        """Rows of the model's matrix (or of its per-row fields) back in the file's row order."""
        if self.perm is None:
            return a
        out = np.empty_like(a)
        out[self.perm] = a
        return out

    def to_bytes(self) -> np.ndarray:
        """(rows, row bytes) uint8 in the file's row order: the blocks the forward pass decodes."""
        with torch.no_grad():
            scale, offset, raw = self.fields()
            idx = self._decode(scale, offset)[1]

        def file_rows(t: torch.Tensor) -> np.ndarray:
            return self.in_file_order(t.detach().cpu().numpy())

        n, bs = self.shape[0] * self.blocks_per_row, self.fmt.block_size
        per_block = (n, self.fmt.n_sub)
        params = BlockParams(file_rows(scale).reshape(per_block),
                             np.zeros(per_block, np.float32) if offset is None else file_rows(offset).reshape(per_block),
                             {k: file_rows(v).reshape(-1) for k, v in raw.items()})
        if self.is_kquant:
            with torch.no_grad():
                for key, code in self.sub_codes().items():
                    params.raw[key] = file_rows(code).reshape(per_block).astype(np.int64)
        data = self.fmt.pack(file_rows(idx).astype(np.int64).reshape(n, bs), params)
        return data.reshape(self.shape[0], -1)


class QuantLinear(torch.nn.Module):
    """A Linear whose weight is a FakeQuant: what the model trains in place of nn.Linear."""

    def __init__(self, fq: FakeQuant, bias: torch.Tensor | None = None):
        super().__init__()
        self.fq = fq
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = fq.shape[1], fq.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.fq(), self.bias)
