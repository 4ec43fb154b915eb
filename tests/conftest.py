"""Shared pytest fixtures.

``isolated_home`` is opt-in: tests that must not touch the real pccpu home ask for it, while real-model tests keep
using the real cache (see ``default_model_path``) so the model is downloaded once per machine, not once per test.

Every test that uses the real model (a fixture that loads or fetches it) is marked ``slow`` automatically:
``pytest -m "not slow"`` is the quick loop (pure logic, the fake engine, the CLI without a model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeContext, FakeModel

REAL_MODEL_FIXTURES = {"default_model_path", "default_model", "gemma_model_path", "gemma_model"}
GEMMA_FIXTURES = {"gemma_model_path", "gemma_model"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if REAL_MODEL_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        if GEMMA_FIXTURES & names:
            item.add_marker(pytest.mark.gemma)


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


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    """gemma-3-270m (sliding-window attention), fetched (253 MB, once per machine) when missing."""
    from pccpu.models import fetch_model

    return fetch_model("gemma3-270m")


@pytest.fixture(scope="session")
def gemma_model(gemma_model_path: Path):  # type: ignore[no-untyped-def]
    from pccpu.engine import LlamaModel

    model = LlamaModel(gemma_model_path)
    yield model
    model.close()


FakeCacheFactory = Callable[..., Any]


@pytest.fixture
def fake_cache(tmp_path: Path) -> Iterator[FakeCacheFactory]:
    """``fake_cache(**PromptCache kwargs)``: a PromptCache on the fake engine (``fake_engine.py``), with a private
    store under ``tmp_path``; closed after the test. ``n_ctx`` and ``n_seq_max`` size the fake context."""
    from pccpu.engine import ContextSettings
    from pccpu.service import PromptCache
    from pccpu.service.runtime import Runtime, chat_roles_for

    opened: list[PromptCache] = []

    def make(*, n_ctx: int = 2048, n_seq_max: int = 16, model: FakeModel | None = None, **kwargs: Any) -> PromptCache:
        fake = model or FakeModel()
        settings = ContextSettings(n_ctx=n_ctx, n_batch=256, n_ubatch=256, n_seq_max=n_seq_max, n_threads=1,
                                   n_threads_batch=1)
        context = FakeContext(fake, n_ctx=n_ctx, n_batch=256, n_seq_max=n_seq_max + 1)
        runtime = Runtime(model=fake, context=context, settings=settings, roles=chat_roles_for(fake, "auto"))
        kwargs.setdefault("store_dir", tmp_path / "store")
        cache = PromptCache(runtime=runtime, n_seq_max=n_seq_max, **kwargs)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        cache.close()
