"""One thread owns the PromptCache: requests wait in a bounded queue, are answered in arrival order, and stream
their text back through a per-request queue.

With ``parallel`` > 1, chat and completion requests are generated together (``PromptCache.batch``, continuous
batching): each is prefilled when its turn comes, then joins the answers in flight, one decode per step for all of
them; a request that cannot join yet (every lane taken, too few KV cells, its conversation busy) waits for one to
end. Any other request (PML, schemas, drafts) runs alone once the answers in flight have ended.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pccpu.errors import PccpuError
from pccpu.service import Answer, Batch, PromptCache, Result, Ticket

logger = logging.getLogger(__name__)

END = object()  # delivered after a job's Result (or its error)
NOT_STARTED = object()


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
    batchable: bool = False  # ``start`` only creates a chat() or complete() answer (no other use of the cache)


class Worker:
    def __init__(self, cache: PromptCache, *, max_queue: int = 16, parallel: int = 1) -> None:
        self.cache = cache
        self.parallel = parallel
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._waiting: deque[tuple[Job, Answer]] = deque()  # batchable answers not admitted yet
        self._running: dict[Ticket, Job] = {}
        self._batch: Batch | None = None
        self._thread = threading.Thread(target=self._loop if parallel == 1 else self._loop_batched,
                                        name="pccpu-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize() + len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Answers being generated now (batched mode)."""
        return len(self._running)

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

    def _run(self, job: Job, answer: Any = NOT_STARTED) -> None:
        """Run ``job`` alone (``answer``: what its ``start`` returned already)."""
        try:
            if answer is NOT_STARTED:
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

    # -- batched mode ------------------------------------------------------------------------------------------
    def _loop_batched(self) -> None:
        try:
            while self._take_jobs():
                self._admit()
                self._step()
                if not self._running and not self._waiting:
                    self._close_batch()
        finally:
            self._close_batch()

    def _take_jobs(self) -> bool:
        """Move arriving jobs into the waiting line (a non-batchable one runs alone, after everything before it);
        block only when nothing else is to be done. False once the worker is stopped."""
        while len(self._waiting) < self.parallel:
            idle = not self._running and not self._waiting
            try:
                job = self._jobs.get(block=idle)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled.is_set():
                self._deliver(job, END)
                continue
            if not job.batchable:
                self._drain()
                self._run(job)
                continue
            try:
                answer = job.start(self.cache)
            except Exception as exc:
                self._finish_job(job, exc)
                continue
            if not isinstance(answer, Answer) or not answer.batchable:
                self._drain()
                self._run(job, answer)
                continue
            self._waiting.append((job, answer))
        return True

    def _admit(self) -> None:
        """Admit waiting answers in arrival order while the batch takes them."""
        while self._waiting:
            job, answer = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                answer.close()
                self._deliver(job, END)
                continue
            if self._batch is None:
                self._batch = self.cache.batch(self.parallel)
            try:
                ticket = self._batch.admit(answer)
            except Exception as exc:
                self._waiting.popleft()
                self._finish_job(job, exc)
                continue
            if ticket is None:
                return
            self._waiting.popleft()
            for text in ticket.texts:
                self._deliver(job, text)
            if ticket.done:
                self._finish_ticket(ticket, job)
            else:
                self._running[ticket] = job

    def _step(self) -> None:
        """One token for every answer in flight; answers whose client left are stopped."""
        if self._batch is None or not self._running:
            return
        try:
            events = self._batch.step()
        except PccpuError:
            logger.exception("a batched decode failed: its answers end with the error")
            events = []
        except Exception:  # a bug: every answer in flight gets it, the server keeps serving
            logger.exception("a batched decode failed")
            events = []
        for ticket, text in events:
            job = self._running.get(ticket)
            if job is not None:
                self._deliver(job, text)
        for ticket, job in list(self._running.items()):
            if not ticket.done and job.cancelled.is_set():
                self._batch.cancel(ticket)
            if ticket.done:  # ended, failed or cancelled: out of the batch
                del self._running[ticket]
                self._finish_ticket(ticket, job)

    def _drain(self) -> None:
        """Generate every answer admitted or waiting to its end, then give the cache back."""
        while self._running or self._waiting:
            self._admit()
            self._step()
        self._close_batch()

    def _close_batch(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            batch.close()
            for ticket, job in list(self._running.items()):  # stopped by the close
                del self._running[ticket]
                self._finish_ticket(ticket, job)

    def _finish_ticket(self, ticket: Ticket, job: Job) -> None:
        outcome: Any = ticket.result if ticket.result is not None else ticket.error
        if outcome is None:
            outcome = PccpuError("the answer ended without a result")
        self._finish_job(job, outcome)

    def _finish_job(self, job: Job, outcome: Any) -> None:
        if isinstance(outcome, Exception) and not isinstance(outcome, PccpuError):
            logger.error("request failed: %r", outcome)
        self._deliver(job, outcome)
        self._deliver(job, END)
