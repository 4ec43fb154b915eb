#!/usr/bin/env bash
# pccpu on a bare CUDA machine that reaches no package index: build llama-cpp-python with CUDA from a carried source,
# then run the GPU tests, the fidelity check and the GPU benchmark. Used for the README's GPU table.
#
#   bash bench/gpu_device.sh build   # needs $DEV1: llama_src.tar.gz (llama-cpp-python sdist, trimmed), whl/*.whl
#   bash bench/gpu_device.sh bench   # needs the build (or $DEV2/wheel.part*), the default model as parts, a
#                                    # tokenizer donor GGUF (bench/random_gguf.py donor) and the corpus tarball
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

venv() {  # a throwaway machine: the carried wheels go into its own Python, next to numpy, torch and the build tools
    "$PY" -c "import scikit_build_core, numpy; print('python:', __import__('sys').executable)"
    "${PIP[@]}" "$DEV1"/whl/*.whl
}

case "${1:-}" in
build)
    venv
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    nvcc --version | tail -2
    [ -d "$DEV1/llama_cpp_python-0.3.36" ] || tar xzf "$DEV1/llama_src.tar.gz" -C "$DEV1"
    started=$(date +%s)
    "$PY" scripts/build_llama.py --backend cuda --source "$DEV1/llama_cpp_python-0.3.36" --offline 2>&1 \
        | grep -v -E "^\s*\[[0-9]+/[0-9]+\]|^ *(Building|Compiling)" | tail -40
    echo "build took $(( $(date +%s) - started )) s"
    wheel=$(ls "$DEV1"/wheels/*/llama_cpp_python-*.whl | head -1)
    ls -la "$wheel"
    split -b 15M -d "$wheel" "$OUT/wheel.part"   # brought back, so a fresh machine can skip the build
    basename "$wheel" > "$OUT/wheel.name"
    ;;
bench)
    venv
    if ! "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null
    then
        name=$(cat "$DEV2/wheel.name")
        cat "$DEV2"/wheel.part* > "/tmp/$name"
        "${PIP[@]}" --force-reinstall "/tmp/$name"
    fi
    "${PIP[@]}" --no-build-isolation -e .
    export PCCPU_HOME=/tmp/pccpu-home
    mkdir -p "$PCCPU_HOME/models"
    model="$PCCPU_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -f "$model" ] || cat "$DEV1/smol.part1" "$DEV2/smol.part2" > "$model"
    [ -d "$PCCPU_HOME/corpus" ] || tar xzf "$DEV1/corpus.tar.gz" -C "$PCCPU_HOME"
    "$PY" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    set -o pipefail
    "$PY" -m pytest -q -rs -s tests/test_cuda.py tests/test_resident.py 2>&1 | tail -30 | tee "$OUT/tests.txt"
    "$PY" -m pccpu.bench.gpu_bench --tokenizer "$DEV2/tokenizer.gguf" --workdir /tmp/pccpu-models --out "$OUT" \
        --fidelity-model "$model" ${GPU_BENCH_ARGS:---shape qwen2.5-1.5b --shape llama3.1-8b} 2>&1 \
        | grep -v "pccpu.llama" | tee "$OUT/bench.log" | tail -40
    ;;
*)
    echo "usage: bash bench/gpu_device.sh build|bench" >&2
    exit 2
    ;;
esac
