"""PML schemas: the data model and the parser.

A schema is ``<schema name="...">`` holding text, role tags, ``<module>`` (nested to any depth), ``<union>`` (its
children are modules; exactly one may be chosen per prompt) and, inside modules only, ``<parameter>``. Text follows
the whitespace rule of :mod:`pccpu.pml.text`. ``src="path"`` takes a module's text from a file below the schema's
folder (or an ``allowed_roots`` folder), read as plain UTF-8 text: no markup, no role tags, trimmed by the same rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union as TypingUnion

from pccpu.errors import (
    DuplicateNameError,
    InvalidNameError,
    ParameterError,
    PmlError,
    PmlSecurityError,
    PmlStructureError,
)
from pccpu.pml.text import Pieces, merge_pieces, trim_chunk
from pccpu.pml.xmltree import Element, parse_xml
from pccpu.pml.xmltree import read_text_file as _read_text
from pccpu.roles import Role, RoleTag

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_\-.]*$")
RESERVED_NAMES = frozenset(role.value for role in Role)


@dataclass(frozen=True)
class Text:
    """Text between markup: strings and role tags, already trimmed."""

    pieces: Pieces


@dataclass(frozen=True)
class Parameter:
    name: str
    length: int
    scaffold: str | None = None
    line: int = 0


@dataclass(frozen=True)
class Module:
    name: str
    body: tuple[Node, ...]
    cache: bool = True
    src: str | None = None
    line: int = 0

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """This module's own parameters (not those of nested modules)."""
        return tuple(n for n in self.body if isinstance(n, Parameter))

    def selectable(self) -> dict[str, Module]:
        return selectable(self.body)


@dataclass(frozen=True)
class Union:
    members: tuple[Module, ...]
    scaffold: str | None = None
    line: int = 0


Node = TypingUnion[Text, Module, Union, Parameter]  # noqa: UP007


@dataclass(frozen=True)
class Schema:
    name: str
    body: tuple[Node, ...]
    source: str | None = None

    def selectable(self) -> dict[str, Module]:
        return selectable(self.body)

    def walk(self) -> Iterator[tuple[str, Module]]:
        """Every module with its path (``parent/child``), in document order."""
        yield from _walk(self.body, "")


def selectable(body: Iterable[Node]) -> dict[str, Module]:
    """The modules a prompt may name at this level: direct modules and every union member, by name."""
    out: dict[str, Module] = {}
    for node in body:
        if isinstance(node, Module):
            out[node.name] = node
        elif isinstance(node, Union):
            for member in node.members:
                out[member.name] = member
    return out


def _walk(body: Iterable[Node], prefix: str) -> Iterator[tuple[str, Module]]:
    for node in body:
        mods = (node,) if isinstance(node, Module) else node.members if isinstance(node, Union) else ()
        for mod in mods:
            path = f"{prefix}/{mod.name}" if prefix else mod.name
            yield path, mod
            yield from _walk(mod.body, path)


def parse_schema(
    text_or_path: str | Path, *, source: str | Path | None = None, allowed_roots: Sequence[str | Path] = ()
) -> Schema:
    """Parse a schema from PML text or from a file.

    A :class:`~pathlib.Path`, or a ``str`` that does not start with ``<`` (after whitespace), is read as a file;
    ``src=`` paths are then relative to its folder.
    """
    base: Path | None = None
    if isinstance(text_or_path, Path) or not text_or_path.lstrip().startswith("<"):
        path = Path(text_or_path)
        source = source if source is not None else str(path)
        text = _read_text(path, source=str(source), what="schema file")
        base = path.resolve().parent
    else:
        text = text_or_path
    src_name = str(source) if source is not None else None
    root = parse_xml(text, source=src_name)
    roots = ([base] if base is not None else []) + [Path(r).resolve() for r in allowed_roots]
    return _SchemaBuilder(src_name, base, roots).schema(root)


class _SchemaBuilder:
    def __init__(self, source: str | None, base: Path | None, roots: list[Path]) -> None:
        self.source = source
        self.base = base
        self.roots = roots

    def fail(self, cls: type[PmlError], el: Element, message: str) -> PmlError:
        return cls(f"{el.where()}: {message}", source=self.source)

    def attrs(self, el: Element, allowed: set[str], required: set[str]) -> None:
        for key in el.attrs:
            if key not in allowed:
                raise self.fail(PmlStructureError, el, f"<{el.tag}> has no attribute {key!r} "
                                f"(allowed: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in el.attrs:
                raise self.fail(PmlStructureError, el, f"<{el.tag}> needs the attribute {key!r}")

    def name(self, el: Element, what: str) -> str:
        name = el.attrs["name"]
        if not NAME_RE.match(name):
            raise self.fail(InvalidNameError, el, f"{what} name {name!r} is invalid: names match "
                            r"^[a-zA-Z_][a-zA-Z0-9_\-.]*$")
        if name in RESERVED_NAMES:
            raise self.fail(InvalidNameError, el, f"{what} name {name!r} is reserved for the role tag <{name}>")
        return name

    def schema(self, el: Element) -> Schema:
        if el.tag != "schema":
            raise self.fail(PmlStructureError, el, f"the root element must be <schema>, not <{el.tag}>")
        self.attrs(el, {"name"}, {"name"})
        name = self.name(el, "schema")
        body = self.body(el, in_module=False)
        return Schema(name=name, body=body, source=self.source)

    def body(self, el: Element, *, in_module: bool) -> tuple[Node, ...]:
        nodes: list[Node] = []
        run: list[str | RoleTag] = []

        def flush() -> None:
            pieces = merge_pieces(run)
            if pieces:
                nodes.append(Text(pieces))
            run.clear()

        for child in el.children:
            if not isinstance(child, Element):
                run.append(child)
                continue
            flush()
            if child.tag == "module":
                nodes.append(self.module(child))
            elif child.tag == "union":
                nodes.append(self.union(child))
            elif child.tag == "parameter":
                if not in_module:
                    raise self.fail(ParameterError, child, f"parameter {child.attrs.get('name', '?')!r} is at the "
                                    "schema root; parameters belong inside a <module>")
                nodes.append(self.parameter(child))
            else:
                raise self.fail(PmlStructureError, child, f"unknown element <{child.tag}> (PML allows <module>, "
                                "<union>, <parameter> and role tags; escape a literal '<' as &lt; or use CDATA)")
        flush()
        self.check_unique(el, nodes)
        return tuple(nodes)

    def check_unique(self, el: Element, nodes: list[Node]) -> None:
        seen: dict[str, int] = {}
        for node in nodes:
            mods = (node,) if isinstance(node, Module) else node.members if isinstance(node, Union) else ()
            for mod in mods:
                if mod.name in seen:
                    where = el.attrs.get("name", el.tag)
                    raise DuplicateNameError(f"line {mod.line}: module name {mod.name!r} is used twice in {where!r} "
                                             f"(also on line {seen[mod.name]}); names must be unique among the "
                                             "modules and union members of one parent", source=self.source)
                seen[mod.name] = mod.line
        params = [n for n in nodes if isinstance(n, Parameter)]
        names = [p.name for p in params]
        for p in params:
            if names.count(p.name) > 1:
                raise ParameterError(f"line {p.line}: parameter {p.name!r} is declared twice in module "
                                     f"{el.attrs.get('name')!r}", source=self.source)

    def module(self, el: Element) -> Module:
        self.attrs(el, {"name", "src", "cache"}, {"name"})
        name = self.name(el, "module")
        cache_attr = el.attrs.get("cache", "true")
        if cache_attr not in ("true", "false"):
            raise self.fail(PmlStructureError, el, f"module {name!r}: cache={cache_attr!r} must be \"true\" or "
                            "\"false\"")
        src = el.attrs.get("src")
        if src is not None:
            if any(isinstance(c, Element) or (isinstance(c, str) and c.strip()) or isinstance(c, RoleTag)
                   for c in el.children):
                raise self.fail(PmlStructureError, el, f"module {name!r} has src={src!r} and a body; use one")
            text = trim_chunk(_read_text(self.resolve_src(el, src), source=self.source, what="src file"),
                              starts_line=True)
            body: tuple[Node, ...] = (Text((text,)),) if text else ()
        else:
            body = self.body(el, in_module=True)
        return Module(name=name, body=body, cache=cache_attr == "true", src=src, line=el.line)

    def resolve_src(self, el: Element, src: str) -> Path:
        if not self.roots:
            raise self.fail(PmlSecurityError, el, f"src={src!r} needs a schema file or allowed_roots to resolve "
                            "against")
        raw = Path(src)
        candidates = [raw.resolve()] if raw.is_absolute() else [(r / raw).resolve() for r in self.roots]
        inside = [c for c in candidates if any(c == r or c.is_relative_to(r) for r in self.roots)]
        if not inside:
            raise self.fail(PmlSecurityError, el, f"src={src!r} points outside the allowed folders "
                            f"({', '.join(str(r) for r in self.roots)})")
        found = next((c for c in inside if c.exists()), inside[0])
        log.debug("src %r -> %s", src, found)
        return found

    def union(self, el: Element) -> Union:
        self.attrs(el, {"scaffold"}, set())
        members: list[Module] = []
        for child in el.children:
            if isinstance(child, Element):
                if child.tag != "module":
                    raise self.fail(PmlStructureError, child, f"<union> may only hold <module> elements, "
                                    f"not <{child.tag}>")
                members.append(self.module(child))
            elif isinstance(child, RoleTag) or child.strip():
                text = child if isinstance(child, str) else f"<{child.role.value}>"
                raise self.fail(PmlStructureError, el, f"text {text.strip()[:40]!r} directly inside <union>; "
                                "put it inside a member <module>")
        if not members:
            raise self.fail(PmlStructureError, el, "<union> needs at least one <module>")
        scaffold = el.attrs.get("scaffold")
        names = [m.name for m in members]
        if scaffold is not None and scaffold not in names:
            raise self.fail(PmlStructureError, el, f"union scaffold {scaffold!r} is not one of its members "
                            f"({', '.join(names)})")
        return Union(members=tuple(members), scaffold=scaffold, line=el.line)

    def parameter(self, el: Element) -> Parameter:
        self.attrs(el, {"name", "length", "len", "scaffold"}, {"name"})
        name = self.name(el, "parameter")
        if el.children:
            raise self.fail(ParameterError, el, f"parameter {name!r} must be empty (<parameter ... />)")
        if "length" in el.attrs and "len" in el.attrs:
            raise self.fail(ParameterError, el, f"parameter {name!r} has both length= and len=; use one")
        raw = el.attrs.get("length", el.attrs.get("len"))
        if raw is None:
            raise self.fail(ParameterError, el, f"parameter {name!r} needs length=\"N\" (tokens)")
        if not re.fullmatch(r"\s*[0-9]+\s*", raw) or int(raw) <= 0:
            raise self.fail(ParameterError, el, f"parameter {name!r} has length={raw!r}; it must be a positive "
                            "whole number of tokens")
        return Parameter(name=name, length=int(raw), scaffold=el.attrs.get("scaffold"), line=el.line)
