"""Iterative prune -> heal for deep cuts: the teacher is cut halfway to the student's shape and
healed, and only that healed model is cut to the final shape, both stages distilled against the
original teacher, sharing one token budget (the first stage a third of it).

Why: a one-shot deep cut removes units whose importance was measured in the full model, where
other units still carried part of their work; cutting a healed intermediate measures importance
where the network has already moved the work (the schedule behind Minitron's 15B -> 8B -> 4B
family, arXiv 2407.14679). Whether it beats one shot here at equal tokens is measured in
bench/results/distill.md (the `+iter` rows).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from ..util.atomic import write_text
from .shapes import ALIGN, TeacherDims

FIRST_SHARE = 1 / 3  # of the tokens, for the first stage


def halfway(t: TeacherDims, final: dict) -> dict:
    """Shape options halfway (in layers and MLP width) from the teacher to `final`, with the
    final hidden width and heads, so that the final shape is a cut of it."""
    ffn_top = t.ffn // ALIGN * ALIGN if t.ffn >= ALIGN else t.ffn
    mid_ffn = (ffn_top + final["ffn"]) // 2
    mid_ffn = max(final["ffn"], mid_ffn // ALIGN * ALIGN if final["ffn"] % ALIGN == 0 else mid_ffn)
    return {**final, "layers": (t.layers + final["layers"] + 1) // 2, "ffn": mid_ffn}


def distill_iteratively(teacher_source, out: str | Path, opts, final: dict) -> dict:
    """Two stages to the `final` shape options (layers, hidden, heads, kv_heads, ffn); returns the
    final run's manifest with the first stage's summary under "stages"."""
    from ..models.facts import hf_config
    from ..models.load import hf_folder
    from .run import distill

    out = Path(out)
    t = TeacherDims.of(hf_config(hf_folder(teacher_source)))
    mid_opts = halfway(t, final)
    mid = out.with_name(out.name + ".stage1")
    first_tokens = max(1, int(opts.tokens * FIRST_SHARE))
    # a finished first stage of this very job is kept (an interrupted second stage resumes from it)
    job = json.dumps([str(teacher_source), first_tokens, mid_opts, {k: v for k, v in asdict(opts).items()
                                                                   if k not in ("force", "resume", "progress", "say")}],
                     sort_keys=True, default=str)
    marker = mid / "stage.json"
    if marker.exists() and marker.read_text() == job and (mid / "distill.json").exists():
        m1 = json.loads((mid / "distill.json").read_text())
    else:
        m1 = distill(teacher_source, mid, replace(opts, tokens=first_tokens, drop_layers=None, fraction=0.5,
                                                  resume=True, force=True, **mid_opts))
        write_text(marker, job)
    m2 = distill(teacher_source, out, replace(opts, tokens=max(1, opts.tokens - m1["tokens"]), prune_from=str(mid),
                                              drop_layers=None, resume=True, force=True, **final))
    m2["stages"] = [{"shape": m1["shape"], "tokens": m1["tokens"], "seconds": m1["seconds"],
                     "held_out": m1["history"][-1]}]
    m2["tokens"] += m1["tokens"]
    shutil.rmtree(mid, ignore_errors=True)
    return m2
