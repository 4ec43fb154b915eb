"""Type-ahead on the real default model (SmolLM2 Q4_1, whose results do not depend on batch splits of two tokens or
more on this CPU): an answer submitted after typing, with edits, a paste, everything deleted, or mid-decode, equals
the same chat without type-ahead bit for bit; llama.cpp's decode is interrupted within a fraction of its run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pccpu.errors import DecodeInterrupted, LayoutOverflowError
from pccpu.service import PromptCache, Result

DOCUMENT = ("The lighthouse of Kerrow was built in 1871 from granite brought by boat. Its lamp burns paraffin and "
            "turns once every twelve seconds; the keeper lives in the cottage below and logs every ship. ") * 6
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer questions about the document."},
    {"role": "user", "content": DOCUMENT},
    {"role": "assistant", "content": "I have read the document."},
]


@pytest.fixture(scope="module")
def pc(default_model_path: Path) -> Iterator[PromptCache]:
    with PromptCache(default_model_path, n_ctx=2048, store_dir=None, persist=False) as cache:
        yield cache


def plain(pc: PromptCache, text: str) -> Result:
    with pc.session() as other:
        return pc.chat([*HISTORY, {"role": "user", "content": text}], session=other, max_tokens=12,
                       keep_logits=True).result()


def type_and_submit(pc: PromptCache, keystrokes: list[str], pause_s: float = 0.0) -> Result:
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        for text in keystrokes:
            draft.type(text)
            time.sleep(pause_s)
        return draft.submit(max_tokens=12, keep_logits=True).result()


def same(a: Result, b: Result) -> bool:
    assert a.first_logits is not None and b.first_logits is not None
    return a.text == b.text and bool((a.first_logits == b.first_logits).all())


QUESTION = "When was the lighthouse built, and how often does its lamp turn?"


@pytest.mark.parametrize(("name", "keystrokes", "pause_s"), [
    ("typed letter by letter", [QUESTION[:i] for i in range(1, len(QUESTION) + 1)], 0.02),
    ("edits and a changed word", ["When was the", "When was the light", "When was", "Who built the",
                                  "Who built the lighthouse?"], 0.15),
    ("a paste", ["Tell me: ", "Tell me: " + QUESTION], 0.2),
    ("everything deleted", ["When was the lighthouse", ""], 0.3),
    ("submitted mid-decode", [QUESTION], 0.0),
])
def test_an_answer_after_type_ahead_equals_the_answer_without_it(pc: PromptCache, name: str,
                                                                 keystrokes: list[str], pause_s: float) -> None:
    typed = type_and_submit(pc, keystrokes, pause_s)
    assert same(typed, plain(pc, keystrokes[-1])), name


def test_enter_after_a_pause_decodes_nothing(pc: PromptCache) -> None:
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        for i in range(1, len(QUESTION) + 1):
            draft.type(QUESTION[:i])
        assert draft.wait(60)
        result = draft.submit(max_tokens=4).result()
    assert result.uncached_tokens == 0 and draft.stats.ready
    assert draft.stats.held_tokens == draft.stats.prompt_tokens == result.session_tokens


def test_a_question_longer_than_the_context_is_refused_at_submit(pc: PromptCache) -> None:
    with pc.session() as chat:
        draft = chat.draft(HISTORY)
        draft.type("why " * 2000)
        assert draft.wait(60) and isinstance(draft.error, LayoutOverflowError)
        with pytest.raises(LayoutOverflowError, match="n_ctx=2048"):
            draft.submit(max_tokens=2).result()
    assert plain(pc, "Still there?").generated_tokens > 0


def test_interrupt_stops_a_running_decode_and_leaves_the_sequence_as_it_was(pc: PromptCache) -> None:
    context = pc._runtime.context  # the engine itself, on purpose
    tokens = pc.tokenize(DOCUMENT * 2)[:1500]
    with pc.session():  # an empty request sequence to decode into
        pc._sessions.park_active()
        timer = threading.Timer(0.05, context.interrupt)  # the decode takes ~2 s here
        timer.start()
        with pytest.raises(DecodeInterrupted):
            context.decode(tokens, seq_id=0, start=0, logits="none")
        assert context.seq_pos_max(0) == -1
        context.decode(tokens, seq_id=0, start=0, logits="none")  # the flag was cleared: this one runs through
        assert context.seq_pos_max(0) == len(tokens) - 1
        context.seq_rm(0)


def test_the_typist_benchmark_runs_and_its_answers_equal_plain_chats(tmp_path: Path, default_model_path: Path) -> None:
    import json

    from pccpu.bench.typeahead import main

    main(["--model", str(default_model_path), "--sizes", "256", "--questions", "1", "--cps", "40", "--pause-ms", "50",
          "--max-tokens", "4", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["system"]: r for r in summary["rows"]}
    assert set(rows) == {"plain", "typed-pause", "typed-no-pause"}
    assert all(r["same_answers"] == r["n"] == 1 for r in rows.values())  # SmolLM2: bit-identical
    assert rows["plain"]["decoded_after_enter_p50"] > 10  # the question and the turn, decoded after Enter
    assert rows["typed-pause"]["worker_ms_p50"] > 0  # the worker decoded while the question was typed
    trials = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(trials) == 3
    assert "typing + 50 ms" in (tmp_path / "summary.md").read_text()
