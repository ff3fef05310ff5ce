"""Quantization-aware distillation (`quantize --method qad`) against gptq and llama.cpp, at the
same bytes, in one run on one machine.

For each type: llama.cpp's quantizer (and with its imatrix), pocketlm gptq (and with --fisher,
gptq --fisher too), and pocketlm qad started from that very gptq file (the --fisher one with
--fisher), trained on pocketlm's bundled general text (wiki-first80 + c4), evaluated like
bench/quant_vs_llamacpp.py: mean KLD against the F32 model, perplexity and top-1
agreement on the last 20% of wiki.txt (never trained on), ctx 512, in llama.cpp.

  .venv/bin/python bench/qad.py [--model smollm2-135m] [--types Q4_0,IQ4_NL] [--tokens 200000] [--fisher] [--tag NAME]

Rows are kept in ~/.cache/pocketlm-bench/qad/<tag>/ (a rerun measures only what is missing);
the table goes to bench/results/qad.md, one section per --tag.
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
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant_vs_llamacpp import measure, prepare_reference, produce, remembered_note, split_texts, work_folder  # noqa: E402
from results_file import put_section  # noqa: E402

from pocketlm.data import general_text  # noqa: E402
from pocketlm.distill.trainer import Checkpoint  # noqa: E402
from pocketlm.quantize import fakequant  # noqa: E402
from pocketlm.quantize.qad import train_file  # noqa: E402
from pocketlm.quantize.qad_options import CODES, QadOptions  # noqa: E402
from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "qad.md"
VARIANTS = ["llama.cpp", "llama.cpp+imatrix", "pocketlm gptq", "pocketlm gptq --fisher", "pocketlm qad"]
SUB_CODE_RATE = fakequant.SUB_CODE_RATE  # the product's, before --sub-code-rate replaces it for a run
GOAL = 0.6  # qad's mean KLD / gptq's, issue #22


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--types", default="Q4_0,IQ4_NL")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--lr", type=float, default=QadOptions.lr,
                    help="default: by format, as quantize does (qad_options.learning_rate); rows say 'lrauto'")
    ap.add_argument("--codes", default=QadOptions.codes, choices=list(CODES))
    ap.add_argument("--sub-code-rate", type=float, default=SUB_CODE_RATE,
                    help="with --codes scales: how fast the k-quants' sub-block codes move (fakequant.SUB_CODE_RATE)")
    ap.add_argument("--norms", action="store_true", help="the file's float32 norms train too")
    ap.add_argument("--batch", type=int, default=QadOptions.batch,
                    help="sequences per step (fewer: more steps for the same tokens)")
    ap.add_argument("--epochs", type=int, default=QadOptions.epochs, help="passes over the --tokens of text")
    ap.add_argument("--block-tokens", type=int, default=None,
                    help="tokens of the layer-by-layer phase (the first of the training sequences, reused); "
                         "default: by format, as quantize does (qad_options.layer_phase_tokens)")
    ap.add_argument("--fisher", action="store_true",
                    help="qad starts from gptq --fisher's file, as `quantize --method qad --fisher` does (a row of its own)")
    ap.add_argument("--data", default=None,
                    help="comma-separated files qad trains on (default: pocketlm's bundled general text)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--cached-only", action="store_true",
                    help="write the section from the rows already measured; '-' for the rest (nothing is computed)")
    ap.add_argument("--note", default="", help="said under the section's heading; remembered per --tag")
    args = ap.parse_args()
    tag, work = work_folder("qad", args.model, args.tag)
    args.note = remembered_note(work, args.note)
    if not args.cached_only:
        calib, held_out = split_texts(work, calib_chars=args.calib_tokens * 8)
        ref, tools, imatrix = prepare_reference(args.model, work, calib, args.calib_tokens)
    # the sub-block codes' rate is in the name: rows of 'scales' at different rates are different runs
    fakequant.SUB_CODE_RATE = args.sub_code_rate  # read at each step; not a QadOptions field (a bench knob)
    codes = f"scales{args.sub_code_rate:g}" if args.codes == "scales" else args.codes
    lr_name = "auto" if args.lr is None else f"{args.lr:g}"
    qad_name = f"pocketlm qad {args.tokens // 1000}k lr{lr_name} {codes}" + "".join(f" {n}" for n, _ in named(args))
    data = args.data.split(",") if args.data else general_text()
    results: dict = {}
    for preset in args.types.split(","):
        for variant in variants(args):
            name = qad_name if variant == "pocketlm qad" else variant
            row = work / f"{preset}-{name.replace(' ', '_').replace('+', '_')}.json"
            if row.exists():
                results[(preset, variant)] = json.loads(row.read_text())
                continue
            if args.cached_only:
                continue
            out = row.with_suffix(".gguf")
            gptq_file = work / f"{preset}-gptq{'-fisher' if args.fisher else ''}-start.gguf"
            extra: dict = {}
            if variant == "pocketlm qad":
                qad = QadOptions(tokens=args.tokens, lr=args.lr, codes=args.codes, norms=args.norms, batch=args.batch,
                                 epochs=args.epochs, micro_batch=min(args.batch, QadOptions.micro_batch),
                                 block_tokens=args.block_tokens, progress=True, resume=True)
                # one checkpoint folder per row: the same command again continues an interrupted row (its key
                # refuses another run's checkpoint), and rows of one type never share a folder
                ckpt = row.with_suffix(".ckpt")
                extra["resumed"] = Checkpoint(ckpt, "").exists()  # its seconds then count only the last stretch
                r = train_file(str(ref), gptq_file, out, data, qad, ckpt, weighted_start=args.fisher)
                seconds = r["seconds"]
                evals = [h for h in r["history"] if h.get("kld") is not None]
                extra |= {"train_tokens": r["tokens"], "epochs": r["epochs"], "max_difference": r["max_difference"],
                         "trainer_start_kld": r["start"]["kld"],
                         "trainer_kld": [(h["step"], h["kld"]) for h in evals], "settings": r["settings"]}
            else:
                seconds = produce(variant, ref, out, preset, calib, args.calib_tokens, imatrix, tools)
                if seconds is None:
                    results[(preset, variant)] = None
                    continue
            res = measure(out, ref, held_out, args.eval_tokens)
            res.update(quantize_s=seconds, name=name, **extra)
            write_json(row, res)
            if variant == ("pocketlm gptq --fisher" if args.fisher else "pocketlm gptq"):
                out.replace(gptq_file)  # qad starts from this very file
            else:
                out.unlink()
            results[(preset, variant)] = res
            print(preset, name, f"kld {res['kld_mean']:.5f} ppl {res['ppl']:.3f} top1 {res['top1']:.4f}", flush=True)
    write_section(tag, args, results, work)


def variants(args) -> list[str]:
    return [v for v in VARIANTS if args.fisher or v != "pocketlm gptq --fisher"]


def named(args) -> list[tuple[str, str]]:
    """The settings of this run that differ from the defaults, each as (its word in the qad row's
    name, its command-line flag), so that a row's name and the section's command agree. Names are
    the cache keys of rows measured before: their spelling stays."""
    data = args.data.split(",") if args.data else []
    return [(word, flag) for on, word, flag in [
        (args.norms, "norms", "--norms"),
        (args.batch != QadOptions.batch, f"batch{args.batch}", f"--batch {args.batch}"),
        (args.epochs != QadOptions.epochs, f"epochs{args.epochs}", f"--epochs {args.epochs}"),
        (args.block_tokens is not None, f"layers{(args.block_tokens or 0) // 1024}k", f"--block-tokens {args.block_tokens}"),
        (args.fisher, "fisher", "--fisher"),
        (bool(data), "data-" + "+".join(Path(d).stem for d in data), f"--data {args.data}"),
    ] if on]


def rate_flag(args) -> str:
    """The sub-block codes' rate on the command line, when it is not fakequant's (it is in the codes' word of the name)."""
    return f" --sub-code-rate {args.sub_code_rate:g}" if args.codes == "scales" and args.sub_code_rate != SUB_CODE_RATE else ""


def other_qad_rows(work: Path, preset: str, name: str) -> list[dict]:
    """The qad rows measured earlier in this work folder with other settings (pilots): shown
    under the command's own row, against the same references."""
    rows = [json.loads(p.read_text()) for p in sorted(work.glob(f"{preset}-pocketlm_qad_*.json"))]
    return sorted((r for r in rows if r.get("name") != name), key=lambda r: (r.get("train_tokens", 0), r["name"]))


def write_section(tag: str, args, results: dict, work: Path) -> None:
    trained_on = f"the files {args.data}" if args.data else "pocketlm's bundled general text (wiki-first80 + c4)"
    lines = [f"## {tag}", "", f"Command: `.venv/bin/python bench/qad.py --model {args.model} --tag {tag} --types {args.types} "
             f"--tokens {args.tokens}" + ("" if args.lr is None else f" --lr {args.lr:g}") + f" --codes {args.codes}"
             + rate_flag(args)
             + "".join(f" {f}" for _, f in named(args)) + "`", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; llama.cpp at 2 threads. Reference: the model in F32. "
             f"gptq and llama.cpp's imatrix calibrate on {args.calib_tokens} tokens of the first 80% of wiki.txt; qad "
             f"trains on {trained_on}"
             " from the gptq file (rows name their data when it is not the bundled text). Evaluation: "
             f"{args.eval_tokens} tokens of the last 20% of wiki.txt, ctx 512, KLD over the full vocabulary, in llama.cpp.",
             ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| type | quantizer | MiB | PPL | mean KLD | top-1 | training tokens | seconds |", "|---|---|---|---|---|---|---|---|"]
    goals = []
    for preset in args.types.split(","):
        for variant in variants(args):
            r = results.get((preset, variant))
            if r is None:
                lines.append(f"| {preset} | {variant} | - | - | - | - | - | - |")
                continue
            lines.append(row_line(preset, r, variant))
        own = results.get((preset, "pocketlm qad"))
        earlier = other_qad_rows(work, preset, own["name"] if own else "")
        lines += [row_line(preset, r, "", "(earlier run) ") for r in earlier]
        g = results.get((preset, "pocketlm gptq"))
        q = own or max(earlier, key=lambda r: r.get("train_tokens", 0), default=None)  # else the longest earlier run
        if g and q:
            ratio = q["kld_mean"] / g["kld_mean"]
            same = q["size_bytes"] == g["size_bytes"]
            which = "" if own else f" (this command's row not measured; from '{q['name']}')"
            f = results.get((preset, "pocketlm gptq --fisher"))
            start = f" (its start, gptq --fisher: {q['kld_mean'] / f['kld_mean']:.4f}x)" if f and own and args.fisher else ""
            goals.append(f"- {preset}: qad / gptq mean KLD = {ratio:.4f}{which} (goal ≤ {GOAL}): "
                         f"{'met' if ratio <= GOAL else 'NOT met'}{start}; same bytes: {'yes' if same else 'NO'}; file "
                         f"decodes to the trained weights with max |difference| {q.get('max_difference', '?')}.")
    lines += ["", "Goals (issue #22):", "", *goals, ""]
    section = "\n".join(lines)
    put_section(RESULTS, "Quantization-aware distillation (qad) vs gptq and llama.cpp", tag, section)
    print(section)


def row_line(preset: str, r: dict, variant: str, mark: str = "") -> str:
    passes = f" x{r['epochs']} passes" if r.get("epochs", 1) > 1 else ""
    resumed = " (resumed: its last part)" if r.get("resumed") else ""
    return (f"| {preset} | {mark}{r.get('name', variant)} | {r['size_bytes'] / 2**20:.2f} | {r['ppl']:.3f} | "
            f"{r['kld_mean']:.4f} | {100 * r['top1']:.1f}% | {r.get('train_tokens', '-')}{passes} | "
            f"{r['quantize_s']:.0f}{resumed} |")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
