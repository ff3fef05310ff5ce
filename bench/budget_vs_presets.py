"""Budget-driven quantization vs llama.cpp's presets at the same file size, in one run.

For each llama.cpp preset (with its imatrix, llama.cpp's best), the file size it produces is
the budget pocketlm gets (`quantize --target-size`, gptq); both files are evaluated on the
same held-out text against the same F32 reference. Also: whether the sensitivity proxy ranks
files as their measured KLD does (Spearman over every file of the run).

  .venv/bin/python bench/budget_vs_presets.py [--model FOLDER] [--tag NAME] [--types Q2_K,...]

Default model: SmolLM2-135M pruned to 256-aligned widths (bench/make_aligned_model.py), so
that every k-quant applies. Rows are cached beside bench/quant_vs_llamacpp.py's, whose
llama.cpp rows (same texts, same settings) are reused. Results: bench/results/budget_vs_presets.md
and budget_vs_presets.png.
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
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import quant_vs_llamacpp as qb  # noqa: E402
from results_file import save_results  # noqa: E402

from pocketlm.eval.runner import EvalOptions, evaluate  # noqa: E402
from pocketlm.models.export_gguf import export_gguf  # noqa: E402
from pocketlm.models.gguf_file import open_gguf  # noqa: E402
from pocketlm.quantize.budget import types_for_budget  # noqa: E402
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from pocketlm.quantize.sensitivity import measure  # noqa: E402
from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
RESULTS = ROOT / "bench" / "results" / "budget_vs_presets.md"


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(qb.CACHE / "smollm2-aligned-512"))
    ap.add_argument("--tag", default="smollm2-aligned-512")
    ap.add_argument("--types", default=",".join(PRESETS))
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    if not qb.WIKI.exists():
        sys.exit(f"needs {qb.WIKI}")
    if not Path(args.model).exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_aligned_model.py"), args.model], check=True)
    work = qb.CACHE / "quant" / args.tag
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "ref-f32.gguf"
    if not ref.exists():
        export_gguf(args.model, ref, "f32")
    calib, held_out = qb.split_texts(work, calib_chars=args.calib_tokens * 8)
    tools = qb.tools_dir()
    if tools is None:
        sys.exit("needs llama.cpp's llama-quantize and llama-imatrix (bench/build_llamacpp_tools.sh)")
    imatrix = work / "llamacpp.imatrix"
    if not imatrix.exists():
        qb.llamacpp_imatrix(ref, calib, imatrix, tools, chunks=args.calib_tokens // 512)
    t0 = time.perf_counter()
    sens = measure(str(ref), [str(calib)], args.calib_tokens)
    sens_s = time.perf_counter() - t0

    def evaluated(path: Path, res_path: Path, seconds: float) -> dict:
        r = evaluate(str(path), EvalOptions(texts=[str(held_out)], reference=str(ref), max_tokens=args.eval_tokens,
                                            ctx=512, progress=False))
        r["quantize_s"] = seconds
        r["types"] = {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
        write_json(res_path, r)
        path.unlink()
        return r

    rows = []
    for preset in args.types.split(","):
        ours_path, theirs_path = work / f"{preset}-budget.json", work / f"{preset}-llama.cpp_imatrix.json"
        theirs = json.loads(theirs_path.read_text()) if theirs_path.exists() else None
        # a row rebuilt from a rounded table (quant_vs_llamacpp.json seeds some) has its size to
        # 0.1 MiB only, and the budget must be llama.cpp's file size to the byte
        if theirs is None or "reconstructed_from_md" in theirs:
            out = work / f"{preset}-llama.cpp_imatrix.gguf"
            seconds = qb.produce("llama.cpp+imatrix", ref, out, preset, calib, args.calib_tokens, imatrix, tools)
            theirs = evaluated(out, theirs_path, seconds)
        if "types" not in theirs:  # a row from quant_vs_llamacpp.py: its per-tensor types from the plan
            from pocketlm.quantize.plan import plan as preset_plan

            shapes = [(t.name, tuple(int(x) for x in reversed(t.shape))) for t in open_gguf(ref).tensors]
            meta = json.loads((Path(args.model) / "config.json").read_text())
            gqa = meta["num_attention_heads"] // meta.get("num_key_value_heads", meta["num_attention_heads"])
            theirs["types"] = {p.name: p.type for p in preset_plan(shapes, preset, meta["num_hidden_layers"], gqa)}
        if ours_path.exists():
            ours = json.loads(ours_path.read_text())
        else:
            out = work / f"{preset}-budget.gguf"
            t1 = time.perf_counter()
            types = types_for_budget(sens, theirs["size_bytes"])
            quantize_model(str(ref), out, QuantizeOptions(types=types, method="gptq", calib=[str(calib)],
                                                          calib_tokens=args.calib_tokens, progress=False))
            ours = evaluated(out, ours_path, time.perf_counter() - t1)
        predicted = [sens.predicted_kld(r["types"]) if all(n in r["types"] for n in sens.tensors) else None
                     for r in (theirs, ours)]
        rows.append((preset, theirs, ours, predicted))
        print(preset, theirs["size_bytes"], theirs["kld_mean"], ours["size_bytes"], ours["kld_mean"], flush=True)
    write(args, rows, sens_s)


def write(args, rows, sens_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, i, style in (("llama.cpp preset + imatrix", 1, "o--"), ("pocketlm budget (gptq)", 2, "s-")):
        ax.plot([r[i]["size_bytes"] / 1e6 for r in rows], [r[i]["kld_mean"] for r in rows], style, label=label)
    for preset, theirs, _, _ in rows:
        ax.annotate(preset, (theirs["size_bytes"] / 1e6, theirs["kld_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xlabel="file size (MB)", ylabel="mean KLD vs F32 (log)", yscale="log", title=f"{args.tag}: size vs KLD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = RESULTS.with_suffix(".png")
    fig.savefig(png, dpi=110)

    met = sum(1 for _, t, o, _ in rows if o["kld_mean"] < t["kld_mean"] and o["size_bytes"] <= t["size_bytes"])
    lines = ["# Budget-driven quantization vs llama.cpp presets", "",
             f"Command: `.venv/bin/python bench/budget_vs_presets.py --tag {args.tag} --types {args.types}` on "
             f"{cpu_name()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}. Model: `{args.model}`. Reference: "
             f"its F32 GGUF. Calibration: {args.calib_tokens} tokens from the first 80% of wiki.txt (llama.cpp's imatrix "
             f"on the same text); evaluation: {args.eval_tokens} tokens of the last 20%, ctx 512. Sensitivity "
             f"measurement: {sens_s:.0f} s (cached after the first run).", "",
             "| preset | llama.cpp MB | llama.cpp KLD | pocketlm MB | pocketlm KLD | KLD ratio | PPL llama.cpp / pocketlm | "
             "predicted KLD (theirs / ours) |", "|---|---|---|---|---|---|---|---|"]
    measured, predicted = [], []
    for preset, t, o, (pt, po) in rows:
        lines.append(f"| {preset} | {t['size_bytes'] / 1e6:.2f} | {t['kld_mean']:.5f} | {o['size_bytes'] / 1e6:.2f} | "
                     f"{o['kld_mean']:.5f} | {o['kld_mean'] / t['kld_mean']:.2f} | {t['ppl']:.2f} / {o['ppl']:.2f} | "
                     + (f"{pt:.4f} / {po:.4f} |" if pt is not None and po is not None else "- |"))
        for p, r in ((pt, t), (po, o)):
            if p is not None:
                predicted.append(p)
                measured.append(r["kld_mean"])
    rho = spearman(predicted, measured) if len(predicted) > 2 else float("nan")
    lines += ["", f"![size vs KLD]({png.name})", "",
              f"Goal (pocketlm's budgeted file has lower mean KLD than llama.cpp's preset at that preset's size): "
              f"{met} of {len(rows)} sizes -> **{'met' if met == len(rows) else 'not met'}**.", "",
              f"Proxy check: Spearman rank correlation between predicted and measured KLD over all {len(predicted)} "
              f"files: {rho:.3f}."]
    text = "\n".join(lines) + "\n"
    save_results(RESULTS, text)
    print(text)


if __name__ == "__main__":
    main()
