"""The smallest reproduction of llama.cpp's sliding-window state behaviour that pccpu works around
(docs/sliding-window.md).

``python -m pccpu.bench.swa_repro [--model gemma3-270m]`` uses llama-cpp-python's low-level API directly (no pccpu
engine code), with the context settings of a careful user: ``swa_full`` on (every cell kept), one unified KV cache,
flash attention off or on. For each prefix length k it compares the logits of the next tokens decoded

1. in place, after decoding the k prefix tokens (the reference);
2. after ``llama_state_seq_get_data`` of the sequence, ``llama_memory_clear`` and ``llama_state_seq_set_data``;
3. after pccpu's way: the same, in parts of half a window, each copied into another sequence before it is saved
   (``pccpu/engine/swa.py``), restored in order.

and prints the sequence's lowest position after the restore (``llama_memory_seq_pos_min``, taken from the SWA cache)
and the largest logit difference. Expected for 2: the state round-trips (pos_min 0, difference 0), as it does for
every k below the window. Seen on the CI machine with gemma-3-270m (window 512): from k = 513 on, pos_min is
``k - 512`` and the logits differ (max ~1, KL ~5e-3), with flash attention on and off; 3 is exact.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from typing import Any

import numpy as np

from pccpu.bench.corpus import corpus_text
from pccpu.bench.fidelity import kl_divergence
from pccpu.engine._lib import lib
from pccpu.models import fetch_model


class Context:
    """One llama.cpp context with the settings above, and the three calls the reproduction needs."""

    def __init__(self, llama: Any, model: Any, flash: bool, threads: int) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, 512, 2
        params.n_threads = params.n_threads_batch = threads
        params.swa_full, params.kv_unified = True, True
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.llama = llama
        self.ctx = llama.llama_init_from_model(model, params)
        self.mem = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(512, 0, 1)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))

    def decode(self, tokens: list[int], start: int, seq: int = 0) -> np.ndarray:
        """Logits of every token, decoded at positions start, start + 1, ... in batches of 512."""
        rows = []
        for offset in range(0, len(tokens), 512):
            chunk = tokens[offset : offset + 512]
            self.batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, start + offset + i, 1
                self.batch.seq_id[i][0], self.batch.logits[i] = seq, 1
            if self.llama.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows += [np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                     for i in range(len(chunk))]
        return np.stack(rows)

    def save(self, seq: int) -> bytes:
        size = self.llama.llama_state_seq_get_size(self.ctx, seq)
        data = (ctypes.c_uint8 * size)()
        self.llama.llama_state_seq_get_data(self.ctx, data, size, seq)
        return bytes(data)

    def restore(self, blob: bytes, seq: int) -> None:
        data = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if self.llama.llama_state_seq_set_data(self.ctx, data, len(blob), seq) == 0:
            raise RuntimeError("llama_state_seq_set_data failed")

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)


def compare(c: Context, tokens: list[int], k: int, n_swa: int) -> str:
    """Save after k tokens both ways, restore each into a cleared cache, decode 200 more; one line of results."""
    llama, mem = c.llama, c.mem
    follow = tokens[k : k + 200]
    llama.llama_memory_clear(mem, True)
    c.decode(tokens[:k], 0)
    whole = c.save(0)
    span = max(1, n_swa // 2)  # pccpu's parts: every cell of a part is visible from the part's last one
    parts = []
    for p0 in range(0, k, span):
        llama.llama_memory_seq_cp(mem, 0, 1, p0, p0 + span)
        parts.append(c.save(1))
        llama.llama_memory_seq_rm(mem, 1, -1, -1)
    reference = c.decode(follow, k)
    results = []
    for name, blobs in (("llama.cpp state", [whole]), ("pccpu parts", parts)):
        llama.llama_memory_clear(mem, True)
        for i, blob in enumerate(blobs):
            c.restore(blob, 0 if i == 0 else 1)
            if i:
                llama.llama_memory_seq_cp(mem, 1, 0, -1, -1)
                llama.llama_memory_seq_rm(mem, 1, -1, -1)
        pos_min = llama.llama_memory_seq_pos_min(mem, 0)
        got = c.decode(follow, k)
        diff = float(np.abs(got - reference).max())
        kl = max(kl_divergence(reference[i], got[i]) for i in range(len(follow)))
        results.append(f"{name}: pos_min {pos_min:4d}, max logit diff {diff:.3f}, max KL {kl:.1e}")
    return f"k={k:4d} (state {len(whole) / 1e6:5.1f} MB): " + " | ".join(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    llama = lib()  # llama_cpp with its log routed to Python logging (quiet)
    model = llama.llama_model_load_from_file(str(fetch_model(args.model)).encode(),
                                             llama.llama_model_default_params())
    vocab = llama.llama_model_get_vocab(model)
    n_swa = llama.llama_model_n_swa(model)
    text = corpus_text()[:20000].encode()
    buf = (llama.llama_token * len(text))()
    n = llama.llama_tokenize(vocab, text, len(text), buf, len(text), True, False)
    tokens = list(buf[:n])
    print(f"model {args.model}: n_swa {n_swa}; {llama.llama_print_system_info().decode().strip()}")
    for flash in (False, True):
        c = Context(llama, model, flash, args.threads)
        for k in (300, 512, 513, 700, 1000):
            print(f"flash_attn {'on ' if flash else 'off'} {compare(c, tokens, k, n_swa)}", flush=True)
        c.close()
    llama.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
