"""Encode once per fleet: machines that share a remote store take a short lease on a module before encoding it.

    for turn in encode_turns(remote, groups, present):  # groups: the missing modules, by encoding pass
        encode_and_save(turn)                           # saving writes to the remote tier too

A turn lists the keys of one group whose lease this process holds; groups held by another machine are skipped and
come back later, so machines that start together split the work. While the caller encodes a turn, a heartbeat
thread renews its leases (``LEASE_TTL_MS``, renewed every third of it), so a holder that dies frees its modules within
seconds, and a holder that is merely slow keeps them. The leases are released when the caller asks for the next turn
(or closes the generator: use ``contextlib.closing``), after the entries were saved.

Keys that another machine holds are waited for: their leases are polled every ``POLL_S``; when one is gone,
``present(key)`` (a checked read through the store, which also keeps the entry on local disk) says whether the
holder stored it. Modules still missing then (the holder died, or could not write) are claimed again. Waiting is
bounded by ``MAX_WAIT_S``; after it the rest is encoded here without a lease. When the server cannot be asked, every
key is yielded at once: nobody coordinates, each machine encodes what it misses, as without a remote tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from types import TracebackType

from pccpu.store.keys import EntryKey
from pccpu.store.remote import RemoteTier

logger = logging.getLogger(__name__)

LEASE_TTL_MS = 10_000
POLL_S = 0.2
MAX_WAIT_S = 300.0  # a 4K-token module of a 1.5B model takes ~90 s on 2 cores; a stuck holder costs at most this


class Heartbeat:
    """Renews leases in a thread while the block runs; releases them after."""

    def __init__(self, remote: RemoteTier, keys: Sequence[EntryKey], ttl_ms: int) -> None:
        self._remote = remote
        self._keys = list(keys)
        self._ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pccpu-lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_ms / 3000):
            self._remote.renew(self._keys, self._ttl_ms)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._remote.release(self._keys)


def encode_turns(remote: RemoteTier, groups: Sequence[Sequence[EntryKey]], present: Callable[[EntryKey], bool], *,
                 ttl_ms: int = LEASE_TTL_MS, poll_s: float = POLL_S, max_wait_s: float = MAX_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> Generator[list[EntryKey], None, None]:
    """The keys to encode here, turn by turn (see the module docstring); together they cover every key that no
    other machine stored meanwhile. ``groups``: keys encoded together (one encoding pass each); a turn is the part
    of one group this process could lease, so machines that start together split a schema's passes among them."""
    pending = [list(dict.fromkeys(g)) for g in groups if g]
    deadline = clock() + max_wait_s
    while pending:
        elsewhere: list[list[EntryKey]] = []  # keys other machines hold, by group
        for index, group in enumerate(pending):
            claimed = remote.claim(group, ttl_ms)
            if claimed is None:  # the server cannot be asked: nobody coordinates, encode all that is left
                yield [k for g in [*elsewhere, *pending[index:]] for k in g]
                return
            # another machine may have stored some between this process's check and its claim
            stored_meanwhile = [k for k in group if k in claimed and remote.exists(k) and present(k)]
            if stored_meanwhile:
                remote.release(stored_meanwhile)
            mine = [k for k in group if k in claimed and k not in stored_meanwhile]
            if mine:
                with Heartbeat(remote, mine, ttl_ms):
                    yield mine
            held = [k for k in group if k not in claimed]
            if held:
                elsewhere.append(held)
        pending = _wait_for_others(remote, elsewhere, present, poll_s=poll_s, deadline=deadline, clock=clock) \
            if elsewhere else []
        if pending and clock() >= deadline:
            left = [k for g in pending for k in g]
            logger.warning("waited %.0f s for %d module(s) another machine is encoding; encoding them here",
                           max_wait_s, len(left))
            yield left
            return


def _wait_for_others(remote: RemoteTier, groups: list[list[EntryKey]], present: Callable[[EntryKey], bool], *,
                     poll_s: float, deadline: float, clock: Callable[[], float]) -> list[list[EntryKey]]:
    """Poll until a lease of ``groups`` is gone or the deadline passes; the keys still missing, by group."""
    logger.info("waiting for %d module(s) another machine is encoding", sum(len(g) for g in groups))
    while clock() < deadline:
        time.sleep(poll_s)
        held = remote.leased([k for g in groups for k in g])
        freed = [k for g in groups for k in g if k not in held]
        if not freed:
            continue
        arrived = {k for k in freed if present(k)}
        remote.counters.fleet_waits += len(arrived)
        groups = [left for g in groups if (left := [k for k in g if k not in arrived])]
        if len(arrived) < len(freed) or not groups:
            break  # a holder left without storing: claim its modules
    return groups
