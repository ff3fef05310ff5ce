"""qad's settings compared by training's own measure (held-out KLD to the teacher, bf16, on the
bundled general text's held-out sequences), without writing or evaluating the files: a quick
screen of what to run through bench/qad.py (llama.cpp's measure) on 2 cores. Made for a lent
GPU machine, where a 200k-token run takes seconds, but runs anywhere.

  python bench/qad_explore.py --teacher T.gguf --start S.gguf --runs frozen:200000:0.02,scales@3:100000:0.02 --out DIR

A run is codes[@sub-block code rate]:tokens:lr (the rows of 2026-12-04 named anneal@rate ran
--qad-codes anneal, measured at commit 72f8d77 and removed after it). Results go to DIR/explore.json after every run;
`--report A.json,B.json --tag NAME --note TEXT` puts them in bench/results/qad.md as one table.
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

from results_file import put_section  # noqa: E402

from pocketlm.data import general_text  # noqa: E402
from pocketlm.quantize import fakequant, qad  # noqa: E402
from pocketlm.quantize.qad_options import QadOptions  # noqa: E402
from pocketlm.util.machine import machine_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher")
    ap.add_argument("--start", type=Path)
    ap.add_argument("--runs")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--report", help="explore.json files to tabulate (nothing is run)")
    ap.add_argument("--tag", default="screen")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.report:
        return report([Path(p).expanduser() for p in args.report.split(",")], args.tag, args.note)
    if not (args.teacher and args.start and args.runs and args.out):
        ap.error("--teacher, --start, --runs and --out are needed to run")
    args.out.mkdir(parents=True, exist_ok=True)
    # the screen reads training's measure only: packing and reading back every tensor would cost more than training
    qad.write_trained = lambda *a, **k: 0.0
    results = []
    for spec in args.runs.split(","):
        codes, tokens, lr = spec.split(":")
        codes, _, rate = codes.partition("@")
        if rate:  # --qad-codes scales: how fast the sub-block codes move
            fakequant.SUB_CODE_RATE = float(rate)
        opts = QadOptions(tokens=int(tokens), lr=float(lr), codes=codes, block_tokens=0, progress=False,
                          eval_every=args.eval_every, save_every=10**9)
        t0 = time.perf_counter()
        r = qad.train_file(args.teacher, args.start, args.out / "scratch.gguf", general_text(), opts,
                           args.out / "ckpt")
        evals = [(h["step"], round(h["kld"], 5)) for h in r["history"] if h.get("kld") is not None]
        row = {"run": spec, "tokens": r["tokens"], "steps": r["steps"], "start_kld": r["start"]["kld"],
               "end_kld": r["end"]["kld"], "ratio": r["end"]["kld"] / r["start"]["kld"], "klds": evals,
               "seconds": round(time.perf_counter() - t0, 1), "machine": machine_name()}
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "explore.json").write_text(json.dumps(results, indent=1))
        (args.out / "scratch.gguf").unlink(missing_ok=True)


def report(files: list[Path], tag: str, note: str) -> None:
    rows = [r for f in files for r in json.loads(f.read_text())]
    lines = [f"## {tag}", "", "Training's own measure (bench/qad_explore.py: held-out KLD to the teacher, bf16, on the bundled "
             "general text's held-out sequences; the files are neither written nor run in llama.cpp).", ""]
    if note:
        lines += [note, ""]
    lines += ["| run (codes@rate:tokens:lr) | steps | KLD at start | KLD at 25/50/75% of the steps | KLD at the end | end / start "
              "| seconds | machine |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mid = " / ".join(f"{k:.4f}" for _, k in r["klds"][1:-1])
        lines.append(f"| {r['run']} | {r['steps']} | {r['start_kld']:.4f} | {mid} | {r['end_kld']:.4f} | {r['ratio']:.3f} | "
                     f"{r['seconds']:.0f} | {r['machine']} |")
    put_section(ROOT / "bench" / "results" / "qad.md", "Quantization-aware distillation (qad) vs gptq and llama.cpp", tag,
                "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
