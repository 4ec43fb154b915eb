"""Resident module runs (``pccpu/service/resident.py``) on the real default model, on the CPU: runs stay in the KV
cache between prompts, are taken from there without a restore, respect their cell budget, and give the answers the
host-memory path gives.

Which runs are resident and how many cells they hold is internal state with no public accessor: the tests read
``pc._residents``, ``pc._schemas`` and ``pc._runtime.reserved_cells`` for it on purpose (``pc.stats().residents``
has the public counters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from greedy import assert_answers_close
from test_service import (
    FID_PROMPT,
    FID_SCHEMA,
    MULTI_SCHEMA,
    WRAPPED_PROMPT,
    WRAPPED_SCHEMA,
    make_cache,
)

from pccpu.bench.fidelity import kl_divergence
from pccpu.service import PromptCache, Result, Session
from pccpu.store import EntryKey

BUDGET = 4 << 20  # 4 MiB: about 180 SmolLM2 cells (23 KB each), room for the small schemas below


def prefill(pc: PromptCache | Session, prompt: str, **options: Any) -> Result:
    """The prompt's prefill alone, with its logits (no token generated)."""
    return pc.ask(prompt, max_tokens=0, keep_logits=True, **options).result()


def module_keys(pc: PromptCache, schema: str) -> dict[str, EntryKey]:
    return {path: record.key for path, record in pc._schemas.get(schema).modules.items()}


def resident_modules(pc: PromptCache) -> set[EntryKey]:
    """The stored modules that have a run resident now."""
    return {key for key, _ in pc._residents._runs}


def test_runs_become_resident_and_are_reused_without_restore(default_model_path: Path) -> None:
    # reuse_previous=False: each request is assembled from the resident runs and the store, never from the previous
    # request's cells, so the second request shows the resident path
    with make_cache(default_model_path, persist=False, reuse_previous=False) as host, \
            make_cache(default_model_path, persist=False, resident_budget=BUDGET, reuse_previous=False) as pc:
        for cache in (host, pc):
            cache.add_schema(WRAPPED_SCHEMA)
        reference = prefill(host, WRAPPED_PROMPT).first_logits
        assert pc._runtime.reserved_cells == BUDGET // int(pc.kv_bytes_per_token)
        first = prefill(pc, WRAPPED_PROMPT)
        records = pc._schemas.get("wrapped").modules.values()
        n_runs = sum(len(r.ranges) for r in records)
        assert pc.stats().residents.admitted == n_runs == len(pc._residents)
        assert first.timings.restore_ms > 0
        second = prefill(pc, WRAPPED_PROMPT)
        assert second.session_tokens == 0
        residents = pc.stats().residents
        assert residents.hits == n_runs and residents.admitted == n_runs
        # the request's cells sit where the host path puts them (after the resident runs), so logits match exactly
        assert np.array_equal(first.first_logits, reference)
        assert np.array_equal(second.first_logits, reference)
        answer = pc.ask(WRAPPED_PROMPT, max_tokens=16).text()
        assert answer == host.ask(WRAPPED_PROMPT, max_tokens=16).text()
        assert pc._residents.used_cells == sum(p1 - p0 for r in records for p0, p1 in r.ranges)


ONLY_A = '<prompt schema="multi"><a/>\nWhat did the baker say?</user></prompt>'
ONLY_B = '<prompt schema="multi"><b/>\nWhat happened on Tuesday?</user></prompt>'


def test_budget_evicts_least_recently_used_runs(default_model_path: Path) -> None:
    with make_cache(default_model_path, persist=False) as host:
        host.add_schema(MULTI_SCHEMA)
        size = {path: r.n_cells for path, r in host._schemas.get("multi").modules.items()}
        per_cell = host.kv_bytes_per_token
        expected = {prompt: host.ask(prompt, max_tokens=12).text() for prompt in (ONLY_A, ONLY_B)}
    budget = int((size[""] + size["a"] + 1) * per_cell)  # holds the root with a (or b: b is smaller), not both
    assert size["b"] <= size["a"]
    with make_cache(default_model_path, persist=False, resident_budget=budget) as pc:
        pc.add_schema(MULTI_SCHEMA)
        keys = module_keys(pc, "multi")
        assert pc.ask(ONLY_B, max_tokens=12).text() == expected[ONLY_B]
        assert resident_modules(pc) == {keys[""], keys["b"]}
        assert pc.ask(ONLY_A, max_tokens=12).text() == expected[ONLY_A]  # b is dropped to make room for a
        assert resident_modules(pc) == {keys[""], keys["a"]}
        assert pc.stats().residents.evicted == 1 and pc._residents.used_cells == size[""] + size["a"]
        assert pc._residents.used_cells <= pc._residents.budget_cells
        assert pc.ask(ONLY_B, max_tokens=12).text() == expected[ONLY_B]
        # a run larger than the whole budget is refused, never half-admitted
        too_big = make_cache(default_model_path, persist=False, resident_budget=int(per_cell * 4))
        with too_big:
            too_big.add_schema(MULTI_SCHEMA)
            assert too_big.ask(ONLY_A, max_tokens=12).text() == expected[ONLY_A]
            assert len(too_big._residents) == 0 and too_big.stats().residents.refused > 0


MOVED_B = ('<prompt schema="multi"><a/> And one more thing happened this week that I forgot to write down. '
           '<b/>\nSummarise.</user></prompt>')


def test_moved_modules_are_not_made_resident(default_model_path: Path) -> None:
    """Text inserted after a pushes b right: b is restored into a private scratch and shifted, never resident
    (seq_add would move a resident run for every prompt)."""
    with make_cache(default_model_path, persist=False) as host:
        host.add_schema(MULTI_SCHEMA)
        expected = host.ask(MOVED_B, max_tokens=12).text()
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc:
        pc.add_schema(MULTI_SCHEMA)
        plan = pc.plan(MOVED_B).plan
        assert {p.module for p in plan.pieces if getattr(p, "shift", 0)} == {"b"}
        for _ in range(2):
            assert pc.ask(MOVED_B, max_tokens=12).text() == expected
        keys = module_keys(pc, "multi")
        assert resident_modules(pc) == {keys[""], keys["a"]}


def test_encoding_drops_resident_runs_and_the_baseline_keeps_them(default_model_path: Path) -> None:
    """An encode pass starts from a cleared cache (a state must not depend on where resident cells lie): resident
    runs are dropped and come back on their next use. A full-prefill baseline runs beside them and keeps them."""
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET, reuse_previous=False) as pc, \
            make_cache(default_model_path, persist=False, reuse_previous=False) as host:
        for cache in (pc, host):
            cache.add_schema(WRAPPED_SCHEMA)
        prefill(pc, WRAPPED_PROMPT)
        held = len(pc._residents)
        assert held > 0
        baseline = prefill(pc, WRAPPED_PROMPT, cache=False).first_logits
        assert len(pc._residents) == held
        for cache in (pc, host):
            cache.add_schema(MULTI_SCHEMA)  # encodes
        assert len(pc._residents) == 0
        for path, key in module_keys(pc, "multi").items():  # the same bytes as a clean encode (internal: the store)
            ours, theirs = pc._store.ram.get(key), host._store.ram.get(key)
            assert ours is not None and theirs is not None, path
            assert np.array_equal(ours.state, theirs.state), path
        again = prefill(pc, WRAPPED_PROMPT).first_logits
        assert len(pc._residents) == held and pc.stats().residents.admitted == 2 * held
        assert np.array_equal(again, prefill(host, WRAPPED_PROMPT).first_logits)
        reference = prefill(host, WRAPPED_PROMPT, cache=False).first_logits
    # the baseline's cells landed beside the resident runs, not from the first cell: close, not bit-equal
    # (KL 0.003 on an AVX2 CPU, 0.008-0.017 on an AVX-512 one); the top token agrees unless the reference's top two
    # nearly tie (30.36 against 30.27 on the AVX-512 CI machine, where they swap)
    top, second = np.sort(reference)[-2:][::-1]
    assert int(np.argmax(baseline)) == int(np.argmax(reference)) or top - second < 0.2
    assert kl_divergence(reference, baseline) < 5e-2


def test_clear_residents_drops_every_run(default_model_path: Path) -> None:
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET, reuse_previous=False) as pc:
        pc.add_schema(WRAPPED_SCHEMA)
        expected = pc.ask(WRAPPED_PROMPT, max_tokens=8).text()
        held = len(pc._residents)
        assert held > 0
        pc.clear_residents()
        assert len(pc._residents) == 0 and pc._residents.used_cells == 0
        assert pc.stats().residents.evicted == held
        assert pc.ask(WRAPPED_PROMPT, max_tokens=8).text() == expected  # restored from RAM, resident again
        assert len(pc._residents) == held


def test_answers_stop_at_n_ctx_not_in_the_resident_cells(default_model_path: Path) -> None:
    """The context has extra cells for resident runs; an answer still ends at the n_ctx the cache was made with."""
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as probe:
        probe.add_schema(FID_SCHEMA)
        prompt_tokens = probe.plan(FID_PROMPT).plan.next_position
    n_ctx = prompt_tokens + 12
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET, n_ctx=n_ctx) as pc:
        pc.add_schema(FID_SCHEMA)
        assert pc._runtime.context.n_ctx > n_ctx  # the reserved cells (internal: the context's real size)
        result = pc.ask(FID_PROMPT, max_tokens=200).result()
    assert result.finish_reason == "context"
    assert prompt_tokens + result.generated_tokens <= n_ctx + 1


def test_switching_sessions_keeps_the_resident_runs(default_model_path: Path) -> None:
    """Bringing a parked session back clears the KV cache around the resident runs, never the runs themselves."""
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc:
        pc.add_schema(WRAPPED_SCHEMA)
        pc.add_schema(FID_SCHEMA)
        one, two = pc.session(), pc.session()
        first = prefill(one, WRAPPED_PROMPT)
        held = len(pc._residents)
        assert held > 0
        prefill(two, FID_PROMPT)
        back = prefill(one, WRAPPED_PROMPT)
        assert back.session_tokens == back.prompt_tokens - 1  # the parked cells came back
        assert np.array_equal(back.first_logits, first.first_logits)
        hits = pc.stats().residents.hits
        with pc.session() as three:  # a new session assembles from the runs still resident
            again = prefill(three, WRAPPED_PROMPT)
        assert pc.stats().residents.hits > hits
        # the runs it took hold their cells: the answer is the host path's (close: cells lie around the runs)
        assert kl_divergence(first.first_logits, again.first_logits) < 5e-2


def test_a_batch_keeps_the_resident_runs_and_leaves_them_their_cells(default_model_path: Path) -> None:
    """Batched chats beside resident runs: the runs stay in the KV cache through the batch (the next PML prompt
    takes them without a restore), the batch counts only the cells the runs cannot hold as its own, and the
    batched answers are the answers given alone (up to rounding: ``greedy.py``)."""
    conversations = [[{"role": "user", "content": f"Name {n} colours, one per line."}] for n in (2, 3, 4)]
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc:
        pc.add_schema(WRAPPED_SCHEMA)
        alone = [pc.chat(m, max_tokens=12, top_logprobs=5, session=pc.session()).result() for m in conversations]
        prefill(pc, WRAPPED_PROMPT)
        held = resident_modules(pc)
        assert held
        with pc.batch(parallel=3) as batch:
            assert batch.capacity == pc._runtime.context.n_ctx - pc._residents.budget_cells
            tickets = [batch.admit(pc.chat(m, max_tokens=12, top_logprobs=5, session=pc.session()))
                       for m in conversations]
            while batch.active:
                batch.step()
            assert batch.batched_tokens > 0
        assert_answers_close(alone, [t.result if t else None for t in tickets])
        assert resident_modules(pc) == held
        hits = pc.stats().residents.hits
        with pc.session() as other:
            prefill(other, WRAPPED_PROMPT)
        assert pc.stats().residents.hits > hits
