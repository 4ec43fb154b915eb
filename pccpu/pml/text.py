"""Text pieces and the PML whitespace rule.

PML text is a sequence of pieces: plain ``str`` and :class:`~pccpu.roles.RoleTag` values. A *chunk* is the
characters between two pieces of markup (elements and role tags; comments are transparent, CDATA is ordinary
text). Each chunk is trimmed by :func:`trim_chunk`:

1. Leading whitespace up to and including the last newline before the first visible character is removed, and so
   is trailing whitespace from the first newline after the last visible character (the XML indentation lines).
2. The remaining lines are dedented by their common leading whitespace. The first line only counts when it starts a
   line (it does not when the chunk begins right after a tag on the same line).
3. Whitespace inside a line, including spaces next to a tag on the same line (``of <parameter .../>``), is kept.
4. A chunk that is only whitespace disappears.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

from pccpu.roles import RoleRenderer, RoleTag

Piece = Union[str, RoleTag]  # noqa: UP007  (a runtime alias; kept py3.10-friendly)
Pieces = tuple[Piece, ...]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def trim_chunk(chunk: str, *, starts_line: bool = False) -> str:
    """Apply the whitespace rule to one chunk; ``starts_line`` says the chunk begins at the start of a line."""
    if not chunk.strip():
        return ""
    lines = chunk.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
        starts_line = True
    while lines and not lines[-1].strip():
        lines.pop()
    counted = lines if starts_line else lines[1:]
    indents = [_indent(line) for line in counted if line.strip()]
    margin = _common_prefix(indents) if indents else ""
    out: list[str] = []
    for i, line in enumerate(lines):
        if i == 0 and not starts_line:
            out.append(line)
        elif not line.strip():
            out.append("")
        else:
            out.append(line[len(margin) :])
    return "\n".join(out)


def _common_prefix(items: Sequence[str]) -> str:
    first, last = min(items), max(items)
    n = 0
    while n < len(first) and n < len(last) and first[n] == last[n]:
        n += 1
    return first[:n]


def merge_pieces(raw: Iterable[Piece]) -> Pieces:
    """Join adjacent strings, trim every chunk by the whitespace rule, drop empty chunks."""
    out: list[Piece] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            text = trim_chunk("".join(buf))
            if text:
                out.append(text)
            buf.clear()

    for piece in raw:
        if isinstance(piece, str):
            buf.append(piece)
        else:
            flush()
            out.append(piece)
    flush()
    return tuple(out)


class InOrder:
    """Renders the pieces of a document in document order: strings as they are, role tags through the renderer,
    each knowing the tag before it (a template that folds the system message into the first user turn renders
    ``<user>`` right after ``</system>`` as nothing). ``previous``: the last tag rendered."""

    def __init__(self, roles: RoleRenderer, previous: RoleTag | None = None) -> None:
        self.roles = roles
        self.previous = previous

    def render(self, pieces: Iterable[Piece]) -> str:
        out: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(self.roles.render_after(piece, self.previous))
                self.previous = piece
        return "".join(out)


def pieces_to_pml(pieces: Iterable[Piece]) -> str:
    """Write pieces back as PML-looking text (for display): role tags as tags."""
    out = []
    for p in pieces:
        if isinstance(p, str):
            out.append(p)
        else:
            role = p.role.value
            out.append({"open": f"<{role}>", "close": f"</{role}>", "empty": f"<{role}/>"}[p.kind])
    return "".join(out)
