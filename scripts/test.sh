#!/usr/bin/env bash
# Run the checks and the test suite (sets up first when needed; a set-up machine starts the tests within seconds):
# ruff (lint), mypy (types of the pccpu package), then pytest. Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # the quick loop: no real model
# pytest's exit code 5 ("no tests collected") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PCCPU_SETUP_MODELS="${PCCPU_SETUP_MODELS:-smollm2}" bash scripts/setup.sh || exit 1
# redis-server for tests/test_remote_store.py (a real server per test), from Debian's package when missing; without
# it (no apt-get, not root, no network) those tests skip and say why
if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        echo "[test] installing redis-server (Debian package)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            redis-server; } >/dev/null 2>&1 || echo "[test] could not install redis-server: its tests will skip" >&2
    else
        echo "[test] redis-server is missing and cannot be installed here (needs apt-get as root): its tests will skip" >&2
    fi
fi
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
