#!/usr/bin/env bash
# Run the checks and the test suite (sets up first when needed; a set-up machine starts the tests within seconds):
# ruff (lint), mypy (types of the pccpu package), then pytest. Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # the quick loop: no real model
# pytest's exit code 5 ("no tests collected") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PCCPU_SETUP_MODELS="${PCCPU_SETUP_MODELS:-smollm2}" bash scripts/setup.sh || exit 1
echo "[test] ruff" >&2
.venv/bin/python -m ruff check pccpu models bench tests fuzz scripts || exit 1
echo "[test] mypy" >&2
.venv/bin/python -m mypy || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
