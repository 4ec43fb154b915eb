"""Where pccpu keeps its files on disk.

Everything lives under one home folder, chosen in this order:

1. ``$PCCPU_HOME`` when set and not empty;
2. ``$XDG_CACHE_HOME/pccpu`` when ``XDG_CACHE_HOME`` is an absolute path (the XDG spec says to ignore relative ones);
3. ``~/.cache/pccpu``.

Below it: ``models/`` holds fetched GGUF files, ``store/`` the module store. These functions only compute paths;
callers create the folders they write to.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PCCPU_HOME"
"""Environment variable that overrides the pccpu home folder."""


def pccpu_home() -> Path:
    """The folder pccpu keeps everything in (see the module docstring for how it is chosen)."""
    override = os.environ.get(HOME_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pccpu"
    return Path.home() / ".cache" / "pccpu"


def models_dir() -> Path:
    """The folder fetched models are written to: ``<home>/models``."""
    return pccpu_home() / "models"


def store_dir() -> Path:
    """The folder of the module store: ``<home>/store``."""
    return pccpu_home() / "store"
