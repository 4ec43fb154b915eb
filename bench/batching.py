"""Would decoding several requests together be faster on this CPU? (issue #13, item 5: measure before building.)

    python -m pccpu.bench.batching [--model qwen2.5-coder-0.5b] [--context 1024] [--batch 1,2,4] [--steps 24]

Uses llama-cpp-python's low-level API directly, one context with ``max(--batch)`` sequences, each holding its own
``--context`` tokens of real text (decoded first, not timed). Then, for each B in ``--batch``:

- **generation**: ``--steps`` decode steps of one new token in each of B sequences, (a) as one ``llama_decode`` of
  B tokens (what a batching server does) and (b) as B calls of one token (what a server that serves one request at
  a time does over the same interval); reported as ms per step and tokens per second over all sequences;
- **prefill**: B prompts of ``--prompt`` new tokens each, (a) in one ``llama_decode`` and (b) one after another.

The two ways alternate step by step (the machine's speed drifts), medians are reported. The answer for a server:
batching pays where (b) / (a) is well above 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from pccpu.bench.args import positive_ints
from pccpu.bench.corpus import corpus_text
from pccpu.engine._lib import lib
from pccpu.models import resolve_model


class Batcher:
    """One context with ``n_seq`` sequences and a batch that can carry tokens of several sequences."""

    def __init__(self, llama: Any, model: Any, n_seq: int, n_ctx: int, threads: int) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, 512, 512, n_seq
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED  # pccpu's default
        self.llama = llama
        self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {n_seq} sequences")
        self.batch = llama.llama_batch_init(512, 0, 1)
        self.next_pos = [0] * n_seq

    def decode(self, items: list[tuple[int, list[int]]]) -> None:
        """One llama_decode of ``tokens`` appended to each listed sequence (at most 512 tokens in all)."""
        n = sum(len(tokens) for _, tokens in items)
        if n > 512:
            raise ValueError(f"{n} tokens do not fit one batch of 512")
        i = 0
        for seq, tokens in items:
            for j, token in enumerate(tokens):
                self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, self.next_pos[seq] + j, 1
                self.batch.seq_id[i][0], self.batch.logits[i] = seq, int(j == len(tokens) - 1)
                i += 1
            self.next_pos[seq] += len(tokens)
        self.batch.n_tokens = n
        if self.llama.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def decode_apart(self, items: list[tuple[int, list[int]]]) -> None:
        """The same tokens, one llama_decode per sequence."""
        for item in items:
            self.decode([item])

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)


def timed(decode: Callable[[list[tuple[int, list[int]]]], None], items: list[tuple[int, list[int]]]) -> float:
    began = time.perf_counter()
    decode(items)
    return (time.perf_counter() - began) * 1000


def measure(model_name: str, context: int, batches: list[int], steps: int, prompt: int, threads: int) -> list[dict]:
    llama = lib()
    path = resolve_model(model_name)
    mparams = llama.llama_model_default_params()
    model = llama.llama_model_load_from_file(str(path).encode(), mparams)
    vocab = llama.llama_model_get_vocab(model)
    text = corpus_text()[: context * 12].encode()
    buf = (llama.llama_token * (context * 4))()
    n = llama.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    if n < context + prompt:
        raise RuntimeError(f"the corpus slice gave {n} tokens, fewer than {context + prompt}")
    tokens = list(buf[:n])
    n_seq = max(batches)
    # every sequence: its context, then per B the generation steps of both ways and the prompts of both ways
    n_ctx = n_seq * (context + len(batches) * 2 * (steps + prompt) + 64)
    rows = []
    b = Batcher(llama, model, n_seq, n_ctx, threads)
    try:
        for seq in range(n_seq):
            for offset in range(0, context, 512):
                b.decode([(seq, tokens[offset : min(offset + 512, context)])])
        for size in batches:
            seqs = list(range(size))
            together, apart = [], []
            for step in range(steps):
                step_items = [(s, [tokens[context + step]]) for s in seqs]
                together.append(timed(b.decode, step_items))
                apart.append(timed(b.decode_apart, step_items))
            prompts = [(s, tokens[context : context + prompt]) for s in seqs]
            prefill_together = timed(b.decode, prompts) if size * prompt <= 512 else None
            prefill_apart = timed(b.decode_apart, prompts)
            step_together, step_apart = statistics.median(together), statistics.median(apart)
            rows.append({"batch": size, "context": context, "step_ms_together": step_together,
                         "step_ms_apart": step_apart, "tokens_per_s_together": size * 1000 / step_together,
                         "tokens_per_s_apart": size * 1000 / step_apart, "gain": step_apart / step_together,
                         "prefill_tokens": prompt, "prefill_ms_together": prefill_together,
                         "prefill_ms_apart": prefill_apart,
                         "prefill_gain": prefill_apart / prefill_together if prefill_together else None})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        b.close()
        llama.llama_model_free(model)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name or .gguf path")
    parser.add_argument("--context", type=int, default=1024, help="tokens already in each sequence")
    parser.add_argument("--batch", type=positive_ints, default=[1, 2, 4],
                        help="comma list of sequence counts decoded together")
    parser.add_argument("--steps", type=int, default=24, help="generation steps per batch size")
    parser.add_argument("--prompt", type=int, default=64, help="new prompt tokens per sequence for the prefill row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.context < 1 or args.steps < 1 or args.prompt < 1:
        parser.error("--context, --steps and --prompt must be positive")
    rows = measure(args.model, args.context, args.batch, args.steps, args.prompt, args.threads)
    print("| sequences | ms per step, together | ms per step, one by one | tokens/s together | tokens/s one by one | "
          "generation gain | prefill ms together / apart | prefill gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        prefill = (f"{r['prefill_ms_together']:.0f} / {r['prefill_ms_apart']:.0f}" if r["prefill_ms_together"]
                   else f"- / {r['prefill_ms_apart']:.0f}")
        gain = f"{r['prefill_gain']:.2f}x" if r["prefill_gain"] else "-"
        print(f"| {r['batch']} | {r['step_ms_together']:.1f} | {r['step_ms_apart']:.1f} | "
              f"{r['tokens_per_s_together']:.1f} | {r['tokens_per_s_apart']:.1f} | {r['gain']:.2f}x | {prefill} | "
              f"{gain} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
