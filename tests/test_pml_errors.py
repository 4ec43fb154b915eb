"""Every PML error: its class, and a message that names the offending thing (and the file, when there is one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pml_fakes import BracketRoles, WordTokenizer

from pccpu.errors import (
    DuplicateNameError,
    InvalidNameError,
    LayoutOverflowError,
    ParameterError,
    PccpuError,
    PmlError,
    PmlSecurityError,
    PmlStructureError,
    PmlSyntaxError,
    SourceFileError,
    UnionConflictError,
    UnknownModuleError,
    UnknownSchemaError,
)
from pccpu.pml import build_layout, parse_prompt, parse_schema, resolve_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "pml"
ROLES = BracketRoles()


def wrap(body: str) -> str:
    return f'<schema name="s">{body}</schema>'


SCHEMA_ERRORS: list[tuple[str, str, type[PmlError], list[str]]] = [
    ("unclosed tag", '<schema name="s"><module name="m">x</schema>', PmlSyntaxError, ["line 1", "mismatched"]),
    ("bad attribute quoting", "<schema name=s></schema>", PmlSyntaxError, ["line 1, column"]),
    ("tag-like code", wrap("if a<b: pass"), PmlSyntaxError, ["&lt;"]),
    ("undefined entity", wrap("&nbsp;"), PmlSyntaxError, ["undefined entity"]),
    ("doctype", '<!DOCTYPE schema [<!ENTITY a "aaaa">]><schema name="s">&a;</schema>', PmlSecurityError,
     ["DOCTYPE"]),
    ("xxe", '<!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]><schema name="s">&x;</schema>', PmlSecurityError,
     ["DOCTYPE"]),
    ("processing instruction", wrap("<?php echo 1 ?>"), PmlStructureError, ["processing instruction", "php"]),
    ("role tag close and empty", wrap("</user/>"), PmlSyntaxError, ["</user/>"]),
    ("wrong root", '<prompt schema="s"/>', PmlStructureError, ["<schema>", "<prompt>"]),
    ("no schema name", "<schema></schema>", PmlStructureError, ["'name'"]),
    ("unknown element", wrap("<b>bold</b>"), PmlStructureError, ["<b>"]),
    ("unknown attribute", wrap('<module name="m" color="red"/>'), PmlStructureError, ["'color'"]),
    ("bad cache value", wrap('<module name="m" cache="yes"/>'), PmlStructureError, ["'yes'", "'m'"]),
    ("bad module name", wrap('<module name="9lives"/>'), InvalidNameError, ["'9lives'"]),
    ("name with space", wrap('<module name="a b"/>'), InvalidNameError, ["'a b'"]),
    ("reserved name", wrap('<module name="user"/>'), InvalidNameError, ["'user'", "role tag"]),
    ("duplicate module", wrap('<module name="m"/><module name="m"/>'), DuplicateNameError, ["'m'", "twice"]),
    ("duplicate across union", wrap('<module name="m"/><union><module name="m"/></union>'), DuplicateNameError,
     ["'m'"]),
    ("duplicate parameter", wrap('<module name="m"><parameter name="p" length="1"/><parameter name="p" '
                                 'length="1"/></module>'), ParameterError, ["'p'", "twice"]),
    ("parameter at root", wrap('<parameter name="p" length="3"/>'), ParameterError, ["'p'", "schema root"]),
    ("missing length", wrap('<module name="m"><parameter name="p"/></module>'), ParameterError, ["'p'", "length"]),
    ("non-numeric length", wrap('<module name="m"><parameter name="p" length="ten"/></module>'), ParameterError,
     ["'p'", "'ten'"]),
    ("zero length", wrap('<module name="m"><parameter name="p" len="0"/></module>'), ParameterError, ["'0'"]),
    ("length and len", wrap('<module name="m"><parameter name="p" len="1" length="1"/></module>'), ParameterError,
     ["'p'"]),
    ("union scaffold not a member", wrap('<union scaffold="z"><module name="a"/></union>'), PmlStructureError,
     ["'z'", "a"]),
    ("empty union", wrap("<union></union>"), PmlStructureError, ["<union>"]),
    ("text in union", wrap('<union>stray<module name="a"/></union>'), PmlStructureError, ["'stray'"]),
    ("non-module in union", wrap('<union><parameter name="p" length="1"/></union>'), PmlStructureError,
     ["<parameter>"]),
    ("src and body", wrap('<module name="m" src="x.txt">body</module>'), PmlStructureError, ["'m'", "src"]),
    ("src without folder", wrap('<module name="m" src="x.txt"/>'), PmlSecurityError, ["'x.txt'"]),
]


@pytest.mark.parametrize(("label", "text", "cls", "needles"), SCHEMA_ERRORS, ids=[c[0] for c in SCHEMA_ERRORS])
def test_schema_errors(label: str, text: str, cls: type[PmlError], needles: list[str]) -> None:
    with pytest.raises(cls) as info:
        parse_schema(text, source="bad.xml")
    assert type(info.value) is cls
    message = str(info.value)
    assert message.startswith("bad.xml: ")
    assert info.value.source == "bad.xml"
    for needle in needles:
        assert needle in message


def test_syntax_error_has_line_and_column() -> None:
    with pytest.raises(PmlSyntaxError) as info:
        parse_schema('<schema name="s">\n  <module name="m">\n  ok &bogus; </module></schema>', source="f.xml")
    assert info.value.line == 3
    assert info.value.column is not None and info.value.column > 1


def test_src_outside_folder(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("s", encoding="utf-8")
    sub = tmp_path / "schemas"
    sub.mkdir()
    schema = sub / "s.xml"
    schema.write_text(wrap('<module name="m" src="../secret.txt"/>'), encoding="utf-8")
    with pytest.raises(PmlSecurityError, match=r"\.\./secret\.txt"):
        parse_schema(schema)
    schema.write_text(wrap('<module name="m" src="/etc/hostname"/>'), encoding="utf-8")
    with pytest.raises(PmlSecurityError, match="/etc/hostname"):
        parse_schema(schema)
    # an explicit allowed root opens it
    schema.write_text(wrap('<module name="m" src="../secret.txt"/>'), encoding="utf-8")
    assert parse_schema(schema, allowed_roots=[tmp_path]).body[0].body[0].pieces == ("s",)


def test_src_missing_and_not_utf8(tmp_path: Path) -> None:
    schema = tmp_path / "s.xml"
    schema.write_text(wrap('<module name="m" src="nope.txt"/>'), encoding="utf-8")
    with pytest.raises(SourceFileError, match=r"nope\.txt") as info:
        parse_schema(schema)
    assert info.value.source == str(schema)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    schema.write_text(wrap('<module name="m" src="bin.txt"/>'), encoding="utf-8")
    with pytest.raises(SourceFileError, match=r"bin\.txt.*UTF-8"):
        parse_schema(schema)


def test_missing_schema_file() -> None:
    with pytest.raises(SourceFileError, match=r"no-such\.xml"):
        parse_schema("no-such.xml")


SCHEMA = wrap(
    '<module name="m">a <parameter name="p" length="2"/> b <union><module name="x"/><module name="y"/></union>'
    '<module name="n"/></module><module name="other"/>'
)

PROMPT_ERRORS: list[tuple[str, str, type[PmlError], list[str]]] = [
    ("unknown schema", '<prompt schema="t"><m p="q"/></prompt>', UnknownSchemaError, ["'t'"]),
    ("unknown module", '<prompt schema="s"><nope/></prompt>', UnknownModuleError, ["'nope'", "m, other"]),
    ("unknown member", '<prompt schema="s"><m p="q"><z/></m></prompt>', UnknownModuleError, ["'z'", "x, y, n"]),
    ("member at wrong level", '<prompt schema="s"><x/></prompt>', UnknownModuleError, ["'x'"]),
    ("union conflict", '<prompt schema="s"><m p="q"><x/><y/></m></prompt>', UnionConflictError, ["'x'", "'y'"]),
    ("referenced twice", '<prompt schema="s"><other/><other/></prompt>', DuplicateNameError, ["'other'"]),
    ("argument too long", '<prompt schema="s"><m p="one two three"/></prompt>', ParameterError,
     ["'p'", "3 tokens", "2 tokens"]),
    ("unknown parameter", '<prompt schema="s"><m p="q" r="1"/></prompt>', ParameterError, ["'r'", "p"]),
    ("missing argument", '<prompt schema="s"><m/></prompt>', ParameterError, ["'p'", "'m'"]),
    ("text inside ref", '<prompt schema="s"><m p="q">hello</m></prompt>', PmlStructureError, ["'hello'", "<m>"]),
    ("wrong prompt root", '<schema name="s"/>', PmlStructureError, ["<prompt>"]),
    ("prompt without schema", "<prompt><m/></prompt>", PmlStructureError, ["schema="]),
    ("prompt extra attribute", '<prompt schema="s" model="x"/>', PmlStructureError, ["'model'"]),
    ("bad ref name", '<prompt schema="s"><a:b/></prompt>', InvalidNameError, ["a:b"]),
]


@pytest.mark.parametrize(("label", "text", "cls", "needles"), PROMPT_ERRORS, ids=[c[0] for c in PROMPT_ERRORS])
def test_prompt_errors(label: str, text: str, cls: type[PmlError], needles: list[str]) -> None:
    tok = WordTokenizer()
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES)
    with pytest.raises(cls) as info:
        resolve_prompt(layout, parse_prompt(text, source="p.xml"), tok, ROLES)
    assert type(info.value) is cls
    assert str(info.value).startswith("p.xml: ")
    for needle in needles:
        assert needle in str(info.value)


def test_scaffold_longer_than_parameter() -> None:
    schema = parse_schema(wrap('<module name="m"><parameter name="p" length="1" scaffold="two words"/></module>'),
                          source="s.xml")
    with pytest.raises(ParameterError, match=r"'p'.*2 tokens.*1 tokens") as info:
        build_layout(schema, WordTokenizer(), ROLES)
    assert info.value.source == "s.xml"


def test_layout_overflow() -> None:
    schema = parse_schema(wrap('<module name="m">a b c d e f</module>'), source="big.xml")
    tok = WordTokenizer()
    with pytest.raises(LayoutOverflowError, match=r"'s' spans 6 positions.*n_ctx=4") as info:
        build_layout(schema, tok, ROLES, n_ctx=4)
    assert info.value.source == "big.xml"
    layout = build_layout(schema, tok, ROLES, n_ctx=6)
    with pytest.raises(LayoutOverflowError, match=r"n_ctx=6"):
        resolve_prompt(layout, parse_prompt('<prompt schema="s"><m/> and more</prompt>'), tok, ROLES, n_ctx=6)


def test_all_errors_are_pccpu_errors() -> None:
    for _, _, cls, _ in SCHEMA_ERRORS + PROMPT_ERRORS:
        assert issubclass(cls, PccpuError)
