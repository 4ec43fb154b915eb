"""What the service does when a sliding-window model's sequence lost cells (LlamaContext.window_intact is false:
llama.cpp reused them, see pccpu/engine/swa.py): it never extends such cells, it rebuilds from the store, and the
answer stays the full prefill's. On the fake engine, whose window floor a test sets; the real detection is tested on
gemma-3-270m in test_sliding_window.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import FakeCacheFactory
from fake_engine import FakeContext

from pccpu.service import PromptCache, Result
from pccpu.service.prompt_cache import REQUEST_SEQ

SCHEMA = """<schema name="docs"><system>You answer from the notes.</system><user>Notes:
<module name="a">Alpha: the bakery opens at six and closes at noon on Sundays.</module>
<module name="b">Beta: the station closes at ten.</module></schema>"""
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer from the document."},
    {"role": "user", "content": "The clock museum of Lindenfeld opens at nine and closes at five. " * 4},
    {"role": "assistant", "content": "Noted."},
]


@pytest.fixture
def pc(fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache(min_chunk_tokens=16)
    cache.add_schema(SCHEMA)
    context = cache._runtime.context  # internal on purpose: the fake's window is set by the test
    assert isinstance(context, FakeContext)
    context.n_swa = 4
    return cache


def lose_window(pc: PromptCache, seq_id: int = REQUEST_SEQ) -> None:
    """Every cell of the sequence lost its window (as after llama.cpp reused them)."""
    context = pc._runtime.context
    assert isinstance(context, FakeContext) and context.seq_pos_max(seq_id) > 8
    context.window_floor[seq_id] = 10**6


def prompt(question: str) -> str:
    return f'<prompt schema="docs"><a/><b/>{question}</user></prompt>'


def same(a: Result, b: Result) -> bool:
    return a.text == b.text and a.first_logits is not None and np.array_equal(a.first_logits, b.first_logits)


def test_a_prompt_after_lost_cells_is_assembled_from_the_store(pc: PromptCache) -> None:
    pc.ask(prompt("When?"), max_tokens=2).result()
    held = pc.ask(prompt("Where?"), max_tokens=2, keep_logits=True).result()
    assert held.session_tokens > 0  # the session's cells are extended when they are intact
    lose_window(pc)
    rebuilt = pc.ask(prompt("Why?"), max_tokens=2, keep_logits=True).result()
    assert rebuilt.session_tokens == 0 and rebuilt.cached_tokens > 0
    assert same(rebuilt, pc.ask(prompt("Why?"), cache=False, max_tokens=2, keep_logits=True).result())


def test_a_chat_after_lost_cells_restores_its_chunks(pc: PromptCache) -> None:
    messages = [*HISTORY, {"role": "user", "content": "When does it open?"}]
    pc.chat(messages, max_tokens=2).result()
    follow = [*messages, {"role": "assistant", "content": "At nine."}, {"role": "user", "content": "And close?"}]
    lose_window(pc)
    again = pc.chat(follow, max_tokens=2, keep_logits=True).result()
    assert again.session_tokens == 0 and again.cached_tokens > 0
    assert same(again, pc.chat(follow, cache=False, max_tokens=2, keep_logits=True).result())


def test_a_session_that_cannot_be_parked_whole_starts_over(pc: PromptCache) -> None:
    one, two = pc.session(), pc.session()
    one.ask(prompt("When?"), max_tokens=2).result()
    lose_window(pc)
    two.ask(prompt("Where?"), max_tokens=2).result()  # parks one: its state cannot be saved whole
    assert pc.stats().sessions.parked == 0
    back = one.ask(prompt("When?"), max_tokens=2, keep_logits=True).result()
    assert back.session_tokens == 0 and back.cached_tokens > 0
    assert same(back, pc.ask(prompt("When?"), cache=False, max_tokens=2, keep_logits=True).result())


def test_type_ahead_after_lost_cells_answers_as_a_plain_chat(pc: PromptCache) -> None:
    question = "When does the museum open on Sundays?"
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type(question[:20])
        assert draft.wait(10)
        lose_window(pc)
        draft.type(question[:12] + "X" + question[13:])  # an edit: the cells before it would be kept
        assert draft.wait(10)
        assert draft.error is None  # the worker started over instead of extending the cells
        result = draft.submit(max_tokens=4, keep_logits=True).result()
    with pc.session() as other:
        text = question[:12] + "X" + question[13:]
        plain = pc.chat([*HISTORY, {"role": "user", "content": text}], session=other, max_tokens=4,
                        keep_logits=True).result()
    assert same(result, plain)
