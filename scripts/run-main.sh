#!/usr/bin/env bash
# `make run`: the main job on the bundled default model. Compress SmolLM2-135M-Instruct to a
# size budget, evaluate it against the original and llama.cpp's nearest preset, write the
# report, index the bundled Python FAQ (PSF licence) and answer one question from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PL=.venv/bin/pocketlm
OUT=${OUT:-out/compress}
BUDGET=${BUDGET:-80MB}
DOCS=src/pocketlm/data/python-faq
MMLU=../shared/data/qa/mmlu_test.jsonl  # used for a 100-question sample when this checkout has it
extra=()
[ -f "$MMLU" ] && extra+=(--mmlu "$MMLU")
$PL compress smollm2-135m --target-size "$BUDGET" --domain "$DOCS" -o "$OUT" "${extra[@]}"
echo
echo "question: How do I make a Python script executable on Unix?"
$PL ask "How do I make a Python script executable on Unix?" --db "$OUT/docs.db" --model "$OUT/model.gguf" --max-tokens 120
echo
echo "report: $OUT/report.html (and report.md)"
