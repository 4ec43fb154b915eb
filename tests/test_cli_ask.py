"""The CLI commands that run the service: encode, ask, demo, cache (real default model, isolated home)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pccpu.cli import main

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.fixture
def runner(isolated_home: Path, default_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("PCCPU_MODEL", str(default_model_path))
    return CliRunner()


def test_encode_then_ask_json_reports_hits_from_disk(runner: CliRunner, isolated_home: Path) -> None:
    encoded = runner.invoke(main, ["encode", str(SCHEMAS / "travel.xml"), "--n-ctx", "1024"])
    assert encoded.exit_code == 0, encoded.output
    assert "schema travel" in encoded.output and "encoded" in encoded.output
    stored = list((isolated_home / "store" / "default").glob("*.pcm"))
    assert stored, "encode wrote no module files"

    asked = runner.invoke(main, ["ask", str(SCHEMAS / "travel.domestic.prompt.xml"), "--n-ctx", "1024",
                                 "--max-tokens", "8", "--json"])
    assert asked.exit_code == 0, asked.output
    result = json.loads(asked.output[asked.output.index("{"):])
    assert result["cached_tokens"] > 0 and result["uncached_tokens"] > 0
    assert {m["source"] for m in result["modules"]} == {"disk"}  # a new process: everything from the disk tier
    assert result["generated_tokens"] >= 1

    listing = runner.invoke(main, ["cache", "ls"])
    assert listing.exit_code == 0 and "travel" in listing.output
    stats = runner.invoke(main, ["cache", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.output)["disk_entries"] == len(stored)  # StoreStats.to_dict()
    cleared = runner.invoke(main, ["cache", "clear", "--yes"])
    assert cleared.exit_code == 0 and f"removed {len(stored)}" in cleared.output
    assert not list((isolated_home / "store" / "default").glob("*.pcm"))


def test_ask_streams_and_no_cache_gives_the_same_greedy_answer(runner: CliRunner) -> None:
    args = ["ask", str(SCHEMAS / "demo_prompt.xml"), "--schema", str(SCHEMAS / "demo.xml"), "--n-ctx", "2048",
            "--max-tokens", "12"]
    cached = runner.invoke(main, args)
    baseline = runner.invoke(main, [*args, "--no-cache"])
    assert cached.exit_code == 0 and baseline.exit_code == 0, cached.output + baseline.output
    assert "ttft" in cached.stderr
    assert cached.stdout.strip() and cached.stdout == baseline.stdout


def test_ask_with_resident_modules_gives_the_same_answer(runner: CliRunner) -> None:
    args = ["ask", str(SCHEMAS / "demo_prompt.xml"), "--schema", str(SCHEMAS / "demo.xml"), "--n-ctx", "2048",
            "--max-tokens", "12", "--no-persist"]
    plain = runner.invoke(main, args)
    resident = runner.invoke(main, [*args, "--resident-mb", "16"])
    assert plain.exit_code == 0 and resident.exit_code == 0, plain.output + resident.output
    assert resident.stdout.strip() and resident.stdout == plain.stdout


def test_demo_prints_measured_ttfts(runner: CliRunner) -> None:
    result = runner.invoke(main, ["demo", "--max-tokens", "8", "--n-ctx", "2048"])
    assert result.exit_code == 0, result.output
    assert "with the cache    ttft" in result.output and "full prefill      ttft" in result.output
    assert "speedup" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "missing.prompt.xml"], "SourceFileError: missing.prompt.xml: no such file"),
        (["encode", "missing.xml"], "SourceFileError: missing.xml: no such file"),
        (["ask", str(SCHEMAS / "demo_prompt.xml"), "--schema", "missing.xml"], "SourceFileError: missing.xml"),
        (["ask", str(SCHEMAS / "demo_prompt.xml"), "--schema", str(SCHEMAS / "travel.xml")], "demo"),
        (["ask", str(SCHEMAS / "demo_prompt.xml"), "--n-ctx", "256"], "n_ctx"),
        (["ask", str(SCHEMAS / "demo_prompt.xml"), "--model", "no-such-model"], "no-such-model"),
        (["ask", str(SCHEMAS / "demo_prompt.xml"), "--gpu-layers", "lots"], "GPU layers must be"),
    ],
)
def test_ask_errors_are_one_line_messages(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.output
    assert "Traceback" not in result.output


def test_gpu_layers_on_a_cpu_build_is_a_one_line_error(runner: CliRunner) -> None:
    from pccpu.engine import gpu_offload_supported

    if gpu_offload_supported():
        pytest.skip("this build has a GPU backend: tests/test_cuda.py covers offload")
    result = runner.invoke(main, ["ask", str(SCHEMAS / "demo_prompt.xml"), "--gpu-layers", "all"])
    assert result.exit_code != 0 and "no GPU backend" in result.output and "PCCPU_BACKEND=cuda" in result.output
    assert "Traceback" not in result.output
