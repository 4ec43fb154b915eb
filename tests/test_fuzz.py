"""Hypothesis fuzzing of the text path (parse_schema, build_layout, parse_prompt, resolve_prompt; fake tokenizer, no
model) on mutations of the shipped schemas and prompts: byte flips, truncation, deletion, duplication and insertion
of markup fragments. Only PccpuError may come out. Bounded: 200 examples per test, a few seconds.

The same mutations drive fuzz/fuzz_pml.py (atheris or a timed loop); a short run of it is the last test."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccpu.errors import PmlError
from pccpu.pml import parse_prompt, parse_schema

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_pml", ROOT / "fuzz" / "fuzz_pml.py")
assert _spec is not None and _spec.loader is not None
fuzz_pml = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_pml"] = fuzz_pml
_spec.loader.exec_module(fuzz_pml)

SEEDS = fuzz_pml.seeds()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
CASES: dict[str, int] = {}


def _count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.randoms(use_true_random=False), st.booleans())
def test_mutated_documents_raise_only_pccpu_errors(index: int, rng: random.Random, schema_side: bool) -> None:
    schema, prompt = SEEDS[index]
    if schema_side:
        schema = fuzz_pml.mutate(schema, rng)
    else:
        prompt = fuzz_pml.mutate(prompt, rng)
    fuzz_pml.check(schema, prompt)
    _count("mutations")


FRAGMENT = st.sampled_from(fuzz_pml.FRAGMENTS)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.floats(0, 1), FRAGMENT), min_size=1, max_size=6),
       st.booleans())
def test_inserted_markup_fragments(index: int, inserts: list[tuple[float, str]], schema_side: bool) -> None:
    schema, prompt = SEEDS[index]
    text = schema if schema_side else prompt
    for where, fragment in inserts:
        i = int(where * len(text))
        text = text[:i] + fragment + text[i:]
    fuzz_pml.check(text, prompt) if schema_side else fuzz_pml.check(schema, text)
    _count("fragments")


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    fuzz_pml.one_input(data, SEEDS)
    _count("bytes")


@pytest.mark.parametrize("where", ["schema", "prompt", "question"])
def test_lone_surrogate_is_a_pml_error(where: str) -> None:
    """A Python str may hold a lone surrogate (from surrogateescape decoding, JSON "\\udcff" ...); it cannot be
    encoded to UTF-8 for expat and must be a PmlError, not a UnicodeEncodeError."""
    from pccpu.service.prompt_builder import build_prompt_xml

    if where == "schema":
        call = lambda: parse_schema('<schema name="s"><module name="m">caf\udcff</module></schema>')  # noqa: E731
    elif where == "prompt":
        call = lambda: parse_prompt('<prompt schema="s"><m/>caf\udcff</prompt>')  # noqa: E731
    else:
        call = lambda: parse_prompt(build_prompt_xml("s", {"m": None}, "caf\udcff?"))  # noqa: E731
    with pytest.raises(PmlError):
        call()


def test_plain_fuzz_loop_runs() -> None:
    cases = fuzz_pml.plain_loop(3.0, seed=1)
    CASES["plain_loop"] = cases
    assert cases > 50
    print("fuzz cases run:", CASES)
