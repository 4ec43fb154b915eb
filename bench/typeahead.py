"""Type-ahead benchmark: a simulated typist asks about a cached document, with and without type-ahead.

    python -m pccpu.bench.typeahead --model qwen2.5-coder-1.5b --sizes 2048,4096,8192 --questions 5

The conversation: a system message, a document of ``size`` tokens (Paul Graham's essays) as a user message, and the
assistant's "I have read it."; stored once (a first chat prefills it), so every measured request restores it from
the RAM tier in a new session, as a desktop app's second question about the same file would. Each question (16
tokens on Qwen's tokenizer, the count is reported) is then asked three ways, each in a fresh session:

* ``plain``: ``chat(history + [question])`` when Enter is pressed: the cached TTFT of today, the decode of the
  question and the template's turn tokens after the restored document;
* ``typed, pause``: the question typed into ``draft()`` key by key, then a pause (default 300 ms) before Enter;
* ``typed, no pause``: Enter right after the last key (the worst case).

TTFT after Enter is from the moment Enter is pressed (``submit()``, or ``chat()`` for plain) to the first streamed
text. The typist types ``--cps`` characters per second (default 6, a fast typist at about 70 words a minute: faster
typing leaves type-ahead less time, so it is the harder case) with +-30% jitter from a fixed seed. Also reported:
the worker's decode time spent on cells the answer never used (speculations interrupted by the next key, and cells
removed), the longest a ``type()`` call took, the largest lateness of a keystroke (how late the typist thread woke
for a key: typing felt delayed if this is large), and whether each answer equals plain's (greedy; first-token KL
where the model's results depend on batch splits).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pccpu.bench.corpus import corpus_text, exact_tokens_text
from pccpu.bench.fidelity import kl_divergence
from pccpu.bench.machine import machine_info
from pccpu.service import PromptCache, Result

logger = logging.getLogger(__name__)

QUESTIONS = (
    "What does the author say about startups and the people who should start them?",
    "Which example does the essay give first, and why does the author pick it here?",
    "Summarize the main argument of this essay in two short sentences for a busy reader.",
    "What advice would the author give a student who wants to learn to write well?",
    "Which mistake does the author warn about most, and what should one do instead?",
    "How does the author describe good taste, and can it be learned over many years?",
    "What role do investors play in the essay, and does the author trust them at all?",
    "Name one surprising claim from the essay and explain briefly why it might be true.",
)
SYSTEM = "You answer questions about the user's document, briefly and precisely."


@dataclass(frozen=True)
class Trial:
    system: str  # plain / typed-pause / typed-no-pause
    question: int
    question_tokens: int
    ttft_ms: float  # after Enter
    decoded_after_enter: int  # tokens the request decoded (0: type-ahead had it all, logits included)
    same_answer: bool
    first_token_kl: float
    unused_ms: float = 0.0  # worker decode time on cells the answer never used
    worker_ms: float = 0.0
    max_type_ms: float = 0.0
    max_lateness_ms: float = 0.0
    keystrokes: int = 0
    speculated_tokens: int = 0  # the final speculation (the last word, the turn's end): tokens and decode ms
    speculation_ms: float = 0.0


def type_question(draft: Any, question: str, cps: float, rng: random.Random) -> float:
    """Type ``question`` key by key; the largest lateness of a key (ms) against its schedule."""
    lateness = 0.0
    due = time.perf_counter()
    for i in range(1, len(question) + 1):
        if i > 1:  # the wait before each key but the first; none after the last (the pause is the caller's)
            due += rng.uniform(0.7, 1.3) / cps
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        lateness = max(lateness, (time.perf_counter() - due) * 1000)
        draft.type(question[:i])
    return lateness


def first_piece_ms(answer: Any, since: float) -> tuple[float, Result]:
    """Iterate the answer; the time from ``since`` to its first text piece (or its end), and the Result."""
    ttft: float | None = None
    for _ in answer:
        if ttft is None:
            ttft = (time.perf_counter() - since) * 1000
    result = answer.result()
    return (ttft if ttft is not None else (time.perf_counter() - since) * 1000), result


def run_size(pc: PromptCache, size: int, questions: Sequence[str], *, cps: float, pause_s: float, max_tokens: int,
             seed: int, speculate_after_ms: float = 0.0) -> list[Trial]:
    text = exact_tokens_text(corpus_text(), size, pc.tokenize, pc.detokenize)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
               {"role": "assistant", "content": "I have read it."}]
    started = time.perf_counter()
    pc.chat([*history, {"role": "user", "content": "Say OK."}], max_tokens=1).result()  # stores the history
    logger.info("history of %d tokens stored in %.1f s", size, time.perf_counter() - started)
    rng = random.Random(seed)
    trials: list[Trial] = []
    for index, question in enumerate(questions):
        n_question = len(pc.tokenize(question))
        with pc.session() as session:
            since = time.perf_counter()
            ttft, reference = first_piece_ms(
                pc.chat([*history, {"role": "user", "content": question}], session=session, max_tokens=max_tokens,
                        keep_logits=True), since)
        trials.append(Trial("plain", index, n_question, ttft, reference.uncached_tokens, True, 0.0))
        for name, pause in (("typed-pause", pause_s), ("typed-no-pause", 0.0)):
            with pc.session() as session:
                draft = session.draft(history, speculate_after_ms=speculate_after_ms)
                lateness = type_question(draft, question, cps, rng)
                time.sleep(pause)
                since = time.perf_counter()
                ttft, result = first_piece_ms(draft.submit(max_tokens=max_tokens, keep_logits=True), since)
            stats = draft.stats
            assert result.first_logits is not None and reference.first_logits is not None
            trials.append(Trial(
                name, index, n_question, ttft, result.uncached_tokens, result.text == reference.text,
                kl_divergence(reference.first_logits, result.first_logits), stats.discarded_ms, stats.decode_ms,
                stats.max_type_ms, lateness, stats.keystrokes, stats.speculated_tokens, stats.speculation_ms))
            logger.info("%s q%d: TTFT %.0f ms (plain %.0f), decoded %d", name, index, ttft, trials[-2 if name ==
                        "typed-pause" else -3].ttft_ms, result.uncached_tokens)
    return trials


def p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, float), 95))


def summarize(model: str, size: int, trials: list[Trial]) -> list[dict[str, Any]]:
    rows = []
    plain = [t.ttft_ms for t in trials if t.system == "plain"]
    for system in ("plain", "typed-pause", "typed-no-pause"):
        chosen = [t for t in trials if t.system == system]
        ttft = [t.ttft_ms for t in chosen]
        rows.append({
            "model": model, "cached_tokens": size, "system": system, "n": len(chosen),
            "question_tokens": statistics.mean(t.question_tokens for t in chosen),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p95_ms": p95(ttft),
            "speedup_p50": statistics.median(plain) / statistics.median(ttft),
            "decoded_after_enter_p50": statistics.median(t.decoded_after_enter for t in chosen),
            "unused_ms_p50": statistics.median(t.unused_ms for t in chosen),
            "worker_ms_p50": statistics.median(t.worker_ms for t in chosen),
            "max_type_ms": max(t.max_type_ms for t in chosen),
            "max_lateness_ms": max(t.max_lateness_ms for t in chosen),
            "same_answers": sum(t.same_answer for t in chosen),
            "first_token_kl_max": max(t.first_token_kl for t in chosen),
            "speculated_tokens_p50": statistics.median(t.speculated_tokens for t in chosen),
            "speculation_ms_p50": statistics.median(t.speculation_ms for t in chosen),
        })
    return rows


def speculation(row: dict[str, Any]) -> str:
    if row["system"] == "plain":
        return ""
    return f"{row['speculated_tokens_p50']:g} tokens, {row['speculation_ms_p50']:,.0f} ms"


def markdown(rows: list[dict[str, Any]], cps: float, pause_ms: float, speculate_after_ms: float = 0.0) -> str:
    lines = [f"typist: {cps:g} characters/s, pause before Enter {pause_ms:g} ms (typed-pause) or none; the turn's "
             f"ending speculated {speculate_after_ms:g} ms after the last key",
             "",
             "| model | cached | Enter after | TTFT p50 | p95 | vs plain | decoded after Enter | last speculation "
             "| unused worker ms | worker ms | max type() | max key lateness | same answer | KL max |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    label = {"plain": "plain chat (no type-ahead)", "typed-pause": f"typing + {pause_ms:g} ms",
             "typed-no-pause": "typing, no pause"}
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cached_tokens']:,} | {label[r['system']]} | {r['ttft_p50_ms']:,.0f} ms | "
            f"{r['ttft_p95_ms']:,.0f} ms | {r['speedup_p50']:.1f}x | {r['decoded_after_enter_p50']:g} | "
            f"{speculation(r)} | {r['unused_ms_p50']:,.0f} | {r['worker_ms_p50']:,.0f} | {r['max_type_ms']:.2f} ms | "
            f"{r['max_lateness_ms']:.0f} ms | {r['same_answers']}/{r['n']} | {r['first_token_kl_max']:.2g} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="registry name or .gguf path (repeatable)")
    parser.add_argument("--sizes", default="2048,4096,8192", help="cached tokens, comma-separated")
    parser.add_argument("--questions", type=int, default=5, help=f"questions per size (at most {len(QUESTIONS)})")
    parser.add_argument("--cps", type=float, default=6.0, help="typing speed, characters per second")
    parser.add_argument("--pause-ms", type=float, default=300.0, help="pause before Enter")
    parser.add_argument("--speculate-after-ms", type=float, default=0.0,
                        help="type-ahead's idle time before it decodes the turn's ending (0: at once)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/typeahead"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    questions = QUESTIONS[:args.questions]
    rows: list[dict[str, Any]] = []
    trials_out: list[dict[str, Any]] = []
    for model in args.model or ["smollm2"]:
        for size in sizes:
            with tempfile.TemporaryDirectory() as store, \
                    PromptCache(model, n_ctx=size + 256, n_threads=args.threads, store_dir=Path(store),
                                persist=False) as pc:
                pc.warm_up()
                trials = run_size(pc, size, questions, cps=args.cps, pause_s=args.pause_ms / 1000,
                                  max_tokens=args.max_tokens, seed=args.seed,
                                  speculate_after_ms=args.speculate_after_ms)
                name = pc.model_path.stem
            rows += summarize(name, size, trials)
            trials_out += [{"model": name, "cached_tokens": size, **asdict(t)} for t in trials]
            print(markdown(rows[-3:], args.cps, args.pause_ms, args.speculate_after_ms), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials_out))
    table = markdown(rows, args.cps, args.pause_ms, args.speculate_after_ms)
    (args.out / "summary.json").write_text(json.dumps({"machine": machine_info(args.threads), "cps": args.cps,
                                                       "pause_ms": args.pause_ms,
                                                       "speculate_after_ms": args.speculate_after_ms, "rows": rows},
                                                      indent=1))
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
