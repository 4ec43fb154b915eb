"""The engine layer: the only code that calls llama.cpp (through llama-cpp-python's low-level API)."""

from __future__ import annotations

from pccpu.engine.context import ContextSettings, LlamaContext
from pccpu.engine.model import ALL_LAYERS, LlamaModel, ModelInfo, gpu_offload_supported, parse_gpu_layers
from pccpu.engine.threads import available_cores

__all__ = ["ALL_LAYERS", "ContextSettings", "LlamaContext", "LlamaModel", "ModelInfo", "available_cores",
           "gpu_offload_supported", "parse_gpu_layers"]
