"""Chat roles as PML writes them, shared by the PML parser and the chat-template layer.

PML role tags (``<system>``, ``</user>``, ``<assistant/>`` ...) are model-neutral. The parser turns them into
:class:`RoleTag` values inside text; a :class:`RoleRenderer` (``pccpu.templates``) turns each tag into the exact
text the model's own chat template produces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Protocol


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class RoleTag:
    """One role tag: ``open`` is ``<user>``, ``close`` is ``</user>``, ``empty`` is ``<system/>``.

    ``<system/>`` stands for the system turn the model's template writes when a conversation has no system
    message of its own (a default system prompt for some models, nothing for others).
    """

    role: Role
    kind: Literal["open", "close", "empty"]


class RoleRenderer(Protocol):
    """Turns role tags into model-specific text."""

    def render(self, tag: RoleTag) -> str: ...

    def render_after(self, tag: RoleTag, previous: RoleTag | None) -> str:
        """The text of ``tag`` where ``previous`` is the role tag before it in the document (None: none). A template
        that folds the system message into the first user turn needs it: ``<user>`` right after ``</system>``
        continues that turn."""
        ...

    @property
    def generation_prompt(self) -> str:
        """Text that starts the assistant's turn, appended after a prompt that ends a user turn."""
        ...


class Tokenizer(Protocol):
    """The model's tokenizer as the PML layout needs it: text to token ids, no BOS added, special tokens parsed."""

    def tokenize(self, text: str) -> list[int]: ...
