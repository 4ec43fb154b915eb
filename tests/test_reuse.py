"""Reusing the previous answer's cells (pccpu/service/reuse.py): the cell traces, and real answers on the default
model that must equal answers assembled from scratch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pccpu.bench.fidelity import kl_divergence
from pccpu.pml import CachedPiece, PromptPlan, UncachedPiece
from pccpu.service import PromptCache, Result, Session
from pccpu.service.reuse import TOKEN, StateIds, common_prefix, plan_after, trace_plan

DOCS_SCHEMA = """<schema name="docs">
<system>You answer questions about the notes below.
<module name="bakery">The bakery on Elm Street opens at six and sells out of rye bread by nine on most days.</module>
<module name="station">Heavy rain flooded the underpass near the station, and buses were rerouted for a week.</module>
<module name="park">The park by the river has a new playground, a pond with ducks and a kiosk selling tea.</module>
</system></schema>"""


def docs_prompt(modules: str, question: str) -> str:
    return f'<prompt schema="docs">{modules}<user>{question}</user></prompt>'


def _plan(pieces: tuple) -> PromptPlan:
    cached = sum(p.length for p in pieces if isinstance(p, CachedPiece))
    uncached = sum(p.length for p in pieces if isinstance(p, UncachedPiece))
    return PromptPlan("s", pieces, ("",), cached, uncached, pieces[-1].end, layout=None)  # type: ignore[arg-type]


PLAN_A = _plan((CachedPiece("", 0, 0, 10), CachedPiece("m", 12, 12, 5), UncachedPiece((7, 8, 9), 17, "prompt_text")))
KEYS = {"": ("root-key", 0), "m": ("m-key", 0)}


def test_same_plan_reuses_all_but_the_last_cell() -> None:
    ids = StateIds()
    a, b = trace_plan(PLAN_A, KEYS, ids), trace_plan(PLAN_A, KEYS, ids)
    assert len(a) == 18 and list(a.positions[-3:]) == [17, 18, 19]
    assert common_prefix(a, b) == 17  # one cell is always left to decode
    assert a.decoded_cells(17) == 2


def test_prefix_stops_at_the_first_different_cell() -> None:
    ids = StateIds()
    kept = trace_plan(PLAN_A, KEYS, ids)
    other_tokens = _plan((*PLAN_A.pieces[:2], UncachedPiece((7, 5, 9, 4), 17, "prompt_text")))
    assert common_prefix(kept, trace_plan(other_tokens, KEYS, ids)) == 16  # 15 module cells + token 7
    other_state = trace_plan(PLAN_A, {**KEYS, "m": ("other-key", 0)}, ids)
    assert common_prefix(kept, other_state) == 10
    moved = _plan((PLAN_A.pieces[0], CachedPiece("m", 12, 10, 5), UncachedPiece((7, 8, 9), 15, "prompt_text")))
    assert common_prefix(kept, trace_plan(moved, KEYS, ids)) == 10  # same state, other positions
    shifted_state = trace_plan(PLAN_A, {**KEYS, "m": ("m-key", 3)}, ids)
    assert common_prefix(kept, shifted_state) == 10  # found at another start: other stored positions


def test_generated_tokens_extend_the_trace() -> None:
    ids = StateIds()
    kept = trace_plan(PLAN_A, KEYS, ids).extended([40, 41], 20)
    assert list(kept.values[-2:]) == [40, 41] and list(kept.states[-2:]) == [TOKEN, TOKEN]
    follow_up = _plan((*PLAN_A.pieces, UncachedPiece((40, 41, 42), 20, "prompt_text")))
    assert common_prefix(kept, trace_plan(follow_up, KEYS, ids)) == 20


def test_plan_after_trims_pieces() -> None:
    rest = plan_after(PLAN_A, 12)
    assert rest.pieces == (CachedPiece("m", 14, 14, 3), UncachedPiece((7, 8, 9), 17, "prompt_text"))
    rest = plan_after(PLAN_A, 16)
    assert rest.pieces == (UncachedPiece((8, 9), 18, "prompt_text"),)
    assert plan_after(PLAN_A, 0).pieces == PLAN_A.pieces


# -- real answers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pc(default_model_path: Path) -> Iterator[PromptCache]:
    with PromptCache(str(default_model_path), n_ctx=1024, n_threads=2, persist=False) as cache:
        cache.add_schema(DOCS_SCHEMA)
        yield cache


@pytest.fixture(scope="module")
def fresh(default_model_path: Path) -> Iterator[PromptCache]:
    """The same schema without reuse: every answer assembled from a cleared cache."""
    with PromptCache(str(default_model_path), n_ctx=1024, n_threads=2, persist=False,
                     reuse_previous=False) as cache:
        cache.add_schema(DOCS_SCHEMA)
        yield cache


ALL = "<bakery/><station/><park/>"


def ask(target: PromptCache | Session, prompt: str, **options: Any) -> Result:
    return target.ask(prompt, **options).result()


def test_prefix_prompt_reuses_modules_and_turn_opening(pc: PromptCache, fresh: PromptCache) -> None:
    ask(pc, docs_prompt(ALL, "When does the bakery open?"), max_tokens=4)
    second = ask(pc, docs_prompt(ALL, "Where did the rain flood?"), max_tokens=8, keep_logits=True)
    reference = ask(fresh, docs_prompt(ALL, "Where did the rain flood?"), max_tokens=8, keep_logits=True)
    baseline = ask(fresh, docs_prompt(ALL, "Where did the rain flood?"), cache=False, max_tokens=8, keep_logits=True)
    plan = pc.plan(docs_prompt(ALL, "Where did the rain flood?")).plan
    # every module cell, and the user turn's opening tokens, are held from the first answer
    assert second.session_tokens > plan.cached_tokens
    assert second.cached_tokens == 0
    assert second.uncached_tokens == second.prompt_tokens - second.session_tokens
    assert reference.session_tokens == 0
    # same cells in the same places: the logits equal those of an answer assembled from scratch, and a full prefill
    assert np.array_equal(second.first_logits, reference.first_logits)
    assert np.array_equal(second.first_logits, baseline.first_logits)
    assert second.text == reference.text == baseline.text


def test_same_prompt_twice_decodes_one_token(pc: PromptCache) -> None:
    prompt = docs_prompt(ALL, "What does the kiosk sell?")
    first = ask(pc, prompt, max_tokens=6, keep_logits=True)
    again = ask(pc, prompt, max_tokens=6, keep_logits=True)
    assert again.session_tokens == again.prompt_tokens - 1 and again.uncached_tokens == 1
    assert np.array_equal(first.first_logits, again.first_logits)
    assert again.text == first.text


def test_follow_up_turn_reuses_the_answer(pc: PromptCache, fresh: PromptCache) -> None:
    first = ask(pc, docs_prompt(ALL, "What does the kiosk sell?"), max_tokens=6)
    follow = (f'<prompt schema="docs">{ALL}<user>What does the kiosk sell?</user>'
              f"<assistant>{first.text}</assistant><user>And the bakery?</user></prompt>")
    second = ask(pc, follow, max_tokens=6, keep_logits=True)
    reference = ask(fresh, follow, max_tokens=6, keep_logits=True)
    question_tokens = pc.plan(docs_prompt(ALL, "What does the kiosk sell?")).plan.next_position
    assert second.session_tokens >= question_tokens  # the first prompt, and the answer where it tokenizes the same
    # the answer's tokens were decoded one at a time, the reference decodes them in one batch: llama.cpp's
    # single-token kernels round differently, so close, not equal
    assert int(np.argmax(second.first_logits)) == int(np.argmax(reference.first_logits))
    assert kl_divergence(reference.first_logits, second.first_logits) < 0.01


def test_modular_prompt_reuses_only_the_common_start(pc: PromptCache, fresh: PromptCache) -> None:
    ask(pc, docs_prompt("<bakery/><park/>", "What is new?"), max_tokens=2)
    second = ask(pc, docs_prompt("<station/><park/>", "What is new?"), max_tokens=6, keep_logits=True)
    reference = ask(fresh, docs_prompt("<station/><park/>", "What is new?"), max_tokens=6, keep_logits=True)
    plan = pc.plan(docs_prompt("<station/><park/>", "What is new?")).plan
    first_piece = plan.pieces[0]
    assert second.session_tokens == first_piece.length  # the system text before the first module
    assert second.cached_tokens == plan.cached_tokens - first_piece.length
    assert np.array_equal(second.first_logits, reference.first_logits)


def test_full_prefill_starts_over_and_encoding_keeps_the_session(pc: PromptCache) -> None:
    prompt = docs_prompt(ALL, "Who sells tea?")
    held = pc.plan(prompt).plan.next_position - 1  # all but the last cell
    encoded_before = pc.stats().encode.tokens
    ask(pc, prompt, max_tokens=2)
    assert ask(pc, prompt, cache=False, max_tokens=2).session_tokens == 0
    assert ask(pc, prompt, max_tokens=2).session_tokens == 0  # the full prefill left nothing to reuse
    ask(pc, prompt, max_tokens=2)
    same_text = DOCS_SCHEMA.replace('name="docs"', 'name="docs2"')
    pc.add_schema(same_text)  # its states are stored already: nothing is encoded, the cells stay valid
    assert pc.stats().encode.tokens == encoded_before
    assert ask(pc, prompt, max_tokens=2).session_tokens == held
    pc.add_schema(same_text.replace("notes", "memos").replace('name="docs2"', 'name="docs3"'))  # encodes
    assert pc.stats().encode.tokens > encoded_before
    # encoding cleared the KV cache, but parked the session first: its cells come back
    assert ask(pc, prompt, max_tokens=2).session_tokens == held


# -- sessions ------------------------------------------------------------------------------------------------------
def test_three_conversations_back_and_forth_are_never_prefilled_again(pc: PromptCache, fresh: PromptCache) -> None:
    """Three sessions, each a growing conversation, asked in turn: every turn decodes only its new tokens, and its
    first-token logits equal those of the same conversation asked without switching."""
    questions = {"a": ["When does the bakery open?", "And on Sundays?"],
                 "b": ["Where did the rain flood?", "For how long?"],
                 "c": ["What is new in the park?", "Is there tea?"]}
    sessions = {name: pc.session(name) for name in questions}
    history = dict.fromkeys(questions, "")
    first_prompt_cells: dict[str, int] = {}
    for turn in range(2):
        for name, chat in sessions.items():
            history[name] += f"<user>{questions[name][turn]}</user>"
            prompt = f'<prompt schema="docs">{ALL}{history[name]}</prompt>'
            result = ask(chat, prompt, max_tokens=6, keep_logits=True)
            if not turn:
                first_prompt_cells[name] = pc.plan(prompt).plan.next_position
            else:
                # the whole first prompt (and the answer, where it tokenizes the same) came back from the parked
                # session: nothing restored from the module store, only the new turn decoded
                assert result.session_tokens >= first_prompt_cells[name]
                assert result.cached_tokens == 0
                # the same conversation on its own, never switched away from
                alone = fresh.session(f"{name}-alone")
                reference = ask(alone, prompt, max_tokens=6, keep_logits=True)
                alone.close()
                assert int(np.argmax(result.first_logits)) == int(np.argmax(reference.first_logits))
                assert kl_divergence(reference.first_logits, result.first_logits) < 0.01
            history[name] += f"<assistant>{result.text}</assistant>"
    stats = pc.stats().sessions
    assert stats.parked >= 2 and stats.switches >= 6
    for chat in sessions.values():
        chat.close()


def test_switching_back_gives_bit_identical_logits(pc: PromptCache) -> None:
    """A session parked and brought back holds exactly the cells it left: asking the same prompt again gives the
    same logits as asking it twice without a switch."""
    prompt = docs_prompt(ALL, "Which street is the bakery on?")
    other = docs_prompt("<park/>", "Any ducks?")
    with pc.session() as one, pc.session() as two:
        ask(one, prompt, max_tokens=3)
        ask(two, other, max_tokens=3)  # parks one
        back = ask(one, prompt, max_tokens=3, keep_logits=True)
        again = ask(one, prompt, max_tokens=3, keep_logits=True)
    assert back.session_tokens == back.prompt_tokens - 1 and back.timings.switch_ms > 0
    assert np.array_equal(back.first_logits, again.first_logits)
