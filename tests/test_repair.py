"""Boundary repair (pccpu/service/repair.py) on the fake engine, whose cell values depend on everything a token
attends to: a module placed after other cells than it was encoded after gives other logits than a full prefill,
and decoding all of its tokens in place gives the full prefill's, bit for bit. Real-model numbers are in
test_repair_real.py and bench/accuracy.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeCacheFactory

from pccpu.errors import OptionError
from pccpu.service import PromptCache, Result

# three documents of different lengths in a union and after it, so that layouts have gaps and shifts
SCHEMA = """<schema name="rag"><system>Answer from the documents.</system><user>Documents:
<module name="a">Alpha: the bakery on the corner opens at six every morning.</module>
<module name="b">Beta: the station closes at ten.</module>
<union><module name="c">Gamma: the park has ducks and a small pond with fish.</module>
<module name="d">Delta: short.</module></union>
<module name="e">Epsilon: the library lends bicycles on Sundays.</module></schema>"""

LONG = 200  # more than any module's tokens: every composed module decoded in place


def prompt(refs: str, question: str = "Which one?") -> str:
    return f'<prompt schema="rag">{refs}{question}</user></prompt>'


def ask(pc: PromptCache, text: str, **options: object) -> Result:
    return pc.ask(text, max_tokens=0, keep_logits=True, **options).result()  # type: ignore[arg-type]


def same(a: Result, b: Result) -> bool:
    return bool(np.array_equal(a.first_logits, b.first_logits))


@pytest.fixture(params=["isolated", "sequential"])
def pc(request: pytest.FixtureRequest, fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache(mode=request.param, reuse_previous=False)
    cache.add_schema(SCHEMA)
    return cache


# layouts without gaps (c fills the union's slot), so that a full prefill puts every token where the plan does
@pytest.mark.parametrize(("mode", "refs"), [("isolated", "<a/><b/>"), ("isolated", "<a/><b/><c/><e/>"),
                                            ("sequential", "<a/><b/><c/><e/>")])
def test_repairing_every_composed_token_gives_the_full_prefill(fake_cache: FakeCacheFactory, mode: str,
                                                               refs: str) -> None:
    pc = fake_cache(mode=mode, reuse_previous=False)
    pc.add_schema(SCHEMA)
    full = ask(pc, prompt(refs), cache=False)
    unrepaired = ask(pc, prompt(refs), repair_tokens=0)
    repaired = ask(pc, prompt(refs), repair_tokens=LONG)
    assert not same(unrepaired, full)  # each layout composes at least one module
    assert same(repaired, full)
    assert any(m.composed for m in unrepaired.modules)
    assert not any(m.repaired_tokens for m in unrepaired.modules)


@pytest.mark.parametrize("refs", ["<a/><b/><e/>", "<a/><b/><c/>", "<a/><b/><d/>"])
def test_a_prefix_layout_is_never_repaired(fake_cache: FakeCacheFactory, refs: str) -> None:
    # sequential mode encodes each module after the schema text before it (a union's members after what precedes
    # the union, the modules after a union without it): these prompts put each exactly there
    pc = fake_cache(mode="sequential", reuse_previous=False)
    pc.add_schema(SCHEMA)
    repaired = ask(pc, prompt(refs), repair_tokens=LONG)
    assert same(repaired, ask(pc, prompt(refs), repair_tokens=0))
    assert repaired.cached_tokens == pc.plan(prompt(refs)).plan.cached_tokens
    assert not any(m.composed or m.repaired_tokens for m in repaired.modules)


def test_isolated_modules_after_their_siblings_are_composed(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(mode="isolated", reuse_previous=False)
    pc.add_schema(SCHEMA)
    result = ask(pc, prompt("<a/><b/>"), repair_tokens=4)
    # the schema text and a were encoded after exactly what precedes them; b never saw a
    assert [(m.module, m.composed, m.repaired_tokens) for m in result.modules] == [
        ("", False, 0), ("a", False, 0), ("b", True, 4)]
    plan = pc.plan(prompt("<a/><b/>")).plan
    assert result.cached_tokens == plan.cached_tokens - 4
    assert result.uncached_tokens == plan.uncached_tokens + 4


def test_partial_repair_lies_between(pc: PromptCache) -> None:
    text = prompt("<b/><e/>")
    full, some = ask(pc, text, cache=False), ask(pc, text, repair_tokens=3)
    assert not same(some, full) and not same(some, ask(pc, text, repair_tokens=0))
    assert sum(m.repaired_tokens for m in some.modules) == 3 * sum(m.composed for m in some.modules)


def test_a_short_module_after_a_gap_is_repaired_whole(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(mode="isolated", reuse_previous=False)
    pc.add_schema(SCHEMA)
    # d is shorter than its union's slot (a gap follows it) and than k: decoded in place entirely, then e after
    # the gap; nothing of d restored
    text = prompt("<a/><d/><e/>")
    result = ask(pc, text, repair_tokens=LONG)
    d = next(m for m in result.modules if m.module == "d")
    assert d.repaired_tokens == d.tokens and d.composed
    assert not same(result, ask(pc, text, repair_tokens=0))
    again = fake_cache(mode="isolated", reuse_previous=False, store_dir=None, persist=False)
    again.add_schema(SCHEMA)
    assert same(result, ask(again, text, repair_tokens=LONG))


@pytest.mark.parametrize("k", [0, 5, LONG])
def test_a_session_reuses_repaired_cells_only_for_the_same_repair(fake_cache: FakeCacheFactory, k: int) -> None:
    pc = fake_cache(mode="isolated")
    pc.add_schema(SCHEMA)
    fresh = fake_cache(mode="isolated", reuse_previous=False, store_dir=None, persist=False)
    fresh.add_schema(SCHEMA)
    session = pc.session()
    first, second = prompt("<a/><b/>", "First?"), prompt("<a/><b/>", "Second?")
    ask(pc, first, session=session, repair_tokens=k)
    again = ask(pc, second, session=session, repair_tokens=k)
    assert again.session_tokens > pc.plan(second).plan.cached_tokens - 1  # all module cells held
    assert same(again, ask(fresh, second, repair_tokens=k))
    other = 3 if k != 3 else 4
    changed = ask(pc, second, session=session, repair_tokens=other)  # other repaired cells: not reused past them
    assert same(changed, ask(fresh, second, repair_tokens=other))


@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_repair_tokens_must_be_a_count(fake_cache: FakeCacheFactory, value: object) -> None:
    pc = fake_cache()
    pc.add_schema(SCHEMA)
    with pytest.raises(OptionError, match="repair_tokens must be an integer >= 0"):
        pc.ask(prompt("<a/>"), repair_tokens=value)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="repair_tokens must be an integer >= 0"):
        fake_cache(repair_tokens=value)
