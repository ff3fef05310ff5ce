"""`pocketlm quantize`: float tensors in, a GGUF of the chosen preset out.

Every tensor is read in GGUF layout (a HF folder is first converted to an f32 GGUF, cached),
planned (plan.py), quantized by the method (methods/), and written with the source's metadata.
With calibration, tensors inside decoder layers are quantized layer by layer while the
calibration activations flow through the already-quantized layers (calibrate.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PocketError
from ..models.gguf_file import copy_metadata, field_value, finish_writer, open_gguf
from ..models.export_gguf import cached_gguf
from ..models.hf_arch import deinterleave_rotary_rows
from ..models.source import resolve
from ..util.atomic import atomic_path
from .formats import get as get_format
from .methods.gptq import quantize_gptq
from .methods.rtn import quantize_rtn
from .plan import FILE_TYPE, TensorPlan, plan

METHODS = ("rtn", "imatrix", "gptq")
FLOAT_TYPES = {"F32", "F16", "BF16"}
log = logging.getLogger(__name__)


@dataclass
class QuantizeOptions:
    preset: str | None = None  # a llama.cpp preset, or None when `types` gives every tensor's type
    method: str | None = None
    calib: list = field(default_factory=list)
    calib_tokens: int = 8192  # 16384 measured the same KLD (0.02432 vs 0.02435) at 1.5x the time
    calib_ctx: int = 512
    keep: dict = field(default_factory=dict)
    allow_requant: bool = False
    progress: bool = True
    types: dict = field(default_factory=dict)  # GGUF name -> type: a budget's allocation (budget.py)


@dataclass
class TensorReport:
    name: str
    shape: tuple
    type: str
    method: str
    weighted_error: float  # sum imp*(w - q)^2 / sum imp*w^2 over the tensor


def _values(t) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)


def _check_requant(reader, plans: dict[str, TensorPlan], allow: bool) -> None:
    for t in reader.tensors:
        src_type, dst = t.tensor_type.name, plans[t.name].type
        if src_type in FLOAT_TYPES or dst in FLOAT_TYPES:
            continue
        src_bpw, dst_bpw = get_format(src_type).bits_per_weight, get_format(dst).bits_per_weight
        if src_bpw < dst_bpw:
            msg = (f"the input is already quantized ({t.name} is {src_type}, {src_bpw:.2f} bpw) below the requested "
                   f"{dst} ({dst_bpw:.2f} bpw): the file grows without regaining precision")
            if not allow:
                raise PocketError(msg + "; pass --allow-requant to do it anyway")
            log.warning(msg)
            return


def _weighted_error(values, deq, importance) -> float:
    imp = np.ones(values.shape[1], np.float32) if importance is None else importance
    den = float(((values * values) * imp).sum())
    return float((((values - deq) ** 2) * imp).sum() / den) if den > 0 else 0.0


def _quantize_one(name, values, type_name, method, stats) -> tuple[np.ndarray, TensorReport, np.ndarray]:
    """(bytes to write, report row, the values the bytes decode to)."""
    if type_name in FLOAT_TYPES:
        data = values.astype(np.float16) if type_name == "F16" else values
        return data, TensorReport(name, values.shape, type_name, "float", 0.0), data.astype(np.float32)
    fmt = get_format(type_name)
    importance = stats.importance if stats is not None and method != "rtn" else None
    if method == "gptq" and stats is not None and stats.xtx is not None:
        data = quantize_gptq(values, fmt, stats.hessian)
    else:
        method = "imatrix" if importance is not None else "rtn"
        data = quantize_rtn(values, fmt, importance)
    deq = fmt.dequantize(data.reshape(-1, fmt.type_size)).reshape(values.shape)
    return data, TensorReport(name, values.shape, type_name, method, _weighted_error(values, deq, importance)), deq


def calibration_windows(tokenizer, add_bos: bool, files, n_tokens: int, ctx: int) -> list[torch.Tensor]:
    from ..data import SAMPLE_DOCS
    from ..eval.windows import make_windows, read_texts

    text = read_texts(files) if files else read_texts(sorted(SAMPLE_DOCS.glob("*.rst")))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise PocketError(f"calibration text has {len(ids)} tokens, fewer than --calib-tokens {n_tokens}; give more text or a smaller number")
    bos_id = tokenizer.bos_token_id if add_bos else None
    per = ctx - 1 if add_bos else ctx
    windows = make_windows(ids, ctx, bos_id, max_tokens=max(n_tokens, per))  # at least one window
    return [torch.from_numpy(row) for row in windows.inputs]


def quantize_model(source, out: str | Path, opts: QuantizeOptions) -> list[TensorReport]:
    import gguf

    method = opts.method or ("gptq" if opts.calib else "imatrix")
    if method not in METHODS:
        raise PocketError(f"unknown --method {method!r} (choose one of {', '.join(METHODS)})")
    src = resolve(source)
    reader = open_gguf(cached_gguf(src, "f32"))
    arch = field_value(reader, "general.architecture")
    n_layers = int(field_value(reader, f"{arch}.block_count", 0))
    n_heads = int(field_value(reader, f"{arch}.attention.head_count", 1))
    n_kv = int(field_value(reader, f"{arch}.attention.head_count_kv", n_heads))
    by_name = {t.name: t for t in reader.tensors}
    shapes = [(t.name, tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors]
    if opts.types:
        plans = {name: TensorPlan(name, opts.types.get(name, "F32")) for name, _ in shapes}
    else:
        plans = {p.name: p for p in plan(shapes, opts.preset, n_layers, max(n_heads // max(n_kv, 1), 1), opts.keep)}
    _check_requant(reader, plans, opts.allow_requant)

    results: dict[str, tuple[np.ndarray, TensorReport]] = {}
    final_stats = None
    if method != "rtn":
        final_stats = _calibrated_pass(src, reader, by_name, plans, method, opts, arch, n_layers, n_heads, n_kv, results)
    for t in tqdm(reader.tensors, desc="quantize", unit="tensor", disable=not opts.progress, leave=False):
        if t.name not in results:
            is_output = t.name == "output.weight" or (t.name == "token_embd.weight" and "output.weight" not in by_name)
            stats = final_stats if is_output else None
            results[t.name] = _quantize_one(t.name, _values(t), plans[t.name].type, method, stats)[:2]

    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        copy_metadata(reader, writer, skip=("general.file_type", "general.quantization_version"))
        writer.add_file_type(FILE_TYPE[(opts.preset or _nearest_preset(plans, shapes)).upper()])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in reader.tensors:
            data, rep = results[t.name]
            if rep.type in FLOAT_TYPES:
                writer.add_tensor(t.name, data)
            else:
                writer.add_tensor(t.name, data, raw_dtype=get_format(rep.type).ggml_type)
        finish_writer(writer)
    return [results[t.name][1] for t in reader.tensors]


def _nearest_preset(plans: dict, shapes) -> str:
    """For a mixed allocation's file-type field (informational to llama.cpp): the preset of
    the type that holds the most weights."""
    weight: dict[str, int] = {}
    for name, shape in shapes:
        t = plans[name].type
        if t not in FLOAT_TYPES:
            weight[t] = weight.get(t, 0) + int(np.prod(shape))
    main = max(weight, key=weight.get) if weight else "Q8_0"
    return {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(main, main)


def _calibrated_pass(src, reader, by_name, plans, method, opts, arch, n_layers, n_heads, n_kv, results):
    import gguf

    from ..models.load import load

    loaded = load(src)
    windows = calibration_windows(loaded.tokenizer, loaded.add_bos, opts.calib, opts.calib_tokens, opts.calib_ctx)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    permuted = arch == "llama"

    def on_layer(i, stats):
        new_weights = {}
        for rel, st in stats.items():
            gname = names.get_name(f"model.layers.{i}.{rel}")
            if gname is None or f"{gname}.weight" not in by_name:
                continue
            tname = f"{gname}.weight"
            data, rep, deq = _quantize_one(tname, _values(by_name[tname]), plans[tname].type, method, st)
            results[tname] = (data, rep)
            if permuted and tname.endswith("attn_q.weight"):
                deq = deinterleave_rotary_rows(deq, n_heads)
            elif permuted and tname.endswith("attn_k.weight"):
                deq = deinterleave_rotary_rows(deq, n_kv)
            new_weights[rel] = torch.from_numpy(deq)
        return new_weights

    from .calibrate import calibrate_layerwise

    return calibrate_layerwise(loaded.model, windows, method == "gptq", on_layer, opts.progress)
