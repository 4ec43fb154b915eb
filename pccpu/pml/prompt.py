"""PML prompts: the data model and the parser.

``<prompt schema="NAME">`` holds module references (the module's name as the tag; attributes are arguments of the
parameters that module declares; nested references pick union members and nested modules) and text with role tags.
Text at the top level is kept in order with the references (see :mod:`pccpu.pml.plan` for where it is decoded);
text inside a reference is refused, since it would have no defined place. Names are checked against the schema
later, by :func:`pccpu.pml.plan.resolve_prompt`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from pccpu.errors import InvalidNameError, PmlStructureError
from pccpu.pml.schema import NAME_RE
from pccpu.pml.text import Pieces, merge_pieces
from pccpu.pml.xmltree import Element, parse_xml, read_text_file
from pccpu.roles import RoleTag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleRef:
    """A reference to a module by name, with arguments and nested references."""

    name: str
    args: tuple[tuple[str, str], ...] = ()
    children: tuple[ModuleRef, ...] = ()
    line: int = 0

    @property
    def arguments(self) -> dict[str, str]:
        return dict(self.args)


@dataclass(frozen=True)
class PromptText:
    pieces: Pieces


PromptItem = Union[ModuleRef, PromptText]  # noqa: UP007


@dataclass(frozen=True)
class Prompt:
    schema: str
    items: tuple[PromptItem, ...]
    source: str | None = None

    @property
    def refs(self) -> tuple[ModuleRef, ...]:
        return tuple(i for i in self.items if isinstance(i, ModuleRef))


def parse_prompt(text: str | Path, *, source: str | Path | None = None) -> Prompt:
    """Parse a prompt from PML text (or from a file, given a :class:`~pathlib.Path`)."""
    if isinstance(text, Path):
        source = source if source is not None else str(text)
        text = read_text_file(text, source=str(source), what="prompt file")
    src = str(source) if source is not None else None
    root = parse_xml(text, source=src)
    if root.tag != "prompt":
        raise PmlStructureError(f"{root.where()}: the root element must be <prompt>, not <{root.tag}>", source=src)
    extra = set(root.attrs) - {"schema"}
    if extra:
        raise PmlStructureError(f"{root.where()}: <prompt> has no attribute {sorted(extra)[0]!r} (only schema=)",
                                source=src)
    if "schema" not in root.attrs:
        raise PmlStructureError(f"{root.where()}: <prompt> needs schema=\"NAME\"", source=src)
    items: list[PromptItem] = []
    run: list[str | RoleTag] = []

    def flush() -> None:
        pieces = merge_pieces(run)
        if pieces:
            items.append(PromptText(pieces))
        run.clear()

    for child in root.children:
        if isinstance(child, Element):
            flush()
            items.append(_ref(child, src))
        else:
            run.append(child)
    flush()
    prompt = Prompt(schema=root.attrs["schema"], items=tuple(items), source=src)
    log.debug("prompt for %r: %d refs", prompt.schema, len(prompt.refs))
    return prompt


def _ref(el: Element, source: str | None) -> ModuleRef:
    if not NAME_RE.match(el.tag):
        raise InvalidNameError(f"{el.where()}: <{el.tag}> is not a valid module name", source=source)
    children: list[ModuleRef] = []
    for child in el.children:
        if isinstance(child, Element):
            children.append(_ref(child, source))
        elif isinstance(child, RoleTag) or child.strip():
            what = f"role tag <{child.role.value}>" if isinstance(child, RoleTag) else f"text {child.strip()[:40]!r}"
            raise PmlStructureError(f"{el.where()}: {what} inside the reference <{el.tag}>; prompt text belongs "
                                    "between references at the top level of <prompt>", source=source)
    return ModuleRef(name=el.tag, args=tuple(el.attrs.items()), children=tuple(children), line=el.line)
