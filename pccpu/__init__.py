"""pccpu: Prompt Cache (modular attention reuse) for GGUF models on llama.cpp, CPU first."""

from __future__ import annotations

__version__ = "0.1.0"
