"""How many threads llama.cpp should use: the physical cores this process may really run on."""

from __future__ import annotations

import os

import psutil


def available_cores() -> int:
    """Physical cores available to this process (CPU affinity and cgroup-free count), at least 1.

    Hyper-threads share a core's vector units; llama.cpp is fastest with one thread per physical core.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        allowed = os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or allowed
    physical = psutil.cpu_count(logical=False) or logical
    threads_per_core = max(1, logical // physical)
    return max(1, allowed // threads_per_core)
