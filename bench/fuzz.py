"""Fuzz pocketlm's readers with thousands of damaged files and write bench/results/fuzz.md.

The same mutation fuzzer and readers as tests/test_fuzz.py (tests/fuzz_harness.py), with many
more cases, plus one reader CI cannot afford per case: a whole `load()` of a damaged Hugging Face
folder through transformers (~0.3 s a case), the path `eval` and `distill` take. Every mutant must
end in a correct result or pocketlm's one-line error; a traceback of any other type, or a reader
still running after 10 s, is counted as a failure and listed.

  .venv/bin/python bench/fuzz.py [--cases 2000] [--load-cases 1000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import make_tiny_llama  # noqa: E402
from fuzz_harness import document_seeds, file_placer, folder_placer, fuzz, read_document, read_gguf, read_hf_folder  # noqa: E402
from results_file import save_results  # noqa: E402

from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fuzz.md"


def read_and_load(path: Path) -> None:
    from pocketlm.models.load import load

    read_hf_folder(path)
    load(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000, help="mutants per reader")
    ap.add_argument("--load-cases", type=int, default=1000, help="mutants through the whole transformers load")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pocketlm-fuzz-"))
    os.environ["POCKETLM_CACHE"] = str(tmp / "cache")
    try:
        from pocketlm.models.export_gguf import export_gguf

        hf = make_tiny_llama(tmp / "tiny")
        gguf_seed = export_gguf(hf, tmp / "seed.gguf", "f16", progress=False).read_bytes()
        place_file, place_in_folder = file_placer(tmp), folder_placer(hf, tmp / "work")

        folder_seeds = {n: (hf / n).read_bytes() for n in ("config.json", "model.safetensors")}
        docs = document_seeds(tmp)
        runs = [("GGUF (info, tensor table, first rows)", {"m.gguf": gguf_seed}, place_file, read_gguf, args.cases, 8192),
                ("HF folder: config.json + safetensors (info, shapes, first rows)", folder_seeds, place_in_folder,
                 read_hf_folder, args.cases, 4096),
                ("HF folder through transformers' load()", folder_seeds, place_in_folder, read_and_load,
                 args.load_cases, 4096)]
        runs += [(f"document: {n.split('.')[-1]}", {n: b}, place_file, read_document, args.cases, None)
                 for n, b in docs.items()]
        rows, failures = [], []
        for i, (label, seeds, place, read, cases, focus) in enumerate(runs):
            t0 = time.perf_counter()
            tally = fuzz(seeds, place, read, cases, seed=100 + i, focus=focus)
            seconds = time.perf_counter() - t0
            o = tally.outcomes
            rows.append(f"| {label} | {tally.cases} | {o['ok']} | {o['error']} | {o['traceback']} | {o['hang']} | "
                        f"{seconds:.0f} |")
            failures += [f"- {label}: `{how}`: {what}" for how, what in tally.failures[:10]]
            print(rows[-1], flush=True)
        bad = sum(int(r.split("|")[5]) + int(r.split("|")[6]) for r in rows)
        save_results(RESULTS, "\n".join([
            "# Fuzzing pocketlm's readers",
            "",
            f"Machine: {cpu_name()}, 2 cores. Command: `.venv/bin/python bench/fuzz.py --cases {args.cases} "
            f"--load-cases {args.load_cases}` ({time.strftime('%Y-%m-%d')}). Mutants of valid seed files (a tiny "
            "Llama's GGUF, its config.json and model.safetensors, and a Markdown, HTML, PDF and DOCX document): "
            "bit flips, random and extreme bytes (0, 2^31, 2^63, 2^64-1 over length fields), cuts, cut-outs, "
            "repeated and inserted spans, one to three per mutant, mostly in the header. `error` is pocketlm's "
            "one-line refusal; `ok` a mutant the reader read correctly (a flipped bit in a weight, text that "
            "stays text). CI runs 150 mutants per reader (tests/test_fuzz.py).",
            "",
            "| reader | mutants | ok | error line | traceback | hang (>10 s) | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Goal (issue #20): >= 500 mutants per reader, 0 tracebacks/hangs: {'MET' if bad == 0 else 'NOT MET'}.",
            "",
            "Found and fixed by this fuzzer before these rows: GGUF string fields that are not UTF-8 (a "
            "UnicodeDecodeError later, in whatever read the field); safetensors files whose tensors do not tile "
            "the data region exactly (accepted by pocketlm's reader, then a traceback from safetensors' own reader "
            "in `info` and transformers); config.json values transformers rejects with other exception types "
            "(`torch_dtype: flt32` is an AttributeError).",
            *(["", "## Failures (first 10 per reader)", "", *failures] if failures else []),
        ]))
        print(f"wrote {RESULTS}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
