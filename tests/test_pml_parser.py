"""Table-driven tests of the PML schema and prompt parsers (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pccpu.pml import Module, Parameter, Text, Union, parse_prompt, parse_schema
from pccpu.pml.prompt import ModuleRef, PromptText
from pccpu.pml.text import trim_chunk
from pccpu.roles import Role, RoleTag

FIXTURES = Path(__file__).parent / "fixtures" / "pml"
U_OPEN, U_CLOSE = RoleTag(Role.USER, "open"), RoleTag(Role.USER, "close")
S_OPEN, S_CLOSE, S_EMPTY = RoleTag(Role.SYSTEM, "open"), RoleTag(Role.SYSTEM, "close"), RoleTag(Role.SYSTEM, "empty")
A_OPEN, A_CLOSE = RoleTag(Role.ASSISTANT, "open"), RoleTag(Role.ASSISTANT, "close")


@pytest.mark.parametrize(
    ("chunk", "starts_line", "expected"),
    [
        ("\n    hello\n    ", False, "hello"),
        ("  \n    a\n      b\n    ", False, "a\n  b"),
        (" inline ", False, " inline "),
        ("of ", False, "of "),
        ("first\n    second\n", False, "first\nsecond"),
        ("   \n\t\n", False, ""),
        ("    x = 1\n    if x:\n        y\n", True, "x = 1\nif x:\n    y"),
        ("\n  a\n\n  b\n", False, "a\n\nb"),
    ],
)
def test_whitespace_rule(chunk: str, starts_line: bool, expected: str) -> None:
    assert trim_chunk(chunk, starts_line=starts_line) == expected


SCHEMA_CASES: list[tuple[str, str, tuple]] = [
    ("text only", '<schema name="s">  hello world  </schema>', (Text(("  hello world  ",)),)),
    ("comment is transparent", '<schema name="s">a<!-- <user> <parameter/> -->b</schema>', (Text(("ab",)),)),
    ("entities and cdata", '<schema name="s">x &lt; y &amp;&amp; <![CDATA[a < b & c]]></schema>',
     (Text(("x < y && a < b & c",)),)),
    ("stray lt and amp", '<schema name="s">0 <= i < n & ok</schema>', (Text(("0 <= i < n & ok",)),)),
    ("role tags", '<schema name="s"><system>sys</system><user>q<assistant/></schema>',
     (Text((S_OPEN, "sys", S_CLOSE, U_OPEN, "q", RoleTag(Role.ASSISTANT, "empty"))),)),
    ("role tag in cdata stays text", '<schema name="s"><![CDATA[<user>]]></schema>', (Text(("<user>",)),)),
    ("empty system", '<schema name="s"><system/>hi</schema>', (Text((S_EMPTY, "hi")),)),
    ("module", '<schema name="s"><module name="m">body</module></schema>', (Module("m", (Text(("body",)),), line=1),)),
    ("cache false", '<schema name="s"><module name="m" cache="false">b</module></schema>',
     (Module("m", (Text(("b",)),), cache=False, line=1),)),
    ("parameter with len", '<schema name="s"><module name="m">a<parameter name="p" len="3"/></module></schema>',
     (Module("m", (Text(("a",)), Parameter("p", 3, None, 1)), line=1),)),
    ("parameter scaffold", '<schema name="s"><module name="m"><parameter name="p" length="4" scaffold="x y"/>'
     "</module></schema>", (Module("m", (Parameter("p", 4, "x y", 1),), line=1),)),
    ("union with scaffold", '<schema name="s"><union scaffold="b"><module name="a">A</module>'
     '<module name="b"/></union></schema>',
     (Union((Module("a", (Text(("A",)),), line=1), Module("b", (), line=1)), "b", 1),)),
    ("role tags wrap modules", '<schema name="s"><user><module name="m">x</module></user></schema>',
     (Text((U_OPEN,)), Module("m", (Text(("x",)),), line=1), Text((U_CLOSE,)))),
]


@pytest.mark.parametrize(("label", "text", "body"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_constructs(label: str, text: str, body: tuple) -> None:
    schema = parse_schema(text)
    assert schema.name == "s"
    assert schema.body == body


def test_nested_unions_and_walk() -> None:
    schema = parse_schema(
        """<schema name="s">
             <module name="outer">
               <union><module name="a"><union><module name="x"/><module name="y"/></union></module>
                      <module name="b"/></union>
               <module name="inner"/>
             </module>
           </schema>"""
    )
    assert [p for p, _ in schema.walk()] == ["outer", "outer/a", "outer/a/x", "outer/a/y", "outer/b", "outer/inner"]
    assert set(schema.selectable()) == {"outer"}
    assert set(schema.body[0].selectable()) == {"a", "b", "inner"}


def test_same_name_in_two_scopes_is_fine() -> None:
    schema = parse_schema(
        '<schema name="s"><module name="education"/><module name="job"><union>'
        '<module name="education"/></union></module></schema>'
    )
    assert [p for p, _ in schema.walk()] == ["education", "job", "job/education"]


def test_src_reads_file_below_schema_folder() -> None:
    schema = parse_schema(FIXTURES / "with_src.xml")
    module = schema.body[0]
    assert isinstance(module, Module)
    assert module.body == (Text(("def f(a, b):\n    return a < b & True",)),)
    assert schema.source == str(FIXTURES / "with_src.xml")


def test_src_with_allowed_roots_from_text() -> None:
    schema = parse_schema('<schema name="s"><module name="m" src="inner.txt"/></schema>', allowed_roots=[FIXTURES])
    assert schema.body[0].body[0].pieces[0].startswith("def f")


def test_unbalanced_role_tags_across_schema_and_prompt() -> None:
    schema = parse_schema('<schema name="s"><user>Read this: <module name="doc">D</module></schema>')
    prompt = parse_prompt('<prompt schema="s"><doc/>Question?</user></prompt>')
    assert schema.body[0] == Text((U_OPEN, "Read this: "))
    assert prompt.items == (ModuleRef("doc", line=1), PromptText(("Question?", U_CLOSE)))


PROMPT_CASES: list[tuple[str, str, tuple]] = [
    ("no refs", '<prompt schema="s"><user>hi</user></prompt>', (PromptText((U_OPEN, "hi", U_CLOSE)),)),
    ("refs only", '<prompt schema="s"><a/><b/></prompt>', (ModuleRef("a", line=1), ModuleRef("b", line=1))),
    ("nested and args", '<prompt schema="s"><a p="x y"><b/></a></prompt>',
     (ModuleRef("a", (("p", "x y"),), (ModuleRef("b", line=1),), line=1),)),
    ("text between refs", '<prompt schema="s"><a/> between <b/><user>q</user></prompt>',
     (ModuleRef("a", line=1), PromptText((" between ",)), ModuleRef("b", line=1),
      PromptText((U_OPEN, "q", U_CLOSE)))),
    ("dotted names", '<prompt schema="s"><book.py/></prompt>', (ModuleRef("book.py", line=1),)),
]


@pytest.mark.parametrize(("label", "text", "items"), PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_constructs(label: str, text: str, items: tuple) -> None:
    prompt = parse_prompt(text)
    assert prompt.schema == "s"
    assert prompt.items == items


def test_prompt_from_path(tmp_path: Path) -> None:
    path = tmp_path / "p.xml"
    path.write_text('<prompt schema="s"><a/></prompt>', encoding="utf-8")
    prompt = parse_prompt(path)
    assert prompt.source == str(path)
    assert prompt.refs == (ModuleRef("a", line=1),)


def test_assistant_tags_parse() -> None:
    schema = parse_schema('<schema name="s"><assistant>ok</assistant></schema>')
    assert schema.body == (Text((A_OPEN, "ok", A_CLOSE)),)
