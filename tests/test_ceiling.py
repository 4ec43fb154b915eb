"""The speedup-ceiling probe (bench/ceiling.py): its cost model, and one real run on the default model."""

from __future__ import annotations

import pytest

from pccpu.bench.ceiling import CHUNK, Line, fit_line, full_prefill_ms, measure, render_markdown
from pccpu.errors import InvalidArgumentError


def test_fit_line_recovers_slope_and_intercept() -> None:
    line = fit_line(24, [0, 1024, 4096], [10.0, 12.0, 18.0])  # 10 ms + 2 ms per 1K
    assert line.w_ms == pytest.approx(10.0) and line.a_ms_per_1k == pytest.approx(2.0)
    assert line.at(2048) == pytest.approx(14.0)


def test_full_prefill_sums_batches_at_their_mean_context() -> None:
    flat = Line(CHUNK, 10.0, 0.0)
    assert full_prefill_ms(flat, 1000) == pytest.approx(10_000.0)
    growing = Line(CHUNK, 0.0, 1024.0)  # 1 ms per token per cached token: the sum of 0..n-1
    assert full_prefill_ms(growing, 1000) == pytest.approx(sum(range(1000)))


def test_sizes_must_be_whole_chunks() -> None:
    with pytest.raises(InvalidArgumentError, match="multiples of 512"):
        measure("smollm2", [700], [8], threads=1, runs=1, uncached=8)
    with pytest.raises(InvalidArgumentError, match="at most 512"):
        measure("smollm2", [512], [1000], threads=1, runs=1, uncached=8)


def test_real_probe_on_the_default_model() -> None:
    result = measure("smollm2", [512, 1024], [8], threads=2, runs=1, uncached=8)
    assert [row["cached_tokens"] for row in result["rows"]] == [512, 1024]
    assert {line["batch"] for line in result["lines"]} == {8, CHUNK}
    assert set(result["measured_ms_per_token"]["8"]) == {"0", "512", "1024"}
    for row in result["rows"]:
        # decoding 8 tokens costs far less than prefilling 500+ tokens
        assert 0 < row["uncached_decode_ms"] < row["full_prefill_ms_estimate"]
        assert row["ceiling_speedup"] > 1
        # the ideal decode uses the 512-batch line at this context: positive, below the full prefill
        assert 0 < row["ideal_decode_ms"] < row["full_prefill_ms_estimate"]
    assert "ceiling speedup" in render_markdown(result)
