"""The HTTP layer: an OpenAI-compatible server on one PromptCache (``pccpu serve``)."""

from __future__ import annotations

from pccpu.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
