#!/usr/bin/env python3
"""Build and install llama-cpp-python with CPU flags that are right for *this* machine.

Why this exists: llama-cpp-python compiles llama.cpp at install time. A default build uses
``-march=native`` and, on CPUs that advertise AMX but fault on it (some virtual machines), dies with
SIGILL on the first decode. /proc/cpuinfo cannot tell those CPUs apart, and neither can a small program that
executes a tile instruction: on the CI machines such a probe exits cleanly while ggml's AMX matmul still dies
with SIGILL (seen 2026-12). So AMX is off unless asked for (``PCCPU_AMX=1``), and even then only when the probe
survives. AMX speeds up int8/bf16 matmuls on large Xeon servers; pccpu's latency is dominated by small decodes.

What it does:
1. Choose CMake arguments: the user's ``CMAKE_ARGS`` when set (used verbatim), else flags detected
   from this CPU (x86-64: explicit ISA flags with GGML_NATIVE=OFF; other architectures: llama.cpp's
   own native detection, which has no AMX problem). ``--backend cuda`` (or ``PCCPU_BACKEND=cuda``)
   adds llama.cpp's CUDA backend (``-DGGML_CUDA=ON``) for the GPU architectures in
   ``PCCPU_CUDA_ARCH`` (CMake's CUDA_ARCHITECTURES: ``native`` by default, e.g. ``90`` for H100/H200).
2. Build a wheel into a cache keyed by (version, CMake args, Python, platform), so a wheel built with
   other flags - for instance a stale one in pip's own cache, which is keyed by the sdist only - is
   never reused by mistake.
3. Install it into the running interpreter unless the same build is already installed, then check
   the installed library loads and reports the chosen instruction sets.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# (cpuinfo flags that must all be present, CMake option) for x86-64, in llama.cpp's terms.
X86_FEATURES: list[tuple[tuple[str, ...], str]] = [
    (("sse4_2",), "GGML_SSE42"),
    (("avx",), "GGML_AVX"),
    (("avx2",), "GGML_AVX2"),
    (("bmi2",), "GGML_BMI2"),
    (("fma",), "GGML_FMA"),
    (("f16c",), "GGML_F16C"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"),
    (("avx512_vnni",), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
]
AMX_FEATURES: list[tuple[str, str]] = [
    ("amx_tile", "GGML_AMX_TILE"),
    ("amx_int8", "GGML_AMX_INT8"),
    ("amx_bf16", "GGML_AMX_BF16"),
]

# Requests permission for AMX tile data, configures one 16x64 tile, zeroes it and releases it.
# If the CPU (or hypervisor) faults on tile instructions, this process dies with SIGILL.
AMX_PROBE_C = r"""
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 2;
    uint8_t cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;                      /* palette 1 */
    cfg[16] = 64;                    /* tile 0: 64 bytes per row */
    cfg[48] = 16;                    /* tile 0: 16 rows */
    __asm__ volatile("ldtilecfg %0" :: "m"(cfg));
    __asm__ volatile("tilezero %%tmm0" ::);
    __asm__ volatile("tilerelease" ::);
    return 0;
}
"""


def log(message: str) -> None:
    print(f"[build_llama] {message}", file=sys.stderr, flush=True)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def amx_really_works() -> bool:
    """Compile and run a tile-instruction probe in a subprocess; True only if it exits cleanly."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log("no C compiler found for the AMX probe: AMX stays off")
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "amx_probe.c"
        binary = Path(tmp) / "amx_probe"
        source.write_text(AMX_PROBE_C)
        compiled = subprocess.run(
            [compiler, "-O0", "-mamx-tile", str(source), "-o", str(binary)],
            capture_output=True,
            text=True,
        )
        if compiled.returncode != 0:
            log(f"AMX probe did not compile ({compiled.stderr.strip()[:200]}): AMX stays off")
            return False
        probe = subprocess.run([str(binary)], capture_output=True)
    if probe.returncode != 0:
        log(f"AMX is advertised but the tile probe failed (exit {probe.returncode}): AMX stays off")
        return False
    return True


BACKENDS = ("cpu", "cuda")


def backend_args(backend: str) -> list[str]:
    """CMake arguments for a GPU backend (none for ``cpu``)."""
    if backend == "cpu":
        return []
    if backend == "cuda":
        if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
            raise SystemExit("the CUDA backend needs CUDA's compiler: put nvcc on PATH or set CUDACXX")
        arch = os.environ.get("PCCPU_CUDA_ARCH", "native")
        return ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
    raise SystemExit(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def detect_cmake_args(backend: str = "cpu") -> list[str]:
    machine = platform.machine().lower()
    args = ["-DLLAVA_BUILD=OFF", *backend_args(backend)]
    if machine not in ("x86_64", "amd64"):
        log(f"{machine}: using llama.cpp's native CPU detection")
        return args
    flags = cpu_flags()
    args.append("-DGGML_NATIVE=OFF")
    for needed, option in X86_FEATURES:
        args.append(f"-D{option}={'ON' if all(f in flags for f in needed) else 'OFF'}")
    wanted = os.environ.get("PCCPU_AMX", "") == "1"
    if not wanted and all(f in flags for f, _ in AMX_FEATURES):
        log("AMX is advertised; it stays off (PCCPU_AMX=1 turns it on where it really works)")
    amx_on = wanted and all(f in flags for f, _ in AMX_FEATURES) and amx_really_works()
    for _, option in AMX_FEATURES:
        args.append(f"-D{option}={'ON' if amx_on else 'OFF'}")
    return args


def build_key(cmake_args: str) -> str:
    material = json.dumps(
        {
            "version": LLAMA_CPP_PYTHON_VERSION,
            "cmake_args": cmake_args,
            "python": sys.implementation.cache_tag,
            "platform": sysconfig.get_platform(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def wheel_cache_dir() -> Path:
    base = os.environ.get("PCCPU_WHEEL_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pccpu" / "wheels"


def marker_path() -> Path:
    return Path(sys.prefix) / "pccpu-llama-build.json"


def installed_key() -> str | None:
    try:
        return json.loads(marker_path().read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, env=env)


def build_wheel(cmake_args: str, target: Path, source: str | None = None, offline: bool = False) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = cmake_args
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    requirement = source or f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    # offline: build with the scikit-build-core, cmake and ninja already installed (no package index)
    extra = ["--no-build-isolation", "--no-index"] if offline else []
    with tempfile.TemporaryDirectory() as tmp:
        # --no-cache-dir: pip's wheel cache is keyed by the sdist alone and may hold a build
        # made with other flags.
        pip(
            "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", *extra,
            "-w", tmp, requirement, env=env,
        )
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise SystemExit(f"expected one llama_cpp_python wheel, found {built}")
        final = target / built[0].name
        shutil.move(str(built[0]), final.with_suffix(".partial"))
        os.replace(final.with_suffix(".partial"), final)
    return final


def verify_install(cmake_args: str) -> None:
    """Load the installed library in a subprocess and check its instruction sets match the build."""
    probe = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise SystemExit(f"llama_cpp does not load after install:\n{probe.stderr[-2000:]}")
    info = probe.stdout.strip()
    log(f"llama.cpp system info: {info}")
    if "-DGGML_AMX_TILE=OFF" in cmake_args and "AMX_INT8 = 1" in info:
        raise SystemExit(
            "the installed llama.cpp has AMX compiled in although AMX was turned off: a stale wheel is "
            "installed. Run: python scripts/build_llama.py --force"
        )
    if "-DGGML_CUDA=ON" in cmake_args:
        gpu = subprocess.run(
            [sys.executable, "-c", "import llama_cpp; print(int(llama_cpp.llama_supports_gpu_offload()))"],
            capture_output=True, text=True,
        )
        if gpu.stdout.strip() != "1":
            log("warning: the CUDA build is installed but llama.cpp sees no GPU here (driver missing?); "
                "pccpu will refuse GPU layers until one is visible")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild the wheel even if a cached one exists")
    parser.add_argument("--print-args", action="store_true", help="print the CMake arguments and exit")
    parser.add_argument("--backend", choices=BACKENDS, default=os.environ.get("PCCPU_BACKEND", "cpu"),
                        help="llama.cpp backend: cpu (default) or cuda (env: PCCPU_BACKEND)")
    parser.add_argument("--source", default=None,
                        help="build from this llama-cpp-python sdist or source folder instead of the package index")
    parser.add_argument("--offline", action="store_true",
                        help="use the build tools already installed (no build isolation, no package index)")
    options = parser.parse_args()

    user_args = os.environ.get("CMAKE_ARGS", "").strip()
    cmake_args = user_args if user_args else " ".join(detect_cmake_args(options.backend))
    log(f"CMAKE_ARGS ({'from the environment' if user_args else 'detected'}): {cmake_args}")
    if options.print_args:
        print(cmake_args)
        return 0

    key = build_key(cmake_args)
    cache = wheel_cache_dir() / key
    wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    if options.force or not wheels:
        log(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (several minutes on 2 cores) into {cache}")
        wheel = build_wheel(cmake_args, cache, options.source, options.offline)
    else:
        wheel = wheels[-1]
        log(f"reusing wheel built with these flags: {wheel}")

    if options.force or installed_key() != key:
        pip("install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel))
        marker_path().write_text(json.dumps({"key": key, "cmake_args": cmake_args, "wheel": str(wheel)}))
    else:
        log("this build is already installed")
    if not options.offline:
        pip("install", "--quiet", str(wheel))  # its dependencies (numpy, typing-extensions, ...), when missing
    verify_install(cmake_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
