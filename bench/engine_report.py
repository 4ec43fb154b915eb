"""Engine numbers for one model: prefill throughput, and the size and save/restore time of a sequence state.

    python -m pccpu.bench.engine_report --model smollm2 --tokens 2048 --threads 2

Prints one JSON object: prefill tokens/s (median of --runs), state bytes per token against the theoretical KV size,
save (llama_state_seq_get_data into a preallocated buffer) and restore (set_data) times in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pccpu.engine import ContextSettings, LlamaContext, LlamaModel
from pccpu.models import resolve_model


def measure(model_name: str, n_tokens: int, threads: int, runs: int) -> dict[str, object]:
    path = resolve_model(model_name)
    model = LlamaModel(path)
    settings = ContextSettings(n_ctx=2 * n_tokens + 64,  # room for the restored copy too
                                n_seq_max=2, n_threads=threads, n_threads_batch=threads)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(100, model.info.n_vocab - 100, size=n_tokens)]
    with LlamaContext(model, settings) as ctx:
        ctx.decode(tokens[:32], seq_id=0, start=0, logits="none")  # warm-up
        prefill = []
        for _ in range(runs):
            ctx.clear()
            started = time.perf_counter()
            ctx.decode(tokens, seq_id=0, start=0, logits="last")
            prefill.append(time.perf_counter() - started)
        buffer = np.empty(ctx.state_seq_size(0), dtype=np.uint8)
        saves, restores = [], []
        for _ in range(max(3, runs)):
            started = time.perf_counter()
            state = ctx.state_seq_get(0, into=buffer)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            ctx.state_seq_set(1, state)
            restores.append(time.perf_counter() - started)
            ctx.seq_rm(1)
        theoretical = settings.kv_bytes_per_token(model)
    model.close()
    return {
        "model": path.name, "tokens": n_tokens, "threads": threads,
        "prefill_tokens_per_s": round(n_tokens / statistics.median(prefill), 1),
        "state_bytes": int(state.nbytes), "state_bytes_per_token": round(state.nbytes / n_tokens, 1),
        "kv_bytes_per_token_theoretical": theoretical,
        "save_ms": round(statistics.median(saves) * 1000, 2),
        "restore_ms": round(statistics.median(restores) * 1000, 2),
        "restore_gb_per_s": round(state.nbytes / statistics.median(restores) / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    for name in options.model or ["smollm2"]:
        print(json.dumps(measure(name, options.tokens, options.threads, options.runs)))


if __name__ == "__main__":
    main()
