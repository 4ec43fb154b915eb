"""Shared pytest fixtures.

``isolated_home`` is opt-in: tests that must not touch the real pccpu home ask for it, while real-model tests keep
using the real cache (see ``default_model_path``) so the model is downloaded once per machine, not once per test.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``PCCPU_HOME`` at an empty temporary folder and clear ``PCCPU_MODEL``; the folder's path."""
    home = tmp_path / "pccpu-home"
    monkeypatch.setenv("PCCPU_HOME", str(home))
    monkeypatch.delenv("PCCPU_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The registry's default model in the real pccpu home, fetched (about 98 MB, once) when missing."""
    from pccpu.models import fetch_model

    return fetch_model()


@pytest.fixture(scope="session")
def default_model(default_model_path: Path):  # type: ignore[no-untyped-def]
    """The default model loaded once for the whole test session."""
    from pccpu.engine import LlamaModel

    model = LlamaModel(default_model_path)
    yield model
    # contexts created by tests are closed by their own fixtures; close the model last
    model.close()
