"""pocketlm's quantizer vs llama.cpp's, side by side, in one run on one machine.

Same F32 reference, same calibration text (first 80% of wiki.txt), same evaluation text
(last 20% of wiki.txt), same preset (so the same per-tensor types and file size). Columns:
file MiB, bpw, PPL, mean KLD vs the F32 reference, top-1 agreement, quantize seconds.

  .venv/bin/python bench/quant_vs_llamacpp.py [--model smollm2-135m] [--types Q4_K_M,Q2_K]
      [--eval-tokens 40960] [--tag NAME]

Work files live in ~/.cache/pocketlm-bench/quant/<tag>/ and are reused by reruns. The table
goes to bench/results/quant_vs_llamacpp.md (one section per --tag) and to stdout; every measured
row also goes, unrounded, to bench/results/quant_vs_llamacpp.json, which seeds the work folder on
a fresh machine, so a run of one preset there still writes the whole section.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_file import put_section  # noqa: E402

from pocketlm.eval.runner import EvalOptions, evaluate  # noqa: E402
from pocketlm.models.export_gguf import export_gguf  # noqa: E402
from pocketlm.quantize.llamacpp_reference import llamacpp_imatrix, llamacpp_quantize  # noqa: E402
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from pocketlm.quantize.plan import PRESETS  # noqa: E402
from pocketlm.util.atomic import write_json, write_text  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "text" / "wiki.txt"
CACHE = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench"))
VARIANTS = ["llama.cpp", "llama.cpp+imatrix", "pocketlm rtn", "pocketlm imatrix", "pocketlm gptq"]
RESULTS = ROOT / "bench" / "results" / "quant_vs_llamacpp.md"
ROWS = RESULTS.with_suffix(".json")


def tools_dir() -> Path | None:
    try:
        out = subprocess.run(["bash", str(ROOT / "bench" / "build_llamacpp_tools.sh")], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, IndexError):
        print("llama.cpp tools could not be built: the llama.cpp+imatrix column is skipped", file=sys.stderr)
        return None


def remembered_note(work: Path, note: str) -> str:
    """A section's note, kept in its work folder: a rerun without --note keeps what was said."""
    note_file = work / "note.txt"
    if note:
        note_file.write_text(note)
    return note_file.read_text() if note_file.exists() else ""


def work_folder(kind: str, model: str, tag: str | None) -> tuple[str, Path]:
    """(tag, the bench's work folder for this model), after checking the shared text is there."""
    if not WIKI.exists():
        sys.exit(f"needs {WIKI}")
    tag = tag or Path(model).name.replace(".gguf", "")
    work = CACHE / kind / tag
    work.mkdir(parents=True, exist_ok=True)
    return tag, work


def prepare_reference(model: str, work: Path, calib: Path, calib_tokens: int) -> tuple[Path, Path | None, Path | None]:
    """The F32 reference every row is measured against, llama.cpp's tools, and llama.cpp's
    imatrix of the calibration text (None without the tools); made once per work folder."""
    ref = work / "ref-f32.gguf"
    if not ref.exists():
        export_gguf(model, ref, "f32")
    tools = tools_dir()
    imatrix = work / "llamacpp.imatrix"
    if tools and not imatrix.exists():
        llamacpp_imatrix(ref, calib, imatrix, tools, chunks=calib_tokens // 512)
    return ref, tools, imatrix if tools else None


def measure(model: Path, ref: Path, held_out: Path, eval_tokens: int) -> dict:
    """What every row reports: PPL, mean KLD against the reference and top-1, on llama.cpp, ctx 512."""
    return evaluate(str(model), EvalOptions(texts=[str(held_out)], reference=str(ref), max_tokens=eval_tokens, ctx=512,
                                            progress=False))


def split_texts(work: Path, calib_chars: int) -> tuple[Path, Path]:
    text = WIKI.read_text()
    cut = int(len(text) * 0.8)
    calib, held_out = work / "calib.txt", work / "eval.txt"
    calib.write_text(text[:cut][:calib_chars])
    held_out.write_text(text[cut:])
    return calib, held_out


def produce(variant: str, ref: Path, out: Path, preset: str, calib: Path, calib_tokens: int, imatrix: Path | None,
            tools: Path | None) -> float | None:
    if variant == "llama.cpp+imatrix" and imatrix is None:
        return None
    t0 = time.perf_counter()
    if variant == "llama.cpp":
        llamacpp_quantize(ref, out, preset)
    elif variant == "llama.cpp+imatrix":
        llamacpp_quantize(ref, out, preset, imatrix=imatrix, tools_dir=tools)
    else:
        method = variant.split()[1]  # "pocketlm gptq", "pocketlm gptq --fisher"
        quantize_model(str(ref), out, QuantizeOptions(preset=preset, method=method, calib=[str(calib)],
                                                      calib_tokens=calib_tokens, allow_requant=True, progress=False,
                                                      fisher=variant.endswith("--fisher")))
    return time.perf_counter() - t0


def time_defaults(model: str, work: Path, calib: Path, preset: str = "Q4_K_M") -> dict:
    """The speed goal is about the command a user types, so it is timed as one: the CLI in a
    fresh process with its defaults (gptq because --calib is given, 8192 calibration tokens;
    the table's rows calibrate on 16384 to match llama.cpp's imatrix)."""
    out = work / f"defaults-{preset}.gguf"
    cmd = [str(Path(sys.executable).parent / "pocketlm"), "quantize", model, "-o", str(out), "--type", preset,
           "--calib", str(calib), "--allow-requant", "--force", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    out.unlink()
    shown = ["pocketlm", *cmd[1:]]
    shown[shown.index(str(calib))] = "calib.txt"
    shown[shown.index(str(out))] = "out.gguf"
    result = {"command": " ".join(shown), "seconds": seconds, "preset": preset}
    write_json(work / "defaults-timing.json", result)
    return result


def row_path(work: Path, preset: str, variant: str) -> Path:
    return work / f"{preset}-{variant.replace(' ', '_').replace('+', '_')}.json"


# What the work folder holds that a section is written from, besides the rows.
KEPT_FILES = ("note.txt", "defaults-timing.json")


def seed_work(work: Path, tag: str) -> None:
    """A full section takes hours to measure and the work folder does not outlive the machine,
    so what was committed is put back there instead of being measured again."""
    committed = json.loads(ROWS.read_text()).get(tag, {}) if ROWS.exists() else {}
    for name, content in committed.items():
        if not (work / name).exists():
            (write_json if name.endswith(".json") else write_text)(work / name, content)


def commit_work(tag: str, work: Path, results: dict) -> None:
    committed = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    kept = committed.setdefault(tag, {})
    for (preset, variant), r in results.items():
        if r is not None:
            # per-tensor types (bench/budget_vs_presets.py adds them to llama.cpp's rows it makes) are
            # not committed: a few hundred lines a row, and that script derives them from the preset's plan
            kept[row_path(work, preset, variant).name] = {k: v for k, v in r.items() if k != "types"}
    for name in KEPT_FILES:
        if (work / name).exists():
            text = (work / name).read_text()
            kept[name] = json.loads(text) if name.endswith(".json") else text
    write_text(ROWS, json.dumps(committed, indent=1, sort_keys=True) + "\n")


def is_current(r: dict | None) -> bool:
    """A row marked "older_code" (by hand, when a codec change makes it out of date) is shown
    with a mark until it is measured again; the next run of its preset re-measures it."""
    return r is not None and "older_code" not in r


def fmt_row(preset, variant, r) -> str:
    if r is None:
        return f"| {preset} | {variant} | - | - | - | - | - | - |"
    mark = "" if is_current(r) else " †"
    return (f"| {preset} | {variant}{mark} | {r['size_bytes'] / 2**20:.1f} | {r['bpw']:.3f} | {r['ppl']:.4f} | "
            f"{r['kld_mean']:.5f} | {100 * r['top1']:.2f}% | {r['quantize_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--types", default=",".join(PRESETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--remeasure", default=None,
                    help="variants whose missing or † rows are measured (default: all in --variants); the others' † rows "
                         "are shown as they stand, so the goal rows can be brought up to date first")
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--note", default="", help="said under the section's heading; remembered per --tag")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the table from the rows already measured; '-' for the rest (nothing is computed)")
    ap.add_argument("--time-defaults", action="store_true",
                    help="also time `pocketlm quantize` as a user runs it (defaults, Q4_K_M), for the speed goal")
    args = ap.parse_args()
    tag, work = work_folder("quant", args.model, args.tag)
    seed_work(work, tag)
    args.note = remembered_note(work, args.note)
    if args.time_defaults or not args.cached_only:
        calib, held_out = split_texts(work, calib_chars=args.calib_tokens * 8)
    if args.time_defaults:
        print(f"defaults: {time_defaults(args.model, work, calib)['seconds']:.1f} s", flush=True)
    if args.cached_only:
        results = {}
        for preset in args.types.split(","):
            for variant in args.variants.split(","):
                res_path = row_path(work, preset, variant)
                results[(preset, variant)] = json.loads(res_path.read_text()) if res_path.exists() else None
        write_section(tag, args, results)
        return
    ref, tools, imatrix = prepare_reference(args.model, work, calib, args.calib_tokens)
    remeasure = set((args.remeasure or args.variants).split(","))
    results = {}
    for preset in args.types.split(","):
        for variant in args.variants.split(","):
            res_path = row_path(work, preset, variant)
            cached = json.loads(res_path.read_text()) if res_path.exists() else None
            if is_current(cached) or (cached is not None and variant not in remeasure):
                results[(preset, variant)] = cached
            else:
                out = res_path.with_suffix(".gguf")
                seconds = produce(variant, ref, out, preset, calib, args.calib_tokens, imatrix, tools)
                if seconds is None:
                    results[(preset, variant)] = None
                    continue
                r = measure(out, ref, held_out, args.eval_tokens)
                r["quantize_s"] = seconds
                write_json(res_path, r)
                out.unlink()  # keep the numbers, not 100 MB per variant
                results[(preset, variant)] = r
            print(fmt_row(preset, variant, results[(preset, variant)]), flush=True)
    write_section(tag, args, results)


def _speed_goal(work: Path, results: dict, calib_tokens: int) -> list[str]:
    lines = []
    slowest = max((r["quantize_s"] for (p, v), r in results.items() if is_current(r) and v == "pocketlm gptq"), default=None)
    if slowest is not None:
        stale = any(r is not None and not is_current(r) for r in results.values())
        lines.append(f"Slowest pocketlm gptq row above{' (not counting † rows)' if stale else ''}: {slowest:.0f} s "
                     f"at {calib_tokens} calibration tokens "
                     f"({'under' if slowest < 120 else 'over'} 2 minutes; the times include loading the model and "
                     "calibrating; rtn and imatrix rows show their own).")
    timing = work / "defaults-timing.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        lines.append(f"As a user runs it, `{t['command']}` (gptq, 8192 calibration tokens, process start included) "
                     f"took {t['seconds']:.0f} s: goal {'met' if t['seconds'] < 120 else 'NOT met'}.")
    elif slowest is not None:
        lines.append("The command a user types was not timed for this model (`--time-defaults`).")
    return ["Goal (set for the default model): quantizing takes under 2 minutes on 2 cores. " + " ".join(lines), ""] if lines else []


def write_section(tag, args, results) -> None:
    lines = [f"## {tag}", "", f"Command: `.venv/bin/python bench/quant_vs_llamacpp.py --model {args.model} --tag {tag} "
             f"--types {args.types} --eval-tokens {args.eval_tokens}`", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, llama.cpp at 2 threads. "
             f"Reference: the model in F32. Calibration: {args.calib_tokens} tokens from the first 80% of wiki.txt "
             f"(the same text for llama.cpp's imatrix). Evaluation: {args.eval_tokens} tokens from the last 20%, "
             "ctx 512, KLD over the full vocabulary.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| type | quantizer | MiB | bpw | PPL | mean KLD | top-1 | quantize s |", "|---|---|---|---|---|---|---|---|"]
    goals = []
    for preset in args.types.split(","):
        for variant in args.variants.split(","):
            lines.append(fmt_row(preset, variant, results.get((preset, variant))))
        g, base, imat = (results.get((preset, v)) for v in ("pocketlm gptq", "llama.cpp", "llama.cpp+imatrix"))
        if g and base:
            r1 = g["kld_mean"] / base["kld_mean"]
            r2 = g["kld_mean"] / imat["kld_mean"] if imat else None
            mark = "" if is_current(g) else " †"
            goals.append(f"| {preset}{mark} | {r1:.2f} {'met' if r1 <= 0.7 else 'NOT met'} | "
                         + (f"{r2:.2f} {'met' if r2 <= 0.9 else 'NOT met'} |" if r2 else "- |"))
    older = sorted({r["older_code"] for r in results.values() if r and not is_current(r)})
    if older:
        lines += ["", f"† measured with code older than today's quantizer ({'; '.join(older)}); to be measured again."]
    lines += ["", "Goal: pocketlm gptq's mean KLD ≤ 0.7× llama.cpp's (no imatrix) and ≤ 0.9× llama.cpp's with imatrix.", "",
              "| type | gptq / llama.cpp (≤ 0.70) | gptq / llama.cpp+imatrix (≤ 0.90) |", "|---|---|---|", *goals, ""]
    lines += _speed_goal(CACHE / "quant" / tag, results, args.calib_tokens)
    section = "\n".join(lines)
    put_section(RESULTS, "pocketlm quantizer vs llama.cpp", tag, section)
    commit_work(tag, CACHE / "quant" / tag, results)
    print(section)


if __name__ == "__main__":
    main()
