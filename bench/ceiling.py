"""The speedup ceiling: how much faster than full prefill can *any* KV cache answer on this machine?

    python -m pccpu.bench.ceiling --model qwen2.5-coder-1.5b --sizes 2048,4096,8192 --threads 2

A cached answer still decodes its uncached tokens (24 in the bench workloads: a 16-token question and the chat
template's turns) against the whole cached context; a full prefill decodes every token, in 512-token batches. On a
CPU both costs are close to linear in the context a token attends to:

    time per token in a batch of B tokens at context c  =  w(B) + a * c

``w(B)`` is the matrix products' share. It depends on B: each forward pass streams all weights from memory once, so
a small batch pays that read for few tokens. ``a`` is attention per cached token. The probe measures both on the
real model, without encoding long prompts: it decodes one 512-token chunk of the bench corpus, saves its state and
restores it at shifted offsets to build cached contexts of each size (timing does not depend on the values), then
times a 512-token batch and small batches (``--batches``) at each context. From the fitted lines:

    full prefill of N tokens  ~  N * w(512) + a * N^2 / 2
    ceiling(N)               =  full prefill / measured decode of Q tokens at context N

That ceiling is what a cache with zero restore and zero overhead would reach. pccpu's measured speedup (``pccpu
bench``) sits just below it; a target above it cannot be met by caching on that machine. The last column assumes a
small batch as efficient per token as a 512-token one (``Q * line512(N)``): what remains is attention, since each
of the answer's tokens attends to all N cached tokens where a prefill token attends to N/2 on average.

Found with it (llama.cpp in llama-cpp-python 0.3.36, AVX2): Q4_K weights are repacked (8x8 interleaved) and their
AVX2 GEMM takes tokens in groups of 16 on its fast path and the remainder in groups of 4 on a slower one, so a
24-token batch (16 + 8) costs more per token than 16, 64 or 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pccpu.bench.corpus import corpus_text
from pccpu.bench.machine import machine_info
from pccpu.engine import ContextSettings, LlamaContext, LlamaModel
from pccpu.errors import InvalidArgumentError
from pccpu.models import resolve_model

logger = logging.getLogger(__name__)

CHUNK = 512  # tokens per restored chunk, and the full prefill's batch size (pccpu's and the bench's n_batch)


@dataclass(frozen=True)
class Line:
    """Per-token time ``w + a * c`` (ms) of one batch size, fitted over the measured contexts."""

    batch: int
    w_ms: float  # per token at context 0
    a_ms_per_1k: float  # added per token per 1,024 cached tokens

    def at(self, context: float) -> float:
        return self.w_ms + self.a_ms_per_1k * context / 1024


def fit_line(batch: int, contexts: Sequence[float], ms_per_token: Sequence[float]) -> Line:
    """Least-squares line through (context, ms per token)."""
    if len(contexts) < 2:
        raise InvalidArgumentError("fitting a line needs at least two contexts")
    slope, intercept = np.polyfit(np.asarray(contexts, float), np.asarray(ms_per_token, float), 1)
    return Line(batch, float(intercept), float(slope) * 1024)


def full_prefill_ms(line: Line, n_tokens: int) -> float:
    """Sum over the prefill's batches of (batch tokens x per-token time at the batch's mean context)."""
    total = 0.0
    for start in range(0, n_tokens, line.batch):
        size = min(line.batch, n_tokens - start)
        total += size * line.at(start + (size - 1) / 2)
    return total


def _build_context(ctx: LlamaContext, state: np.ndarray, n_cached: int) -> None:
    """Fill sequence 0 with ``n_cached`` cells: the chunk's state restored at offsets 0, 512, 1024, ..."""
    ctx.clear()
    chunks = n_cached // CHUNK
    for k in range(chunks):
        ctx.state_seq_set(k + 1, state)
        if k:
            ctx.seq_add(k + 1, 0, -1, k * CHUNK)  # positions 0..511 -> k*512 .. k*512+511
    if chunks:
        ctx.apply_pending_shift()
    for k in range(chunks):
        ctx.seq_cp(k + 1, 0)
        ctx.seq_rm(k + 1)


def _time_decode(ctx: LlamaContext, tokens: Sequence[int], start: int) -> float:
    """Milliseconds to decode ``tokens`` at ``start`` into sequence 0 (removed again afterwards)."""
    began = time.perf_counter()
    ctx.decode(tokens, seq_id=0, start=start, logits="last")
    elapsed = (time.perf_counter() - began) * 1000
    ctx.seq_rm(0, start, -1)
    return elapsed


def measure(model_name: str, sizes: Sequence[int], batches: Sequence[int], threads: int, runs: int,
            uncached: int, large_runs: int = 1) -> dict[str, Any]:
    """Measure the cost lines and the ceiling per size (medians of ``runs`` small-batch decodes and ``large_runs``
    512-token decodes per context); see the module docstring."""
    if not sizes or any(s <= 0 or s % CHUNK for s in sizes):
        raise InvalidArgumentError(f"sizes must be positive multiples of {CHUNK}, got {list(sizes)}")
    if uncached not in batches:
        batches = sorted({*batches, uncached})
    if max(batches) > CHUNK:
        raise InvalidArgumentError(f"small batches must be at most {CHUNK} tokens, got {max(batches)}")
    path = resolve_model(model_name)
    contexts = sorted({0, *sizes})
    model = LlamaModel(path)
    text_tokens = model.tokenize(corpus_text()[: 40 * CHUNK])
    if len(text_tokens) < 2 * CHUNK:
        raise InvalidArgumentError("the corpus is too short for two 512-token chunks")
    chunk, probe = text_tokens[:CHUNK], text_tokens[CHUNK : 2 * CHUNK]
    settings = ContextSettings(n_ctx=max(sizes) + CHUNK, n_seq_max=max(sizes) // CHUNK + 1,
                               n_threads=threads, n_threads_batch=threads)
    per_token: dict[int, list[float]] = {b: [] for b in (CHUNK, *batches)}
    decode_ms: dict[int, dict[int, float]] = {b: {} for b in batches}
    with LlamaContext(model, settings) as ctx:
        ctx.decode(chunk, seq_id=1, start=0, logits="none")
        state = ctx.state_seq_get(1).copy()
        for c in contexts:
            _build_context(ctx, state, c)
            _time_decode(ctx, probe[:8], c)  # warm-up
            # batch sizes alternate run by run, so that a slow spell of a shared machine hits all of them
            samples: dict[int, list[float]] = {b: [] for b in per_token}
            for r in range(max(runs, large_runs)):
                for b in per_token:
                    if r < (large_runs if b == CHUNK else runs):
                        samples[b].append(_time_decode(ctx, probe[:b], c))
            for b, values in samples.items():
                per_token[b].append(statistics.median(values) / b)
                if b != CHUNK:
                    decode_ms[b][c] = statistics.median(values)
            logger.info("context %d: %s ms/token", c, {b: round(v[-1], 2) for b, v in per_token.items()})
    model.close()
    # a batch of b tokens at context c: its tokens attend to c + (b - 1) / 2 cached tokens on average
    lines = {b: fit_line(b, [c + (b - 1) / 2 for c in contexts], per_token[b]) for b in per_token}
    rows = []
    for n in sizes:
        full = full_prefill_ms(lines[CHUNK], n + uncached)
        # the same tokens if a small batch ran at the 512-token batch's per-token cost (at its own context)
        ideal = uncached * lines[CHUNK].at(n + (uncached - 1) / 2)
        rows.append({"cached_tokens": n, "full_prefill_ms_estimate": round(full),
                     "uncached_decode_ms": round(decode_ms[uncached][n], 1),
                     "ceiling_speedup": round(full / decode_ms[uncached][n], 1),
                     "ideal_decode_ms": round(ideal, 1), "ideal_ceiling_speedup": round(full / ideal, 1)})
    return {
        "model": path.name, "threads": threads, "runs": runs, "large_runs": large_runs, "uncached_tokens": uncached,
        "machine": machine_info(threads),
        "lines": [asdict(line) for line in lines.values()],
        "measured_ms_per_token": {str(b): dict(zip(map(str, contexts), (round(v, 3) for v in per_token[b]),
                                                   strict=True)) for b in per_token},
        "rows": rows,
    }


def render_markdown(result: dict[str, Any]) -> str:
    lines_out = ["| batch (tokens) | ms per token at context 0 | + ms per token per 1K cached |", "|---:|---:|---:|"]
    for line in result["lines"]:
        lines_out.append(f"| {line['batch']} | {line['w_ms']:.1f} | {line['a_ms_per_1k']:.2f} |")
    lines_out += ["", f"| cached tokens | full prefill (estimate) | decode of {result['uncached_tokens']} uncached "
                      "tokens | ceiling speedup | ceiling at large-batch speed |", "|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines_out.append(f"| {row['cached_tokens']:,} | {row['full_prefill_ms_estimate'] / 1000:.1f} s "
                         f"| {row['uncached_decode_ms']:.0f} ms | {row['ceiling_speedup']:.0f}x "
                         f"| {row['ideal_ceiling_speedup']:.0f}x |")
    machine = result["machine"]
    lines_out += ["", f"Model {result['model']}, {result['threads']} threads, {machine.get('cpu')}."]
    return "\n".join(lines_out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sizes", default="2048,4096,8192", help="cached context sizes (multiples of 512)")
    parser.add_argument("--batches", default="16,24,64", help="small batch sizes to time (tokens)")
    parser.add_argument("--uncached", type=int, default=24, help="uncached tokens of an answer (bench: 24)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed decodes per small batch and context (median)")
    parser.add_argument("--large-runs", type=int, default=2, help="timed 512-token decodes per context (median)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(options.model, [int(s) for s in options.sizes.split(",")],
                     [int(b) for b in options.batches.split(",")], options.threads, options.runs, options.uncached,
                     options.large_runs)
    print(json.dumps(result, indent=1) if options.json else render_markdown(result))


if __name__ == "__main__":
    main()
