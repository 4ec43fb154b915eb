"""Conformance: the prototype's own schemas (../shared/reference-pml) and pccpu's examples (schemas/) all load,
and every prompt resolves against the schema it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pml_fakes import BracketRoles, WordTokenizer

from pccpu.pml import SchemaLayout, build_layout, parse_prompt, parse_schema, resolve_prompt
from pccpu.pml.prompt import Prompt

REFERENCE = Path(os.environ.get("PCCPU_REFERENCE_PML", "/work/shared/reference-pml"))
EXAMPLES = Path(__file__).parent.parent / "schemas"
ROLES = BracketRoles()


def _is_prompt(path: Path) -> bool:
    return path.read_text(encoding="utf-8").lstrip().startswith("<prompt")


def _check_folder(folder: Path) -> tuple[int, int]:
    tok = WordTokenizer()
    layouts: dict[str, list[SchemaLayout]] = {}
    prompts: list[Prompt] = []
    for path in sorted(folder.glob("*.xml")):
        if _is_prompt(path):
            prompts.append(parse_prompt(path))
        else:
            layout = build_layout(parse_schema(path), tok, ROLES, bos_tokens=(1,))
            assert layout.span > 0
            layouts.setdefault(layout.name, []).append(layout)
    for prompt in prompts:
        assert prompt.schema in layouts, f"{prompt.source}: no schema named {prompt.schema!r}"
        for layout in layouts[prompt.schema]:
            plan = resolve_prompt(layout, prompt, tok, ROLES)
            assert plan.next_position > 0
            assert len(plan.baseline_tokens()) == plan.cached_tokens + plan.uncached_tokens
    return sum(len(v) for v in layouts.values()), len(prompts)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference PML folder {REFERENCE} is absent")
def test_reference_pml() -> None:
    n_schemas, n_prompts = _check_folder(REFERENCE)
    assert n_schemas >= 10 and n_prompts >= 10


def test_example_schemas() -> None:
    n_schemas, n_prompts = _check_folder(EXAMPLES)
    assert n_schemas >= 4 and n_prompts >= 5


def test_reference_default_schema_traps() -> None:
    path = REFERENCE / "test_schema_code_generation.xml"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    tok = WordTokenizer()
    layout = build_layout(parse_schema(path), tok, ROLES)
    assert layout.modules["preface/system2"].cache is False
    assert layout.modules["preface"].parameters["param-name"].scaffold_tokens == tuple(
        tok.tokenize("[to be filled later]"))
    plan = resolve_prompt(layout, parse_prompt(REFERENCE / "prompt_default.xml"), tok, ROLES)
    kinds = [getattr(p, "kind", "cached") for p in plan.pieces]
    assert kinds.count("argument") == 3 and kinds[-1] == "trailing"


def test_demo_prompt_asks_for_a_planted_fact() -> None:
    tok = WordTokenizer()
    layout = build_layout(parse_schema(EXAMPLES / "demo.xml"), tok, ROLES)
    manual = layout.modules["manual"]
    assert manual.own_tokens >= 500  # words here; the real tokenizer gives more
    assert "7-3-1-9" in manual.items[0].text
    plan = resolve_prompt(layout, parse_prompt(EXAMPLES / "demo_prompt.xml"), tok, ROLES)
    assert plan.included_modules == ("", "manual")


def test_codebase_keeps_code_characters() -> None:
    layout = build_layout(parse_schema(EXAMPLES / "codebase.xml"), WordTokenizer(), ROLES)
    assert "<=" in layout.modules["shapes.py"].items[0].text
    assert "1 << 0" in layout.modules["flags.py"].items[0].text
    assert layout.modules["snippet"].items[0].text == "if 0 < len(shapes) && ready: draw()"
