#!/usr/bin/env bash
# Runs the test suite. pytest exits 5 when it collected nothing; that must fail CI, not pass it.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Every skip fails the run (tests/conftest.py): CI must not pass by skipping what it should test.
export POCKETLM_STRICT_TESTS=1
# The web page's test drives Debian's Chromium (Playwright never downloads a browser here).
# Installed when missing and this user may; otherwise that one test skips and says why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the web page test (once per machine)"
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "could not install chromium: the web page test will fail" >&2
fi
# Lint and types first: an unused import or an undefined name fails CI like a failing test.
.venv/bin/ruff check src tests bench || { echo "ruff found problems (see above): failing" >&2; exit 1; }
# Types of src/ (settings in pyproject.toml): a None where a value is needed fails CI before it fails a user.
# Its cache lives beside pip's, outside the clone: CI's clean clones then check only what changed
# (~50 s cold on 2 cores, a few seconds warm); mypy re-checks any file whose contents changed.
.venv/bin/mypy --no-error-summary --cache-dir "${XDG_CACHE_HOME:-$HOME/.cache}/pocketlm/mypy" || { echo "mypy found problems (see above): failing" >&2; exit 1; }
# One worker per core (at most 4: each holds its own models in memory), each kept to its core by
# tests/conftest.py: the tests wait on one thread, on files and on subprocesses much of the time, and two
# workers on 2 cores took the suite 671 s -> 376 s, the same hour (single tests pass alone too: -n 0).
workers=$(.venv/bin/python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
.venv/bin/python -m pytest -q -ra -n "$workers" "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "no tests were collected: failing on purpose" >&2
  exit 1
fi
exit $rc
