"""The benchmark: pure parts (bound, tables, resume) and a smoke run of the quick bench on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pccpu.bench.report import bound_ms, render_markdown, summarize
from pccpu.bench.runner import append_records, done_keys, load_records, pending_systems, row_key, sample_counts
from pccpu.bench.systems import longest_prefix


def _row(system: str, ttfts: list[float], **extra: object) -> dict:
    base = {"kind": "row", "model": "m", "model_file": "m.gguf", "model_sha256": "ab", "workload": "prefix",
            "size": 512, "system": system, "cached_tokens": 500, "prompt_tokens": 530, "uncached_tokens": 30,
            "kv_bytes_per_token_theory": 1000.0, "memory_bandwidth_bytes_per_s": 1e9,
            "disk_bandwidth_bytes_per_s": 5e8, "samples": [{"ttft_ms": t, "first_token": "a", "state_bytes": 500_000,
                                                             "timings": {"decode_ms": 10.0, "parse_ms": 1.0,
                                                                         "lookup_ms": 0.5, "restore_ms": 0.5,
                                                                         "copy_ms": 0.1}} for t in ttfts]}
    return dict(base, **extra)


def test_bound_is_decode_plus_copy_time() -> None:
    assert bound_ms(10.0, 2e9, 1e9) == pytest.approx(2010.0)
    assert bound_ms(10.0, 0, 1e9) == 10.0
    assert bound_ms(10.0, 1e6, None) is None


def test_summary_speedup_and_ratio_to_bound() -> None:
    records = [_row("full", [1000.0]), _row("pccpu-ram", [12.0, 11.0, 20.0]), _row("pccpu-disk", [13.0])]
    summary = summarize(records)
    rows = {r["system"]: r for r in summary["rows"]}
    assert rows["full"]["speedup"] == 1.0 and rows["full"]["bound_ms"] is None
    ram = rows["pccpu-ram"]
    assert ram["ttft_ms"] == {"median": 12.0, "min": 11.0, "max": 20.0, "n": 3}
    assert ram["speedup"] == pytest.approx(1000 / 12)
    assert ram["bound_ms"] == pytest.approx(10.0 + 500 * 1000 / 1e9 * 1000)  # decode + 0.5 MB at 1 GB/s
    assert rows["pccpu-disk"]["bound_ms"] == pytest.approx(10.0 + 500 * 1000 / 5e8 * 1000)  # disk bandwidth
    assert ram["bound_speedup"] == pytest.approx(1000 / 10.5) and rows["full"]["bound_speedup"] is None
    group = summary["groups"][0]
    assert group["overhead_ms"] == pytest.approx(2.1)
    assert group["stored_bytes_per_cached_token"] == 1000
    assert group["top1_agreement"] == 1.0


def test_markdown_table_has_one_line_per_row() -> None:
    summary = summarize([_row("full", [1000.0]), _row("pccpu-ram", [12.0, 11.0])])
    text = render_markdown(summary)
    lines = [line for line in text.splitlines() if line.startswith("| prefix | m |")]
    assert len(lines) == 3  # two TTFT rows and one metrics row
    assert "| pccpu-ram | 11.5 [11.0-12.0] | 87.0x | 1.1x | 95.2x |" in text  # bound 10.5 ms: 1000 / 10.5
    assert "1000 [1000-1000] (n=1)" in text


def test_resume_skips_rows_done_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_records(path, [{"kind": "meta"}, _row("full", [1.0]), _row("pccpu-ram", [1.0])])
    with path.open("a") as f:
        f.write('{"kind": "row", "model": "m", "work')  # interrupted mid-write
    records = load_records(path)
    assert len(records) == 3
    done = done_keys(records)
    assert done == {row_key("m", "prefix", 512, "full"), row_key("m", "prefix", 512, "pccpu-ram")}
    assert pending_systems(["full", "llama-ram", "pccpu-ram"], done, "m", "prefix", 512) == ["llama-ram"]
    assert pending_systems(["full"], done, "m", "prefix", 1024) == ["full"]


def test_sample_counts_measure_slow_systems_once_above_the_threshold() -> None:
    assert sample_counts(4096, 4100, 1, 5, 2048) == (0, 1)
    assert sample_counts(4096, 30, 1, 5, 2048) == (1, 5)
    assert sample_counts(1024, 1100, 1, 5, 2048) == (1, 5)
    assert longest_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_quick_bench_smoke(tmp_path: Path) -> None:
    from pccpu.cli import main

    out = tmp_path / "results"
    args = ["bench", "--quick", "--sizes", "128", "--runs", "1", "--warmup", "0", "--workloads", "prefix,modular",
            "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("results.jsonl", "results.json", "results.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "results.json").read_text())
    seen = {(r["workload"], r["system"]) for r in summary["rows"]}
    for workload in ("prefix", "modular"):
        for system in ("full", "llama-ram", "llama-disk", "pccpu-ram", "pccpu-disk"):
            assert (workload, system) in seen
    assert all(r["ttft_ms"]["n"] == 1 for r in summary["rows"])
    table = (out / "results.md").read_text()
    assert table.count("| pccpu-disk |") == 2
    assert summary["machine"]["threads_used"] >= 1
    kls = [g["first_token_kl"] for g in summary["groups"]]
    assert all(k is not None and k >= 0 for k in kls)
    (quality,) = summary["quality"]
    assert quality["questions"] == 2 and len(quality["answers"]) == 2
    assert 0 <= quality["full_accuracy"] <= 1 and 0 <= quality["cached_accuracy"] <= 1
    assert all(a["cached_tokens"] > 0 and a["full"] and a["cached"] for a in quality["answers"])
    assert "Retrieval accuracy" in table
    # resume: nothing left to measure, the same rows come back
    again = CliRunner().invoke(main, [*args, "--resume"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "done already" in again.output
    assert len(json.loads((out / "results.json").read_text())["quality"]) == 1


def test_planted_fact_sits_at_its_depth_in_whole_words() -> None:
    from pccpu.bench.retrieval import fact, plant

    doc = " ".join(f"Sentence number {i} is here." for i in range(40))
    for depth in (0.25, 0.5, 0.75):
        planted = plant(doc, fact(0), depth)
        at = planted.index(fact(0))
        assert abs(at / len(doc) - depth) < 0.05
        assert planted[at - 2 : at] == ". " and planted.replace(fact(0) + " ", "") == doc
