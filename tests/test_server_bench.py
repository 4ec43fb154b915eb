"""The server benchmark's pure parts: sizing the documents to the context, cutting them, the RAG segments (essays
new or seen before), the summary's rows and the answer agreement, the server command lines, argument checks.
The benchmark itself starts real servers and runs for an hour; its smoke test is the server tests' load run."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

from pccpu.bench.corpus import CorpusError
from pccpu.bench.server_bench import (
    Sample,
    ServerError,
    Settings,
    agreement,
    cut_documents,
    doc_sizes,
    in_segment,
    joined_parts,
    main,
    new_essays,
    server_command,
    summarize,
    takes_parts,
)

WORDS: dict[str, int] = {}


def word_tokenize(text: str) -> list[int]:
    return [WORDS.setdefault(w, len(WORDS)) for w in text.split()]


def word_detokenize(tokens: list[int]) -> str:
    names = {i: w for w, i in WORDS.items()}
    return " ".join(names[t] for t in tokens)


def sample(system: str, label: str, ttft: float, *, workload: str = "rag", turn: int = 0, n_ctx: int = 2048,
           prompt_n: int | None = 10, answer: str = "a", request: str = "r") -> Sample:
    return Sample(system=system, n_ctx=n_ctx, rep=0, workload=workload, label=label, turn=turn, request=request,
                  ttft_ms=ttft, total_ms=ttft + 1, prompt_n=prompt_n, cache_n=0, prompt_tokens=100, answer=answer)


def test_documents_fill_what_the_context_leaves() -> None:
    sizes = doc_sizes(2048, turns=4, max_tokens=8)
    assert (sizes.chat_doc_tokens, sizes.rag_doc_tokens) == (1504, 552)  # the documented 2K sizes
    bigger = doc_sizes(4096, turns=4, max_tokens=8)
    assert (bigger.chat_doc_tokens, bigger.rag_doc_tokens) == (3296, 1149)
    # three essays, the answer, the reserve and the template stay inside the context
    assert 3 * sizes.rag_doc_tokens + 8 + 2048 // 8 + 128 <= 2048
    with pytest.raises(ValueError, match="larger context"):
        doc_sizes(200, turns=4, max_tokens=8)


def test_documents_are_cut_to_exact_counts_from_separate_stretches() -> None:
    source = " ".join(f"w{i}" for i in range(1000))
    docs = cut_documents(source, [100, 50, 200], word_tokenize, word_detokenize)
    assert [len(word_tokenize(d)) for d in docs] == [100, 50, 200]
    assert docs[0].startswith("w0 ")
    ends = [int(d.split()[-1][1:]) for d in docs]
    starts = [int(d.split()[0][1:]) for d in docs]
    assert starts[1] > ends[0] and starts[2] > ends[1]  # no overlap
    with pytest.raises(CorpusError, match="too short"):
        cut_documents(" ".join(f"v{i}" for i in range(120)), [100, 50], word_tokenize, word_detokenize)


def test_new_essays_counts_what_no_earlier_request_carried() -> None:
    picks = ((0, 1, 2), (2, 3, 0), (1, 3, 0), (4, 1, 2))
    assert [new_essays(picks, i) for i in range(len(picks))] == [3, 1, 0, 1]


def test_rag_segments_split_on_new_essays() -> None:
    picks = ((0, 1, 2), (2, 1, 0), (3, 1, 0))
    samples = [sample("s", f"r{i}", t) for i, t in enumerate((900.0, 100.0, 500.0))]
    assert [in_segment(s, "rag", "new", picks) for s in samples] == [True, False, True]
    assert [in_segment(s, "rag", "seen", picks) for s in samples] == [False, True, False]
    assert all(in_segment(s, "rag", "", picks) for s in samples)
    chat = sample("s", "A2", 50.0, workload="chats", turn=2)
    assert in_segment(chat, "chats", "follow-up", picks) and not in_segment(chat, "chats", "first", picks)
    assert not in_segment(chat, "rag", "", picks)


def test_summary_rows_per_segment_and_unknown_token_counts() -> None:
    picks = ((0, 1, 2), (2, 1, 0), (0, 1, 2))
    samples = [sample("pccpu", "r0", 900.0), sample("pccpu", "r1", 100.0), sample("pccpu", "r2", 300.0),
               sample("other", "r0", 800.0, prompt_n=None), sample("other", "r1", 700.0),
               sample("other", "r2", 600.0)]
    rows = {(r["system"], r["workload"]): r for r in summarize(samples, ["pccpu", "other"], [2048], picks)}
    assert rows["pccpu", "rag"]["n"] == 3 and rows["pccpu", "rag"]["ttft_p50_ms"] == 300.0
    assert rows["pccpu", "rag, every essay seen before"]["ttft_p50_ms"] == 200.0  # r1 and r2
    assert rows["pccpu", "rag, an essay new"]["n"] == 1
    assert rows["pccpu", "rag"]["decoded_mean"] == 10.0
    assert rows["other", "rag"]["decoded_mean"] is None  # one request did not report it: no partial mean
    assert ("pccpu", "chats, first turn") not in rows  # no samples, no row


def test_agreement_compares_identical_requests_only() -> None:
    samples = [sample("pccpu", "r0", 1.0, answer="x", request="q0"), sample("pccpu", "r1", 1.0, answer="y",
                                                                            request="q1"),
               sample("ls", "r0", 1.0, answer="x", request="q0"), sample("ls", "r1", 1.0, answer="z",
                                                                        request="joined")]
    [row] = agreement(samples, ["pccpu", "ls"])
    assert (row["requests"], row["same_request"], row["same_answer"]) == (2, 1, 1)
    assert row["differing"] == []  # r1 differs in its request, not counted as a differing answer


def test_joined_parts_only_touches_part_lists() -> None:
    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert joined_parts(messages) == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a\nb"}]
    assert isinstance(messages[1]["content"], list)  # the original is left as it was


def test_server_commands_name_the_reuse_mode_and_shared_settings() -> None:
    settings = Settings("m.gguf", 4096, 2, 8)
    compose = server_command("pccpu-compose", settings, 1234)
    assert compose[compose.index("--reuse") + 1] == "compose"
    exact = server_command("pccpu", settings, 1234)
    assert exact[exact.index("--reuse") + 1] == "exact" and exact[exact.index("--n-ctx") + 1] == "4096"
    llama = server_command("llama-cpp-python", settings, 1234)
    assert llama[llama.index("--cache") + 1] == "True" and llama[llama.index("--host") + 1] == "127.0.0.1"
    assert not takes_parts("llama-cpp-python") and takes_parts("llama-server-reuse256")
    batched = server_command("pccpu", settings, 1234, parallel=4)
    assert batched[batched.index("--parallel") + 1] == "4" and exact[exact.index("--parallel") + 1] == "1"
    llama_np = server_command("llama-server", settings, 1234, parallel=4)
    assert json.loads(llama_np[-1])["n_parallel"] == 4
    with pytest.raises(ServerError, match="one request at a time"):
        server_command("llama-cpp-python", settings, 1234, parallel=2)


def test_concurrency_bench_names_its_systems() -> None:
    from pccpu.bench.concurrency import system_args

    assert system_args("pccpu") == ("pccpu", 1) and system_args("pccpu-p4") == ("pccpu", 4)
    assert system_args("llama-server") == ("llama-server", 1) and system_args("llama-server-np2") == ("llama-server", 2)
    for bad in ("pccpu-p", "pccpu-4", "vllm", "llama-server-npx"):
        with pytest.raises(ValueError, match="unknown system"):
            system_args(bad)


@pytest.fixture
def keep_sigterm() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.usefixtures("keep_sigterm")
@pytest.mark.parametrize("argv, message", [
    (["--workloads", "rag,bogus"], "--workloads"),
    (["--systems", "pccpu,nginx"], "unknown systems"),
    (["--n-ctx", "2k"], "comma list of integers"),
    (["--n-ctx", "256"], "larger context"),
    (["--docs", "2"], "--docs must be >= 3"),
    (["--rag-requests", "0"], "--rag-requests must be >= 1"),
])
def test_bad_arguments_are_refused_before_anything_starts(argv: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err



def test_agreement_falls_back_to_the_pccpu_system_that_ran() -> None:
    samples = [sample("pccpu-compose", "r0", 1.0, answer="x", request="q0"),
               sample("llama-server", "r0", 1.0, answer="y", request="q0")]
    [row] = agreement(samples, ["pccpu-compose", "llama-server"])
    assert (row["system"], row["against"], row["same_request"], row["same_answer"]) == (
        "pccpu-compose", "llama-server", 1, 0)
    assert row["differing"] == [{"n_ctx": 2048, "rep": 0, "label": "rag r0", "pccpu-compose": "x",
                                 "llama-server": "y"}]
    assert agreement(samples[1:], ["llama-server"]) == []  # nothing of pccpu's ran


def test_chunk_size_variants_change_only_the_end_of_the_conversation(monkeypatch: pytest.MonkeyPatch) -> None:
    import random as random_module

    from pccpu.bench import chunk_size

    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(400))
    monkeypatch.setattr(chunk_size, "corpus_text", lambda: text)
    rng = random_module.Random(3)
    messages = chunk_size.conversation(4, rng)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4
    tests = chunk_size.variants(messages, rng)
    assert tests["continue"][:-1] == messages and tests["continue"][-1]["role"] == "user"
    regenerate = tests["regenerate"]
    assert regenerate[:-2] == messages[:-1] and regenerate[-2]["content"] != messages[-1]["content"]
    assert tests["edit"][:-1] == messages[:-2] and tests["edit"][-1]["content"].startswith(messages[-2]["content"])
    assert tests["edit"][-1]["content"] != messages[-2]["content"]


@pytest.mark.parametrize("argv", [["--batch", "1,x"], ["--batch", "0,2"], ["--batch", ","], ["--steps", "0"]])
def test_batching_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pccpu.bench import batching

    with pytest.raises(SystemExit) as exit_info:
        batching.main(argv)
    assert exit_info.value.code == 2 and ("comma list" in (err := capsys.readouterr().err) or "positive" in err)


@pytest.mark.parametrize("argv", [["--thresholds", "16,a"], ["--thresholds", "-1"], ["--turns", "1"]])
def test_chunk_size_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pccpu.bench import chunk_size

    with pytest.raises(SystemExit) as exit_info:
        chunk_size.main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err


def test_a_streamed_reply_becomes_a_sample() -> None:
    """stream_chat's reply is what Run.add builds a Sample from (a field added to one and not the other broke a
    whole benchmark run once): an SSE stream served by httpx's mock transport, through both."""
    import httpx

    from pccpu.bench.server_bench import Run, stream_chat

    events = [{"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2},
               "timings": {"prompt_n": 5, "cache_n": 7}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://test") as client:
        reply = stream_chat(client, "m", [{"role": "user", "content": "hi"}], 8)
    run = Run("pccpu", 2048, 0)
    run.add("chats", "A1", 1, [{"role": "user", "content": "hi"}], reply)
    (got,) = run.samples
    assert (got.answer, got.prompt_n, got.cache_n, got.prompt_tokens, got.completion_tokens) == ("Hello", 5, 7, 12, 2)
    assert 0 < got.ttft_ms <= got.total_ms
