"""What the benchmark ran on, and the two bandwidths the bound is computed from.

- Memory bandwidth: ``numpy.copyto`` of a 256 MiB buffer into another (a memcpy, like a state restore), best of a few
  repetitions, counted as bytes copied per second.
- Disk read bandwidth: reading the module store's files with the page cache as it is (files just written are usually
  cached, so this is what a restore from the disk tier really sees right after encoding; a cold disk is slower).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info).strip()


def machine_info(threads: int) -> dict[str, Any]:
    import llama_cpp

    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "cores_allowed": allowed,
        "threads_used": threads,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_system_info": llama_system_info(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def memory_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of a large ``numpy.copyto`` (best of ``repeats``)."""
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return n_bytes / best


def disk_read_bandwidth(files: list[Path], min_seconds: float = 0.05) -> float | None:
    """Bytes per second reading ``files`` whole, page cache as it is; None when there is nothing to read."""
    files = [f for f in files if f.is_file() and f.stat().st_size > 0]
    if not files:
        return None
    size = max(f.stat().st_size for f in files)
    buffer = bytearray(size)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    while True:
        for path in files:
            with path.open("rb", buffering=0) as f:
                total += f.readinto(view)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return total / elapsed


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)
