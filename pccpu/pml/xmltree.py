"""Safe XML reading for PML: a pre-pass for role tags and stray ``<``/``&``, then expat into a small ordered tree.

The pre-pass runs outside comments, CDATA sections and processing instructions, and keeps every line and column
where it was (each replacement has the length of what it replaces):

* role tags (``<user>``, ``</user>``, ``<user/>``, likewise ``system`` and ``assistant``) become processing
  instructions, so they may be unbalanced and may wrap modules and unions; the tree holds them as
  :class:`~pccpu.roles.RoleTag` values among the text.
* a ``<`` that cannot start markup (followed by a space, digit, ``=`` ...) and an ``&`` that does not start an entity
  or character reference are taken as literal text, as in ``0 <= x < n`` or ``a & b`` inside source code. A ``<``
  followed by a letter still starts a tag: escape it (``&lt;``) or use CDATA.

Security: any DOCTYPE or entity declaration is refused with :class:`~pccpu.errors.PmlSecurityError`, so neither
entity expansion bombs nor external entities can happen. Other processing instructions are refused too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast
from xml.parsers import expat

from pccpu.errors import PmlSecurityError, PmlStructureError, PmlSyntaxError, SourceFileError
from pccpu.roles import Role, RoleTag

# Deeper PML is refused: the parsers recurse per level, and no real schema nests anywhere near this.
MAX_DEPTH = 200

log = logging.getLogger(__name__)

# Stand-ins for literal '<' and '&' (Unicode noncharacters, reserved for internal use; one character each).
LT_SENTINEL = "\ufdd0"
AMP_SENTINEL = "\ufdd1"
_KIND_LETTER = {"open": "o", "close": "c", "empty": "e"}
_ROLE_LETTER = {Role.SYSTEM: "S", Role.USER: "U", Role.ASSISTANT: "A"}
_PI_TO_TAG = {
    _ROLE_LETTER[role] + letter: RoleTag(role, cast(Literal["open", "close", "empty"], kind))
    for role in Role
    for kind, letter in _KIND_LETTER.items()
}

_SCAN = re.compile(
    r"(?P<skip><!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>)"
    r"|(?P<role><(?P<close>/?)(?P<name>system|user|assistant)\s*(?P<empty>/?)>)"
    r"|(?P<lt><(?![A-Za-z_:/!?\u00c0-\ufffd]))"
    r"|(?P<amp>&(?!(?:[A-Za-z_:][\w.\-:]*|#[0-9]+|#x[0-9A-Fa-f]+);))",
    re.S,
)


@dataclass
class Element:
    """One XML element: children are ``str`` (text, comments removed), :class:`RoleTag` or :class:`Element`."""

    tag: str
    attrs: dict[str, str]
    line: int
    column: int
    children: list[str | RoleTag | Element] = field(default_factory=list)

    def where(self) -> str:
        return f"line {self.line}"


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def prepass(text: str, *, source: str | None = None) -> str:
    """Replace role tags by same-length processing instructions and stray ``<``/``&`` by sentinels."""
    if LT_SENTINEL in text or AMP_SENTINEL in text:
        raise PmlStructureError("the text contains U+FDD0 or U+FDD1, which PML reserves for itself", source=source)

    def replace(m: re.Match[str]) -> str:
        if m.group("skip"):
            return m.group(0)
        if m.group("lt"):
            return LT_SENTINEL
        if m.group("amp"):
            return AMP_SENTINEL
        original = m.group(0)
        if m.group("close") and m.group("empty"):
            line, col = _line_col(text, m.start())
            raise PmlSyntaxError(f"role tag {original!r} cannot both close and be empty", source=source, line=line,
                                 column=col)
        kind = "close" if m.group("close") else "empty" if m.group("empty") else "open"
        pi = "<?" + _ROLE_LETTER[Role(m.group("name"))] + _KIND_LETTER[kind]
        return pi + " " * (len(original) - len(pi) - 2) + "?>"

    return _SCAN.sub(replace, text)


def restore(text: str) -> str:
    return text.replace(LT_SENTINEL, "<").replace(AMP_SENTINEL, "&")


class _Builder:
    def __init__(self, parser: expat.XMLParserType, source: str | None) -> None:
        self.parser = parser
        self.source = source
        self.stack: list[Element] = []
        self.root: Element | None = None

    def _where(self) -> str:
        return f"line {self.parser.CurrentLineNumber}, column {self.parser.CurrentColumnNumber + 1}"

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise PmlStructureError(f"{self._where()}: elements nest more than {MAX_DEPTH} deep", source=self.source)
        el = Element(restore(tag), {k: restore(v) for k, v in attrs.items()}, self.parser.CurrentLineNumber,
                     self.parser.CurrentColumnNumber + 1)
        if self.stack:
            self.stack[-1].children.append(el)
        else:
            self.root = el
        self.stack.append(el)

    def end(self, tag: str) -> None:
        self.stack.pop()

    def chars(self, data: str) -> None:
        if self.stack:
            self.stack[-1].children.append(restore(data))

    def pi(self, target: str, data: str) -> None:
        tag = _PI_TO_TAG.get(target)
        if tag is None or data.strip():
            raise PmlStructureError(f"{self._where()}: processing instruction <?{target} ...?> is not allowed in PML",
                                    source=self.source)
        if not self.stack:
            raise PmlStructureError(f"{self._where()}: role tag <{tag.role.value}> outside the root element",
                                    source=self.source)
        self.stack[-1].children.append(tag)

    def doctype(self, *args: object) -> None:
        raise PmlSecurityError(f"{self._where()}: DOCTYPE declarations are not allowed in PML (no DTDs, no entities)",
                               source=self.source)

    def entity(self, *args: object) -> None:
        raise PmlSecurityError(f"{self._where()}: entity declarations are not allowed in PML", source=self.source)

    def external_entity(self, *args: object) -> int:
        self.entity(*args)
        return 0  # not reached: expat's signature for this handler returns an int


def read_text_file(path: Path, *, source: str | None, what: str) -> str:
    """A PML or src= file as text, with a SourceFileError naming the problem (missing, not UTF-8, unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SourceFileError(f"{what} {str(path)!r} does not exist", source=source) from None
    except UnicodeDecodeError as exc:
        raise SourceFileError(f"{what} {str(path)!r} is not UTF-8 ({exc.reason})", source=source) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SourceFileError(f"{what} {str(path)!r} cannot be read: {reason}", source=source) from None


def parse_xml(text: str, *, source: str | None = None) -> Element:
    """Parse PML text into an :class:`Element` tree (raising PML errors, never expat's)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: expat would fail on it with a UnicodeEncodeError
        raise PmlSyntaxError(f"the text holds a character that is not valid Unicode ({exc.reason}) at index "
                             f"{exc.start}", source=source) from None
    prepared = prepass(text, source=source)
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    builder = _Builder(parser, source)
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.chars
    parser.ProcessingInstructionHandler = builder.pi
    parser.StartDoctypeDeclHandler = builder.doctype
    parser.EntityDeclHandler = builder.entity
    parser.UnparsedEntityDeclHandler = builder.entity
    parser.ExternalEntityRefHandler = builder.external_entity
    try:
        parser.Parse(prepared, True)
    except expat.ExpatError as exc:
        message = expat.ErrorString(exc.code) if exc.code is not None else str(exc)
        hint = ""
        if "not well-formed" in message or "mismatched tag" in message:
            hint = " (write a literal '<' as &lt; and '&' as &amp;, or wrap code in <![CDATA[ ... ]]>)"
        raise PmlSyntaxError(message + hint, source=source, line=exc.lineno, column=exc.offset + 1) from None
    except RecursionError:
        raise PmlStructureError("the document nests too deeply", source=source) from None
    if builder.root is None:  # pragma: no cover - expat reports "no element found" first
        raise PmlSyntaxError("no root element", source=source, line=1, column=1)
    log.debug("parsed %s: root <%s>", source or "<text>", builder.root.tag)
    return builder.root
