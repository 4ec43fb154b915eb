"""``Session``: one conversation on a PromptCache.

    with pc.session() as chat:
        print(chat.ask(first_prompt).text())
        print(chat.ask(first_prompt_plus_answer_plus_next_turn).text())   # decodes only the new turn

Each session keeps the cells its last request left, and its next request reuses the longest common prefix; several
sessions can be open at once, and switching between them parks and brings back their cells (see ``sessions.py``).
``PromptCache.ask`` without a session uses the cache's default session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from pccpu.errors import SessionError
from pccpu.service.answer import Answer
from pccpu.service.chat import ChatReuse
from pccpu.service.options import GenerationKwargs, GenerationOptions
from pccpu.service.prompt_builder import Selection
from pccpu.service.request import Request
from pccpu.service.sessions import SessionState
from pccpu.service.typeahead import DEFAULT_BATCH_TOKENS, Draft

if TYPE_CHECKING:
    from pccpu.service.prompt_cache import PromptCache


class Session:
    def __init__(self, cache: PromptCache, state: SessionState) -> None:
        self._cache = cache
        self._state = state

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def held_tokens(self) -> int:
        """Cells this session holds for its next request (in the KV cache, or parked in RAM); 0 after a drop."""
        return len(self._state.kept) if self._state.kept is not None else 0

    @property
    def closed(self) -> bool:
        return self._state.closed

    def ask(self, prompt: str | Path | Request, *, cache: bool = True, options: GenerationOptions | None = None,
            **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """``PromptCache.ask`` in this session."""
        return self._cache.ask(prompt, cache=cache, session=self, options=options, **kwargs)

    def ask_parts(self, schema: str, modules: Selection | None = None, question: str | None = None, *,
                  role: str = "user", cache: bool = True, options: GenerationOptions | None = None,
                  **kwargs: Unpack[GenerationKwargs]) -> Answer:
        return self._cache.ask_parts(schema, modules, question, role=role, cache=cache, session=self,
                                     options=options, **kwargs)

    def draft(self, messages: Sequence[Mapping[str, Any]] = (), *, reuse: ChatReuse | None = None,
              speculate_after_ms: float = 0.0, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> Draft:
        """``PromptCache.draft`` in this session: type-ahead of the next user message after ``messages``."""
        return self._cache.draft(messages, session=self, reuse=reuse, speculate_after_ms=speculate_after_ms,
                                 batch_tokens=batch_tokens)

    def close(self) -> None:
        """Forget this session's cells; asking in it afterwards is a SessionError."""
        self._cache._close_session(self._state)

    def _state_for(self, cache: PromptCache) -> SessionState:
        if cache is not self._cache:
            raise SessionError(f"session {self.name!r} belongs to another PromptCache")
        return self._state

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.name!r}: {self.held_tokens} cells held{' (closed)' if self.closed else ''}>"
