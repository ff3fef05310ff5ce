#!/usr/bin/env bash
# `make run`: the main job on the bundled default model. Until `pocketlm compress` exists this
# shows what the model is and measures it on bundled text (the Python FAQ, PSF licence).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PL=.venv/bin/pocketlm
DOCS=src/pocketlm/data/python-faq
mkdir -p out
$PL info smollm2-135m
$PL eval smollm2-135m --text "$DOCS/programming.rst" --max-tokens 4096 --speed --json out/eval-smollm2.json
# quantize with pocketlm (imatrix, calibrated on the other FAQ pages: never on the text we
# report on) and measure what Q4_0 keeps of the original
CALIB=()
for f in "$DOCS"/*.rst; do
  case "$f" in *programming.rst|*LICENSE*) ;; *) CALIB+=(--calib "$f") ;; esac
done
$PL quantize smollm2-135m -o out/smollm2-Q4_0.gguf --type Q4_0 --method imatrix "${CALIB[@]}" --force --quiet
$PL eval out/smollm2-Q4_0.gguf --reference smollm2-135m --text "$DOCS/programming.rst" --max-tokens 4096 \
  --json out/eval-smollm2-Q4_0.json
