"""Resident module runs (``pccpu/service/resident.py``) on the real default model, on the CPU: runs stay in the KV
cache between prompts, are taken from there without a restore, respect their cell budget, and give the answers the
host-memory path gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from test_service import (
    FID_PROMPT,
    FID_SCHEMA,
    MULTI_SCHEMA,
    WRAPPED_PROMPT,
    WRAPPED_SCHEMA,
    first_logits,
    kl,
    make_cache,
)

from pccpu.service.prompt_cache import PromptCache

BUDGET = 4 << 20  # 4 MiB: about 180 SmolLM2 cells (23 KB each), room for the small schemas below


def cached(pc: PromptCache, prompt: str, **options: Any) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    plan = pc.plan(prompt)
    try:
        logits = pc._prefill_cached(plan, timings)[0]
        return np.array(logits, dtype=np.float64), timings
    finally:
        pc.runtime.context.seq_rm(0)


def test_runs_become_resident_and_are_reused_without_restore(default_model_path: Path) -> None:
    with make_cache(default_model_path, persist=False) as host, \
            make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc:
        for cache in (host, pc):
            cache.add_schema(WRAPPED_SCHEMA)
        reference = first_logits(host, WRAPPED_PROMPT)
        assert pc.runtime.reserved_cells == BUDGET // int(pc.settings.kv_bytes_per_token(pc.runtime.model))
        first, t1 = cached(pc, WRAPPED_PROMPT)
        n_runs = sum(len(r) for r in pc._schemas["wrapped"].ranges.values())
        assert pc.residents.stats.admitted == n_runs == len(pc.residents)
        assert t1["restore_ms"] > 0
        second, _ = cached(pc, WRAPPED_PROMPT)
        assert pc.residents.stats.hits == n_runs and pc.residents.stats.admitted == n_runs
        # the request's cells sit where the host path puts them (after the resident runs), so logits match exactly
        assert np.array_equal(first, reference)
        assert np.array_equal(second, reference)
        answer = pc.ask(WRAPPED_PROMPT, max_tokens=16)
        assert answer.text == host.ask(WRAPPED_PROMPT, max_tokens=16).text
        assert pc.residents.used_cells == sum(p1 - p0 for r in pc._schemas["wrapped"].ranges.values()
                                              for p0, p1 in r)


ONLY_A = '<prompt schema="multi"><a/>\nWhat did the baker say?</user></prompt>'
ONLY_B = '<prompt schema="multi"><b/>\nWhat happened on Tuesday?</user></prompt>'


def test_budget_evicts_least_recently_used_runs(default_model_path: Path) -> None:
    with make_cache(default_model_path, persist=False) as host:
        host.add_schema(MULTI_SCHEMA)
        ranges = host._schemas["multi"].ranges
        size = {path: sum(p1 - p0 for p0, p1 in r) for path, r in ranges.items()}
        per_cell = host.settings.kv_bytes_per_token(host.runtime.model)
        expected = {prompt: host.ask(prompt, max_tokens=12).text for prompt in (ONLY_A, ONLY_B)}
    budget = int((size[""] + size["a"] + 1) * per_cell)  # holds the root with a (or b: b is smaller), not both
    assert size["b"] <= size["a"]
    with make_cache(default_model_path, persist=False, resident_budget=budget) as pc:
        pc.add_schema(MULTI_SCHEMA)
        keys = pc._schemas["multi"].keys
        assert pc.ask(ONLY_B, max_tokens=12).text == expected[ONLY_B]
        assert {key for key, _ in pc.residents._runs} == {keys[""], keys["b"]}
        assert pc.ask(ONLY_A, max_tokens=12).text == expected[ONLY_A]  # b is dropped to make room for a
        assert {key for key, _ in pc.residents._runs} == {keys[""], keys["a"]}
        assert pc.residents.stats.evicted == 1 and pc.residents.used_cells == size[""] + size["a"]
        assert pc.residents.used_cells <= pc.residents.budget_cells
        assert pc.ask(ONLY_B, max_tokens=12).text == expected[ONLY_B]
        # a run larger than the whole budget is refused, never half-admitted
        too_big = make_cache(default_model_path, persist=False, resident_budget=int(per_cell * 4))
        with too_big:
            too_big.add_schema(MULTI_SCHEMA)
            assert too_big.ask(ONLY_A, max_tokens=12).text == expected[ONLY_A]
            assert len(too_big.residents) == 0 and too_big.residents.stats.refused > 0


MOVED_B = ('<prompt schema="multi"><a/> And one more thing happened this week that I forgot to write down. '
           '<b/>\nSummarise.</user></prompt>')


def test_moved_modules_are_not_made_resident(default_model_path: Path) -> None:
    """Text inserted after a pushes b right: b is restored into a private scratch and shifted, never resident
    (seq_add would move a resident run for every prompt)."""
    with make_cache(default_model_path, persist=False) as host:
        host.add_schema(MULTI_SCHEMA)
        expected = host.ask(MOVED_B, max_tokens=12).text
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc:
        pc.add_schema(MULTI_SCHEMA)
        plan = pc.plan(MOVED_B)
        assert {p.module for p in plan.pieces if getattr(p, "shift", 0)} == {"b"}
        for _ in range(2):
            assert pc.ask(MOVED_B, max_tokens=12).text == expected
        keys = pc._schemas["multi"].keys
        assert {key for key, _ in pc.residents._runs} == {keys[""], keys["a"]}


def test_encoding_drops_resident_runs_and_the_baseline_keeps_them(default_model_path: Path) -> None:
    """An encode pass starts from a cleared cache (a state must not depend on where resident cells lie): resident
    runs are dropped and come back on their next use. A full-prefill baseline runs beside them and keeps them."""
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as pc, \
            make_cache(default_model_path, persist=False) as host:
        for cache in (pc, host):
            cache.add_schema(WRAPPED_SCHEMA)
        cached(pc, WRAPPED_PROMPT)
        held = len(pc.residents)
        assert held > 0
        baseline = first_logits(pc, WRAPPED_PROMPT, cache=False)
        assert len(pc.residents) == held
        for cache in (pc, host):
            cache.add_schema(MULTI_SCHEMA)  # encodes
        assert len(pc.residents) == 0
        for path, key in pc._schemas["multi"].keys.items():  # the same bytes as a clean encode
            ours, theirs = pc.store.lookup(key, pc._expect()), host.store.lookup(key, host._expect())
            assert ours is not None and theirs is not None, path
            assert np.array_equal(ours.entry.state, theirs.entry.state), path
        again, _ = cached(pc, WRAPPED_PROMPT)
        assert len(pc.residents) == held and pc.residents.stats.admitted == 2 * held
        assert np.array_equal(again, first_logits(host, WRAPPED_PROMPT))
        reference = first_logits(host, WRAPPED_PROMPT, cache=False)
    # the baseline's cells landed beside the resident runs, not from the first cell: close, not bit-equal
    # (KL 0.003 on an AVX2 CPU, 0.017 on an AVX-512/AMX one)
    assert int(np.argmax(baseline)) == int(np.argmax(reference)) and kl(reference, baseline) < 5e-2


def test_answers_stop_at_n_ctx_not_in_the_resident_cells(default_model_path: Path) -> None:
    """The context has extra cells for resident runs; an answer still ends at the n_ctx the cache was made with."""
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET) as probe:
        probe.add_schema(FID_SCHEMA)
        prompt_tokens = probe.plan(FID_PROMPT).next_position
    n_ctx = prompt_tokens + 12
    with make_cache(default_model_path, persist=False, resident_budget=BUDGET, n_ctx=n_ctx) as pc:
        pc.add_schema(FID_SCHEMA)
        assert pc.runtime.context.n_ctx > n_ctx  # the reserved cells
        result = pc.ask(FID_PROMPT, max_tokens=200)
    assert result.finish_reason == "context"
    assert prompt_tokens + result.generated_tokens <= n_ctx + 1
