"""Batched generation (``pccpu/service/batching.py``, ``PromptCache.batch``, the server's ``parallel``): answers
generated together equal the answers generated alone, sessions keep their cells through lanes, admission waits when
it must, and bad use is refused. The fake engine pins the logic; the real model pins llama.cpp's side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeCacheFactory
from greedy import assert_answers_close
from test_server import concurrent_answers_match_one_by_one, start_server, stop_server

from pccpu.errors import BusyError, ConfigError, InvalidArgumentError, OptionError
from pccpu.service import Batch, PromptCache, Result, Ticket


def chat(n: int) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Tell me about the number {n} in one sentence."}]


def run_to_end(batch: Batch) -> None:
    while batch.active:
        batch.step()


def results(tickets: list[Ticket | None]) -> list[Result]:
    out = []
    for ticket in tickets:
        assert ticket is not None and ticket.result is not None
        out.append(ticket.result)
    return out


# -- the fake engine: scheduling, lanes and sessions ----------------------------------------------------------
def follow_up(n: int, result: Result) -> list[dict[str, Any]]:
    return [*chat(n), {"role": "assistant", "content": result.text}, {"role": "user", "content": "More."}]


def test_batched_answers_equal_answers_alone_and_sessions_keep_their_cells(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(min_chunk_tokens=4)
    solo_sessions = [pc.session(f"solo{n}") for n in range(4)]
    alone = [pc.chat(chat(n), max_tokens=12, temperature=0, session=s).result() for n, s in enumerate(solo_sessions)]
    alone_next = [pc.chat(follow_up(n, r), max_tokens=2, session=s).result()
                  for n, (s, r) in enumerate(zip(solo_sessions, alone, strict=True))]
    pc.clear_store()
    sessions = [pc.session(f"s{n}") for n in range(4)]
    context = pc._runtime.context  # the fake engine (internal on purpose)
    with pc.batch(parallel=4) as batch:
        tickets = [batch.admit(pc.chat(chat(n), max_tokens=12, temperature=0, session=s))
                   for n, s in enumerate(sessions)]
        run_to_end(batch)
        assert batch.batched_tokens > 12  # steps of several answers happened
    assert context.step_calls > 0
    batched = results(tickets)
    assert [(r.text, r.finish_reason, r.generated_tokens) for r in batched] == \
        [(r.text, r.finish_reason, r.generated_tokens) for r in alone]
    assert sum(r.generated_tokens for r in batched) > 12
    # every session kept its conversation (parked from its lane, or still active), as the sessions answered alone
    # did: the next turn holds and decodes the same
    batched_next = [pc.chat(follow_up(n, r), max_tokens=2, session=s).result()
                    for n, (s, r) in enumerate(zip(sessions, batched, strict=True))]
    assert [(r.session_tokens, r.uncached_tokens) for r in batched_next] == \
        [(r.session_tokens, r.uncached_tokens) for r in alone_next]
    assert all(r.session_tokens > 40 for r in batched_next)


def test_an_answer_alone_in_a_batch_is_computed_as_outside_one(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache()
    alone = pc.chat(chat(1), max_tokens=6, keep_logits=True).result()
    pc.clear_store()
    context = pc._runtime.context
    with pc.batch(parallel=2) as batch:
        ticket = batch.admit(pc.chat(chat(1), max_tokens=6, keep_logits=True, session=pc.session()))
        run_to_end(batch)
    (result,) = results([ticket])
    assert context.step_calls == 0  # one answer: plain decodes, as without a batch
    assert result.text == alone.text
    assert result.first_logits is not None and alone.first_logits is not None
    assert np.array_equal(result.first_logits, alone.first_logits)


def test_admission_waits_for_lanes_cells_and_a_busy_session(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(n_ctx=512)
    one, two = pc.session("one"), pc.session("two")
    with pc.batch(parallel=2) as batch:
        first = batch.admit(pc.chat(chat(1), max_tokens=50, session=one))
        assert first is not None
        assert batch.admit(pc.chat(chat(2), max_tokens=8, session=one)) is None  # its session is busy
        too_long = pc.chat(chat(3), max_tokens=480, session=pc.session())
        assert batch.admit(too_long) is None  # the cells the first answer may still need leave too few
        second = batch.admit(pc.chat(chat(4), max_tokens=50, session=two))
        assert second is not None
        waiting = pc.chat(chat(5), max_tokens=8, session=pc.session())
        assert batch.admit(waiting) is None  # both lanes taken
        run_to_end(batch)
        third = batch.admit(waiting)  # the same answer, admitted once there is room
        assert third is not None
        run_to_end(batch)
    assert all(r.generated_tokens > 0 for r in results([first, second, third]))


def test_cancel_close_and_the_cache_afterwards(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache()
    batch = pc.batch(parallel=3)
    tickets = [batch.admit(pc.chat(chat(n), max_tokens=40, session=pc.session())) for n in range(3)]
    batch.step()
    assert tickets[0] is not None
    batch.cancel(tickets[0])
    assert tickets[0].result is not None and tickets[0].result.finish_reason == "cancelled"
    with pytest.raises(BusyError):  # the batch holds the cache
        pc.chat(chat(9), max_tokens=1).result()
    running = [t for t in tickets if t is not None and not t.done]
    assert running
    batch.close()  # stops the others
    assert all(t.result is not None and t.result.finish_reason == "cancelled" for t in running)
    assert not batch.active
    with pytest.raises(ConfigError, match="closed"):
        batch.admit(pc.chat(chat(1)))
    assert pc.chat(chat(9), max_tokens=2).result().generated_tokens == 2  # the cache is free again


def test_bad_batches_are_refused(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(n_seq_max=6)
    for bad in (0, -1, True, "2"):
        with pytest.raises(ConfigError, match="parallel"):
            pc.batch(parallel=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_seq_max"):
        pc.batch(parallel=6)  # lanes are the scratch sequences 3..5, beside the request sequence
    with pc.batch(parallel=4) as batch:
        with pytest.raises(OptionError, match="chat"):
            batch.admit(pc.complete("hello", cache=False))
        started = pc.chat(chat(1), max_tokens=2)
        assert batch.admit(started) is not None
        with pytest.raises(OptionError):  # an answer is admitted once
            batch.admit(started)


def test_a_batched_server_answers_concurrent_clients_as_one_by_one(fake_cache: FakeCacheFactory,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fake_cache(min_chunk_tokens=16)
    context = cache._runtime.context
    decode = context.decode

    def slow_decode(tokens: Any, **kwargs: Any) -> Any:
        time.sleep(0.002)  # like llama.cpp: decoding takes time, so requests overlap
        return decode(tokens, **kwargs)

    monkeypatch.setattr(context, "decode", slow_decode)
    running = start_server(cache, api_key=None, max_new_tokens=8, parallel=4)
    try:
        concurrent_answers_match_one_by_one(running, max_tokens=24)
        # a PML request (runs alone, after the answers in flight) still works beside batched chats
        schemas = running.client().get("/pml/store", cast_to=object)
    finally:
        stop_server(running)
    assert context.step_calls > 0  # answers were generated together
    assert schemas is not None


# -- the real model ------------------------------------------------------------------------------------------------
def test_decode_step_checks_before_calling_llama_cpp(default_model: Any) -> None:
    from pccpu.engine import ContextSettings, LlamaContext

    with LlamaContext(default_model, ContextSettings(n_ctx=512, n_batch=64, n_ubatch=64, n_seq_max=3)) as ctx:
        prompt = default_model.tokenize("The museum opens at nine")
        ctx.decode(prompt, seq_id=0, start=0)
        ctx.decode(prompt, seq_id=1, start=0)
        n = len(prompt)
        for steps, match in (([(1, 0, n), (2, 0, n)], "one token per sequence"),
                             ([(1, 0, n + 1), (2, 1, n)], "next token goes at"),
                             ([(1, 0, n), (10**9, 1, n)], "vocabulary"),
                             ([], "1..64"),
                             ([(1, 5, 0)], "seq_id")):
            with pytest.raises(InvalidArgumentError, match=match):
                ctx.decode_step(steps)  # type: ignore[arg-type]
        assert ctx.seq_pos_max(0) == n - 1 and ctx.seq_pos_max(1) == n - 1  # nothing was decoded
        token = int(default_model.tokenize(" and")[0])
        rows = ctx.decode_step([(token, 0, n), (token, 1, n)])
        assert rows.shape == (2, default_model.info.n_vocab)
        assert ctx.seq_pos_max(0) == n and ctx.seq_pos_max(1) == n
        # the same token after the same prompt in two sequences: the same distribution (up to rounding)
        assert int(np.argmax(rows[0])) == int(np.argmax(rows[1]))
        assert float(np.abs(rows[0] - rows[1]).max()) < 0.5


def test_real_model_batched_answers_match_answers_alone(default_model_path: Path, tmp_path: Path) -> None:
    with PromptCache(str(default_model_path), n_ctx=2048, n_threads=2, store_dir=tmp_path) as pc:
        alone = [pc.chat(chat(n), max_tokens=16, keep_logits=True, top_logprobs=5).result() for n in (3, 7, 11)]
        pc.clear_store()
        with pc.batch(parallel=3) as batch:
            tickets = [batch.admit(pc.chat(chat(n), max_tokens=16, keep_logits=True, top_logprobs=5,
                                           session=pc.session())) for n in (3, 7, 11)]
            run_to_end(batch)
            assert batch.batched_tokens > 0
        batched = results(tickets)
    # the first was prefilled alone (same cells, same logits); all are generated beside the others, where llama.cpp
    # rounds differently in the last bits (how much depends on the CPU's kernels): the same greedy answers up to a
    # near-tie, where rounding may pick the runner-up
    assert batched[0].first_logits is not None and alone[0].first_logits is not None
    assert np.array_equal(batched[0].first_logits, alone[0].first_logits)
    assert_answers_close(alone, batched)
    for a, b in zip(alone[1:], batched[1:], strict=True):
        assert a.first_logits is not None and b.first_logits is not None
        assert int(np.argmax(a.first_logits)) == int(np.argmax(b.first_logits))
