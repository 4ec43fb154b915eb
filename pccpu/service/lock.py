"""Who may use a PromptCache's context now: one foreground call at a time, type-ahead in the gaps.

Foreground calls (``ask``, ``chat``, ``add_schema``, ...) hold the cache for their whole run, a streamed answer
included; a second foreground caller meanwhile gets :class:`~pccpu.errors.BusyError`, as it always has. The
type-ahead worker (``typeahead.py``) is the one *background* holder: it takes the cache only when no call holds it or
waits for it, for one short step at a time. A foreground call that finds the worker holding the cache asks it to
yield (``preempt``: the worker interrupts a decode that call does not need) and waits for the end of the step,
instead of failing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from pccpu.errors import BusyError

Holder = Literal["foreground", "background"]

BUSY_MESSAGE = ("this PromptCache is busy with another call, or an earlier answer is still being streamed: finish it "
                "(result()) or close() it first; from several threads, use one PromptCache per thread or serialize "
                "the calls (for example with a queue)")


class CacheLock:
    """The holder of a PromptCache and a condition to wait on; ``cond`` also guards the type-ahead worker's state."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.holder: Holder | None = None
        self.waiting = 0  # foreground calls waiting for the background holder to finish its step
        self.preempt: Callable[[], None] | None = None  # called (under ``cond``) when a foreground call waits

    @contextmanager
    def foreground(self) -> Iterator[None]:
        with self.cond:
            if self.holder == "foreground" or self.waiting:
                raise BusyError(BUSY_MESSAGE)
            if self.holder == "background":
                self.waiting += 1
                try:
                    if self.preempt is not None:
                        self.preempt()
                    while self.holder is not None:
                        self.cond.wait()
                finally:
                    self.waiting -= 1
            self.holder = "foreground"
        try:
            yield
        finally:
            with self.cond:
                self.holder = None
                self.cond.notify_all()

    def free_for_background(self) -> bool:
        """Whether the background holder may take the cache now (call under ``cond``)."""
        return self.holder is None and not self.waiting
