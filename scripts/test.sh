#!/usr/bin/env bash
# Runs the test suite. pytest exits 5 when it collected nothing; that must fail CI, not pass it.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "no tests were collected: failing on purpose" >&2
  exit 1
fi
exit $rc
