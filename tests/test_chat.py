"""Chats without a schema (pccpu/service/chat.py): messages become stored chunks, restored after the same
conversation prefix in any session and after a restart, with the full-prefill answer. Fast tests on the fake engine,
one on the real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeCacheFactory

from pccpu.errors import LayoutOverflowError, OptionError
from pccpu.service import PromptCache, Result
from pccpu.service.chat import build_chunks

DOC = "The clock museum of Lindenfeld opens at nine and closes at five. " * 6


def conversation(*turns: str, system: str = "You answer from the document.") -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": [{"type": "text", "text": DOC},
                                                                   {"type": "text", "text": turns[0]}]}]
    for i, turn in enumerate(turns[1:]):
        messages += [{"role": "assistant", "content": f"Answer {i}."}, {"role": "user", "content": turn}]
    return messages


def chat(pc: PromptCache, messages: list[dict[str, Any]], **options: Any) -> Result:
    return pc.chat(messages, **options).result()


@pytest.fixture
def pc(fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache(min_chunk_tokens=16)
    return cache


@pytest.mark.parametrize(("messages", "message"), [
    ([], "at least one message"),
    ([{"role": "robot", "content": "hi"}], "role must be one of"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "images and audio are not supported"),
    ([{"role": "user", "content": 3}], "must be a string or a non-empty list"),
    (["hello"], "must be an object"),
    ([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "yes"}]}],
     r"content\[0\].cache_control must be"),
    ([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}]}],
     "ephemeral"),
])
def test_bad_messages_are_option_errors(pc: PromptCache, messages: list[Any], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        chat(pc, messages)


def test_a_conversation_longer_than_the_context_is_refused(fake_cache: FakeCacheFactory) -> None:
    small = fake_cache(n_ctx=256)
    with pytest.raises(LayoutOverflowError, match="n_ctx=256"):
        chat(small, conversation("x" * 400))
    assert chat(small, [{"role": "user", "content": "hi"}], max_tokens=1).generated_tokens == 1


def test_chunks_chain_their_keys_and_merge_small_messages(pc: PromptCache) -> None:
    runtime = pc._runtime  # internal on purpose: chunking is a pure function of the runtime's tokenizer and roles
    # the fake tokenizer gives a token per byte: the system turn is ~40 tokens, merged into the document's chunk
    first = build_chunks(conversation("When?"), runtime, seed="s", n_ctx=4096, min_chunk_tokens=64)
    longer = build_chunks(conversation("When?", "And on Sundays?"), runtime, seed="s", n_ctx=4096,
                          min_chunk_tokens=64)
    other = build_chunks(conversation("When?", system="Be brief."), runtime, seed="s", n_ctx=4096,
                         min_chunk_tokens=64)
    # the short question travels with the assistant's opening, which is never stored
    assert [c.label for c in first] == ["message 0 .. message 1 part 0", "message 1 part 1 .. assistant opening"]
    assert first[0].key is not None and first[1].key is None
    assert longer[0].key == first[0].key  # the same prefix, the same stored chunk
    assert other[0].key != first[0].key  # another system message: nothing after it is shared
    assert [c.start for c in longer] == [0, *np.cumsum([len(c.tokens) for c in longer])[:-1]]
    one_by_one = build_chunks(conversation("When?"), runtime, seed="s", n_ctx=4096, min_chunk_tokens=1)
    assert [c.label for c in one_by_one] == ["message 0", "message 1 part 0", "message 1 part 1", "assistant opening"]
    assert [c.key is None for c in one_by_one] == [False, False, False, True]
    assert build_chunks(conversation("When?"), runtime, seed="t", n_ctx=4096, min_chunk_tokens=64)[0].key \
        != first[0].key


@pytest.mark.parametrize("reuse", ["exact", "compose"])
def test_a_cache_control_marker_ends_a_chunk_however_short(pc: PromptCache, reuse: str) -> None:
    runtime = pc._runtime
    instruction = "Answer in French."  # far below min_chunk_tokens: merged into the next chunk unless marked
    plain = [{"role": "system", "content": "You answer from the document."},
             {"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "text", "text": DOC},
                                          {"type": "text", "text": "When?"}]}]
    marked = [plain[0], {"role": "user", "content": [
        {"type": "text", "text": instruction, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": DOC}, {"type": "text", "text": "When?"}]}]
    unmarked = build_chunks(plain, runtime, seed="s", n_ctx=4096, min_chunk_tokens=64, reuse=reuse)  # type: ignore[arg-type]
    chunks = build_chunks(marked, runtime, seed="s", n_ctx=4096, min_chunk_tokens=64, reuse=reuse)  # type: ignore[arg-type]
    assert "message 1 part 0" not in [c.label for c in unmarked]  # merged with a neighbour
    assert "message 1 part 0" in [c.label for c in chunks]  # a module of its own
    part = next(c for c in chunks if c.label == "message 1 part 0")
    assert part.key is not None and len(part.tokens) < 64
    # the same tokens at the same places: only where the chunks end differs
    assert [t for c in chunks for t in c.tokens] == [t for c in unmarked for t in c.tokens]


@pytest.mark.parametrize("reuse", ["exact", "compose"])
def test_a_marked_short_part_is_reused_by_the_next_request(fake_cache: FakeCacheFactory, reuse: str) -> None:
    pc = fake_cache(min_chunk_tokens=64, chat_reuse=reuse)
    instruction = "Answer in French, briefly."  # short, and followed by a short question: merged unless marked

    def ask(system: str, question: str, marker: bool) -> Result:
        part: dict[str, Any] = {"type": "text", "text": instruction}
        if marker:
            part["cache_control"] = {"type": "ephemeral"}
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [part, {"type": "text", "text": question}]}]
        return chat(pc, messages, max_tokens=1, session=pc.session())

    # exact mode reuses after the same system message; compose mode after another one too
    second_system = "You are helpful." if reuse == "exact" else "You are a different assistant."
    ask("You are helpful.", "When?", marker=False)
    assert ask(second_system, "Where?", marker=False).cached_tokens == 0  # nothing short was stored
    pc.clear_store()
    ask("You are helpful.", "When?", marker=True)
    again = ask(second_system, "Where?", marker=True)
    parts = [m for m in again.modules if m.module.endswith("message 1 part 0") and m.source in ("ram", "disk")]
    assert parts and again.cached_tokens >= parts[0].tokens > 0, again.modules


def test_a_chat_is_stored_and_restored_with_the_full_prefill_answer(pc: PromptCache) -> None:
    messages = conversation("When does it open?")
    first = chat(pc, messages, max_tokens=4, keep_logits=True)
    assert first.cached_tokens == 0 and {m.source for m in first.modules} == {"encoded", "uncached"}
    full = chat(pc, messages, cache=False, max_tokens=4, keep_logits=True)
    assert np.array_equal(first.first_logits, full.first_logits) and first.text == full.text
    with pc.session() as other:  # another conversation with the same start: the stored chunks come back
        again = pc.chat(messages, session=other, max_tokens=4, keep_logits=True).result()
    assert again.session_tokens == 0
    assert again.cached_tokens == sum(m.tokens for m in first.modules if m.source == "encoded")
    assert again.uncached_tokens == sum(m.tokens for m in first.modules if m.source == "uncached")
    assert np.array_equal(again.first_logits, full.first_logits)


def test_a_follow_up_reuses_the_session_and_stores_the_earlier_turn(pc: PromptCache) -> None:
    first = chat(pc, conversation("When does it open?"), max_tokens=3)
    follow = conversation("When does it open?", "And when does it close?")
    follow[2]["content"] = first.text
    second = chat(pc, follow, max_tokens=3, keep_logits=True)
    assert second.session_tokens >= sum(m.tokens for m in first.modules)  # the whole first prompt was held
    assert second.cached_tokens == 0
    full = chat(pc, follow, cache=False, max_tokens=3, keep_logits=True)
    assert np.array_equal(second.first_logits, full.first_logits)
    with pc.session() as fresh:  # the first turn and its answer were stored as chunks meanwhile
        third = pc.chat(follow, session=fresh, max_tokens=3).result()
    assert third.cached_tokens > second.uncached_tokens


def test_a_changed_earlier_message_is_not_reused(pc: PromptCache) -> None:
    chat(pc, conversation("When does it open?"), max_tokens=2)
    with pc.session() as other:
        changed = pc.chat(conversation("When does it open?", system="Be brief."), session=other,
                          max_tokens=2).result()
    assert changed.cached_tokens == 0 and changed.session_tokens == 0


def test_a_chat_after_a_restart_comes_from_disk(default_model_path: Path, tmp_path: Path) -> None:
    messages = conversation("When does the museum open?")
    with PromptCache(str(default_model_path), n_ctx=1024, n_threads=2, store_dir=tmp_path,
                     min_chunk_tokens=16) as first:
        computed = chat(first, messages, max_tokens=8)
    assert {m.source for m in computed.modules} == {"encoded", "uncached"}
    with PromptCache(str(default_model_path), n_ctx=1024, n_threads=2, store_dir=tmp_path,
                     min_chunk_tokens=16) as again:
        restored = chat(again, messages, max_tokens=8, keep_logits=True)
        full = chat(again, messages, cache=False, max_tokens=8, keep_logits=True)
    assert "disk" in {m.source for m in restored.modules} and restored.cached_tokens > 0
    assert np.array_equal(restored.first_logits, full.first_logits)
    assert restored.text == full.text == computed.text


def test_a_document_in_the_first_question_reaches_the_store(fake_cache: FakeCacheFactory, tmp_path: Path) -> None:
    """The first turn's last message (a document and its question in one string) is stored, and so it survives a
    restart: asking that first turn again restores it."""
    store = tmp_path / "store"
    first_turn = [{"role": "system", "content": "Answer from the document."},
                  {"role": "user", "content": "Document: " + DOC + "\nWhen does it open?"}]
    before = fake_cache(store_dir=store, min_chunk_tokens=16)
    asked = chat(before, first_turn, max_tokens=3)
    follow = [*first_turn, {"role": "assistant", "content": asked.text}, {"role": "user", "content": "And Sundays?"}]
    chat(before, follow, max_tokens=3)  # the session holds the first turn; it is stored from the held cells
    after = fake_cache(store_dir=store, min_chunk_tokens=16)  # a restart: only the disk tier is shared
    again = chat(after, first_turn, max_tokens=3, keep_logits=True)
    opening = len(after.tokenize("<|im_start|>assistant\n"))
    assert again.cached_tokens > len(DOC) and again.uncached_tokens == opening  # only the opening decoded
    full = chat(after, first_turn, cache=False, max_tokens=3, keep_logits=True)
    assert np.array_equal(again.first_logits, full.first_logits)


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "16"])
def test_a_bad_min_chunk_tokens_is_refused(fake_cache: FakeCacheFactory, value: object) -> None:
    from pccpu.errors import ConfigError

    with pytest.raises(ConfigError, match="min_chunk_tokens must be an integer >= 1"):
        fake_cache(min_chunk_tokens=value)


def test_the_default_keeps_a_short_question_as_a_module_of_its_own(fake_cache: FakeCacheFactory) -> None:
    # the measured default (16 tokens): a 20-token question is stored alone, so a conversation continued from the
    # store (another session, a restart) decodes no more than the new turn
    runtime = fake_cache()._runtime
    question = "When does it open?!!"  # 20 tokens with the fake tokenizer (a token per byte)
    labels = [c.label for c in build_chunks(conversation(question, "And then?"), runtime, seed="s", n_ctx=4096)]
    assert "message 1 part 1" in labels
