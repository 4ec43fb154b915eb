"""Concurrent clients against one server: does ``pccpu serve --parallel N`` (continuous batching) pay? (issue #13)

    python -m pccpu.bench.concurrency [--model qwen2.5-coder-0.5b] [--clients 4] [--requests 3]
        [--systems pccpu,pccpu-p4,llama-server-np4] [--max-tokens 64] [--runs 2]

Each client holds a conversation of its own (a ~300-token essay excerpt and a question, then follow-up questions)
and sends ``--requests`` streamed chat requests one after another; all clients start together. Per system (a fresh
server each, in turn, ``--runs`` times): wall time until every client is done, generated tokens per second over all
clients, TTFT p50 / p95 and the time per answer. Systems: ``pccpu`` (one answer at a time), ``pccpu-pN`` (``--parallel
N``), ``llama-server`` (``-np 1``) and ``llama-server-npN`` (``-np N``, unified KV cache), same model, threads and
context.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from pccpu.bench.corpus import corpus_text
from pccpu.bench.server_bench import (
    Running,
    ServerError,
    Settings,
    running_server,
    stream_chat,
)

logger = logging.getLogger(__name__)

QUESTIONS = ("Summarize this text in three sentences.", "What is its weakest claim, and why?",
             "Rewrite its first sentence for a child.", "Which word in it is the most unusual?")


def system_args(system: str) -> tuple[str, int]:
    """``(server system name for server_bench, parallel)``: pccpu-p4 -> ("pccpu", 4), llama-server-np4 -> ..."""
    for prefix, marker in (("pccpu", "-p"), ("llama-server", "-np")):
        if system == prefix:
            return prefix, 1
        if system.startswith(prefix + marker) and system[len(prefix + marker):].isdigit():
            return prefix, int(system[len(prefix + marker):])
    raise ValueError(f"unknown system {system!r}: pccpu, pccpu-pN, llama-server or llama-server-npN")


def excerpts(clients: int, chars: int = 1400) -> list[str]:
    text = corpus_text()
    step = len(text) // (clients + 1)
    return [text[i * step : i * step + chars] for i in range(clients)]


def client_run(running: Running, base_url: str, excerpt: str, requests: int, max_tokens: int,
               out: list[dict[str, Any]], errors: list[BaseException], start: threading.Barrier) -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a concise assistant."},
                                      {"role": "user", "content": f"{excerpt}\n\n{QUESTIONS[0]}"}]
    with httpx.Client(base_url=base_url, timeout=600, trust_env=False) as client:
        try:
            start.wait()
            for i in range(requests):
                if i:
                    messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
                sample = stream_chat(client, running.model_id, messages, max_tokens)
                sample["completion_tokens"] = sample.get("completion_tokens")
                out.append(sample)
                messages.append({"role": "assistant", "content": sample["answer"]})
        except BaseException as exc:
            errors.append(exc)


def measure(system: str, settings: Settings, clients: int, requests: int, work: Path) -> dict[str, Any]:
    base, parallel = system_args(system)
    log_path = work / f"{system}.log"
    home = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=work))  # every server starts with an empty store
    with running_server(base, settings, home, log_path, parallel=parallel) as running:
        base_url = str(running.client.base_url)
        samples: list[dict[str, Any]] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(clients + 1)
        threads = [threading.Thread(target=client_run, args=(running, base_url, text, requests,
                                                             settings.max_tokens, samples, errors, barrier))
                   for text in excerpts(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
    if errors:
        raise ServerError(f"{system}: {errors[0]!r}; see {log_path}")
    ttfts = sorted(s["ttft_ms"] for s in samples)
    generated = sum(s["completion_tokens"] or 0 for s in samples)
    return {"system": system, "clients": clients, "requests": len(samples), "wall_s": wall,
            "generated_tokens": generated, "tokens_per_s": generated / wall,
            "ttft_ms_p50": statistics.median(ttfts), "ttft_ms_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "answer_ms_p50": statistics.median(s["total_ms"] for s in samples),
            "answers": [s["answer"] for s in samples]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or .gguf path")
    parser.add_argument("--systems", default="pccpu,pccpu-p4,llama-server-np4",
                        help="comma list of pccpu, pccpu-pN, llama-server, llama-server-npN")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3, help="requests per client (one conversation)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="each system this many times, in turn")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    systems = [s for s in args.systems.split(",") if s]
    try:
        for system in systems:
            system_args(system)
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.clients, args.requests, args.max_tokens, args.runs) < 1:
        parser.error("--clients, --requests, --max-tokens and --runs must be positive")
    from pccpu.models import resolve_model

    settings = Settings(str(resolve_model(args.model)), args.n_ctx, args.threads, args.max_tokens)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pccpu-concurrency-") as tmp:
        for rep in range(args.runs):
            for system in systems:
                row = measure(system, settings, args.clients, args.requests, Path(tmp))
                row["rep"] = rep
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"concurrency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": Path(settings.model_path).name, "clients": args.clients,
                                "requests": args.requests, "max_tokens": args.max_tokens, "n_ctx": args.n_ctx,
                                "threads": args.threads, "rows": rows}, indent=2))
    print(f"| system | wall s (median of {args.runs}) | tokens/s | TTFT p50 ms | TTFT p95 ms | answer p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for system in systems:
        mine = [r for r in rows if r["system"] == system]

        def med(key: str, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[key] for r in mine)

        print(f"| {system} | {med('wall_s'):.1f} | {med('tokens_per_s'):.1f} | {med('ttft_ms_p50'):.0f} | "
              f"{med('ttft_ms_p95'):.0f} | {med('answer_ms_p50'):.0f} |")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
