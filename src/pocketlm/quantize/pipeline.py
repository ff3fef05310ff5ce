"""`pocketlm quantize`: float tensors in, a GGUF of the chosen preset out.

Every tensor is read lazily in GGUF layout (models/tensors.py), planned (plan.py), quantized
by the method (methods/), and written at its place in the output as soon as it is done
(models/gguf_stream.py). With calibration, tensors inside decoder layers are quantized layer
by layer, one layer in memory, while the calibration activations flow through the
already-quantized layers (calibrate.py, models/layers.py).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ..errors import PocketError
from ..models.export_gguf import metadata_writer
from ..models.gguf_stream import StreamingGGUF, check_disk_space, row_blocks
from ..models.hf_arch import deinterleave_rotary_rows
from ..models.source import resolve
from ..models.tensors import open_tensors
from ..util.atomic import atomic_path
from .formats import get as get_format
from .methods.gptq import quantize_gptq
from .methods.rtn import quantize_rtn
from .plan import FILE_TYPE, TensorPlan, plan
from .qad_options import QadOptions
from .workers import map_rows

METHODS = ("rtn", "imatrix", "gptq", "qad")
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
    device: str | None = None  # where calibration's layer forward and X^T X run; None: CUDA when present
    qad: QadOptions | None = None  # qad.QadOptions for --method qad (gptq, then trained against the original: qad.py)
    fisher: bool = False  # gptq's tokens weighted by the logits' Fisher energy at each layer (fisher.py)


@dataclass
class TensorReport:
    name: str
    shape: tuple
    type: str
    method: str
    weighted_error: float  # sum imp*(w - q)^2 / sum imp*w^2 over the tensor


def _check_requant(ts, plans: dict[str, TensorPlan], allow: bool) -> None:
    for name, e in ts.entries.items():
        src_type, dst = e.type, plans[name].type
        if src_type in FLOAT_TYPES or dst in FLOAT_TYPES:
            continue
        src_bpw, dst_bpw = get_format(src_type).bits_per_weight, get_format(dst).bits_per_weight
        if src_bpw < dst_bpw:
            msg = (f"the input is already quantized ({name} is {src_type}, {src_bpw:.2f} bpw) below the requested "
                   f"{dst} ({dst_bpw:.2f} bpw): the file grows without regaining precision")
            if not allow:
                raise PocketError(msg + "; pass --allow-requant to do it anyway")
            log.warning(msg)
            return


def _encode(values, type_name, method, stats, last_use: bool = False) -> tuple[np.ndarray, str, np.ndarray, np.ndarray | None]:
    """(bytes to write, the method used, the values the bytes decode to, the importance).
    last_use: no other tensor needs these statistics, so gptq may consume their X^T X.
    values: an array, or [array] given away to gptq (which works in its storage)."""
    shape = (values[0] if isinstance(values, list) else values).shape
    if type_name in FLOAT_TYPES:
        data = values.astype(np.float16) if type_name == "F16" else values
        return data, "float", data.astype(np.float32), None
    fmt = get_format(type_name)
    importance = stats.importance if stats is not None and method != "rtn" else None
    if method == "gptq" and stats is not None and stats.xtx is not None:
        # given away in a list when this is its last use: gptq pops it, and its memory is freed as soon as gptq
        # has its permuted copy (an argument held by this frame would live through the whole sweep)
        data = quantize_gptq(values, fmt, [stats.take_hessian() if last_use else stats.copy_hessian()])
    else:
        method = "imatrix" if importance is not None else "rtn"
        data = np.concatenate(map_rows(lambda part: quantize_rtn(part, fmt, importance), values))
    deq = fmt.dequantize(data.reshape(-1, fmt.type_size)).reshape(shape)
    return data, method, deq, importance


def quantize_tensor(ts, name: str, type_name: str, method: str, stats, out, whole: bool = False,
                    last_use: bool = False):
    """Quantize one tensor into the streaming file `out`, a block of rows at a time (gptq takes
    all rows: its error feedback runs along each row's columns with one Hessian). Returns the
    report row and, when `whole`, the decoded values of the whole tensor (the calibrated layers
    run on them)."""
    shape = ts.shape(name)
    num = den = 0.0
    at, used, decoded = 0, method, []
    all_rows = method == "gptq" and stats is not None and stats.xtx is not None and type_name not in FLOAT_TYPES
    for rows in row_blocks(shape, all_rows):
        values = ts.values(name, rows)
        if all_rows:  # gptq works in the values' own storage (0.2 GB at 8B); the error below reads them again
            box = [values]
            del values
            data, used, deq, importance = _encode(box, type_name, method, stats, last_use)
            values = ts.values(name, rows)
        else:
            data, used, deq, importance = _encode(values, type_name, method, stats, last_use)
        out.write(name, data, at)
        at += data.nbytes
        if whole:
            decoded.append(deq)
        if used != "float":
            imp = np.ones(values.shape[-1], np.float32) if importance is None else importance
            num += float((((values - deq) ** 2) * imp).sum())
            den += float(((values * values) * imp).sum())
    report = TensorReport(name, shape, type_name, used, num / den if den > 0 else 0.0)
    return report, (np.concatenate(decoded) if whole else None)


def calibration_windows(tokenizer, add_bos: bool, files, n_tokens: int, ctx: int) -> list[torch.Tensor]:
    from ..data import SAMPLE_DOCS
    from ..eval.windows import make_windows, read_texts

    text = read_texts(files) if files else read_texts(sorted(SAMPLE_DOCS.glob("*.rst")))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise PocketError(f"calibration text has {len(ids)} tokens, fewer than --calib-tokens {n_tokens}; "
                          "give more text or a smaller number")
    bos_id = tokenizer.bos_token_id if add_bos else None
    per = ctx - 1 if add_bos else ctx
    windows = make_windows(ids, ctx, bos_id, max_tokens=max(n_tokens, per))  # at least one window
    return [torch.from_numpy(row) for row in windows.inputs]


def method_of(opts: QuantizeOptions) -> str:
    """The method asked for, else gptq on the user's calibration text, imatrix on the bundled one."""
    return opts.method or ("gptq" if opts.calib else "imatrix")


def quantize_model(source, out: str | Path, opts: QuantizeOptions) -> list[TensorReport]:
    """Tensors are read lazily from the source and written into the output as each is done:
    memory holds one tensor (or one decoder layer when calibrating), disk only the output."""
    method = method_of(opts)
    if method not in METHODS:
        raise PocketError(f"unknown --method {method!r} (choose one of {', '.join(METHODS)})")
    if opts.fisher:
        from .fisher import check

        check(source, method)
    if method == "qad":
        from .qad import quantize_qad

        return quantize_qad(source, Path(out), opts, opts.qad or QadOptions(progress=opts.progress))
    src = resolve(source)
    ts = open_tensors(src)
    facts = ts.facts
    if not src.is_gguf:
        ts.check_shapes()
    shapes = [(name, ts.shape(name)) for name in ts.names]
    if opts.types:
        plans = {name: TensorPlan(name, opts.types.get(name, "F32")) for name, _ in shapes}
    elif opts.preset is None:
        raise PocketError("give a preset or every tensor's type")
    else:
        plans = {p.name: p for p in plan(shapes, opts.preset, facts.n_layers, facts.gqa, opts.keep)}
    _check_requant(ts, plans, opts.allow_requant)
    writer = metadata_writer(ts, skip=("general.file_type", "general.quantization_version"))
    writer.add_file_type(FILE_TYPE[(opts.preset or _nearest_preset(plans, shapes)).upper()])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    out = Path(out)
    reports: dict[str, TensorReport] = {}
    with atomic_path(out) as tmp:
        stream = StreamingGGUF(tmp, writer)
        for name, shape in shapes:
            stream.add_tensor_info(name, plans[name].type, shape)
        check_disk_space(out, stream.total_bytes())
        stream.begin()
        try:
            final_stats = None
            if method != "rtn":
                final_stats = _calibrated_pass(src, ts, plans, method, opts, stream, reports)
            for name in tqdm(ts.names, desc="quantize", unit="tensor", disable=not opts.progress, leave=False):
                if name not in reports:
                    is_output = name == "output.weight" or (name == "token_embd.weight" and facts.tied)
                    stats = final_stats if is_output else None
                    reports[name] = quantize_tensor(ts, name, plans[name].type, method, stats, stream)[0]
            stream.finish()
        finally:
            stream.close()
    return [reports[name] for name in ts.names]


def _nearest_preset(plans: dict, shapes) -> str:
    """For a mixed allocation's file-type field (informational to llama.cpp): the preset of
    the type that holds the most weights."""
    weight: dict[str, int] = {}
    for name, shape in shapes:
        t = plans[name].type
        if t not in FLOAT_TYPES:
            weight[t] = weight.get(t, 0) + int(np.prod(shape))
    main = max(weight, key=lambda t: weight[t]) if weight else "Q8_0"
    return {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(main, main)


def _calibrated_pass(src, ts, plans, method, opts, stream, reports):
    from ..models.layers import LayerStream
    from .calibrate import calibrate_layerwise

    layers = LayerStream(src, device=opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    windows = calibration_windows(layers.tokenizer, layers.add_bos, opts.calib, opts.calib_tokens, opts.calib_ctx)
    names = ts.facts.name_map()
    weights = None
    if opts.fisher and method == "gptq":
        from .fisher import token_weights

        weights = token_weights(src, windows, opts.progress)

    def on_layer(i, stats):  # a generator: each tensor's decoded weights are handed over before the next is made
        users = Counter(id(st) for st in stats.values())  # q/k/v and gate/up share their statistics
        # the widest input first: its gptq (two 14336^2 Hessians at 8B) then runs while no other
        # decoded weight of the layer is held (each tensor is written at its own place in the file,
        # and its statistics were all taken before any tensor changed: the order changes no byte)
        for rel, st in sorted(stats.items(), key=lambda item: -item[1].sq_sum.shape[0]):
            users[id(st)] -= 1
            gname = names.get_name(f"model.layers.{i}.{rel}")
            if gname is None or f"{gname}.weight" not in ts.entries:
                continue
            tname = f"{gname}.weight"
            reports[tname], deq = quantize_tensor(ts, tname, plans[tname].type, method, st, stream, whole=True,
                                                  last_use=users[id(st)] == 0)
            heads = ts.facts.permuted_heads(tname)
            if heads:
                deq = deinterleave_rotary_rows(deq, heads)
            yield rel, torch.from_numpy(deq)
            del deq  # the layer rebuilt from these holds them; this frame need not

    return calibrate_layerwise(layers.model, windows, method == "gptq", on_layer, opts.progress, stream=layers,
                               release=True, token_weights=weights)
