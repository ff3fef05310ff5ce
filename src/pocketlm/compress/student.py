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
               key: str) -> dict:
    """Candidate `c` pruned and healed for d["pilot_tokens"], then its sensitivity measured and
    the allocation its file budget allows found: {"pilot_kld", "quant_kld", ...}. Kept in
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
    m = distill(src.path, model, DistillOptions(
        data=data, tokens=d["pilot_tokens"], loss=d["loss"], targets=d["targets"], ce_weight=d["ce_weight"],
        hidden_weight=d["hidden_weight"],
        **c.shape_options(), resume=True, force=True, progress=progress, say=lambda _line: None,
        eval_every=10**9, save_every=10**9))
    sens = measure(model, calib, q["calib_tokens"], progress)
    types = types_for_budget(sens, c.file_budget)
    last = m["history"][-1]
    result = {"pilot_kld": last["kld"], "pilot_ppl": last["ppl"], "quant_kld": sens.predicted_kld(types),
              "file_bytes": sens.file_bytes(types), "tokens": m["tokens"],
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(done, {"key": key, "result": result})
    shutil.rmtree(model)  # a float32 student is hundreds of MB; its numbers are all the choice needs
    return result


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
        choice = choose(finals, lambda c: pilot_heal(src, folder, c, data, d, q, calib, progress, key), say)
    choice["candidates"] = [c.to_dict() for c in cands]
    choice["finalists"] = [c.label for c in finals]
    write_json(folder / "choose.json", choice)
    return choice
