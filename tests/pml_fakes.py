"""Fake tokenizer and role renderer for the PML tests: no model needed."""

from __future__ import annotations

import re

from pccpu.roles import RoleTag

_WORD = re.compile(r"\S+")


class WordTokenizer:
    """One token per whitespace-separated word; ids are stable per word (assigned on first sight)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 10) for w in _WORD.findall(text)]

    def words(self, ids: list[int] | tuple[int, ...]) -> list[str]:
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]


class CharTokenizer:
    """One token per character (its code point)."""

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class BracketRoles:
    """Renders <user> as '[user]', </user> as '[/user]', <system/> as '[system/]' (one word each, spaced)."""

    generation_prompt = " [assistant] "

    def render(self, tag: RoleTag) -> str:
        mark = {"open": "", "close": "/", "empty": ""}[tag.kind]
        end = "/" if tag.kind == "empty" else ""
        return f" [{mark}{tag.role.value}{end}] "

    def render_after(self, tag: RoleTag, previous: RoleTag | None) -> str:
        return self.render(tag)
