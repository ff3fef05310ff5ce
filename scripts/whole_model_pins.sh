#!/usr/bin/env bash
# Makes tests/test_streaming.py's float-dependent pins for this kind of host from the code the
# pins stand for: the whole-model code of commit 9ccd30a, with only 2ba6439's float64 scale
# sums applied (what every pin set so far was made by). Prints the gptq files' sha256 and the
# tiny model's sensitivity gains; add them as this host's set in test_streaming.py.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git worktree add --detach "$tree" 9ccd30a >/dev/null
git show 2ba6439 -- src/pocketlm/quantize/formats/search.py | git -C "$tree" apply
cache=$(mktemp -d)
POCKETLM_CACHE="$cache" PYTHONPATH="$tree/src:tests" HF_HUB_OFFLINE=1 .venv/bin/python - <<'PY'
import hashlib
import tempfile
from pathlib import Path

from conftest import CORPUS, make_tiny_gemma, make_tiny_llama, make_tiny_qwen

import pocketlm
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
from pocketlm.quantize.sensitivity import measure

assert "/src/pocketlm" in pocketlm.__file__ and "tests" not in pocketlm.__file__
root = Path(tempfile.mkdtemp())
models = {"llama": make_tiny_llama(root / "tiny-llama"), "llama_untied": make_tiny_llama(root / "tiny-untied", seed=1, tied=False),
          "gemma3": make_tiny_gemma(root / "tiny-gemma"), "qwen2": make_tiny_qwen(root / "tiny-qwen")}
text = root / "sample.txt"
text.write_text(CORPUS * 12)
gains = measure(str(models["llama_untied"]), [str(text)], 1024, progress=False, calib_ctx=128).gains
print("gains:", {k: gains[k] for k in sorted(gains)})
for key in ["llama/Q4_K_M-gptq", "llama_untied/Q3_K_S-gptq", "gemma3/Q4_K_M-gptq", "qwen2/Q4_K_M-gptq"]:
    model, job = key.split("/")
    preset, method = job.split("-")
    out = root / "out.gguf"
    quantize_model(str(models[model]), out, QuantizeOptions(preset=preset, method=method, calib=[str(text)], calib_tokens=1024,
                                                            calib_ctx=128, progress=False, allow_requant=True))
    print(f'"{key}": "{hashlib.sha256(out.read_bytes()).hexdigest()}",')
PY
rm -rf "$cache"
