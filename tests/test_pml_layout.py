"""Layout and plan tests: positions of every construct, and where llama.cpp will really put each piece."""

from __future__ import annotations

import json

import pytest
from pml_fakes import BracketRoles, WordTokenizer

from pccpu.pml import (
    CachedPiece,
    ParameterSlot,
    TextChunk,
    UncachedPiece,
    build_layout,
    parse_prompt,
    parse_schema,
    resolve_prompt,
)

ROLES = BracketRoles()

SCHEMA = """
<schema name="s">
  <system>one two</system>
  <module name="m">
    a b c <parameter name="p" length="4" scaffold="x"/> d e
    <union scaffold="u1">
      <module name="u1">f g h</module>
      <module name="u2" cache="false">i</module>
    </union>
    <module name="n">j k</module>
    l
  </module>
  tail
</schema>
"""


@pytest.fixture()
def tok() -> WordTokenizer:
    return WordTokenizer()


def words(tok: WordTokenizer, ids: tuple[int, ...]) -> str:
    return " ".join("<bos>" if i == 1 else tok.words([i])[0] for i in ids)


def test_layout_positions(tok: WordTokenizer) -> None:
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES, bos_tokens=(1,))
    root = layout.root
    # bos, "[system] one two [/system]" (4 words)
    assert [(c.start, c.length) for c in root.items] == [(0, 1), (1, 4), (20, 1)]
    m = layout.modules["m"]
    assert (m.start, m.end) == (5, 20)
    assert m.items == (TextChunk("m", 5, m.items[0].tokens, "a b c "),
                       ParameterSlot("m", "p", 8, 4, tuple(tok.tokenize("x"))),
                       TextChunk("m", 12, m.items[2].tokens, " d e"),
                       TextChunk("m", 19, m.items[3].tokens, "l"))
    assert (layout.modules["m/u1"].start, layout.modules["m/u1"].end) == (14, 17)
    assert (layout.modules["m/u2"].start, layout.modules["m/u2"].end) == (14, 15)
    assert layout.modules["m/u2"].cache is False
    assert layout.modules["m/u1"].union_id == layout.modules["m/u2"].union_id == "m#0"
    assert layout.unions["m#0"].scaffold == "m/u1"
    assert (layout.modules["m/n"].start, layout.modules["m/n"].end) == (17, 19)
    assert layout.span == root.end == 21
    assert m.children == ("m/u1", "m/u2", "m/n")


def test_layout_nested_module_after_union(tok: WordTokenizer) -> None:
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES)
    n = layout.modules["m/n"]
    assert (n.start, n.end) == (16, 18)  # union [13, 16) spans its longest member u1
    assert layout.modules["m"].items[-1].start == 18
    assert layout.span == 20


def test_plan_pieces_and_positions(tok: WordTokenizer) -> None:
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES, bos_tokens=(1,))
    prompt = parse_prompt('<prompt schema="s"><m p="Q R"><u2/><n/></m><user>why</user></prompt>')
    plan = resolve_prompt(layout, prompt, tok, ROLES)
    assert plan.pieces == (
        CachedPiece("", 0, 0, 5),
        CachedPiece("m", 5, 5, 3),
        UncachedPiece(tuple(tok.tokenize("Q R")), 8, "argument", "m"),
        CachedPiece("m", 12, 12, 2),  # slot rest [10, 12) is a gap
        UncachedPiece(tuple(tok.tokenize("i")), 14, "uncached_module", "m/u2"),
        CachedPiece("m/n", 17, 17, 2),  # after the short member: keeps its schema positions
        CachedPiece("m", 19, 19, 1),
        CachedPiece("", 20, 20, 1),
        UncachedPiece(tuple(tok.tokenize(" [user] why [/user] ")), 21, "trailing", None),
    )
    assert plan.included_modules == ("", "m", "m/u2", "m/n")
    assert plan.next_position == 24
    assert plan.cached_tokens == 5 + 3 + 2 + 2 + 1 + 1
    assert plan.uncached_tokens == 2 + 1 + 3
    assert words(tok, plan.baseline_tokens()) == (
        "<bos> [system] one two [/system] a b c Q R d e i j k l tail [user] why [/user]")
    json.dumps(plan.to_dict())


def test_prompt_text_between_refs_shifts_later_pieces(tok: WordTokenizer) -> None:
    schema = parse_schema('<schema name="s"><module name="a">A1 A2</module><module name="b">B1 B2</module></schema>')
    layout = build_layout(schema, tok, ROLES)
    plan = resolve_prompt(layout, parse_prompt('<prompt schema="s">lead <a/> mid one <b/></prompt>'), tok, ROLES)
    assert plan.pieces == (
        UncachedPiece(tuple(tok.tokenize("lead ")), 0, "prompt_text", None),
        CachedPiece("a", 0, 1, 2),  # shifted right by one
        UncachedPiece(tuple(tok.tokenize(" mid one ")), 3, "prompt_text", None),
        CachedPiece("b", 2, 5, 2),
    )
    assert plan.pieces[1].shift == 1
    assert plan.next_position == 7


def test_excluded_module_splits_parent_and_gap_is_kept(tok: WordTokenizer) -> None:
    schema = parse_schema('<schema name="s"><module name="a">x <module name="skip">s s s</module> y</module>'
                          '<module name="b">z</module></schema>')
    layout = build_layout(schema, tok, ROLES)
    plan = resolve_prompt(layout, parse_prompt('<prompt schema="s"><a/><b/></prompt>'), tok, ROLES)
    assert plan.pieces == (CachedPiece("a", 0, 0, 1), CachedPiece("a", 4, 4, 1), CachedPiece("b", 5, 5, 1))
    assert plan.uncached_tokens == 0
    assert plan.next_position == 6


def test_prompt_without_text_and_unselected_union(tok: WordTokenizer) -> None:
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES)
    plan = resolve_prompt(layout, parse_prompt('<prompt schema="s"><m p=""/></prompt>'), tok, ROLES)
    assert all(isinstance(p, CachedPiece) for p in plan.pieces)
    assert plan.included_modules == ("", "m")
    assert plan.next_position == layout.span


def test_layout_json_and_tree(tok: WordTokenizer) -> None:
    layout = build_layout(parse_schema(SCHEMA), tok, ROLES)
    data = layout.to_dict(tokens=True)
    json.dumps(data)
    assert [m["path"] for m in data["modules"]] == ["", "m", "m/u1", "m/u2", "m/n"]
    assert data["unions"][0]["members"] == ["m/u1", "m/u2"]
    tree = layout.render_tree()
    assert "parameter p [7, 11)  length 4" in tree
    assert "module u2 [13, 14)  own 1 tokens  cache=false" in tree


def test_layout_depends_on_tokenizer() -> None:
    from pml_fakes import CharTokenizer

    layout = build_layout(parse_schema('<schema name="s"><module name="m">abc</module></schema>'), CharTokenizer(),
                          ROLES)
    assert layout.modules["m"].items[0].tokens == (97, 98, 99)
    assert layout.span == 3
