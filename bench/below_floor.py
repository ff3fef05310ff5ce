"""The default model below its quantization floor, through `pocketlm compress` as a user runs it.

SmolLM2-135M quantizes to no less than 71.4 MB (576-wide rows take no k-quants). For each budget
under that, `compress --target-size SIZE --tokens N` chooses a student shape and its bits (pilot
heals of the finalists, distill/choose.py), distills it on the bundled general text, quantizes
it with gptq to the budget and evaluates it against the teacher beside llama.cpp's smallest file
of the teacher (every preset is over these budgets, so that is Q2_K, 88 MB). Held out: the last
20% of ../shared/data/text/wiki.txt, which the bundled text (its first 80%) never contains.

  .venv/bin/python bench/below_floor.py [--sizes 60MB,55MB,50MB] [--tokens 1000000] [--eval-tokens 20480]

Each budget's compress folder lives in ~/.cache/pocketlm-bench/below_floor/ (a rerun resumes it);
one section per (budget, tokens) goes to bench/results/below_floor.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_file import put_section  # noqa: E402

from pocketlm.quantize.budget import parse_size  # noqa: E402
from pocketlm.util.machine import machine_name  # noqa: E402

DATA = Path(os.environ.get("POCKETLM_DATA", ROOT.parent / "shared" / "data"))
WIKI = DATA / "text" / "wiki.txt"
CACHE = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "below_floor"
RESULTS = ROOT / "bench" / "results" / "below_floor.md"
TITLE = "Below the quantization floor: SmolLM2-135M through `pocketlm compress`"
GOALS = {60_000_000: (1.25, 0.75), 50_000_000: (1.6, None)}  # budget -> (PPL / teacher at most, top-1 at least)


def held_out(work: Path) -> Path:
    text = WIKI.read_text()
    cut = text.rfind("</doc>", 0, int(len(text) * 0.8)) + len("</doc>")  # where the bundled 80% ends
    path = work / "heldout-wiki.txt"
    path.write_text(text[cut:])
    return path


def run(size: str, tokens: int, eval_tokens: int, work: Path) -> dict:
    out = work / f"{size}-{tokens}"
    recipe = work / "recipe.yaml"
    recipe.write_text(f"evaluate:\n  texts: [{held_out(work)}]\n  max_tokens: {eval_tokens}\n  ctx: 512\n")
    cmd = [str(ROOT / ".venv" / "bin" / "pocketlm"), "compress", "smollm2-135m", "--target-size", size,
           "--tokens", str(tokens), "-o", str(out), "--recipe", str(recipe)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())["steps"]
    # the steps' peaks are sampled (compress/manifest.py) and can miss a short spike the kernel's
    # ru_maxrss saw; runs of 2026-12-03 (clear_refs resets then) left ru_maxrss too low instead
    peak = max([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20]  # GiB, the largest process
               + [v["peak_rss_mb"] / 1024 for v in manifest.values() if v.get("peak_rss_mb")])
    return {"size": size, "tokens": tokens, "wall_s": wall, "peak_gib": peak, "out": str(out),
            "rows": json.loads((out / "eval.json").read_text()), "steps": manifest}


def section(r: dict, eval_tokens: int) -> str:
    budget = parse_size(r["size"])
    rows, steps = r["rows"], r["steps"]
    teacher = rows["original"]
    choice = steps.get("choose", {}).get("result", {})
    step_s = {k: f"{v['seconds']:.0f}" + (f" ({v['peak_rss_mb'] / 1024:.1f} GiB)" if v.get("peak_rss_mb") else "")
              for k, v in steps.items()}
    lines = [f"## {r['size']}, {r['tokens']:,} distillation tokens", "",
             f"`.venv/bin/python bench/below_floor.py --sizes {r['size']} --tokens {r['tokens']} --eval-tokens "
             f"{eval_tokens}` on {machine_name()}, {time.strftime('%Y-%m-%d')}. Held out: "
             f"the last 20% of wiki.txt, {eval_tokens} tokens, windows of 512; KLD and top-1 against the teacher.", "",
             "| model | file MB | held-out PPL | × teacher | KLD | top-1 | decode tok/s |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        ratio = row["ppl"] / teacher["ppl"]
        lines.append(f"| {'teacher (original Q4_1)' if name == 'original' else name} | {row['size_bytes'] / 1e6:.1f} | "
                     f"{row['ppl']:.2f} | {ratio:.2f} | " + ("-" if row.get("kld_mean") is None else f"{row['kld_mean']:.3f}")
                     + " | " + ("-" if row.get("top1") is None else f"{100 * row['top1']:.1f}%") + " | "
                     + ("-" if row.get("decode_tps") is None else f"{row['decode_tps']:.0f}") + " |")
    if choice:
        lines += ["", f"Student chosen: {choice['why']}.", "",
                  "| finalist | non-emb params | bpw at the budget | KLD after pilot heal | + quantization KLD | score |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['label']} | {p['non_embedding'] / 1e6:.1f}M | {p['bpw']:.2f} | {p['pilot_kld']:.3f} | "
                  f"{p['quant_kld']:.3f}{'' if p.get('quant_measured') else ' (predicted)'} | {p['score']:.3f} |"
                  for p in choice["pilots"]]
    lines += ["", "Time per step in s (peak RSS of the step, compress's own process): "
              + ", ".join(f"{k} {v}" for k, v in step_s.items())
              + f"; whole command {r['wall_s'] / 60:.1f} min (goal ≤ 90), peak RSS of the largest process "
              f"{r['peak_gib']:.2f} GiB."]
    ours = rows["pocketlm"]
    ratio, top1 = ours["ppl"] / teacher["ppl"], ours.get("top1") or 0.0
    goal = GOALS.get(budget)
    if goal:
        ppl_goal, top1_goal = goal
        verdict = [f"PPL {ratio:.2f}× the teacher's (goal ≤ {ppl_goal}): {'met' if ratio <= ppl_goal else 'NOT met'}"]
        if top1_goal:
            verdict.append(f"top-1 {100 * top1:.1f}% (goal ≥ {100 * top1_goal:.0f}%): "
                           f"{'met' if top1 >= top1_goal else 'NOT met'}")
        if r["tokens"] < 1_000_000:
            verdict.append(f"at {r['tokens']:,} tokens, not the goal's 1M")
        lines += ["", "Goals: " + "; ".join(verdict) + "."]
    preset = next((n for n in rows if n.startswith("llama.cpp")), None)
    if preset:
        p = rows[preset]
        better = ours["ppl"] < p["ppl"] and (ours.get("top1") or 0) > (p.get("top1") or 0)
        lines.append(f"Against {preset} ({p['size_bytes'] / 1e6:.1f} MB): PPL {ours['ppl']:.2f} vs {p['ppl']:.2f}, top-1 "
                     f"{100 * top1:.1f}% vs {100 * (p.get('top1') or 0):.1f}%: the {ours['size_bytes'] / 1e6:.1f} MB file "
                     f"is {'better' if better else 'NOT better'} on both.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="60MB,55MB,50MB")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    args = ap.parse_args()
    if not WIKI.exists():
        sys.exit(f"error: {WIKI} is missing (set POCKETLM_DATA)")
    CACHE.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        r = run(size, args.tokens, args.eval_tokens, CACHE)
        text = section(r, args.eval_tokens)
        print(text, flush=True)
        put_section(RESULTS, TITLE, f"{size}, {args.tokens:,} distillation tokens", text)


if __name__ == "__main__":
    main()
