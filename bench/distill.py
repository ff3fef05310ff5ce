"""Healing a pruned student: no healing vs cross-entropy vs KD losses, same everything else.

Teacher: the default model. Student: the default shape (about half the teacher's non-embedding
parameters, every Linear input a multiple of 256), pruned by activation importance. Data: the
first 80% of wiki.txt plus c4.txt. Held out: the last 20% of wiki.txt. Each run trains on the
same sequences in the same order for the same number of tokens; only the loss differs.
A domain run distills on the Python docs (every 10th page held out) and compares held-out PPL.

  .venv/bin/python bench/distill.py [--tokens 1000000] [--losses ce,fkl@full,fkl@sampled,fkl@topk] [--eval-tokens 20480]
      [--mmlu 500] [--domain-tokens N] [--domain-loss fkl|fkl+tail] [--skip-domain]

Work files live in ~/.cache/pocketlm-bench/distill/ (students, per-run JSON) and are reused by
reruns with the same settings; the tables go to bench/results/distill.md and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_file import save_results  # noqa: E402

from pocketlm.distill.run import DistillOptions, distill  # noqa: E402
from pocketlm.distill.stages import distill_iteratively  # noqa: E402
from pocketlm.eval.runner import EvalOptions, evaluate  # noqa: E402
from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import machine_name  # noqa: E402

DATA = Path(os.environ.get("POCKETLM_DATA", ROOT.parent / "shared" / "data"))
WIKI, C4, MMLU = DATA / "text" / "wiki.txt", DATA / "text" / "c4.txt", DATA / "qa" / "mmlu_test.jsonl"
PYDOCS = DATA / "corpora" / "python-docs"
CACHE = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "distill"
RESULTS = ROOT / "bench" / "results" / "distill.md"
DEFAULT_LR = DistillOptions.lr
TEACHER = os.environ.get("POCKETLM_TEACHER", "smollm2-135m")  # a path where the wheel is not installed


def split_wiki(work: Path) -> tuple[Path, Path]:
    text = WIKI.read_text()
    cut = text.rfind("</doc>", 0, int(len(text) * 0.8)) + len("</doc>")  # at an article boundary
    train, held = work / "train-wiki.txt", work / "heldout-wiki.txt"
    train.write_text(text[:cut])
    held.write_text(text[cut:])
    return train, held


def split_pydocs(work: Path) -> tuple[Path, Path]:
    pages = sorted(p for p in PYDOCS.rglob("*.txt") if p.name != "license.rst.txt")
    train_dir, held = work / "pydocs-train", work / "heldout-pydocs.txt"
    train_dir.mkdir(exist_ok=True)
    held_parts = []
    for i, p in enumerate(pages):
        if i % 10 == 0:
            held_parts.append(p.read_text())
        else:
            (train_dir / p.relative_to(PYDOCS).as_posix().replace("/", "__")).write_text(p.read_text())
    held.write_text("\n\n".join(held_parts))
    return train_dir, held


def run(name: str, work: Path, data: list[str], loss: str, tokens: int, evals: dict, args,
        shape: dict | None = None) -> dict:
    res_path = work / f"{name}.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    out = work / name
    t0 = time.perf_counter()
    spec, _, targets = loss.partition("@")  # "fkl@sampled": the teacher's signal (distill/signals.py)
    # "+tail": the tail sample (distill/losses.py); "+ce0.2": --ce-weight 0.2; "+iter": two prune -> heal stages
    base_loss, *extras = spec.split("+")
    ce_weight = next((float(e[2:]) for e in extras if e.startswith("ce")), 0.0)
    hidden_weight = next((float(e[3:]) for e in extras if e.startswith("hid")), 0.0)  # "+hid1": --hidden-weight 1
    opts = DistillOptions(data=data, tokens=tokens, loss=base_loss, lr=args.lr, force=True,
                          tail="sample" if "tail" in extras else "bucket", targets=targets or "topk", ce_weight=ce_weight,
                          hidden_weight=hidden_weight, eval_every=10**9, save_every=25, resume=True, say=print,
                          **(shape or {}))
    if "iter" in extras:  # "+iter": the same student in two prune -> heal stages (distill/stages.py)
        manifest = distill_iteratively(TEACHER, out, opts, default_student())
    else:
        manifest = distill(TEACHER, out, opts)
    row = {"name": name, "loss": loss if tokens else "-", "tokens": manifest["tokens"], "targets": manifest["targets"],
           "wall_s": time.perf_counter() - t0, "share": student_share(out),
           "tok_s": (manifest["history"][-1].get("tok_s") if tokens else None)}
    for label, (text, mmlu) in evals.items():
        # llama.cpp's tokenizer and transformers' split the Python docs differently (eval refuses the
        # pair), so the domain pages are scored by the teacher and the student through one tokenizer
        backend = "torch" if label == "pydocs" else args.eval_backend
        r = evaluate(str(out), EvalOptions(texts=[str(text)], reference=TEACHER, max_tokens=args.eval_tokens,
                                           mmlu=str(MMLU) if mmlu and args.mmlu else None, mmlu_limit=args.mmlu,
                                           backend=backend, progress=False))
        row[label] = {"ppl": r["ppl"], "kld": r["kld_mean"], "top1": r["top1"], "teacher_ppl": r["reference_ppl"],
                      "mmlu": r.get("mmlu_acc")}
    write_json(res_path, row)
    return row


def student_share(out: Path) -> float | None:
    """The student's non-embedding parameters as a share of the teacher's (from its distill.json)."""
    from pocketlm.distill.shapes import StudentShape, TeacherDims
    from pocketlm.models.facts import hf_config
    from pocketlm.models.load import hf_folder

    shape = json.loads((out / "distill.json").read_text()).get("shape") if (out / "distill.json").exists() else None
    if not shape:
        return None
    t = TeacherDims.of(hf_config(hf_folder(TEACHER)))
    return StudentShape.from_dict(shape).non_embedding(t) / t.non_embedding()


def default_student() -> dict:
    """The shape options of the one-shot rows' student (the default: half the teacher's non-embedding parameters)."""
    from pocketlm.distill.shapes import TeacherDims, default_shape
    from pocketlm.models.facts import hf_config
    from pocketlm.models.load import hf_folder

    t = TeacherDims.of(hf_config(hf_folder(TEACHER)))
    s = default_shape(t, list(range(t.layers)))
    return {"layers": len(s.keep_layers), "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads, "ffn": s.ffn}


def teacher_row(work: Path, evals: dict, args) -> dict:
    res_path = work / "teacher.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    row = {"name": "teacher"}
    for label, (text, mmlu) in evals.items():
        r = evaluate(TEACHER, EvalOptions(texts=[str(text)], max_tokens=args.eval_tokens,
                                          mmlu=str(MMLU) if mmlu and args.mmlu else None, mmlu_limit=args.mmlu,
                                          backend=args.eval_backend, progress=False))
        row[label] = {"ppl": r["ppl"], "mmlu": r.get("mmlu_acc")}
    write_json(res_path, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--losses", default="ce,fkl@full,fkl@sampled,fkl@topk",
                    help="LOSS[+tail][+ceW][@TARGETS]: fkl+tail is fkl with --tail sample, fkl+ce0.2 adds 0.2 x ce; "
                         "TARGETS full, sampled or topk "
                         "(default topk, what every run before 2026-12-01 used)")
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--mmlu", type=int, default=500)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--domain-tokens", type=int, default=None, help="default: --tokens")
    ap.add_argument("--domain-loss", default="fkl", help="the loss of the domain run (e.g. fkl+tail)")
    ap.add_argument("--domain-fraction", type=float, default=0.5,
                    help="the domain student's share of the teacher's non-embedding parameters (#21's goal: <= 0.6)")
    ap.add_argument("--domain-layers", type=int, default=None,
                    help="the domain student's layers (with --domain-ffn: a shape instead of the fraction's default)")
    ap.add_argument("--domain-hidden", type=int, default=None,
                    help="the domain student's hidden width [distill's default: the teacher's, aligned down to 256]")
    ap.add_argument("--domain-ffn", type=int, default=None, help="the domain student's MLP width")
    ap.add_argument("--domain-heads", type=int, default=None, help="the domain student's attention heads")
    ap.add_argument("--skip-domain", action="store_true")
    ap.add_argument("--title", default=None, help="added to the section's heading: sections are replaced by heading")
    ap.add_argument("--eval-backend", default="auto", choices=["auto", "torch"],
                    help="torch: evaluate the GGUF teacher through transformers too (a GPU machine without llama.cpp)")
    args = ap.parse_args()
    if not WIKI.exists():
        sys.exit(f"needs {WIKI}")
    work = CACHE / (f"t{args.tokens}" + (f"-lr{args.lr:g}" if args.lr != DEFAULT_LR else ""))
    work.mkdir(parents=True, exist_ok=True)
    train_wiki, held_wiki = split_wiki(work)
    evals = {"wiki": (held_wiki, True)}
    teacher = teacher_row(work, evals, args)
    rows = [run("pruned", work, [str(train_wiki), str(C4)], "fkl", 0, evals, args)]
    for loss in args.losses.split(","):
        name = f"heal-{loss.replace(':', '').replace('@', '-')}"
        rows.append(run(name, work, [str(train_wiki), str(C4)], loss, args.tokens, evals, args))
    domain = None
    if not args.skip_domain:
        train_docs, held_docs = split_pydocs(work)
        dom_evals = {"pydocs": (held_docs, False)}
        shape = domain_shape(args)
        name = f"domain-{args.domain_loss.replace(':', '').replace('@', '-')}" + \
            "".join(f"-{tag}{shape[k]:g}" for k, tag in DOMAIN_SHAPE if k in shape)
        dom = run(name, work, [str(train_docs)], args.domain_loss, args.domain_tokens or args.tokens, dom_evals, args,
                  shape=shape)
        domain = (dom["pydocs"]["teacher_ppl"], dom)
    write_results(args, teacher, rows, domain)


# the domain student's shape flags (--domain-KEY, DistillOptions.KEY) and their tags in its cache name:
# one list for the run's options, that name and the command the results quote
DOMAIN_SHAPE = (("fraction", "f"), ("layers", "L"), ("hidden", "H"), ("ffn", "ffn"), ("heads", "h"))


def domain_shape(args) -> dict:
    """The domain student's shape options that were given (a fraction of 0.5 is the default's)."""
    given = {k: getattr(args, f"domain_{k}") for k, _ in DOMAIN_SHAPE}
    return {k: v for k, v in given.items() if v is not None and not (k == "fraction" and v == 0.5)}


def write_results(args, teacher, rows, domain) -> None:
    t_ppl = teacher["wiki"]["ppl"]
    a_ppl = rows[0]["wiki"]["ppl"]
    title = f"## Healing at {rows[-1]['tokens']:,} training tokens" + (f", lr {args.lr:g}" if args.lr != DEFAULT_LR else "")
    lines = [title + (f": {args.title}" if args.title else ""), "",
             f"Command: `.venv/bin/python bench/distill.py --tokens {args.tokens} --losses {args.losses}"
             + (f" --mmlu {args.mmlu}" if args.mmlu != 500 else "") + (f" --title '{args.title}'" if args.title else "")
             + (f" --lr {args.lr:g}" if args.lr != DEFAULT_LR else "")
             + (f" --eval-backend {args.eval_backend}" if args.eval_backend != "auto" else "")
             + (" --skip-domain" if args.skip_domain else
                (f" --domain-loss {args.domain_loss}" if args.domain_loss != "fkl" else "")
                + "".join(f" --domain-{k} {v:g}" for k, v in domain_shape(args).items()))
             + f"` on {machine_name()} ({os.cpu_count()} CPU cores), {time.strftime('%Y-%m-%d')}. "
             + f"Teacher: {Path(TEACHER).name} (PPL {t_ppl:.3f}"
             + (f", MMLU {100 * teacher['wiki']['mmlu']:.1f}%" if teacher["wiki"].get("mmlu") else "") + "). "
             f"Held-out: last 20% of wiki.txt, {args.eval_tokens} tokens"
             + (f"; MMLU: stratified {args.mmlu}." if args.mmlu else "; MMLU not run."), "",
             "| student | loss | tokens | held-out PPL | KLD vs teacher | top-1 | MMLU | gap closed | tok/s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["wiki"]
        gap = (a_ppl - w["ppl"]) / (a_ppl - t_ppl) if a_ppl != t_ppl else 0.0
        lines.append(f"| {r['name']} | {r['loss']} | {r['tokens']:,} | {w['ppl']:.3f} | {w['kld']:.4f} | "
                     f"{100 * w['top1']:.1f}% | " + (f"{100 * w['mmlu']:.1f}%" if w.get("mmlu") is not None else "-")
                     + f" | {100 * gap:.1f}% | " + (f"{r['tok_s']:.0f}" if r.get("tok_s") else "-") + f" | {r['wall_s']:.0f} |")
    ce = next((r for r in rows if r["loss"] == "ce"), None)
    kd = [r for r in rows if r["loss"] not in ("ce", "-")]
    if ce and kd:
        best = min(kd, key=lambda r: r["wiki"]["ppl"])
        gain = 1 - best["wiki"]["ppl"] / ce["wiki"]["ppl"]
        lines += ["", f"Goal (#21: KD beats ce-only by >= 5% held-out PPL at equal tokens): best KD ({best['loss']}) "
                      f"PPL {best['wiki']['ppl']:.3f} vs ce {ce['wiki']['ppl']:.3f}: "
                      + (f"{100 * gain:.1f}% lower" if gain >= 0 else f"{-100 * gain:.1f}% higher") + " -> "
                      + ("**met**" if gain >= 0.05 else "**not met**") + "."]
    if domain:
        t_dom, d = domain
        ratio = d["pydocs"]["ppl"] / t_dom
        lines += ["", "### Domain: Python docs (every 10th page held out)", "",
                  "| model | tokens | held-out pages PPL |", "|---|---|---|",
                  f"| teacher | - | {t_dom:.3f} |", f"| student ({d['loss']}) | {d['tokens']:,} | {d['pydocs']['ppl']:.3f} |", "",
                  "Goal (#21: the student at <= 60% of the teacher's non-embedding parameters within 1.25x its PPL on "
                  "held-out pages; this student has " + (f"{d['share']:.0%}" if d.get("share") else "~49%") + "): "
                  f"ratio {ratio:.3f} -> " + ("**met**" if ratio <= 1.25 and (d.get("share") or 0.49) <= 0.6 else
                                              "**not met**") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    header = "# Distillation benchmark\n\nSections are replaced per heading; see bench/distill.py.\n\n"
    old = RESULTS.read_text() if RESULTS.exists() else header
    kept = [s for s in old.split("\n## ")[1:] if ("## " + s).split("\n", 1)[0] != lines[0]]
    save_results(RESULTS, header + "".join("## " + s.rstrip() + "\n\n" for s in kept) + text)


if __name__ == "__main__":
    main()
