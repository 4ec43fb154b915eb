"""``Answer``: one object for a streamed and a blocking answer (simonw/llm's ``Response`` is the model).

    answer = pc.ask(prompt)
    for piece in answer:          # text as it is generated
        print(piece, end="")
    print(answer.result().ttft_ms)

    pc.ask(prompt).text()         # or block until the end

Nothing runs until the answer is iterated or ``result()``/``text()`` is called; from then until it ends (or is
closed) it holds its PromptCache, and a second request in the meantime gets a ``BusyError``. ``close()`` stops
generation early; the result then has ``finish_reason == "cancelled"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pccpu.errors import SessionError
from pccpu.service.result import Result

if TYPE_CHECKING:
    from pccpu.service.batching import ChatJob

# starts the request: gets a callback for the Result (called once, also when the answer is closed early) and
# returns the generator of text pieces
Runner = Callable[[Callable[[Result], None]], Iterator[str]]


class _ResultBox:
    """Where the running request leaves its Result. The request's generator holds this box, not the Answer: an
    Answer dropped mid-stream is freed at once (no reference cycle), which closes the generator and frees the
    PromptCache for the next request."""

    def __init__(self) -> None:
        self.result: Result | None = None

    def set(self, result: Result) -> None:
        self.result = result


class Answer:
    def __init__(self, runner: Runner, batch_job: ChatJob | None = None) -> None:
        self._runner: Runner | None = runner
        self._batch_job = batch_job  # what a Batch runs instead (chat and complete answers)
        self._held_runner: Runner | None = None  # while a batch holds the job
        self._pieces: Iterator[str] | None = None
        self._chunks: list[str] = []
        self._box = _ResultBox()
        self._error: BaseException | None = None  # what stopped the request, raised again by result()
        self._closed = False

    @property
    def _result(self) -> Result | None:
        return self._box.result

    def __iter__(self) -> Iterator[str]:
        """The answer's text pieces; iterating a finished answer gives them again."""
        if self._pieces is None and self._runner is not None and not self._closed:
            self._pieces = self._runner(self._box.set)
            self._runner = None
        if self._pieces is None or self._result is not None:
            yield from list(self._chunks)
            return
        yield from self._chunks  # pieces an earlier, interrupted loop already took
        try:
            for piece in self._pieces:
                self._chunks.append(piece)
                yield piece
        except Exception as exc:
            self._error = exc
            raise

    def result(self) -> Result:
        """Run the answer to its end (if it is not there yet) and return its Result."""
        if self._error is not None:
            raise self._error
        for _ in self:
            pass
        if self._result is None:
            raise SessionError("this answer was closed before it started, so it has no result; ask again")
        return self._result

    def text(self) -> str:
        return self.result().text

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def batchable(self) -> bool:
        """Whether ``Batch.admit`` can take this answer (a chat() or complete() answer with cache, not started)."""
        return self._batch_job is not None and self._runner is not None and self._pieces is None and not self._closed

    def _take_batch_job(self) -> ChatJob | None:
        """For ``Batch.admit``: the request to run in a batch (None if it cannot be), this answer used up."""
        if not self.batchable:
            return None
        job, self._batch_job = self._batch_job, None
        self._held_runner, self._runner = self._runner, None
        return job

    def _give_back_batch_job(self, job: ChatJob) -> None:
        """The batch could not take it now: it may be admitted again later, or run alone."""
        self._batch_job, self._runner = job, self._held_runner

    def close(self) -> None:
        """Stop generating now (the cells generated so far stay with the session)."""
        self._closed = True
        self._runner = None
        if self._pieces is not None:
            self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "done" if self.done else "closed" if self._closed else "running" if self._pieces else "not started"
        return f"<Answer {state}: {''.join(self._chunks)[:40]!r}>"
