"""The systems measured, each answering the same request with one generated token (time to first token, TTFT):

- ``full``: full prefill of the prompt's tokens (``PromptCache.ask(cache=False)``: the same text written out).
- ``llama-ram`` / ``llama-disk``: llama-cpp-python's ``Llama`` with ``LlamaRAMCache`` / ``LlamaDiskCache``, warmed with
  the previous request (see ``workloads.py``), as a user of that library gets caching today. The warm state is
  computed once per row and put into a fresh cache before every run (a disk hit deletes its entry, and a run's own
  save would otherwise serve the next run). The context is reset before each request, so only the cache can help.
  TTFT is the time to the first streamed chunk of ``create_completion`` (the cache save that follows is not counted).
- ``pccpu-ram``: a warm ``PromptCache`` whose modules are encoded and in RAM (``reuse_previous=False``: every answer is
  assembled from a cleared cache, as the llama-cpp-python side resets its context).
- ``pccpu-disk``: a fresh process (``disk_worker.py``) that opens a ``PromptCache`` on the same store and answers from
  the disk tier; its model load time is reported apart from TTFT.

All use the same n_threads (batch and single-token), n_batch, n_ctx and flash attention setting.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pccpu.service import Result
from pccpu.store.entry_file import FILE_SUFFIX

logger = logging.getLogger(__name__)

SYSTEMS = ("full", "llama-ram", "llama-disk", "pccpu-ram", "pccpu-disk")
NAMESPACE = "bench"


@dataclass(frozen=True)
class RunSettings:
    model_path: str
    n_ctx: int
    threads: int
    n_batch: int = 512
    flash_attn: bool = False  # as PromptCache: results independent of batch splits
    store_dir: str = ""

    def prompt_cache_kwargs(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_threads": self.threads,
                "flash_attn": self.flash_attn, "store_dir": self.store_dir, "namespace": NAMESPACE, "persist": True}


def result_sample(result: Result) -> dict[str, Any]:
    """The fields of a pccpu answer the report uses."""
    stored = [m for m in result.modules if m.source in ("ram", "disk")]
    return {
        "ttft_ms": result.ttft_ms,
        "timings": asdict(result.timings),
        "first_token": result.text,
        "cached_tokens": result.cached_tokens,
        "uncached_tokens": result.uncached_tokens,
        "reused_tokens": result.session_tokens,
        "prompt_tokens": result.prompt_tokens,
        "state_bytes": sum(m.state_bytes for m in stored),
        "sources": sorted({m.source for m in result.modules}),
    }


def first_token_kl(reference: Any, other: Any) -> float | None:
    """KL(reference || other) of two next-token distributions given as logits; None when one is missing."""
    if reference is None or other is None:
        return None
    from pccpu.bench.fidelity import kl_divergence

    return kl_divergence(reference, other)


def longest_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PccpuSide:
    """A warm PromptCache with the workload's schema encoded (and written to the disk tier for the fresh process)."""

    def __init__(self, settings: RunSettings, schema: str, prompt: str, previous: str) -> None:
        from pccpu.service import PromptCache

        self.settings = settings
        self.prompt = prompt
        self.last_logits: dict[str, Any] = {}  # first-token logits of the last full / pccpu-ram answer
        # modules from RAM, every answer assembled from a cleared cache: keeping the previous answer's cells is
        # in-context reuse, which llama-cpp-python's Llama also does without reset() (not what these rows compare)
        self.pc = PromptCache(settings.model_path, reuse_previous=False, **settings.prompt_cache_kwargs())
        try:
            self.pc.clear_store()
            started = time.perf_counter()
            self.pc.add_schema(schema)
            self.encode_ms = (time.perf_counter() - started) * 1000
            encode = self.pc.stats().encode
            self.encode_tokens = encode.tokens
            self.encode_tokens_per_s = encode.tokens_per_second
            plan = self.pc.plan(prompt).plan
            self.tokens = list(plan.baseline_tokens())
            self.previous_tokens = list(self.pc.plan(previous).plan.baseline_tokens())
            self.cached_tokens = plan.cached_tokens
            self.uncached_tokens = plan.uncached_tokens
            self.kv_bytes_per_token = self.pc.kv_bytes_per_token
        except BaseException:
            self.pc.close()
            raise

    def store_files(self) -> list[Path]:
        folder = self.pc.stats().store.disk_path
        return sorted(Path(folder).glob(f"*{FILE_SUFFIX}")) if folder is not None else []

    def full(self) -> dict[str, Any]:
        result = self.pc.ask(self.prompt, cache=False, max_tokens=1, keep_logits=True).result()
        self.last_logits["full"] = result.first_logits
        return result_sample(result)

    def ram(self) -> dict[str, Any]:
        result = self.pc.ask(self.prompt, max_tokens=1, keep_logits=True).result()
        self.last_logits["pccpu-ram"] = result.first_logits
        sample = result_sample(result)
        if sample["sources"] != ["ram"]:
            logger.warning("pccpu-ram run served modules from %s, not only RAM", sample["sources"])
        return sample

    def close(self) -> None:
        self.pc.close()


class LlamaCacheSide:
    """llama-cpp-python's ``Llama`` warmed once with the previous request; each run gets a fresh cache holding
    only that warm state."""

    def __init__(self, settings: RunSettings, tokens: list[int], previous_tokens: list[int], scratch: Path) -> None:
        from llama_cpp import Llama

        self.tokens = tokens
        self.scratch = scratch
        started = time.perf_counter()
        self.llm = Llama(model_path=settings.model_path, n_ctx=settings.n_ctx, n_threads=settings.threads,
                         n_threads_batch=settings.threads, n_batch=settings.n_batch, n_ubatch=settings.n_batch,
                         flash_attn=settings.flash_attn, verbose=False)
        self.load_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        self.llm.create_completion(previous_tokens, max_tokens=1, temperature=0.0)
        self.warm_ms = (time.perf_counter() - started) * 1000
        self.warm_state = self.llm.save_state()
        self.warm_key = [int(t) for t in self.warm_state.input_ids[: self.warm_state.n_tokens]]
        self.reusable_tokens = longest_prefix(previous_tokens, tokens)

    def run(self, kind: str) -> dict[str, Any]:
        from llama_cpp import LlamaDiskCache, LlamaRAMCache

        cache_dir: Path | None = None
        if kind == "llama-ram":
            cache: Any = LlamaRAMCache(capacity_bytes=1 << 40)
        else:
            cache_dir = Path(tempfile.mkdtemp(prefix="llama-disk-", dir=self.scratch))
            cache = LlamaDiskCache(cache_dir=str(cache_dir), capacity_bytes=1 << 40)
        # LlamaDiskCache prints to stderr on every set; keep that out of the CLI's output
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return self._run(cache)
            finally:
                self.llm.set_cache(None)  # type: ignore[arg-type]
                if cache_dir is not None:
                    cache.cache.close()
                    shutil.rmtree(cache_dir, ignore_errors=True)

    def _run(self, cache: Any) -> dict[str, Any]:
        cache[self.warm_key] = self.warm_state
        self.llm.set_cache(cache)
        self.llm.reset()
        started = time.perf_counter()
        stream = self.llm.create_completion(self.tokens, max_tokens=1, temperature=0.0, stream=True)
        first = next(iter(stream))
        ttft_ms = (time.perf_counter() - started) * 1000
        for _ in stream:  # the rest: the final chunk and the cache's save (not timed)
            pass
        text = first["choices"][0]["text"]  # type: ignore[index]
        return {"ttft_ms": ttft_ms, "first_token": text, "reused_tokens": self.reusable_tokens,
                "state_bytes": self.warm_state.llama_state_size}

    def close(self) -> None:
        self.llm.close()


def run_disk_worker(settings: RunSettings, schema: str, prompt: str, asks: int, timeout_s: float = 3600) -> dict:
    """Answer ``prompt`` ``asks`` times from the disk tier in a fresh process; its report (see ``disk_worker.py``)."""
    with tempfile.TemporaryDirectory(prefix="pccpu-bench-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"settings": asdict(settings), "schema": schema, "prompt": prompt, "asks": asks}))
        cmd = [sys.executable, "-m", "pccpu.bench.disk_worker", str(job)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"the disk-tier worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
