"""Property-based tests: random well-formed schemas and prompts keep the layout and plan invariants, and random
mutations of valid documents raise nothing but pccpu's own errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pml_fakes import BracketRoles, WordTokenizer

from pccpu.errors import PccpuError
from pccpu.pml import CachedPiece, ParameterSlot, TextChunk, build_layout, parse_prompt, parse_schema, resolve_prompt

ROLES = BracketRoles()
WORDS = st.sampled_from(["alpha", "beta", "0 <= x", "a &amp; b", "<user>", "</user>", "<system/>", "gamma", "\n  "])
SETTINGS = settings(
    max_examples=int(os.environ.get("PML_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass
class Mod:
    name: str
    params: dict[str, int] = field(default_factory=dict)
    children: list[Mod | list[Mod]] = field(default_factory=list)  # a list is a union


@st.composite
def body(draw: st.DrawFn, depth: int, owner: Mod | None, counter: list[int]) -> str:
    out: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kinds = ["text"] + (["module", "union"] if depth < 3 else []) + (["param"] if owner is not None else [])
        kind = draw(st.sampled_from(kinds))
        counter[0] += 1
        name = draw(st.sampled_from(["m", "_x", "K.", "d-"])) + str(counter[0])
        if kind == "text":
            out.append(" ".join(draw(st.lists(WORDS, min_size=1, max_size=4))))
        elif kind == "param":
            length = draw(st.integers(1, 5))
            assert owner is not None
            owner.params[name] = length
            out.append(f'<parameter name="{name}" {draw(st.sampled_from(["len", "length"]))}="{length}"/>')
        elif kind == "module":
            out.append(draw(module(depth, owner, counter, name)))
        else:
            members: list[Mod] = []
            texts = [draw(module(depth, None, counter, f"{name}u{i}", sink=members))
                     for i in range(draw(st.integers(1, 3)))]
            if owner is not None:
                owner.children.append(members)
            else:
                ROOT_SINK[-1].children.append(members)
            out.append("<union>" + "".join(texts) + "</union>")
    return "\n".join(out)


ROOT_SINK: list[Mod] = []


@st.composite
def module(draw: st.DrawFn, depth: int, owner: Mod | None, counter: list[int], name: str,
           sink: list[Mod] | None = None) -> str:
    mod = Mod(name)
    if sink is not None:
        sink.append(mod)
    else:
        (owner or ROOT_SINK[-1]).children.append(mod)
    cache = draw(st.sampled_from(["", ' cache="false"', ' cache="true"']))
    inner = draw(body(depth + 1, mod, counter))
    return f'<module name="{name}"{cache}>{inner}</module>'


@st.composite
def schema_and_prompt(draw: st.DrawFn) -> tuple[str, str]:
    root = Mod("")
    ROOT_SINK.append(root)
    try:
        schema = f'<schema name="s">{draw(body(0, None, [0]))}</schema>'
    finally:
        ROOT_SINK.pop()
    refs = draw(select(root))
    pieces = []
    for ref in refs:
        if draw(st.booleans()):
            pieces.append(draw(st.sampled_from(["between", "<user>q</user>", "x y z"])))
        pieces.append(ref)
    if draw(st.booleans()):
        pieces.append("<user>tail</user>")
    return schema, f'<prompt schema="s">{"".join(pieces)}</prompt>'


@st.composite
def select(draw: st.DrawFn, parent: Mod) -> list[str]:
    out = []
    for child in parent.children:
        if isinstance(child, list):
            choice = draw(st.integers(-1, len(child) - 1))
            if choice >= 0:
                out.append(draw(ref(child[choice])))
        elif draw(st.booleans()):
            out.append(draw(ref(child)))
    return out


@st.composite
def ref(draw: st.DrawFn, mod: Mod) -> str:
    args = "".join(f' {p}="{" ".join(["w"] * draw(st.integers(0, n)))}"' for p, n in mod.params.items())
    return f"<{mod.name}{args}>{''.join(draw(select(mod)))}</{mod.name}>"


def _union_siblings(layout, a: str, b: str) -> bool:
    """True when modules a and b lie in different members of one union (so their ranges may overlap)."""
    pa, pb = a.split("/") if a else [], b.split("/") if b else []
    i = 0
    while i < min(len(pa), len(pb)) and pa[i] == pb[i]:
        i += 1
    if i >= len(pa) or i >= len(pb):
        return False
    ma, mb = layout.modules["/".join(pa[: i + 1])], layout.modules["/".join(pb[: i + 1])]
    return ma.union_id is not None and ma.union_id == mb.union_id


@SETTINGS
@given(schema_and_prompt(), st.integers(0, 2))
def test_layout_and_plan_invariants(doc: tuple[str, str], n_bos: int) -> None:
    schema_text, prompt_text = doc
    tok = WordTokenizer()
    schema = parse_schema(schema_text)
    layout = build_layout(schema, tok, ROLES, bos_tokens=(1,) * n_bos)
    items = [(m.path, i) for m in layout.modules.values() for i in m.items]
    for path, item in items:
        end = item.end
        assert 0 <= item.start < end <= layout.span
        mod = layout.modules[path]
        assert mod.start <= item.start and end <= mod.end
    for (pa, a), (pb, b) in ((x, y) for k, x in enumerate(items) for y in items[k + 1 :]):
        if a.start < b.end and b.start < a.end:
            assert _union_siblings(layout, pa, pb), (pa, a, pb, b)
    declared = {(p, prm.name): prm.length for p, m in schema.walk() for prm in m.parameters}
    slots = {(i.module, i.name): i.length for _, i in items if isinstance(i, ParameterSlot)}
    assert slots == declared
    assert all(i.length > 0 for _, i in items if isinstance(i, TextChunk))

    plan = resolve_prompt(layout, parse_prompt(prompt_text), tok, ROLES)
    cursor = 0
    for piece in plan.pieces:
        assert piece.length > 0
        assert piece.start >= cursor
        if isinstance(piece, CachedPiece):
            assert piece.start >= piece.schema_start
        cursor = piece.end
    assert plan.next_position == cursor
    assert len(plan.baseline_tokens()) == plan.cached_tokens + plan.uncached_tokens


MUTATION_CHARS = st.text(alphabet="<>&/\"'= ab!-[]?;#\n", max_size=6)


@SETTINGS
@given(schema_and_prompt(), st.data())
def test_mutations_raise_only_pccpu_errors(doc: tuple[str, str], data: st.DataObject) -> None:
    tok = WordTokenizer()
    for text in doc:
        mutated = text
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(mutated)))
            j = data.draw(st.integers(i, min(len(mutated), i + 8)))
            mutated = mutated[:i] + data.draw(MUTATION_CHARS) + mutated[j:]
        try:
            if mutated.lstrip().startswith("<prompt"):
                parse_prompt(mutated)
            else:
                build_layout(parse_schema(mutated, source="mutated.xml"), tok, ROLES)
        except PccpuError:
            pass
