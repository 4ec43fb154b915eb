"""Running the benchmark: models x workloads x sizes, every system of a row measured in turn (alternating, run by
run), raw rows appended to ``results.jsonl`` as each row finishes so that ``--resume`` continues an interrupted run.

Sample counts: ``warmup`` then ``runs`` per system, except that above ``slow_above`` cached tokens a system that
decodes more than ``slow_above`` tokens (full prefill, a prefix cache that cannot reuse the context) is measured once
without warm-up: a full prefill of 8K tokens on the 1.5B model takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pccpu.bench import machine
from pccpu.bench.corpus import corpus_text
from pccpu.bench.retrieval import run_retrieval
from pccpu.bench.systems import (
    SYSTEMS,
    LlamaCacheSide,
    PccpuSide,
    RunSettings,
    first_token_kl,
    run_disk_worker,
)
from pccpu.bench.workloads import WORKLOADS, Workload, build_workload
from pccpu.fingerprint import file_sha256_cached

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192)
QUICK_SIZES = (512, 1024)
DEFAULT_MODELS = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
RESULTS_FILE = "results.jsonl"


@dataclass
class BenchConfig:
    models: list[str]
    sizes: list[int]
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    runs: int = 5
    warmup: int = 1
    threads: int = 2
    out: Path = Path("bench/results")
    resume: bool = False
    slow_above: int = 2048
    retrieval: bool = True  # the retrieval-accuracy questions (retrieval.py) on the modular row of the smallest size

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS] + [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown workloads/systems {unknown}; workloads: {', '.join(WORKLOADS)}; "
                             f"systems: {', '.join(SYSTEMS)}")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("runs and threads must be >= 1 and warmup >= 0")


# -- results file and resume -------------------------------------------------------------------------------------
def row_key(model: str, workload: str, size: int, system: str) -> str:
    return f"{model}|{workload}|{size}|{system}"


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON record of a results file; a torn last line (an interrupted write) is skipped."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.warning("%s:%d is not valid JSON (an interrupted write?); ignored", path, number)
    return records


def done_keys(records: Iterable[dict[str, Any]]) -> set[str]:
    return {row_key(r["model"], r["workload"], r["size"], r["system"]) for r in records if r.get("kind") == "row"}


def pending_systems(systems: Iterable[str], done: set[str], model: str, workload: str, size: int) -> list[str]:
    """The systems of one row still to measure."""
    return [s for s in systems if row_key(model, workload, size, s) not in done]


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()


def sample_counts(cached_size: int, decoded_tokens: int, warmup: int, runs: int, slow_above: int) -> tuple[int, int]:
    """(warm-up, measured) runs for a system that decodes ``decoded_tokens`` tokens per request."""
    if cached_size > slow_above and decoded_tokens > slow_above:
        return 0, 1
    return warmup, runs


# -- the run -----------------------------------------------------------------------------------------------------
Progress = Callable[[str], None]


def run_bench(config: BenchConfig, progress: Progress | None = None) -> Path:
    """Measure everything ``config`` asks for; the path of ``results.jsonl``."""
    from pccpu.engine import LlamaModel
    from pccpu.models import resolve_model

    say = progress or logger.info
    config.out.mkdir(parents=True, exist_ok=True)
    results = config.out / RESULTS_FILE
    if not config.resume and results.exists():
        results.unlink()
    done = done_keys(load_records(results))
    say("measuring memory bandwidth")
    mem_bw = machine.memory_bandwidth()
    meta = {"kind": "meta", "time": time.time(), "machine": machine.machine_info(config.threads),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "memory_bandwidth_bytes_per_s": mem_bw}
    append_records(results, [meta])
    corpus = corpus_text()
    for model_name in config.models:
        path = resolve_model(model_name)
        sha = file_sha256_cached(path)
        with LlamaModel(path) as tokenizer_model:
            n_ctx_train = tokenizer_model.info.n_ctx_train

            def tokenize(text: str, m: LlamaModel = tokenizer_model) -> list[int]:
                return m.tokenize(text, add_bos=False, parse_special=False)

            def detokenize(tokens: list[int], m: LlamaModel = tokenizer_model) -> str:
                return m.detokenize(tokens)

            for workload_name in config.workloads:
                for size in config.sizes:
                    todo = pending_systems(config.systems, done, model_name, workload_name, size)
                    if not todo:
                        say(f"{model_name} {workload_name} {size}: done already (resume)")
                        continue
                    workload = build_workload(workload_name, size, corpus, tokenize, detokenize)
                    if workload.n_ctx > n_ctx_train:
                        say(f"{model_name} {workload_name} {size}: skipped, needs n_ctx {workload.n_ctx} > the "
                            f"model's {n_ctx_train}")
                        continue
                    say(f"{model_name} {workload_name} {size}: measuring {', '.join(todo)}")
                    common = {"model": model_name, "model_file": path.name, "model_sha256": sha, "size": size,
                              "workload": workload_name, "threads": config.threads, "n_ctx": workload.n_ctx,
                              "memory_bandwidth_bytes_per_s": mem_bw}
                    rows = measure_row(config, str(path), workload, todo, common)
                    append_records(results, rows)
                    done |= done_keys(rows)
    return results


def measure_row(config: BenchConfig, model_path: str, workload: Workload, systems: list[str],
                common: dict[str, Any]) -> list[dict[str, Any]]:
    """All requested systems on one (model, workload, size): alternating run by run; one record per system."""
    work = config.out / ".work" / f"{common['model']}-{workload.key}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "scratch").mkdir(parents=True)
    settings = RunSettings(model_path, workload.n_ctx, config.threads, store_dir=str(work / "store"))
    pcs = PccpuSide(settings, workload.schema, workload.prompt, workload.previous)
    llama: LlamaCacheSide | None = None
    try:
        disk_bw = machine.disk_read_bandwidth(pcs.store_files())
        if any(s.startswith("llama") for s in systems):
            llama = LlamaCacheSide(settings, pcs.tokens, pcs.previous_tokens, work / "scratch")
        decoded = {"full": len(pcs.tokens), "pccpu-ram": pcs.uncached_tokens, "pccpu-disk": pcs.uncached_tokens}
        if llama is not None:
            decoded["llama-ram"] = decoded["llama-disk"] = len(pcs.tokens) - llama.reusable_tokens
        counts = {s: sample_counts(pcs.cached_tokens, decoded[s], config.warmup, config.runs, config.slow_above)
                  for s in systems}
        calls: dict[str, Callable[[], dict[str, Any]]] = {"full": pcs.full, "pccpu-ram": pcs.ram}
        if llama is not None:
            side = llama
            calls["llama-ram"] = lambda: side.run("llama-ram")
            calls["llama-disk"] = lambda: side.run("llama-disk")
        in_process = [s for s in systems if s in calls]
        samples: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        peak_rss = machine.rss_bytes()
        for i in range(max((sum(counts[s]) for s in in_process), default=0)):
            shift = i % len(in_process)
            for system in in_process[shift:] + in_process[:shift]:  # alternate, rotating who goes first
                if i < sum(counts[system]):
                    sample = calls[system]()
                    sample["warmup"] = i < counts[system][0]
                    samples[system].append(sample)
                    peak_rss = max(peak_rss, machine.rss_bytes())
        extra: dict[str, dict[str, Any]] = {s: {} for s in systems}
        if "pccpu-disk" in systems:
            w, r = counts["pccpu-disk"]
            report = run_disk_worker(settings, workload.schema, workload.prompt, w + r)
            for i, sample in enumerate(report["samples"]):
                sample["warmup"] = i < w
            samples["pccpu-disk"] = report["samples"]
            extra["pccpu-disk"] = {"load_ms": report["load_ms"], "peak_rss_bytes": report["peak_rss_bytes"],
                                   "first_ttft_ms": report["samples"][0]["ttft_ms"]}
        if "pccpu-ram" in systems:
            extra["pccpu-ram"] = {"encode_ms": pcs.encode_ms, "encode_tokens": pcs.encode_tokens,
                                  "encode_tokens_per_s": pcs.encode_tokens_per_s,
                                  "first_token_kl": first_token_kl(pcs.last_logits.get("full"),
                                                                   pcs.last_logits.get("pccpu-ram"))}
        for name in ("llama-ram", "llama-disk"):
            if name in systems and llama is not None:
                extra[name] = {"load_ms": llama.load_ms, "warm_ms": llama.warm_ms,
                               "reused_tokens": llama.reusable_tokens}
        shared = dict(common, cached_tokens=pcs.cached_tokens, uncached_tokens=pcs.uncached_tokens,
                      prompt_tokens=len(pcs.tokens), kv_bytes_per_token_theory=pcs.kv_bytes_per_token,
                      disk_bandwidth_bytes_per_s=disk_bw, peak_rss_bytes=max(peak_rss, machine.peak_rss_bytes()),
                      time=time.time())
        rows = []
        for system in systems:
            measured = [s for s in samples[system] if not s["warmup"]]
            rows.append(dict(shared, kind="row", system=system, warmup=counts[system][0],
                             decoded_tokens=decoded[system], samples=measured, **extra[system]))
        if config.retrieval and workload.retrieval and workload.size == min(config.sizes):
            # on the row's own PromptCache, after the timed runs: its modules are encoded already
            quality = run_retrieval(pcs.pc, list(workload.retrieval))
            rows.append(dict(quality, kind="quality", model=common["model"], size=workload.size, time=time.time()))
        return rows
    finally:
        if llama is not None:
            llama.close()
        pcs.close()
        shutil.rmtree(work, ignore_errors=True)
