"""Boundary repair on the real default model: decoding every token of a composed module in place gives the full
prefill's logits, a prefix layout is never repaired (still bit-identical), and the accuracy benchmark's mechanics
(bench/accuracy.py) hold on a small run."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pccpu.bench.fidelity import kl_divergence
from pccpu.service import PromptCache

SCHEMA = """<schema name="gates"><system>Answer from the documents.</system><user>Documents:
<module name="a">The access code for the north gate is 4817. The bakery on the corner opens at six every morning and
sells bread, cakes and small pies to the people who live on the street.</module>
<module name="b">The access code for the east gate is 2390. The station closes at ten at night, and the last train
leaves a few minutes before, going north to the city by the river.</module></schema>"""
QUESTION = '<prompt schema="gates">{refs}What is the access code for the north gate?</user></prompt>'


@pytest.fixture(scope="module", params=["isolated", "sequential"])
def pc(request: pytest.FixtureRequest, default_model_path: Path) -> Iterator[PromptCache]:
    with PromptCache(default_model_path, mode=request.param, n_ctx=1024, store_dir=None, persist=False,
                     reuse_previous=False) as cache:
        cache.add_schema(SCHEMA)
        yield cache


def test_repairing_a_whole_composed_module_gives_the_full_prefill(pc: PromptCache) -> None:
    text = QUESTION.format(refs="<b/>" if pc.mode == "sequential" else "<a/><b/>")
    full = pc.ask(text, cache=False, max_tokens=8, keep_logits=True).result()
    unrepaired = pc.ask(text, max_tokens=8, keep_logits=True, repair_tokens=0).result()
    repaired = pc.ask(text, max_tokens=8, keep_logits=True, repair_tokens=500).result()
    b = next(m for m in repaired.modules if m.module == "b")
    assert b.composed and b.repaired_tokens == b.tokens
    before = kl_divergence(full.first_logits, unrepaired.first_logits)
    after = kl_divergence(full.first_logits, repaired.first_logits)
    if pc.mode == "isolated":  # b never saw a; repaired, every cell is the full prefill's
        assert before > 1e-3 and after < 1e-5, (before, after)
        assert repaired.text == full.text
    else:  # b was encoded after a, at its schema position: without a, a gap stays where a was (full prefill has
        # none), so only the composition is repaired. The gap dominates what is left: repaired cells are other
        # cells (other logits), about as close to full prefill (measured 0.0245 -> 0.0255 on an AVX2 EPYC, lower
        # on an AVX-512 Xeon), never much further
        assert not np.array_equal(repaired.first_logits, unrepaired.first_logits)
        assert after < 1.25 * before, (before, after)


@pytest.mark.parametrize("pc", ["sequential"], indirect=True)  # in isolated mode, b never saw a: always composed
def test_a_prefix_layout_stays_bit_identical_with_repair_on(pc: PromptCache) -> None:
    text = QUESTION.format(refs="<a/><b/>")
    full = pc.ask(text, cache=False, max_tokens=8, keep_logits=True).result()
    cached = pc.ask(text, max_tokens=8, keep_logits=True, repair_tokens=64).result()
    assert not any(m.composed or m.repaired_tokens for m in cached.modules)
    assert np.array_equal(full.first_logits, cached.first_logits) and cached.text == full.text


def test_the_accuracy_benchmark_runs_each_system_over_the_same_prompts(default_model_path: Path,
                                                                      tmp_path: Path) -> None:
    from pccpu.bench import accuracy

    args = argparse.Namespace(model=str(default_model_path), size=512, questions=8, docs=3, repair=[0, 8],
                              encodings=["isolated", "filler"], max_tokens=4, threads=2, seed=3, out=tmp_path)
    report = accuracy.run(args)
    rows = {r["system"]: r for r in report["rows"]}
    assert list(rows) == ["full", "isolated-k0", "isolated-k8", "filler-k0", "filler-k8"]
    assert all(r["questions"] == 8 for r in rows.values())
    prompt_tokens = {r["prompt_tokens_p50"] for r in rows.values()}
    assert len(prompt_tokens) == 1 and 400 < prompt_tokens.pop() < 700
    # a new request decodes: every document (full), the question only (k=0), plus k tokens of the two documents
    # placed after another (k=8)
    k0, k8 = rows["isolated-k0"]["decoded_tokens_p50"], rows["isolated-k8"]["decoded_tokens_p50"]
    assert rows["full"]["decoded_tokens_p50"] > 10 * k0 and k8 == k0 + 2 * 8
    assert rows["full"]["first_token_kl_p50"] is None and rows["isolated-k0"]["first_token_kl_p50"] > 0
    # after fillers, a document's state was computed after as much text as it follows: as many tokens decoded
    assert rows["filler-k0"]["decoded_tokens_p50"] == k0 and rows["filler-k8"]["decoded_tokens_p50"] == k8
    assert (tmp_path / f"accuracy-{default_model_path.stem}-512.md").read_text().count("| filler-k") == 2
