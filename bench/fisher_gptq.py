"""gptq with and without `--fisher` (each calibration token weighted by the logits' Fisher energy at
each layer, quantize/fisher.py), at the same types, side by side in one run on one machine.

Measured like bench/qad.py and bench/quant_vs_llamacpp.py: both calibrate on the same tokens of the
first 80% of wiki.txt; mean KLD against the F32 model, perplexity and top-1 on the last 20%
(never calibrated on), ctx 512, in llama.cpp.

  .venv/bin/python bench/fisher_gptq.py [--model smollm2-135m] [--types Q4_0] [--tag NAME]

Rows are kept in ~/.cache/pocketlm-bench/fisher_gptq/<tag>/ (a rerun measures only what is
missing); the table goes to bench/results/fisher_gptq.md, one section per --tag.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant_vs_llamacpp import measure, prepare_reference, produce, remembered_note, split_texts, work_folder  # noqa: E402
from results_file import put_section  # noqa: E402

from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fisher_gptq.md"
VARIANTS = {"pocketlm gptq": False, "pocketlm gptq --fisher": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--types", default="Q4_0")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--note", default="", help="said under the section's heading; remembered per --tag")
    args = ap.parse_args()
    tag, work = work_folder("fisher_gptq", args.model, args.tag)
    args.note = remembered_note(work, args.note)
    calib, held_out = split_texts(work, calib_chars=args.calib_tokens * 8)
    ref = prepare_reference(args.model, work, calib, args.calib_tokens)[0]
    rows = {}
    for preset in args.types.split(","):
        for variant, fisher in VARIANTS.items():
            row = work / f"{preset}-{'fisher' if fisher else 'plain'}.json"
            if row.exists():
                rows[(preset, variant)] = json.loads(row.read_text())
                continue
            out = row.with_suffix(".gguf")
            seconds = produce(variant, ref, out, preset, calib, args.calib_tokens, None, None)  # the variant says --fisher
            res = measure(out, ref, held_out, args.eval_tokens) | {"quantize_s": seconds}
            out.unlink()
            write_json(row, res)
            rows[(preset, variant)] = res
            print(preset, variant, f"kld {res['kld_mean']:.5f} ppl {res['ppl']:.3f} top1 {res['top1']:.4f}", flush=True)
    write_section(tag, args, rows)


def write_section(tag: str, args, rows: dict) -> None:
    lines = [f"## {tag}", "", f"Command: `.venv/bin/python bench/fisher_gptq.py --model {args.model} --tag {tag} "
             f"--types {args.types}`", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; llama.cpp at 2 threads. Reference: the model in F32. Both "
             f"calibrate on {args.calib_tokens} tokens of the first 80% of wiki.txt. Evaluation: {args.eval_tokens} tokens "
             "of the last 20% of wiki.txt, ctx 512, KLD over the full vocabulary, in llama.cpp.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| type | quantizer | MiB | PPL | mean KLD | top-1 | KLD / plain gptq's | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for (preset, variant), r in rows.items():
        plain = rows[(preset, "pocketlm gptq")]["kld_mean"]
        lines.append(f"| {preset} | {variant} | {r['size_bytes'] / 2**20:.2f} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | "
                     f"{100 * r['top1']:.1f}% | {r['kld_mean'] / plain:.3f} | {r['quantize_s']:.0f} |")
    put_section(RESULTS, "gptq with Fisher-weighted calibration tokens (--fisher) vs plain gptq", tag, "\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
