#!/usr/bin/env bash
# pccpu on a bare CUDA machine that reaches no package index: build llama-cpp-python with CUDA from a carried source,
# then run the GPU tests, the fidelity check and the GPU benchmark. Used for the README's GPU table.
#
#   bash bench/gpu_device.sh build   # $DEV1: llama_src.tar.gz (the llama-cpp-python sdist without models/ and
#                                    # docs/), whl/*.whl, smol.part1 (first half of the default model), corpus.tar.gz
#   bash bench/gpu_device.sh bench   # $DEV2: smol.part2, tokenizer.gguf (bench/random_gguf.py donor)
#
# A call carries at most 64 MiB, so the default model (98 MB) travels in two halves, one per call, and the two
# calls must run on the same machine while it is still warm: "build" installs llama-cpp-python into the machine's
# Python and keeps its half and the corpus under /tmp/pccpu-keep, which outlive the call (the repo's ignored
# folders do not). The CUDA wheel (266 MB) is too large to bring back.
#
# Results go to $OUT (default: ./gpu-out). It installs into the machine's own Python (a throwaway machine), which has
# numpy, jinja2, click, psutil, xxhash, scikit-build-core, cmake and ninja; only diskcache, xmltodict and gguf are
# carried as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV1="${DEV1:-.dev1}"
DEV2="${DEV2:-.dev2}"
OUT="${OUT:-gpu-out}"
PY="${PY:-python3}"
PIP=("$PY" -m pip install -q --no-index --no-deps --break-system-packages)
export PCCPU_WHEEL_CACHE="$DEV1/wheels" PCCPU_CUDA_ARCH="${PCCPU_CUDA_ARCH:-90}" PCCPU_BACKEND=cuda
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
mkdir -p "$OUT"

install_wheels() {  # a throwaway machine: the carried wheels go into its own Python, next to numpy, torch and the build tools
    "$PY" -c "import scikit_build_core, numpy; print('python:', __import__('sys').executable)"
    "${PIP[@]}" "$DEV1"/whl/*.whl
}

case "${1:-}" in
build)
    install_wheels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    nvcc --version | tail -2
    [ -d "$DEV1/llama_cpp_python-0.3.36" ] || tar xzf "$DEV1/llama_src.tar.gz" -C "$DEV1"
    started=$(date +%s)
    "$PY" scripts/build_llama.py --backend cuda --source "$DEV1/llama_cpp_python-0.3.36" --offline 2>&1 \
        | grep -v -E "^\s*\[[0-9]+/[0-9]+\]|^ *(Building|Compiling)" | tail -40
    echo "build took $(( $(date +%s) - started )) s"
    wheel=$(ls "$DEV1"/wheels/*/llama_cpp_python-*.whl | head -1)
    ls -la "$wheel"
    mkdir -p /tmp/pccpu-keep
    cp "$DEV1/smol.part1" "$DEV1/corpus.tar.gz" /tmp/pccpu-keep/
    ;;
bench)
    if ! "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null
    then
        echo "no CUDA llama-cpp-python here: run 'build' first, on this same machine" >&2
        exit 3
    fi
    "${PIP[@]}" --no-build-isolation -e .
    export PCCPU_HOME=/tmp/pccpu-home
    mkdir -p "$PCCPU_HOME/models"
    model="$PCCPU_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -f "$model" ] || cat /tmp/pccpu-keep/smol.part1 "$DEV2/smol.part2" > "$model"
    [ -d "$PCCPU_HOME/corpus" ] || tar xzf /tmp/pccpu-keep/corpus.tar.gz -C "$PCCPU_HOME"
    "$PY" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    set -o pipefail
    "$PY" -m pytest -q -rs -s tests/test_cuda.py tests/test_resident.py 2>&1 | tail -30 | tee "$OUT/tests.txt"
    "$PY" -m pccpu.bench.gpu_bench --tokenizer "$DEV2/tokenizer.gguf" --workdir /tmp/pccpu-models --out "$OUT" \
        --fidelity-model "$model" ${GPU_BENCH_ARGS:---runs 3 --shape qwen2.5-1.5b --shape llama3.1-8b} 2>&1 \
        | grep -v "pccpu.llama" | tee "$OUT/bench.log" | tail -40
    ;;
*)
    echo "usage: bash bench/gpu_device.sh build|bench" >&2
    exit 2
    ;;
esac
