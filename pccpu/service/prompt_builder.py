"""Prompts built from data instead of XML text: a module selection, arguments and the user's question.

Every value is XML-escaped, so text typed by a user can never open a tag, reference a module or close a role.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union
from xml.sax.saxutils import escape, quoteattr

from pccpu.errors import InvalidNameError
from pccpu.pml.schema import NAME_RE as NAME_PATTERN

# A selection: module name -> None (include it), a dict of arguments, or a nested selection.
Selection = Mapping[str, Union["Selection", "ModuleArgs", None]]


@dataclass(frozen=True)
class ModuleArgs:
    """Arguments for a module's parameters, plus the modules selected inside it."""

    args: Mapping[str, str] = field(default_factory=dict)
    children: Selection = field(default_factory=dict)


def build_prompt_xml(schema: str, modules: Selection | None = None, question: str | None = None,
                     *, role: str = "user") -> str:
    """``<prompt schema=...>`` with the selected modules and the question wrapped in a role turn.

    >>> build_prompt_xml("docs", {"manual": None}, "What is <b>?")
    '<prompt schema="docs"><manual/><user>What is &lt;b&gt;?</user></prompt>'
    """
    if role not in ("user", "system", "assistant", ""):
        raise InvalidNameError(f"role must be user, system, assistant or '' (no role), got {role!r}")
    body = "".join(_ref(name, value) for name, value in (modules or {}).items())
    if question is not None:
        text = escape(question)
        body += f"<{role}>{text}</{role}>" if role else text
    return f"<prompt schema={quoteattr(schema)}>{body}</prompt>"


def _ref(name: str, value: Selection | ModuleArgs | None) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidNameError(f"{name!r} is not a module name (names match {NAME_PATTERN.pattern})")
    if value is None:
        return f"<{name}/>"
    if isinstance(value, ModuleArgs):
        for arg in value.args:
            if not NAME_PATTERN.match(arg):
                raise InvalidNameError(f"{arg!r} is not a parameter name")
        attrs = "".join(f" {k}={quoteattr(str(v))}" for k, v in value.args.items())
        inner = "".join(_ref(n, v) for n, v in value.children.items())
    else:
        attrs = ""
        inner = "".join(_ref(n, v) for n, v in value.items())
    return f"<{name}{attrs}>{inner}</{name}>" if inner else f"<{name}{attrs}/>"
