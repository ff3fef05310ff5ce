"""How fast bad input is refused: each case runs the real `pocketlm` command in a fresh process
(start-up and imports included, as a user meets them) and must end in one `error:` line and
exit status 1 within 2 seconds (issue #20). Writes bench/results/rejections.md.

  .venv/bin/python bench/rejections.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import make_tiny_llama  # noqa: E402
from results_file import save_results  # noqa: E402

from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rejections.md"
LIMIT = 2.0


def cases(tmp: Path) -> list[list[str]]:
    hf = make_tiny_llama(tmp / "tiny")
    text = tmp / "t.txt"
    text.write_text("some text")
    recipe = tmp / "bad.yaml"
    recipe.write_text("quantize:\n  method: gtpq\n")
    out = str(tmp / "q.gguf")
    return [
        ["quantize", str(hf), "-o", out, "--type", "Q9_K"],
        ["quantize", str(hf), "-o", out, "--target-size", "1KB"],
        ["quantize", "smollm2-135m", "-o", out, "--target-size", "1MB"],
        ["quantize", str(hf), "-o", out, "--target-size", "sixty"],
        ["quantize", str(hf), "-o", out, "--target-bpw", "0.5"],
        ["quantize", str(hf), "-o", out, "--type", "Q4_K_M", "--method", "gtpq"],
        ["quantize", str(hf), "-o", out, "--type", "Q4_K_M", "--keep", "blk.*=Q9"],
        ["quantize", str(hf), "-o", out, "--type", "Q4_K_M", "--calib", str(tmp / "missing.txt")],
        ["quantize", str(hf), "-o", out, "--tpye", "Q4_K_M"],
        ["plan", str(hf)],
        ["plan", "smollm2-135m", "--target-bpw", "40"],
        ["compress", "--target-size", "80MB", "-o", str(tmp / "c"), "--recipe", str(recipe)],
        ["compress", "--target-size", "lots", "-o", str(tmp / "c")],
        ["distill", str(hf), "-o", str(tmp / "s"), "--data", str(text), "--loss", "kl"],
        ["distill", str(hf), "-o", str(tmp / "s"), "--data", str(text), "--lr", "0"],
        ["index", str(text), "--db", str(tmp / "i.db"), "--chunk-tokens", "-1"],
        ["search", "river", "--db", str(tmp / "i.db"), "--k", "0"],
        ["eval", str(hf), "--ctx", "1"],
        ["serve", "--port", "70000"],
        ["chat", "--temperature", "-1"],
    ]


def main() -> None:
    exe = Path(sys.executable).with_name("pocketlm")
    tmp = Path(tempfile.mkdtemp(prefix="pocketlm-reject-"))
    rows, worst, bad = [], 0.0, 0
    try:
        for args in cases(tmp):
            t0 = time.perf_counter()
            res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
            seconds = time.perf_counter() - t0
            lines = res.stderr.strip().splitlines()
            one_line = res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
            ok = one_line and seconds < LIMIT
            bad += not ok
            worst = max(worst, seconds)
            shown = " ".join(args).replace(str(tmp), "$TMP")
            message = (lines[-1] if lines else "(no output)").replace(str(tmp) + "/", "")
            rows.append(f"| `pocketlm {shown}` | {seconds:.2f} | {'yes' if one_line else 'NO'} | {message[:110]} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_results(RESULTS, "\n".join([
        "# Bad input: how fast it is refused",
        "",
        f"Machine: {cpu_name()}, 2 cores. Command: `.venv/bin/python bench/rejections.py` ({time.strftime('%Y-%m-%d')}). "
        "Each row is a fresh `pocketlm` process, start-up included; `$TMP` holds a tiny Llama folder (`tiny`), a "
        "text file and a recipe with a misspelt method.",
        "",
        "| command | seconds | one `error:` line, exit 1 | the line |",
        "|---|---:|---|---|",
        *rows,
        "",
        f"Goal (issue #20): every rejection in under {LIMIT:.0f} s with one `error:` line: "
        f"{'MET' if bad == 0 else f'NOT MET ({bad} of {len(rows)} rows)'}; slowest {worst:.2f} s.",
    ]))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
