"""One thread owns the PromptCache: requests wait in a bounded queue, are answered one at a time in arrival order,
and stream their text back through a per-request queue.

Threading rules: llama.cpp's context is used by the worker thread only; the event loop never touches it. A request
that is cancelled (its client went away, or it timed out) is stopped within one generated token: the worker checks
the request's ``cancelled`` event after every text piece and closes the answer. A full queue is refused at once
(``QueueFullError``: the HTTP layer answers 429 with Retry-After) instead of letting latency grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pccpu.errors import PccpuError
from pccpu.service import Answer, PromptCache, Result

logger = logging.getLogger(__name__)

END = object()  # delivered after a job's Result (or its error)


class QueueFullError(PccpuError):
    """Every place in the request queue is taken."""


@dataclass
class Job:
    """One request: ``start`` runs on the worker thread. When it returns an Answer, its pieces, then its Result (or
    an exception), then END are handed to ``deliver``; any other value (a schema added, store statistics) is handed
    alone, then END. ``deliver`` is called on the worker thread (the server's puts into an asyncio queue through
    ``call_soon_threadsafe``, so no thread waits per request)."""

    start: Callable[[PromptCache], Any]
    deliver: Callable[[Any], object]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class Worker:
    def __init__(self, cache: PromptCache, *, max_queue: int = 16) -> None:
        self.cache = cache
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="pccpu-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"{self._jobs.maxsize} requests are waiting already; retry in a moment") from None

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self._deliver(job, END)
                continue
            self._run(job)

    @staticmethod
    def _deliver(job: Job, item: Any) -> None:
        try:
            job.deliver(item)
        except RuntimeError:  # the receiving event loop is closed (shutdown): stop generating for it
            job.cancelled.set()

    def _run(self, job: Job) -> None:
        try:
            answer = job.start(self.cache)
            if not isinstance(answer, Answer):
                self._deliver(job, answer)
                self._deliver(job, END)
                return
            for piece in answer:
                if job.cancelled.is_set():
                    answer.close()
                    break
                self._deliver(job, piece)
            result: Result | PccpuError = answer.result()
        except PccpuError as exc:
            result = exc
        except Exception as exc:  # a bug: the client gets a 500 with its type, the server keeps serving
            logger.exception("request failed")
            result = exc  # type: ignore[assignment]
        self._deliver(job, result)
        self._deliver(job, END)
