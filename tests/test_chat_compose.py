"""Chats in compose mode (``PromptCache.chat(reuse="compose")``, pccpu/service/chat.py): stored messages restored
wherever they appear, in any order and combination, repaired at their start, and reported as composed. On the fake
engine, whose cell values depend on everything a token attends to, so "repairing every token gives the full
prefill" is checked bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import FakeCacheFactory

from pccpu.errors import OptionError
from pccpu.service import PromptCache, Result

DOCS = {name: f"Document {name}: the {name} tower opens at {hour} and the guide there speaks {hour % 3 + 2} "
              f"languages; tickets are sold at the door only. " * 2
        for name, hour in (("alpha", 7), ("beta", 9), ("gamma", 11))}
LONG = 1000  # more than any document's tokens


def rag(*docs: str, question: str = "When does it open?") -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": DOCS[d]} for d in docs] + [{"type": "text", "text": question}]
    return [{"role": "system", "content": "You answer from the documents."}, {"role": "user", "content": parts}]


def chat(pc: PromptCache, messages: list[dict[str, Any]], **options: Any) -> Result:
    return pc.chat(messages, max_tokens=0, keep_logits=True, **options).result()


def same(a: Result, b: Result) -> bool:
    return bool(np.array_equal(a.first_logits, b.first_logits))


@pytest.fixture
def pc(fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache(min_chunk_tokens=16, chat_reuse="compose")
    return cache


def test_documents_in_another_order_are_restored_and_reported_as_composed(pc: PromptCache) -> None:
    chat(pc, rag("alpha", "beta"), session=pc.session())
    swapped = chat(pc, rag("beta", "alpha", question="Who speaks most?"), session=pc.session(), repair_tokens=4)
    docs = {u.module: u for u in swapped.modules if u.source in ("ram", "disk")}
    assert len(docs) == 3  # the system message (same prefix, same place: exact) and both documents (moved)
    composed = [u for u in docs.values() if u.composed]
    assert len(composed) == 2 and all(u.shifted and u.repaired_tokens == 4 for u in composed)
    assert not swapped.exact
    full = chat(pc, rag("beta", "alpha", question="Who speaks most?"), cache=False)
    assert not same(swapped, full)
    assert swapped.cached_tokens == sum(u.tokens - u.repaired_tokens for u in docs.values())


def test_repairing_every_token_gives_the_full_prefill(pc: PromptCache) -> None:
    chat(pc, rag("alpha", "beta", "gamma"), session=pc.session())
    messages = rag("gamma", "alpha", question="Which is first?")
    repaired = chat(pc, messages, session=pc.session(), repair_tokens=LONG)
    assert same(repaired, chat(pc, messages, cache=False))


def test_the_same_conversation_again_is_exact(pc: PromptCache) -> None:
    chat(pc, rag("alpha", "beta"), session=pc.session())
    again = chat(pc, rag("alpha", "beta", question="Another question?"), session=pc.session(), repair_tokens=0)
    assert again.exact and not any(u.composed for u in again.modules)
    assert again.cached_tokens > 2 * 40
    assert same(again, chat(pc, rag("alpha", "beta", question="Another question?"), cache=False))


def test_a_session_continues_over_composed_cells_and_stays_composed(pc: PromptCache) -> None:
    chat(pc, rag("alpha", "beta"), session=pc.session())
    session = pc.session()
    first = chat(pc, rag("beta", "alpha"), session=session, repair_tokens=4)
    follow = [*rag("beta", "alpha"), {"role": "assistant", "content": "At nine."},
              {"role": "user", "content": "And on Sundays?"}]
    second = chat(pc, follow, session=session, repair_tokens=4)
    assert not first.exact and not second.exact  # the held cells are the composed ones
    assert second.session_tokens >= first.prompt_tokens - 1 and second.cached_tokens == 0


def test_chunks_computed_after_composed_cells_are_not_stored_as_exact(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16, chat_reuse="compose")
    chat(pc, rag("alpha"), session=pc.session())
    # gamma is new and decoded after the composed alpha: stored, but not as computed after its true prefix
    chat(pc, rag("beta", "alpha", "gamma"), session=pc.session(), repair_tokens=2)
    again = chat(pc, rag("beta", "alpha", "gamma", question="Other?"), session=pc.session(), repair_tokens=0)
    gamma = next(u for u in again.modules if u.module.endswith("part 2"))
    assert gamma.source in ("ram", "disk") and gamma.composed


def test_exact_mode_stays_the_default(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16)
    chat(pc, rag("alpha", "beta"), session=pc.session())
    swapped = chat(pc, rag("beta", "alpha"), session=pc.session())
    assert swapped.exact and all(u.source not in ("ram", "disk") or not u.composed for u in swapped.modules)
    assert same(swapped, chat(pc, rag("beta", "alpha"), cache=False))
    with pytest.raises(OptionError, match="reuse must be one of exact, compose"):
        pc.chat(rag("alpha"), reuse="sometimes")  # type: ignore[arg-type]


def test_a_short_system_message_before_documents_stays_a_chunk_of_its_own(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=64, chat_reuse="compose")  # the system message is shorter than that
    chat(pc, rag("alpha", "beta", "gamma"), session=pc.session())
    swapped = chat(pc, rag("gamma", "alpha", "beta"), session=pc.session())
    restored = [u for u in swapped.modules if u.source in ("ram", "disk")]
    assert [u.module for u in restored] == ["message 0", "message 1 part 0", "message 1 part 1", "message 1 part 2"]
    assert [u.composed for u in restored] == [False, True, True, True]
