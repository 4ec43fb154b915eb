"""Type-ahead (pccpu/service/typeahead.py) on the fake engine: what the worker decodes while a message is typed, how
edits remove cells, that submit() answers as a plain chat would, and the threading rules (a keystroke never waits, a
foreground call never gets BusyError from the worker). The real model's tests are in test_typeahead_real.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import FakeCacheFactory

from pccpu.errors import LayoutOverflowError, OptionError, SessionError
from pccpu.service import PromptCache, Result

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer from the document."},
    {"role": "user", "content": "The clock museum of Lindenfeld opens at nine and closes at five. " * 4},
    {"role": "assistant", "content": "Noted."},
]
QUESTION = "When does the museum open on Sundays?"


@pytest.fixture
def pc(fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache(min_chunk_tokens=16)
    return cache


def plain(pc: PromptCache, text: str, history: list[dict[str, Any]] = HISTORY) -> Result:
    """The same message without type-ahead, in a session of its own."""
    with pc.session() as other:
        return pc.chat([*history, {"role": "user", "content": text}], session=other, max_tokens=6,
                       keep_logits=True).result()


def typed(pc: PromptCache, keystrokes: list[str], **draft_options: Any) -> tuple[Result, Any]:
    with pc.session() as chat:
        draft = chat.draft(HISTORY, **draft_options)
        for text in keystrokes:
            draft.type(text)
        assert draft.wait(10)
        result = draft.submit(max_tokens=6, keep_logits=True).result()
        return result, draft.stats


def prefixes(text: str) -> list[str]:
    return [text[:i] for i in range(1, len(text) + 1)]


def test_a_typed_message_is_decoded_before_enter(pc: PromptCache) -> None:
    result, stats = typed(pc, prefixes(QUESTION))
    reference = plain(pc, QUESTION)
    assert result.text == reference.text
    assert result.first_logits is not None and reference.first_logits is not None
    assert (result.first_logits == reference.first_logits).all()
    assert result.uncached_tokens == 0 and result.cached_tokens == 0  # every cell was already in the session
    assert result.session_tokens == stats.prompt_tokens and stats.ready
    assert stats.keystrokes == len(QUESTION) and stats.decoded_tokens >= len(QUESTION.encode())


def test_edits_remove_cells_from_the_first_difference(pc: PromptCache) -> None:
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type("When does the museum close")
        assert draft.wait(10)
        held_before = chat.held_tokens
        draft.type("When does the mu")  # backspace over two words
        assert draft.wait(10)
        assert chat.held_tokens < held_before
        assert draft.stats.discarded_tokens > 0
        draft.type("Where is the museum?")  # a changed word near the start
        assert draft.wait(10)
        result = draft.submit(max_tokens=6, keep_logits=True).result()
    reference = plain(pc, "Where is the museum?")
    assert result.text == reference.text and result.uncached_tokens == 0
    assert result.first_logits is not None and (result.first_logits == reference.first_logits).all()


@pytest.mark.parametrize("keystrokes", [
    [QUESTION[:5], QUESTION[:12], QUESTION[:5] + " " + QUESTION],  # a paste in the middle
    ["Hello there", ""],  # everything deleted, then submitted empty
    [],  # nothing typed at all
])
def test_pastes_deletions_and_empty_input_answer_as_a_plain_chat(pc: PromptCache, keystrokes: list[str]) -> None:
    result, _ = typed(pc, keystrokes)
    reference = plain(pc, keystrokes[-1] if keystrokes else "")
    assert result.text == reference.text
    assert result.first_logits is not None and (result.first_logits == reference.first_logits).all()


def test_the_last_word_is_kept_back_until_it_ends(pc: PromptCache) -> None:
    with pc.session() as chat:
        draft = chat.draft(HISTORY, speculate_after_ms=60_000 - 1)  # no speculation: only stable tokens
        draft.type("When does the mus")
        time.sleep(0.3)
        held = chat.held_tokens
        target = draft.target("When does the mus")
        assert held == target.stable < len(target.trace)
        # what is held ends before the last word: " mus" is not decoded yet
        assert target.trace.values[:held].tolist()[-4:] == [ord(c) + 3 for c in " the"]
        draft.close()


def test_speculation_makes_enter_free_and_a_keystroke_interrupts_it(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16)
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type("When does it open")
        assert draft.wait(10)
        pc._runtime.context.seconds_per_token = 0.02  # a speculation of ~10 tokens takes 0.2 s
        draft.type("When does it open?")  # punctuation: decoded with the turn's ending, speculatively
        time.sleep(0.05)  # the speculation of this text is running
        draft.type("When does it open on Sundays?")
        assert draft.wait(20)
        assert draft.stats.interrupted >= 1 and draft.stats.discarded_ms > 0
        result = draft.submit(max_tokens=4).result()
    assert result.uncached_tokens == 0 and draft.stats.ready
    assert draft.stats.max_type_ms < 1000  # type() records text; it never waits for the 0.2 s decode


def test_submit_mid_decode_waits_for_the_useful_step(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16)
    pc._runtime.context.seconds_per_token = 0.01
    with pc.session() as chat:
        draft = chat.draft(HISTORY, batch_tokens=64)
        draft.type(QUESTION)
        time.sleep(0.05)  # the conversation before it is being decoded
        result = draft.submit(max_tokens=4, keep_logits=True).result()
    pc._runtime.context.seconds_per_token = 0.0
    reference = plain(pc, QUESTION)
    assert result.first_logits is not None and (result.first_logits == reference.first_logits).all()


def test_a_foreground_call_takes_the_cache_from_the_worker(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16)
    pc._runtime.context.seconds_per_token = 0.01
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type(QUESTION * 3)
        time.sleep(0.05)
        other = pc.chat([{"role": "user", "content": "Something else"}], max_tokens=2).result()  # no BusyError
        assert other.generated_tokens == 2
        pc._runtime.context.seconds_per_token = 0.0
        assert draft.wait(20)  # the worker goes on afterwards
        result = draft.submit(max_tokens=3).result()
    assert result.uncached_tokens == 0


def test_a_message_longer_than_the_context_stops_type_ahead_and_submit_says_why(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(n_ctx=512, min_chunk_tokens=16)
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type("x" * 600)
        assert draft.wait(10)
        assert isinstance(draft.error, LayoutOverflowError)
        draft.type("short again")  # the next keystroke clears it
        assert draft.wait(10) and draft.error is None
        draft.type("y" * 600)
        with pytest.raises(LayoutOverflowError, match="n_ctx=512"):
            draft.submit(max_tokens=2).result()
    assert pc.chat([{"role": "user", "content": "still fine"}], max_tokens=1).result().generated_tokens == 1


def test_a_submitted_draft_is_finished_and_bad_settings_are_refused(pc: PromptCache) -> None:
    draft = pc.draft(HISTORY)
    draft.type("hi")
    draft.submit(max_tokens=1).result()
    with pytest.raises(SessionError, match="submitted or closed"):
        draft.type("more")
    with pytest.raises(SessionError, match="submitted or closed"):
        draft.submit()
    with pytest.raises(OptionError, match="batch_tokens"):
        pc.draft(HISTORY, batch_tokens=0)
    with pytest.raises(OptionError, match="speculate_after_ms"):
        pc.draft(HISTORY, speculate_after_ms=-1)
    with pytest.raises(OptionError, match="role must be one of"):
        pc.draft([{"role": "robot", "content": "x"}])
    with pytest.raises(OptionError, match="as a string"):
        pc.draft(HISTORY).type(3)  # type: ignore[arg-type]


def test_the_next_turn_continues_from_the_answer(pc: PromptCache) -> None:
    """Two turns typed one after the other in one session, against the same two turns as plain chats."""
    answers = []
    with pc.session() as chat:
        history = list(HISTORY)
        for question in ("When does it open?", "And when does it close?"):
            draft = chat.draft(history)
            for text in prefixes(question):
                draft.type(text)
            assert draft.wait(10)
            result = draft.submit(max_tokens=5, keep_logits=True).result()
            answers.append(result)
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.text}]
    with pc.session() as other:
        history = list(HISTORY)
        for question, typed_result in zip(("When does it open?", "And when does it close?"), answers, strict=True):
            history.append({"role": "user", "content": question})
            result = pc.chat(history, session=other, max_tokens=5, keep_logits=True).result()
            assert result.text == typed_result.text
            assert result.first_logits is not None and typed_result.first_logits is not None
            assert (result.first_logits == typed_result.first_logits).all()
            history.append({"role": "assistant", "content": result.text})
    assert answers[1].uncached_tokens == 0


def test_closing_the_cache_stops_the_worker(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=16)
    pc._runtime.context.seconds_per_token = 0.05
    draft = pc.draft(HISTORY)
    draft.type(QUESTION)
    time.sleep(0.02)
    pc.close()
    worker = pc._typeahead
    assert worker is not None and worker.thread is not None and not worker.thread.is_alive()
    assert not any(t.name == "pccpu-type-ahead" and t.is_alive() for t in threading.enumerate())
