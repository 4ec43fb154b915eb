#!/usr/bin/env bash
# Set up pccpu from nothing: a virtual environment in .venv, llama-cpp-python built with CPU flags checked on
# this machine (scripts/build_llama.py), pccpu with its test and bench extras, and the default model.
# Idempotent: a second run reuses the built wheel and the fetched model and takes seconds.
#   PYTHON=python3.12 bash scripts/setup.sh     # another interpreter
#   PCCPU_BACKEND=cuda bash scripts/setup.sh   # with llama.cpp's CUDA backend (needs nvcc; PCCPU_CUDA_ARCH=90 for H100)
#   CMAKE_ARGS="..." bash scripts/setup.sh      # your own llama.cpp build flags, used verbatim
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${PCCPU_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
# llama-cpp-python first, from our own flag-keyed wheel cache, so pip never picks a stale or native build.
"$VENV/bin/python" scripts/build_llama.py
"$VENV/bin/python" -m pip install --quiet -e ".[test,bench]"
"$VENV/bin/python" scripts/build_llama.py   # verifies the install above kept our build
# the registry's default (tests) and the demo's model; the test command asks for the first only
for name in ${PCCPU_SETUP_MODELS:-smollm2 qwen2.5-coder-0.5b}; do
    echo "[setup] fetching model $name" >&2
    "$VENV/bin/pccpu" models fetch "$name" >&2
done
echo "[setup] done: run $VENV/bin/pccpu --help" >&2
