#!/usr/bin/env bash
# The scale bench's 1B and 8B gptq rows (issue #19) on a lent GPU machine: the per-layer work
# (calibration forward passes, X^T X, GPTQ's inverse factor and column sweep) on CUDA, one decoder
# layer resident; the k-quant codec's scale searches and packing on the host's cores. CI never runs this; it needs no GPU to pass.
#
# Two steps, from a session that has a device (the `device` tool's `status`):
#   1. here, once:      bash bench/device_check.sh --prepare
#      (downloads the wheels the GPU image lacks into .whl/ and copies the tokenizer into
#      .device-tok/; both are ignored by git through .git/info/exclude and travel with `carry`)
#   2. on the device:   run(command="bash bench/device_check.sh", carry=[".whl", ".device-tok"], timeout_s=600)
# Results come back as $OUT/scale-device.md and .json; commit them under bench/results/.
#
# Budget: the image has torch/transformers/accelerate and numba but not gguf or pydantic; llama-cpp-python
# is not there either, so the "llama.cpp runs it" column reads "not checked" (CPU rows check it).
# Sized to end inside 10 minutes: 1B gptq first, 8B gptq second; a row that does not finish in time
# leaves the 1B row in $OUT, and its own log and RSS trace in jobs.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  grep -qx "/.device-tok/" .git/info/exclude 2>/dev/null || echo "/.device-tok/" >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl .device-tok
  # Versions as installed here, so both machines run the same library code.
  v() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
  for pkg in gguf pydantic pydantic-core annotated-types typing-inspection; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg==$(v "$pkg")"
  done
  .venv/bin/python -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import scale; scale._copy_tokenizer(Path('.device-tok'))"
  du -sh .whl .device-tok
  exit 0
fi

[ -d .whl ] && [ -d .device-tok ] || { echo "error: run 'bash bench/device_check.sh --prepare' here first and carry .whl and .device-tok" >&2; exit 1; }
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export POCKETLM_BENCH_CACHE=/tmp/pocketlm-bench POCKETLM_SCALE_TOKENIZER=$PWD/.device-tok
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# The calibration text: the bench reads ../shared/data, which does not travel; any 400 kB of prose
# does for cost (random weights), so the repo's own test texts stand in, repeated.
mkdir -p /tmp/pocketlm-bench/scale
(for _ in $(seq 40); do cat tests/data/*.txt; done | head -c 400000 > /tmp/pocketlm-bench/scale/calib.txt) || true  # head closes the pipe: SIGPIPE
# the GPU sweep against the CPU's on one tensor (quality equal within 2%), before any timing
python3 bench/gptq_device_check.py 2>&1 | tee "$OUT/gptq-check.txt" || echo "gptq device check: MISS (see gptq-check.txt)" | tee -a "$OUT/log.txt"
end=555  # bash counts SECONDS from the script's start: one deadline for every row, inside run's 600 s
# 1B, then the whole 8B with what time is left: if it is cut off, its log (progress per layer) still
# says how many layers it did and how fast, and its RSS trace how much memory they held
for spec in "1B" "8B"; do
  left=$((end - SECONDS)); [ "$left" -gt 30 ] || { echo "no time left for $spec" | tee -a "$OUT/log.txt"; break; }
  timeout "$left" python3 bench/scale.py --shapes "$spec" --jobs gptq --device-run "$OUT/scale-device" \
    2>&1 | tee -a "$OUT/log.txt" || echo "$spec did not finish (see log.txt)" | tee -a "$OUT/log.txt"
done
# each job's own output (progress per layer) and RSS trace; one archive, as few files come back
(cd /tmp/pocketlm-bench/scale && tar czf "$OUT/jobs.tar.gz" out-*/*.log out-*/*.tsv) || true
