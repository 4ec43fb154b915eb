"""Loading llama_cpp once: backend init and llama.cpp's log output routed into Python ``logging``.

llama.cpp logs through a C callback. We install ours (the logger ``pccpu.llama``) in place of
llama-cpp-python's, which prints to stderr. llama.cpp's INFO lines go to DEBUG and its WARN lines to
INFO, so they are quiet unless ``--verbose`` (logging DEBUG) is asked for; its errors stay errors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from types import ModuleType

logger = logging.getLogger("pccpu.llama")

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_GGML_TO_LOGGING = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}

_lock = threading.Lock()
_lib: ModuleType | None = None
_callback: object = None  # keeps the ctypes callback alive for the life of the process
_pending_level = logging.DEBUG
_pending_text: list[str] = []
# llama.cpp reports an interrupted decode (LlamaContext.interrupt, an expected event) as
# three errors and a warning: debug messages
_INTERRUPT_MESSAGES = (b"compute status: 1", b"failed to decode, ret = 2", b"failed with error 1",
                       b"removing memory module entries")


def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    global _pending_level
    if level != 5:
        _pending_level = _GGML_TO_LOGGING.get(level, logging.DEBUG)
        if level in (3, 4) and any(message in text for message in _INTERRUPT_MESSAGES):
            _pending_level = logging.DEBUG
    if not logger.isEnabledFor(_pending_level):
        return
    _pending_text.append(text.decode("utf-8", errors="replace"))
    joined = "".join(_pending_text)
    if joined.endswith("\n"):
        _pending_text.clear()
        if logger.isEnabledFor(_pending_level):
            logger.log(_pending_level, joined.rstrip("\n"))


def _load_libstdcxx_first() -> None:
    """Load the C++ runtime into the global symbol scope before llama.cpp's libraries.

    A CUDA build of llama.cpp made with CUDA 13 ships a ``libggml-cuda.so`` that itself exports C++ runtime symbols
    (``std::ostream`` inserters); when those are bound first, ``libllama`` formats its model summary with them and
    crashes (SIGSEGV in ``print_info`` during ``llama_model_load_from_file``, seen on an H200 machine). With the
    system's ``libstdc++`` loaded globally first, every library binds to it. Harmless where nothing interposes.
    """
    if sys.platform != "linux":
        return
    name = ctypes.util.find_library("stdc++")
    if name is None:
        return
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        logger.debug("could not preload %s: %s", name, exc)


def lib() -> ModuleType:
    """Return the ``llama_cpp`` module, initialising the backend and the log bridge on first use."""
    global _lib, _callback
    with _lock:
        if _lib is None:
            _load_libstdcxx_first()
            import llama_cpp

            _callback = llama_cpp.llama_log_callback(_on_log)
            llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _lib = llama_cpp
        return _lib


def llama_build_info() -> str:
    """llama-cpp-python's version and llama.cpp's system info: part of every cache key."""
    llama_cpp = lib()
    return f"llama-cpp-python {llama_cpp.__version__}; {llama_cpp.llama_print_system_info().decode().strip()}"
