"""``pccpu serve`` (pccpu/server): the real HTTP server on 127.0.0.1 and a free port, talked to with the official
``openai`` SDK and plain httpx. Most tests run it on the fake engine (fast); the last ones on the real model."""

from __future__ import annotations

import contextlib
import importlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from conftest import FakeCacheFactory

from pccpu.server import ServerSettings, create_app
from pccpu.server.worker import Job, QueueFullError, Worker
from pccpu.service import PromptCache

MODEL = "test-model"
DOC = "The clock museum of Lindenfeld opens at nine and closes at five, except on Mondays. " * 4


@dataclass
class RunningServer:
    url: str
    cache: PromptCache
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def start_server(cache: PromptCache, *, send_buffer: int | None = None, **settings: Any) -> RunningServer:
    """``send_buffer``: SO_SNDBUF of the listening socket, which accepted connections inherit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(cache, ServerSettings(model_id=MODEL, **settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", cache, server, thread)


def stop_server(running: RunningServer) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=30)


@pytest.fixture
def served(fake_cache: FakeCacheFactory) -> Iterator[RunningServer]:
    running = start_server(fake_cache(min_chunk_tokens=16), api_key=None, max_new_tokens=8)
    yield running
    stop_server(running)


def messages(question: str = "When does it open?", system: str = "Answer from the document.") -> list[dict[str, Any]]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": DOC}, {"type": "text", "text": question}]}]


# -- the OpenAI surface ------------------------------------------------------------------------------------------
def test_chat_completion_with_usage_and_timings(served: RunningServer) -> None:
    reply = served.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=5)
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    usage = reply.usage
    assert usage is not None and usage.completion_tokens <= 5 and usage.prompt_tokens > 400
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    timings = (reply.model_extra or {})["timings"]
    assert timings["prompt_n"] == usage.prompt_tokens and timings["pccpu"]["exact"] is True


def test_streamed_chat_ends_with_usage_and_done(served: RunningServer) -> None:
    stream = served.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=6,
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    plain = served.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=6)
    assert plain.choices[0].message.content == text  # greedy: streamed and not streamed agree
    raw = httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                     json={"model": MODEL, "messages": messages(), "max_tokens": 2, "stream": True, "temperature": 0})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_logprobs_streamed_or_not(served: RunningServer) -> None:
    """``logprobs`` / ``top_logprobs`` in OpenAI's shape: one entry per generated token whose bytes make the text,
    the greedy choice first among its alternatives; a stream carries the same entries; without them, none."""
    client = served.client()
    ask = {"model": MODEL, "temperature": 0, "messages": messages(), "max_tokens": 5}
    reply = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens == 5
    assert b"".join(bytes(e.bytes) for e in entries).decode() == reply.choices[0].message.content
    for entry in entries:
        best = entry.top_logprobs[0]
        assert entry.logprob <= 0 and (best.bytes, best.logprob) == (entry.bytes, entry.logprob)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [e for c in client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in entries]
    assert [len(e.top_logprobs) for e in client.chat.completions.create(**ask, logprobs=True).choices[0]
            .logprobs.content] == [0] * 5
    assert client.chat.completions.create(**ask).choices[0].logprobs is None
    refused = httpx.post(f"{served.url}/v1/completions", json={"prompt": "Once", "logprobs": 2}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_conversations_and_documents_are_reused(served: RunningServer) -> None:
    client = served.client()
    first = client.chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=4,
                                           extra_body={"prompt_cache_key": "alice"})
    follow = [*messages(), {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And when does it close?"}]
    second = client.chat.completions.create(model=MODEL, temperature=0, messages=follow, max_tokens=4,
                                            extra_body={"prompt_cache_key": "alice"})
    pccpu = (second.model_extra or {})["timings"]["pccpu"]
    assert pccpu["session_tokens"] > first.usage.prompt_tokens - 10
    other = client.chat.completions.create(model=MODEL, temperature=0, messages=messages("Is it open on Monday?"),
                                           max_tokens=4, extra_body={"prompt_cache_key": "bob"})
    cached = other.usage.prompt_tokens_details.cached_tokens
    assert cached > 350  # the system message and the document, stored by alice's first request
    back = client.chat.completions.create(model=MODEL, temperature=0, messages=follow, max_tokens=4,
                                          extra_body={"prompt_cache_key": "alice"})
    assert back.choices[0].message.content == second.choices[0].message.content
    assert (back.model_extra or {})["timings"]["pccpu"]["decoded_tokens"] == 1  # alice's cells came back


DOCS = [f"Document {i}: the tower number {i} opens at {7 + i} and its guide speaks {i + 2} languages. " * 2
        for i in range(3)]


def rag(order: list[int], question: str = "Which tower opens first?") -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": DOCS[i]} for i in order] + [{"type": "text", "text": question}]
    return [{"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": parts}]


def test_compose_mode_reuses_documents_in_any_order(served: RunningServer) -> None:
    client = served.client()
    compose = {"pccpu": {"reuse": "compose", "repair_tokens": 4}}
    client.chat.completions.create(model=MODEL, temperature=0, messages=rag([0, 1, 2]), max_tokens=2,
                                   extra_body={**compose, "user": "a"})
    swapped = rag([2, 0], "Which guide speaks most?")
    exact = client.chat.completions.create(model=MODEL, temperature=0, messages=swapped, max_tokens=2,
                                           extra_body={"user": "b"})
    composed = client.chat.completions.create(model=MODEL, temperature=0, messages=swapped, max_tokens=2,
                                              extra_body={**compose, "user": "c"})
    exact_block, composed_block = ((r.model_extra or {})["timings"]["pccpu"] for r in (exact, composed))
    assert exact_block["exact"] and exact_block["composed_tokens"] == 0  # only the system message: same prefix
    assert not composed_block["exact"]
    moved = [m for m in composed_block["modules"] if m["composed"]]
    assert len(moved) == 2 and all(m["shifted"] and m["repaired_tokens"] == 4 for m in moved)
    assert composed_block["composed_tokens"] == sum(m["tokens"] - 4 for m in moved)
    assert composed.usage.prompt_tokens_details.cached_tokens > exact.usage.prompt_tokens_details.cached_tokens + 100


def test_models_health_and_metrics(served: RunningServer) -> None:
    assert [m.id for m in served.client().models.list()] == [MODEL]
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    served.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=2)
    text = httpx.get(f"{served.url}/metrics").text
    assert "pccpu_requests_total 1" in text and 'pccpu_prompt_tokens_total{source="decoded"}' in text
    assert "pccpu_ttft_seconds_count 1" in text


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "temprature": 0.5}, 400, "temprature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": "x"}]}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "pccpu": {"reuse": "always"}}, 400, "pccpu.reuse"),
    ({"messages": [{"role": "user", "content": "hi"}], "pccpu": {"repair_tokens": -2}}, 400, "pccpu.repair_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "pccpu": {"cache": True}}, 400, "pccpu"),
])
def test_bad_requests_get_openai_errors(served: RunningServer, body: dict[str, Any], status: int,
                                        param: str | None) -> None:
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert "Traceback" not in reply.text


def test_malformed_and_oversized_bodies(served: RunningServer) -> None:
    reply = httpx.post(f"{served.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    huge = httpx.post(f"{served.url}/v1/chat/completions", content=b" " * (5 << 20), timeout=30)
    assert huge.status_code == 413
    assert served.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(),
                                                   max_tokens=1).choices


def test_api_key(fake_cache: FakeCacheFactory) -> None:
    running = start_server(fake_cache(), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").chat.completions.create(model=MODEL, temperature=0, messages=messages(),
                                                            max_tokens=1)
        reply = running.client("s3cret").chat.completions.create(model=MODEL, temperature=0, messages=messages(),
                                                                 max_tokens=1)
        assert reply.choices
    finally:
        stop_server(running)


def test_a_full_queue_is_refused(fake_cache: FakeCacheFactory) -> None:
    release = threading.Event()

    def blocked(cache: PromptCache) -> Any:
        release.wait(10)
        return cache.chat([{"role": "user", "content": "hi"}], max_tokens=1)

    worker = Worker(fake_cache(), max_queue=1)
    items: queue.Queue[Any] = queue.Queue()
    try:
        worker.submit(Job(blocked, items.put))  # taken by the worker, which waits
        time.sleep(0.2)
        worker.submit(Job(blocked, items.put))  # waits in the queue
        with pytest.raises(QueueFullError, match="1 requests are waiting"):
            worker.submit(Job(blocked, items.put))
    finally:
        release.set()
        worker.stop()


def concurrent_answers_match_one_by_one(running: RunningServer, max_tokens: int, clients: int = 4,
                                        rounds: int = 3) -> None:
    """Each question asked alone, then by ``clients`` clients at once, ``rounds`` times each: no error, and every
    answer equal to the one given alone (greedy)."""
    questions = [f"Question {i}: when does it open?" for i in range(clients)]
    alone = {q: running.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(q),
                                                         max_tokens=max_tokens).choices[0].message.content
             for q in questions}
    answers: dict[str, list[str | None]] = {q: [] for q in questions}
    errors: list[BaseException] = []

    def client_loop(q: str) -> None:
        try:
            for _ in range(rounds):
                reply = running.client().chat.completions.create(model=MODEL, temperature=0, messages=messages(q),
                                                                 max_tokens=max_tokens)
                answers[q].append(reply.choices[0].message.content)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(answers[q] == [alone[q]] * rounds for q in questions)


def test_concurrent_clients_get_the_answers_of_requests_sent_one_by_one(served: RunningServer) -> None:
    concurrent_answers_match_one_by_one(served, max_tokens=4)


# -- the real model ------------------------------------------------------------------------------------------------
def test_real_model_exact_reuse_gives_the_full_prefill_answer(default_model_path: Path, tmp_path: Path) -> None:
    cache = PromptCache(str(default_model_path), n_ctx=2048, n_threads=2, store_dir=tmp_path, min_chunk_tokens=16)
    running = start_server(cache, max_new_tokens=12)
    try:
        client = running.client()
        first = client.chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=12,
                                               extra_body={"user": "one"})
        second = client.chat.completions.create(model=MODEL, temperature=0, messages=messages(), max_tokens=12,
                                                extra_body={"user": "two"})
    finally:
        stop_server(running)
    assert second.usage.prompt_tokens_details.cached_tokens > 80
    assert second.choices[0].message.content == first.choices[0].message.content
    full = cache.chat(messages(), cache=False, max_tokens=12, keep_logits=True).result()
    restored = cache.chat(messages(), max_tokens=12, keep_logits=True).result()
    cache.close()
    assert full.text == second.choices[0].message.content
    assert restored.cached_tokens > 80 and np.array_equal(restored.first_logits, full.first_logits)


def test_a_client_that_disconnects_stops_its_generation(served: RunningServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    context = served.cache._runtime.context  # the fake engine (internal on purpose)
    decode = context.decode
    generated = []

    def slow_decode(tokens: Any, **kwargs: Any) -> Any:
        # like llama.cpp, a decode takes time without holding the GIL, so the event loop notices the disconnect
        time.sleep(0.005)
        if len(tokens) == 1:
            generated.append(tokens[0])  # the answer is decoded one token at a time
        return decode(tokens, **kwargs)

    monkeypatch.setattr(context, "decode", slow_decode)
    body = {"model": MODEL, "messages": messages(), "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few events, then the client goes away
    assert any(line.startswith("data: ") for line in received)
    # the next request runs after the cancelled one has stopped (one worker, arrival order)
    served.client().chat.completions.create(model=MODEL, temperature=0, max_tokens=1,
                                            messages=[{"role": "user", "content": "hi"}])
    assert 2 <= len(generated) < 50  # stopped soon after the disconnect, far from the 1,500 asked for


def test_a_client_that_stops_reading_holds_the_model_no_longer_than_its_answer(
        fake_cache: FakeCacheFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # a client that never reads a long answer (small socket buffers on both ends): the server's writes back up
    # (uvicorn waits for the transport to drain), yet the worker hands its pieces to an unbounded queue, finishes
    # the answer and serves the next request
    running = start_server(fake_cache(n_ctx=4096, min_chunk_tokens=16), send_buffer=4096, max_new_tokens=8)
    model = running.cache._runtime.model  # the fake engine (internal on purpose): its answers never end early
    monkeypatch.setattr(model, "is_end_of_generation", lambda token: False)
    body = json.dumps({"model": MODEL, "messages": messages(), "max_tokens": 2000, "temperature": 0,
                       "stream": True}).encode()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stalled.connect(("127.0.0.1", int(running.url.rsplit(":", 1)[1])))
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                        b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not any(getattr(c, "flow", None) is not None and c.flow.write_paused
                      for c in running.server.server_state.connections):
            assert time.monotonic() < deadline, "the unread stream never filled the socket buffers"
            time.sleep(0.05)  # until the stream waits for the client to read
        reply = running.client().with_options(timeout=60).chat.completions.create(
            model=MODEL, temperature=0, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content is not None
        assert any(c.flow.write_paused for c in running.server.server_state.connections)  # still not read
    finally:
        stalled.close()
        stop_server(running)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_command(fake_cache: FakeCacheFactory, monkeypatch: pytest.MonkeyPatch,
                  args: list[str]) -> Iterator[tuple[uvicorn.Server, int, dict[str, Any]]]:
    """The real ``pccpu serve`` command on the fake engine, in a thread: the uvicorn server it built, its port, and
    the options it opened its cache with."""
    from pccpu.cli import serve as serve_cli

    servers: list[uvicorn.Server] = []
    opened: dict[str, Any] = {}

    class Recorded(uvicorn.Server):  # the server uvicorn.run builds, kept to stop it afterwards
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            servers.append(self)

    def open_fake(**opts: Any) -> PromptCache:
        opened.update(opts)
        return fake_cache(n_seq_max=opts["n_seq_max"])

    monkeypatch.setattr(importlib.import_module("uvicorn.main"), "Server", Recorded)
    monkeypatch.setattr(serve_cli, "open_prompt_cache", open_fake)
    port = free_port()
    thread = threading.Thread(target=serve_cli.serve.main, daemon=True,
                              args=(["--port", str(port), "--model-id", MODEL, *args],),
                              kwargs={"standalone_mode": False})
    thread.start()
    deadline = time.monotonic() + 30
    while not (servers and servers[0].started):
        assert time.monotonic() < deadline and thread.is_alive(), "pccpu serve did not start"
        time.sleep(0.02)
    try:
        yield servers[0], port, opened
    finally:
        servers[0].should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.mark.parametrize(("args", "expected"), [([], 5), (["--idle-timeout", "1"], 1)])
def test_serve_idle_timeout_closes_kept_alive_connections(fake_cache: FakeCacheFactory,
                                                          monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                          expected: int) -> None:
    """``pccpu serve --idle-timeout`` reaches uvicorn: the real command (on the fake engine) closes a kept-alive
    connection after that many idle seconds."""
    with serve_command(fake_cache, monkeypatch, args) as (server, port, _):
        assert server.config.timeout_keep_alive == expected
        if expected <= 2:  # waiting for the default's 5 s would only slow the quick loop down
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # HTTP/1.1: kept alive
                received = conn.recv(65536)
                answered = time.monotonic()
                while chunk := conn.recv(65536):  # b"" once the server closes the connection
                    received += chunk
                idle = time.monotonic() - answered
            assert received.startswith(b"HTTP/1.1 200")
            assert expected - 0.5 < idle < 4.5  # closed by the idle timeout; uvicorn's default would wait 5 s


@pytest.mark.parametrize(("parallel", "n_seq_max"), [(4, 16), (20, 22)])
def test_serve_opens_a_sequence_for_every_parallel_answer(fake_cache: FakeCacheFactory,
                                                          monkeypatch: pytest.MonkeyPatch, parallel: int,
                                                          n_seq_max: int) -> None:
    """``pccpu serve --parallel N`` starts for any N it accepts: the cache gets a lane per answer beside the
    request sequence (at least the default 16 sequences), and /health reports the parallelism."""
    with serve_command(fake_cache, monkeypatch, ["--parallel", str(parallel)]) as (_, port, opened):
        assert opened["n_seq_max"] == n_seq_max
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["parallel"] == parallel


def test_conversations_without_a_key_are_found_by_content(served: RunningServer) -> None:
    """Two chats interleaved by a client that names neither: each follow-up continues its own conversation's cells."""
    client = served.client()
    firsts = {q: client.chat.completions.create(model=MODEL, temperature=0, max_tokens=3, messages=messages(q))
              for q in ("When does it open?", "Is it open on Monday?")}
    for question, first in firsts.items():
        follow = [*messages(question), {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "Thanks. Anything else?"}]
        reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=3, messages=follow)
        pccpu = (reply.model_extra or {})["timings"]["pccpu"]
        assert pccpu["session_tokens"] >= first.usage.prompt_tokens  # its own first turn was held
        assert pccpu["stored_tokens"] == 0


def test_text_completions(served: RunningServer) -> None:
    client = served.client()
    first = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert first.object == "text_completion" and first.choices[0].finish_reason in ("length", "stop")
    text = first.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    longer = client.completions.create(model=MODEL, prompt="Once upon a time" + text + " there", max_tokens=2,
                                       temperature=0)
    assert longer.usage is not None and longer.usage.prompt_tokens_details is not None
    assert longer.usage.prompt_tokens_details.cached_tokens > 10  # the first prompt's cells, found by content
    for bad in ({"prompt": ["a", "b"]}, {"prompt": "a", "echo": True}, {"prompt": ""}):
        reply = httpx.post(f"{served.url}/v1/completions", json=bad, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] in ("prompt", "echo")


# -- PML over HTTP -------------------------------------------------------------------------------------------------
PML_SCHEMA = """<schema name="docs"><system>Answer from the notes.</system><user>
<module name="a">Alpha: the bakery opens at six.</module>
<module name="b">Beta: the station closes at ten.</module></schema>"""


def test_pml_schemas_prompts_and_the_store(served: RunningServer) -> None:
    url = served.url
    added = httpx.post(f"{url}/v1/pml/schemas", json={"schema": PML_SCHEMA}, timeout=60).json()
    assert added["name"] == "docs" and added["modules"] == ["(root)", "a", "b"]
    assert httpx.get(f"{url}/v1/pml/schemas").json()["schemas"][0]["name"] == "docs"
    prompt = '<prompt schema="docs"><b/>When does it close?</user></prompt>'
    reply = httpx.post(f"{url}/v1/pml/ask", json={"prompt": prompt, "max_tokens": 3, "temperature": 0},
                       timeout=60).json()
    assert reply["object"] == "chat.completion" and reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert reply["timings"]["pccpu"]["exact"] is False  # composed from a schema's modules
    assert {m["module"] for m in reply["timings"]["pccpu"]["modules"]} == {"", "b"}
    parts = httpx.post(f"{url}/v1/pml/ask", timeout=60,
                       json={"schema": "docs", "modules": {"b": None}, "question": "<b/> When?</user>",
                             "max_tokens": 2, "temperature": 0, "stream": True})
    assert parts.text.rstrip().endswith("data: [DONE]")  # the question's markup stayed text
    stats = httpx.get(f"{url}/v1/pml/store").json()
    assert stats["store"]["ram_entries"] == 3
    assert httpx.delete(f"{url}/v1/pml/store").json()["removed"] >= 3


@pytest.mark.parametrize(("body", "message"), [
    ({"schema": "/etc/passwd"}, "files are not read over HTTP"),
    ({"schema": '<schema name="x"><module name="m" src="/etc/passwd"/></schema>'}, "src="),
    ({"schema": "<schema"}, ""),
])
def test_pml_over_http_reads_no_files_and_refuses_bad_schemas(served: RunningServer, body: dict[str, Any],
                                                               message: str) -> None:
    reply = httpx.post(f"{served.url}/v1/pml/schemas", json=body, timeout=30)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_pml_ask_errors(served: RunningServer) -> None:
    for body in ({"prompt": '<prompt schema="nope"><user>hi</user></prompt>'}, {},
                 {"prompt": "<prompt", "schema": "docs"}):
        reply = httpx.post(f"{served.url}/v1/pml/ask", json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["message"]


def test_a_full_queue_is_a_429_with_retry_after(fake_cache: FakeCacheFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fake_cache()
    decode = cache._runtime.context.decode  # slowed down (the GIL released, like llama.cpp) to keep the worker busy

    def slow_decode(tokens: Any, **kwargs: Any) -> Any:
        time.sleep(0.1)  # 20 tokens: the first request runs for 2 s, while the others arrive 0.3 s apart
        return decode(tokens, **kwargs)

    monkeypatch.setattr(cache._runtime.context, "decode", slow_decode)
    running = start_server(cache, max_queue=1)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}
    replies: list[httpx.Response] = []

    def post() -> None:
        replies.append(httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60))

    try:
        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:  # the first runs, the second waits in the queue, the third finds it full
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(timeout=60)
    finally:
        stop_server(running)
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 429]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"


# -- type-ahead over HTTP ----------------------------------------------------------------------------------------
def test_a_drafted_message_is_decoded_before_its_chat_request(served: RunningServer) -> None:
    history = [{"role": "system", "content": "Answer from the document."}, {"role": "user", "content": DOC},
               {"role": "assistant", "content": "Read."}]
    question = "When does it close on Fridays?"
    for i in range(1, len(question) + 1):
        reply = httpx.post(f"{served.url}/v1/chat/drafts", timeout=60,
                           json={"messages": history, "text": question[:i], "prompt_cache_key": "carol"})
        assert reply.status_code == 202 and reply.json()["keystrokes"] >= 1
    draft = next(iter(served.cache._typeahead.drafts))  # type: ignore[union-attr]  # the server's one draft
    assert draft.wait(30)
    client = served.client()
    sent = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=4,
                                          messages=[*history, {"role": "user", "content": question}],
                                          extra_body={"prompt_cache_key": "carol"})
    timings = (sent.model_extra or {})["timings"]
    assert timings["prompt_n"] == 0  # nothing left to decode when it arrived
    assert sent.usage.prompt_tokens_details.cached_tokens == sent.usage.prompt_tokens
    plain = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=4,
                                           messages=[*history, {"role": "user", "content": question}],
                                           extra_body={"prompt_cache_key": "dave"})
    assert sent.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [], "text": "hi"}, "prompt_cache_key"),
    ({"messages": "x", "text": "hi", "prompt_cache_key": "k"}, "messages"),
    ({"messages": [], "text": 3, "prompt_cache_key": "k"}, "text"),
    ({"messages": [], "text": "hi", "prompt_cache_key": "k", "temperature": 0}, "temperature"),
    ({"messages": [{"role": "robot", "content": "x"}], "text": "hi", "prompt_cache_key": "k"}, None),
])
def test_bad_drafts_are_400s(served: RunningServer, body: dict[str, Any], param: str | None) -> None:
    reply = httpx.post(f"{served.url}/v1/chat/drafts", json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
