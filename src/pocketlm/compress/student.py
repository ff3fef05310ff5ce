"""compress's choice of student for a budget below the quantization floor (distill/choose.py),
with the pilot heals run and kept resumable: each finished pilot's result is written beside
the others, so an interrupted choice only redoes the pilot it was in."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from ..util.atomic import write_json


def teacher_facts(src):
    """The teacher's dimensions and the file bytes besides tensor data a student of it carries
    (the same tokenizer and metadata), from its config and header alone: no weights loaded."""
    from ..distill.shapes import TeacherDims
    from ..models.export_gguf import header_bytes
    from ..models.facts import hf_config
    from ..models.load import hf_folder
    from ..models.tensors import open_tensors

    return TeacherDims.of(hf_config(hf_folder(src))), header_bytes(open_tensors(src))


def students_below_floor(model, target_size: int, memory: int | None = None, ctx: int = 4096) -> dict | None:
    """For a file budget below the smallest file quantization alone makes of `model`: the student
    shapes that fit it, from shapes alone (`plan` shows them), or None when quantization reaches
    it. With `memory`, each student gets what that memory leaves it at `ctx`."""
    from ..distill.choose import student_candidates
    from ..distill.prune import check_prunable
    from ..models.facts import hf_config
    from ..models.load import hf_folder
    from ..models.source import resolve
    from ..quantize.budget import smallest_file_bytes

    smallest = smallest_file_bytes(model)[0]
    if target_size >= smallest:
        return None
    src = resolve(model)
    check_prunable(hf_config(hf_folder(src)))
    t, overhead = teacher_facts(src)
    cands, finals = student_candidates(t, overhead, memory or target_size, ctx if memory else None)
    return {"budget": target_size, "memory": memory, "ctx": ctx if memory else None, "smallest_quantized": smallest,
            "candidates": [c.to_dict() for c in cands], "finalists": [c.label for c in finals]}


def pilot_heal(src, folder: Path, c, data: list[str], d: dict, q: dict, calib: list[str], progress: bool,
               key: str, best: float | None = None) -> dict:
    """Candidate `c` pruned and healed for d["pilot_tokens"], its sensitivity measured and the
    allocation its file budget allows found, then (unless its healing alone scores above `best`)
    quantized to it and the file's KLD measured: {"pilot_kld", "quant_kld", ...}. Kept in
    `folder` under `key`; a result kept under another key is redone."""
    from ..distill.run import DistillOptions, distill
    from ..quantize.budget import types_for_budget
    from ..quantize.sensitivity import measure

    done = folder / f"{c.label}.json"
    if done.exists():
        r = json.loads(done.read_text())
        if r.get("key") == key:
            return r["result"]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = folder / c.label
    opts = DistillOptions(
        data=data, tokens=d["pilot_tokens"], loss=d["loss"], targets=d["targets"], ce_weight=d["ce_weight"],
        hidden_weight=d["hidden_weight"],
        **c.shape_options(), resume=True, force=True, progress=progress, say=lambda _line: None,
        eval_every=10**9, save_every=10**9)
    m = distill(src.path, model, opts)
    sens = measure(model, calib, q["calib_tokens"], progress)
    types = types_for_budget(sens, c.file_budget)
    last = m["history"][-1]
    predicted = sens.predicted_kld(types)
    result = {"pilot_kld": last["kld"], "pilot_ppl": last["ppl"], "quant_kld": predicted, "quant_measured": False,
              "predicted_quant_kld": predicted, "file_bytes": sens.file_bytes(types), "tokens": m["tokens"]}
    if best is None or last["kld"] < best:
        # distill's held-out KLD is exact with the full-vocabulary teacher, an estimate from its draws otherwise
        float_kld, file_kld = _file_kld(src, model, types, data, opts, q, calib, folder / f"{c.label}.gguf", progress,
                                        last["kld"] if m["targets"] == "full" else None)
        # llama.cpp rounds each matmul's input to 8 bits, which the float forward above does not: the proxy's term
        result.update(quant_kld=file_kld - float_kld + sens.runtime_kld(types), quant_measured=True, file_kld=file_kld,
                      float_kld=float_kld)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(done, {"key": key, "result": result})
    shutil.rmtree(model)  # a float32 student is hundreds of MB; its numbers are all the choice needs
    return result


def _file_kld(src, model: Path, types: dict, data: list[str], opts, q: dict, calib: list[str], gguf: Path,
              progress: bool, float_kld: float | None) -> tuple[float, float]:
    """(the float `model`'s held-out KLD to the teacher, that of `model` quantized to `types` as
    compress will quantize it), both over the whole vocabulary on distill's held-out sequences at
    its precision; the file's values decoded exactly as llama.cpp decodes them, in the student's
    float forward. `float_kld`: the first, when distill measured it so already."""
    import torch

    from ..distill.data import load_sequences
    from ..distill.signals import OnlineTeacher
    from ..distill.trainer import TrainConfig, evaluate_student
    from ..models.load import load
    from ..quantize.pipeline import QuantizeOptions, quantize_model
    from ..quantize.qad import build_student
    from ..util.machine import compute_device

    quantize_model(str(model), gguf, QuantizeOptions(types=types, method=q["method"], calib=calib,
                                                     calib_tokens=q["calib_tokens"], progress=progress))
    try:
        teacher = load(src)
        seqs = load_sequences(teacher.tokenizer, data, opts.seq, teacher.add_bos)
        device = compute_device(0)
        teacher.model.to(device, torch.bfloat16 if opts.bf16 else torch.float32)
        signal, cfg = OnlineTeacher(teacher.model), TrainConfig(micro_batch=opts.micro_batch, bf16=opts.bf16)
        skeleton = load(model).model
        if float_kld is None:
            float_kld = float(evaluate_student(skeleton.to(device), seqs.held_out, signal, cfg)["kld"])
        student, _, _ = build_student(skeleton.to("cpu"), gguf)
        return float_kld, float(evaluate_student(student.to(device), seqs.held_out, signal, cfg)["kld"])
    finally:
        gguf.unlink(missing_ok=True)


def choose_student(src, folder: Path, budget: int, data: list[str], d: dict, q: dict, calib: list[str],
                   progress: bool, say: Callable[[str], None], ctx: int | None, key: str) -> dict:
    """`budget`: file bytes, or with `ctx` run-time memory at that context (distill/choose.py).
    `key`: the step's key (inputs and code); a pilot result left under another is redone."""
    from ..distill.choose import choose, student_candidates

    t, overhead = teacher_facts(src)
    cands, finals = student_candidates(t, overhead, budget, ctx)
    say(f"{len(cands)} student shapes fit {budget / 1e6:.1f} MB" + (f" of memory at --ctx {ctx}" if ctx else "")
        + "; pilot-healing the finalists: "
        + ", ".join(f"{c.label} at {c.bpw:.2f} bits/weight" for c in finals))
    folder.mkdir(parents=True, exist_ok=True)

    if d["pilot_tokens"] == 0 or len(finals) == 1:
        from ..distill.choose import LEVELS

        mid = min(finals, key=lambda c: abs(c.bpw - LEVELS[len(LEVELS) // 2]))
        why = ("the only shape that fits" if len(finals) == 1 else
               f"the finalist nearest {LEVELS[len(LEVELS) // 2]} bits per weight (distill.pilot_tokens: 0, no pilots)")
        choice = {"pilots": [], "chosen": mid.label, "shape": mid.shape_options(), "why": f"{mid.label}: {why}"}
    else:
        choice = choose(finals, lambda c, best: pilot_heal(src, folder, c, data, d, q, calib, progress, key, best),
                        say)
    choice["candidates"] = [c.to_dict() for c in cands]
    choice["finalists"] = [c.label for c in finals]
    write_json(folder / "choose.json", choice)
    return choice
