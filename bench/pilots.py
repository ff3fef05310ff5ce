"""compress's pilot heals for shapes named by hand, at a length of your choosing: is the
chooser's ranking (distill/choose.py) the one longer healing gives?

Each shape is pruned from the default model and healed exactly as `compress --target-size SIZE`
pilots its finalists (compress/student.py: the recipe's defaults, the bundled general text),
then its sensitivity measured, the budget's allocation found, and (as compress does, unless its
healing alone scores above the best so far) its file made and measured; prints each pilot's KLD
after healing, the quantization KLD the sensitivity proxy predicts and the one its file measured.
Shapes are labels as `plan` prints them.

  .venv/bin/python bench/pilots.py --size 60MB --shapes L26-h576-a9x3-f1280,L30-h512-a8x8-f1536 --tokens 200000

Finished pilots are kept in ~/.cache/pocketlm-bench/pilots/SIZE-TOKENS/ (a rerun resumes).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pocketlm.compress.manifest import key_of  # noqa: E402
from pocketlm.compress.pipeline import _hash_files, default_texts  # noqa: E402
from pocketlm.compress.recipe import load_recipe  # noqa: E402
from pocketlm.compress.student import pilot_heal, teacher_facts  # noqa: E402
from pocketlm.data import general_text  # noqa: E402
from pocketlm.distill import choose  # noqa: E402
from pocketlm.models.source import resolve  # noqa: E402
from pocketlm.quantize.budget import parse_size  # noqa: E402
from pocketlm.util.machine import machine_name  # noqa: E402

CACHE = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "pilots"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="60MB")
    ap.add_argument("--shapes", required=True, help="comma-separated labels, e.g. L30-h512-a8x8-f1536")
    ap.add_argument("--tokens", type=int, default=40_000, help="healing tokens per pilot (compress: 40,000)")
    args = ap.parse_args()
    if args.tokens < 1:
        sys.exit("error: --tokens must be at least 1 (compress skips pilots at 0)")
    budget, src = parse_size(args.size), resolve("smollm2-135m")
    t, overhead = teacher_facts(src)
    cands = choose.candidates(t, budget, overhead)
    named = {c.label: c for c in cands}
    missing = [s for s in args.shapes.split(",") if s not in named]
    if missing:
        sys.exit(f"error: {', '.join(missing)} fit no {args.size} budget (see `pocketlm plan smollm2-135m --target-size "
                 f"{args.size}`)")
    recipe = load_recipe(None)
    d, q = {**recipe["distill"], "pilot_tokens": args.tokens}, recipe["quantize"]
    calib, data = default_texts()[0], general_text()
    print(f"{machine_name()}: {args.size}, {args.tokens:,} tokens per pilot", flush=True)
    # a pilot kept under another key (other code, data or recipe) is redone, as compress's are
    key = key_of("choose", budget, d, q, _hash_files(data), _hash_files(calib))
    # compress's own verdict over the named shapes, so each pilot gets the best score so far as compress's do
    shapes = [named[s] for s in dict.fromkeys(args.shapes.split(","))]
    result = choose.choose(shapes, lambda c, best: pilot_heal(src, CACHE / f"{args.size}-{args.tokens}", c, data, d, q,
                                                              calib, True, key, best))
    print("| shape | non-emb params | bpw | KLD after healing | + quantization KLD predicted | + measured (file) | score | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["pilots"]:
        measured = f"{r['quant_kld']:.3f}" if r.get("quant_measured") else "not measured"
        print(f"| {r['label']} | {r['non_embedding'] / 1e6:.1f}M | {r['bpw']:.2f} | {r['pilot_kld']:.3f} | "
              f"{r.get('predicted_quant_kld', r['quant_kld']):.3f} | {measured} | {r['score']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
