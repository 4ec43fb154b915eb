"""A circuit breaker for a remote service that answers may not depend on.

A failure opens the breaker: one warning is logged, and callers skip the service (``allow()`` is False) for
``retry_after_s`` seconds. Then calls are let through again; if one fails the breaker opens again, quietly (debug
log); if one succeeds the breaker closes and an info line says the service is back (a later outage is warned about
again). Failures are counted.

    >>> b = CircuitBreaker("Redis at redis://h:6379/0", retry_after_s=30.0)
    >>> b.allow()
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, what: str, *, retry_after_s: float, hint: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self.hint = hint
        self.failures = 0
        self._clock = clock
        self._open_until: float | None = None  # None: closed (the service is used)
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether to call the service now: closed, or open and due for a retry."""
        with self._lock:
            return self._open_until is None or self._clock() >= self._open_until

    def failure(self, exc: BaseException) -> None:
        """Count a failed call and open the breaker; one warning per outage."""
        with self._lock:
            self.failures += 1
            was_open = self._open_until is not None
            self._open_until = self._clock() + self.retry_after_s
        if not was_open:
            logger.warning("%s is unavailable (%s: %s); using the local tiers only, retrying every %.0f s%s",
                           self.what, type(exc).__name__, exc, self.retry_after_s, self.hint)
        else:
            logger.debug("%s still unavailable: %s", self.what, exc)

    def success(self) -> None:
        with self._lock:
            was_open = self._open_until is not None
            self._open_until = None
        if was_open:
            logger.info("%s is reachable again", self.what)
