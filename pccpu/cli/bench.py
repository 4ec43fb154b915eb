"""``pccpu bench``: time to first token of pccpu against full prefill and llama-cpp-python's own prompt cache."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from pccpu.engine.threads import available_cores


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("bench")
@click.option("--quick", is_flag=True,
              help="CI smoke run: default model, prefix and modular workloads, 512 and 1K tokens, 1 warm-up and 2 "
                   "runs (one sample for systems that decode the whole context).")
@click.option("--models", help="Comma-separated registry names or .gguf paths (default: all three bench models).")
@click.option("--sizes", help="Comma-separated cached context sizes in tokens (default 512,1024,2048,4096,8192).")
@click.option("--workloads", help="Comma-separated: prefix, modular, parameterized (default: all).")
@click.option("--systems", help="Comma-separated: full, llama-ram, llama-disk, pccpu-ram, pccpu-disk (default: all).")
@click.option("--runs", type=int, help="Measured runs per system (default 5; --quick 2).")
@click.option("--warmup", type=int, help="Warm-up runs per system (default 1).")
@click.option("--threads", type=int, help="Threads for every system (default: the physical cores available).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Results folder.")
@click.option("--resume", is_flag=True, help="Keep results.jsonl and measure only the rows it lacks.")
@click.option("--no-retrieval", is_flag=True,
              help="Skip the retrieval-accuracy task (planted facts, full prefill vs cached answers) per model.")
@click.option("--accuracy", "accuracy_questions", type=int, default=None, metavar="N",
              help="Instead of TTFT: the accuracy benchmark (bench/accuracy.py), N questions per model and size: "
                   "full prefill against documents encoded apart (isolated, after fillers), repair k = 0 and 16.")
def bench(quick: bool, models: str | None, sizes: str | None, workloads: str | None, systems: str | None,
          runs: int | None, warmup: int | None, threads: int | None, out: Path, resume: bool,
          no_retrieval: bool, accuracy_questions: int | None) -> None:
    """Measure TTFT on the prefix, modular and parameterized workloads; write results.jsonl, results.json,
    results.md and charts to --out. With --accuracy: answer quality of composed modules instead."""
    if accuracy_questions is not None:
        _accuracy(accuracy_questions, _list(models), _list(sizes), threads, out)
        return
    from pccpu.bench.report import write_reports
    from pccpu.bench.runner import DEFAULT_MODELS, DEFAULT_SIZES, QUICK_SIZES, BenchConfig, run_bench
    from pccpu.bench.systems import SYSTEMS
    from pccpu.bench.workloads import WORKLOADS
    from pccpu.models import load_registry

    logger = logging.getLogger("pccpu.bench")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        size_list = [int(s) for s in _list(sizes) or []] or list(QUICK_SIZES if quick else DEFAULT_SIZES)
    except ValueError as exc:
        raise click.BadParameter(f"sizes must be integers: {exc}", param_hint="--sizes") from exc
    try:
        config = BenchConfig(
            models=_list(models) or ([load_registry().default] if quick else list(DEFAULT_MODELS)),
            sizes=size_list,
            workloads=_list(workloads) or (["prefix", "modular"] if quick else list(WORKLOADS)),
            systems=_list(systems) or list(SYSTEMS),
            runs=runs if runs is not None else (2 if quick else 5),
            warmup=warmup if warmup is not None else 1,
            threads=threads or available_cores(),
            out=out,
            resume=resume,
            # --quick: a system that decodes the whole context (full prefill, a prefix cache that cannot reuse it)
            # is sampled once, as the full bench does above 2K; the cached systems get the warm-up and the runs.
            slow_above=256 if quick else 2048,
            retrieval=not no_retrieval,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    started = time.perf_counter()
    run_bench(config, progress=lambda line: click.echo(line, err=True))
    summary = write_reports(out)
    click.echo((out / "results.md").read_text())
    click.echo(f"results in {out} ({len(summary['rows'])} rows, {time.perf_counter() - started:.0f} s)", err=True)


def _accuracy(questions: int, models: list[str] | None, sizes: list[str] | None, threads: int | None,
              out: Path) -> None:
    """``pccpu bench --accuracy N``: bench/accuracy.py for each model and size (default qwen2.5-coder-0.5b, 2048)."""
    import argparse

    from pccpu.bench import accuracy

    if questions < 1:
        raise click.BadParameter("must be at least 1", param_hint="--accuracy")
    try:
        size_list = [int(s) for s in sizes or ["2048"]]
    except ValueError as exc:
        raise click.BadParameter(f"sizes must be integers: {exc}", param_hint="--sizes") from exc
    for model in models or ["qwen2.5-coder-0.5b"]:
        for size in size_list:
            args = argparse.Namespace(model=model, size=size, questions=questions, docs=10, repair=[0, 16],
                                      encodings=["isolated", "filler"], max_tokens=24,
                                      threads=threads or available_cores(), seed=1, out=out / "accuracy")
            report = accuracy.run(args)
            click.echo(accuracy.markdown(report["rows"], report["meta"]))
