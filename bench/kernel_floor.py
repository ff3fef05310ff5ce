"""How much KL-divergence llama.cpp's quantized kernels add when the weights are exact.

A quantized GGUF is evaluated against the F32 file of its own dequantized weights, so no
weight carries any rounding error: what KLD remains comes from the runtime (llama.cpp
quantizes the activations to 8 bits inside its quantized dot products). No weight quantizer
can go below this floor, which is why KLD ratios against llama.cpp approach 1 at 6-8 bits.

  .venv/bin/python bench/kernel_floor.py [--tag smollm2-aligned-512] [--types Q8_0,Q6_K]

Uses the work folder of bench/quant_vs_llamacpp.py for that tag (its reference and its
evaluation text), so run that first. Writes bench/results/kernel_floor.md (one section per tag).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant_vs_llamacpp import CACHE, seed_work  # noqa: E402
from results_file import put_section  # noqa: E402

from pocketlm.eval.runner import EvalOptions, evaluate  # noqa: E402
from pocketlm.models.export_gguf import export_gguf  # noqa: E402
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kernel_floor.md"


def floor_for(work: Path, key: str, label: str, quantized: Path, eval_tokens: int, vs_ref: float | None) -> dict:
    """KLD of `quantized` against the F32 copy of its own weights (cached per key); vs_ref is
    its KLD against the original model, from the quant benchmark (None: not known)."""
    row = work / f"floor-{key}.json"
    if row.exists():
        return json.loads(row.read_text())
    opts = dict(texts=[str(work / "eval.txt")], max_tokens=eval_tokens, ctx=512, progress=True)
    exact = work / f"floor-{key}-f32.gguf"
    export_gguf(str(quantized), exact, "f32")
    r = evaluate(str(quantized), EvalOptions(reference=str(exact), **opts))
    exact.unlink()
    out = {"label": label, "kld_floor": r["kld_mean"], "top1_floor": r["top1"], "kld_vs_ref": vs_ref}
    write_json(row, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="smollm2-aligned-512")
    ap.add_argument("--types", default="Q8_0,Q6_K", help="GGUF presets quantized by pocketlm rtn, each measured")
    ap.add_argument("--file", action="append", default=[],
                    help="LABEL=PATH: an existing quantized GGUF to measure too (e.g. the model's own file)")
    ap.add_argument("--eval-tokens", type=int, default=40960)
    args = ap.parse_args()
    work = CACHE / "quant" / args.tag
    if not (work / "ref-f32.gguf").exists():
        sys.exit(f"run bench/quant_vs_llamacpp.py --tag {args.tag} first (needs its {work}/ref-f32.gguf)")
    seed_work(work, args.tag)  # the committed rtn rows, for the 'vs F32 reference' column
    rows = []
    for spec in args.file:
        label, _, path = spec.partition("=")
        rows.append(floor_for(work, label, label, Path(path), args.eval_tokens, None))
    for preset in filter(None, args.types.split(",")):
        q = work / f"floor-{preset}.gguf"
        if not (work / f"floor-{preset}.json").exists():
            quantize_model(str(work / "ref-f32.gguf"), q, QuantizeOptions(preset=preset, method="rtn", progress=False))
        rtn_row = work / f"{preset}-pocketlm_rtn.json"  # the same file: rtn is deterministic
        known = json.loads(rtn_row.read_text())["kld_mean"] if rtn_row.exists() else None
        rows.append(floor_for(work, preset, f"{preset} (pocketlm rtn)", q, args.eval_tokens, known))
        q.unlink(missing_ok=True)
    lines = [f"## {args.tag}", "",
             f"Command: `.venv/bin/python bench/kernel_floor.py --tag {args.tag}"
             + (f" --types {args.types}" if args.types else " --types ''")
             + "".join(f" --file {f.split('=')[0]}=..." for f in args.file) + "`", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, llama.cpp at 2 threads; {args.eval_tokens} tokens of the "
             "quant benchmark's evaluation text, ctx 512. 'floor': the file against the F32 copy of its own weights "
             "(weights exact, only the runtime differs); 'vs F32 reference': the same file against the original model, "
             "as in quant_vs_llamacpp.md.", "",
             "| file | KLD floor (kernels only) | top-1 floor | KLD vs F32 reference | floor share |", "|---|---|---|---|---|"]
    for r in rows:
        vs = r["kld_vs_ref"]
        lines.append(f"| {r['label']} | {r['kld_floor']:.5f} | {100 * r['top1_floor']:.2f}% | "
                     + (f"{vs:.5f} | {r['kld_floor'] / vs:.0%} |" if vs else "- | - |"))
    section = "\n".join(lines) + "\n"
    put_section(RESULTS, "KLD floor of llama.cpp's quantized kernels", args.tag, section)
    print(section)


if __name__ == "__main__":
    main()
