"""The compress report: one plain sentence, a side-by-side table, and plots. The Markdown
links its plots as PNG files beside it (a Markdown viewer shows embedded base64 as pages of
text); the HTML carries them inside, so it can be mailed on its own."""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from ..util.atomic import write_bytes, write_text

# the eval row of compress's float student (distilled, before quantization): written by the pipeline, read here
STUDENT_ROW = "distilled student, unquantized"
KIND_ORDER = ["token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plots(rows: dict, types: dict[str, str]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..quantize.formats import get as get_format

    plots = {}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in rows.items():
        kld = r.get("kld_mean", 0.0) or 0.0
        ax.scatter(r["size_bytes"] / 1e6, kld, s=60, label=name)
    ax.set(xlabel="file size (MB)", ylabel="mean KLD vs the original", title="size vs quality (lower left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots["size vs quality"] = _png(fig)
    plt.close(fig)

    speed = {n: r for n, r in rows.items() if r.get("decode_tps")}
    if speed:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(speed)
        ax.barh(names, [speed[n]["decode_tps"] for n in names], color="#4c72b0")
        ax.set(xlabel="decode tokens/s (llama.cpp, 2 threads)", title="speed")
        fig.tight_layout()
        plots["speed"] = _png(fig)
        plt.close(fig)

    layers = sorted({int(m.group(1)) for n in types if (m := re.match(r"blk\.(\d+)\.", n))})
    kinds = [k for k in KIND_ORDER if any(_kind(n) == k for n in types)]
    if layers and kinds:
        import numpy as np

        grid = np.full((len(kinds), len(layers)), np.nan)
        for name, t in types.items():
            m = re.match(r"blk\.(\d+)\.", name)
            if m and _kind(name) in kinds:
                grid[kinds.index(_kind(name)), layers.index(int(m.group(1)))] = get_format(t).bits_per_weight
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(kinds) + 1.4))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title("bits per weight chosen for each tensor")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        plots["per-tensor allocation"] = _png(fig)
        plt.close(fig)
    return plots


def _kind(name: str) -> str:
    m = re.match(r"blk\.\d+\.(.+)\.weight$", name)
    return m.group(1) if m else name.removesuffix(".weight")


def headline(rows: dict) -> str:
    o, p = rows["original"], rows["pocketlm"]
    smaller = o["size_bytes"] / p["size_bytes"]
    digits = 0 if p["size_bytes"] >= 10e6 else 2
    parts = [f"{smaller:.1f}× smaller ({o['size_bytes'] / 1e6:.{digits}f} MB → {p['size_bytes'] / 1e6:.{digits}f} MB)"]
    if o.get("decode_tps") and p.get("decode_tps"):
        parts.append(f"{p['decode_tps'] / o['decode_tps']:.1f}× the decoding speed")
    if p.get("top1") is not None:
        parts.append(f"agrees with the original's next-token choice {100 * p['top1']:.0f}% of the time "
                     f"(perplexity {o['ppl']:.1f} → {p['ppl']:.1f})")
    return "; ".join(parts) + "."


def _table(rows: dict) -> list[list[str]]:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    out = [["model", "MB", "bpw", "PPL", "mean KLD", "top-1", "prefill tok/s", "decode tok/s", "peak RSS MB", "MMLU"]]
    for name, r in rows.items():
        out.append([name, f(r["size_bytes"] / 1e6, ".1f"), f(r.get("bpw"), ".2f"), f(r.get("ppl"), ".2f"),
                    f(r.get("kld_mean"), ".4f"), "-" if r.get("top1") is None else f"{100 * r['top1']:.1f}%",
                    f(r.get("prefill_tps"), ".0f"), f(r.get("decode_tps"), ".0f"), f(r.get("peak_rss_mb"), ".0f"),
                    "-" if r.get("mmlu_acc") is None else f"{100 * r['mmlu_acc']:.1f}%"])
    return out


def _choice_table(choice: dict) -> list[list[str]]:
    """The student shapes compress weighed: the finalists' pilot scores, then the shapes alone."""
    head = ["student shape", "non-emb params", "bits/weight", "KLD after pilot heal", "+ quantization KLD", "score", ""]
    rows = [head]
    for p in choice["pilots"]:
        rows.append([p["label"], f"{p['non_embedding'] / 1e6:.1f}M", f"{p['bpw']:.2f}", f"{p['pilot_kld']:.3f}",
                     f"{p['quant_kld']:.3f}" + ("" if p.get("quant_measured") else " (predicted)"), f"{p['score']:.3f}",
                     "chosen" if p["label"] == choice["chosen"] else ""])
    piloted = {p["label"] for p in choice["pilots"]}
    rest = sorted((c for c in choice["candidates"] if c["label"] not in piloted), key=lambda c: -c["non_embedding"])
    for c in rest[:8]:
        rows.append([c["label"], f"{c['non_embedding'] / 1e6:.1f}M", f"{c['bpw']:.2f}", "-", "-", "-",
                     "chosen" if c["label"] == choice["chosen"] else "not a finalist"])
    return rows


def md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]), *["| " + " | ".join(r) + " |" for r in rows[1:]]]


def _html_table(rows: list[list[str]]) -> list[str]:
    return ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>",
            *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]], "</table>"]


def write_report(out: Path, src, plan: dict, quantized: dict, preset: str | None, choice: dict | None = None) -> dict:
    rows = json.loads((out / "eval.json").read_text())
    top = headline(rows)
    plots = _plots(rows, quantized["types"])
    mem = quantized.get("memory")
    notes = [f"Budget {plan['budget'] / 1e6:.1f} MB; the file is {quantized['size'] / 1e6:.2f} MB." if not mem else
             f"Memory budget {mem['label']} at a context of {mem['ctx']} tokens: measured {mem['measured'] / 1e6:.0f} MB "
             f"(peak resident memory of a process running the file on llama.cpp with its whole context filled; "
             f"predicted {mem['predicted'] / 1e6:.0f} MB: file + KV cache + compute buffer + process): "
             + ("fits." if mem["fits"] else f"does NOT fit, {(mem['measured'] - mem['budget']) / 1e6:.0f} MB over.")
             + f" The file is {quantized['size'] / 1e6:.2f} MB.",
             f"Why: {plan['why']}.",
             (f"Predicted KLD of quantizing the distilled student, relative to the student (from measured sensitivity): "
              f"{quantized['predicted_kld']:.4f}; the measured KLD above is relative to the original, so it includes "
              "what distillation lost." if plan["distill"] else
              f"Predicted KLD of the allocation (from measured sensitivity): {quantized['predicted_kld']:.4f}; measured: "
              f"{rows['pocketlm'].get('kld_mean', float('nan')):.4f}.")]
    student = rows.get(STUDENT_ROW, {}).get("kld_mean")
    final = rows["pocketlm"].get("kld_mean")
    if student is not None and final is not None:
        added = (f"quantization added {final - student:.4f}" if final >= student else
                 f"the file ended {student - final:.4f} closer to it than the student")
        notes.append(f"`{STUDENT_ROW}` is the float student the file was quantized from: of the file's mean KLD to the "
                     f"original ({final:.4f}), distillation left {student:.4f} ({100 * student / final:.0f}%) and "
                     f"{added}, on the same text.")
    qad = quantized.get("qad")
    if qad:
        notes.append(f"`pocketlm before qad` is the gptq file the final one was trained from ({qad['why']}): "
                     f"{qad['tokens']} tokens" + (f" read {qad['epochs']} times" if qad.get("epochs", 1) > 1 else "") +
                     f" against the original's logits in {qad['seconds'] / 60:.0f} min, held-out "
                     f"KLD {qad['kld_before']:.4f} -> {qad['kld_after']:.4f} during training; " +
                     ("worse than where it started, so the gptq file was kept as the final one." if qad.get("kept_start")
                      else f"the file decodes exactly to the trained weights (max difference {qad['max_difference']:g})."))
    if preset:
        size = rows[f"llama.cpp {preset}"]["size_bytes"]
        where = ("the largest that fits the budget" if size <= plan["budget"] else
                 f"the smallest llama.cpp makes of this model, {size / 1e6:.1f} MB: every preset is over the budget")
        notes.append(f"`llama.cpp {preset}` is llama.cpp's own preset of the original, {where} (llama.cpp's quantizer, "
                     "no imatrix).")
    if src.is_gguf and "Q4_1" in src.path.name.upper():
        notes.append("The original is itself a Q4_1 GGUF: its weights lie on a Q4_1 grid, so any tensor kept at Q4_1 "
                     "is lossless, and types above Q4_1 would only grow the file; they are not offered.")
    notes.append(f"Measured on the evaluation text only (never the calibration text), windows of "
                 f"{rows['pocketlm'].get('ctx', '?')} tokens, KLD over the full vocabulary; speeds with 2 threads on this "
                 "machine (GGUF files on llama.cpp, HF folders on torch).")
    table = _table(rows)
    md = [f"# pocketlm compress report: {src.name}", "", f"**{top}**", "", *md_table(table)]
    md += ["", *[f"- {n}" for n in notes], ""]
    if choice:
        md += ["## Student shapes weighed", "", f"{choice['why']}.", "", *md_table(_choice_table(choice)),
               f"\n({len(choice['candidates'])} shapes fit the budget; shown: the finalists, then the largest others.)", ""]
    files = {title: f"plots/{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png" for title in plots}
    for title, data in plots.items():
        write_bytes(out / files[title], data)
    md += [f"## {title}\n\n![{title}]({files[title]})\n" for title in plots]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>pocketlm report</title><style>"
            "body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
            "td:first-child,th:first-child{text-align:left}.top{font-size:1.15em;background:#eef5ee;padding:.7em}"
            "</style></head><body>", f"<h1>pocketlm compress report: {html.escape(src.name)}</h1>",
            f"<p class='top'>{html.escape(top)}</p>", *_html_table(table)]
    page += ["<ul>", *[f"<li>{html.escape(n)}</li>" for n in notes], "</ul>"]
    if choice:
        page += ["<h2>Student shapes weighed</h2>", f"<p>{html.escape(choice['why'])}.</p>",
                 *_html_table(_choice_table(choice))]
    page += [f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{base64.b64encode(d).decode()}'>"
             for t, d in plots.items()]
    page.append("</body></html>")
    for name, text in (("report.md", "\n".join(md)), ("report.html", "\n".join(page))):
        write_text(out / name, text)
    return {"md": str(out / "report.md"), "html": str(out / "report.html"), "headline": top, "notes": notes,
            "table": table}
