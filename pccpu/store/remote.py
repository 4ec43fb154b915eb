"""The remote tier: module states in a Redis (or Valkey) server that many machines share, behind RAM and disk.

Entries are the disk tier's entries (same header fields, same payload bytes, same exact keys), split into chunks
with a manifest (``remote_format.py``). Every call goes through a circuit breaker with short socket timeouts: when
the server is down, slow or refuses a command, the call counts as a miss (or a skipped write), one warning is
logged, and the server is tried again after a while. An answer never depends on the server.

What the server holds is trusted: checksums catch damage and evictions, not a machine that writes wrong entries on
purpose. Point only machines you trust at one server (see docs/remote-store.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from pccpu.errors import ConfigError, CorruptEntryError
from pccpu.store.breaker import CircuitBreaker
from pccpu.store.keys import EntryKey
from pccpu.store.remote_format import DEFAULT_CHUNK_BYTES, RemoteKeys, join_chunks, parse_manifest, split_entry

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

T = TypeVar("T")

URL_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT_S = 0.5
TIMEOUT_S = 2.0  # per socket operation; a chunk (8 MiB) must move within it
RETRY_AFTER_S = 30.0
READ_SIZE = 1 << 20  # bytes per recv: reading 117 MB over loopback, 600 MB/s against 530 MB/s with the default 32 KiB

# compare-and-delete: the manifest (KEYS[1]) and its chunks go only if the manifest is still the one that was read
_DELETE_IF_SAME = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', unpack(KEYS)) return 1 end return 0"
# a lease is renewed or released only by its holder
_RENEW_IF_MINE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end " \
                 "return 0"
_RELEASE_IF_MINE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def display_url(url: str) -> str:
    """The URL without credentials, for logs and stats."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass
class RemoteCounters:
    hits: int = 0
    misses: int = 0  # absent, evicted (in part) or damaged
    evicted: int = 0  # a manifest whose chunks the server evicted: a normal miss
    corrupt: int = 0  # damaged entries (checksums, sizes, keys): a miss, and the entry is deleted
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    refused: int = 0  # commands the server answered with an error (out of memory, read-only replica, ...)
    fleet_waits: int = 0  # modules this process waited for while another machine encoded them


class RemoteTier:
    """One namespace's entries and encoding leases in a Redis server, every call guarded by a circuit breaker."""

    def __init__(self, url: str, namespace: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, timeout_s: float = TIMEOUT_S,
                 retry_after_s: float = RETRY_AFTER_S) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if urlsplit(url).scheme not in URL_SCHEMES:
            raise ConfigError(f"store URL {display_url(url)!r}: expected redis://HOST:PORT/DB (rediss:// for TLS, "
                              "unix:///path/to/redis.sock)")
        if chunk_bytes <= 0:
            raise ConfigError(f"the remote chunk size must be > 0 bytes, got {chunk_bytes}")
        try:  # no retries inside the client: the breaker decides when to try again
            self._client: redis.Redis = redis.Redis.from_url(
                url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                socket_read_size=READ_SIZE)
        except ValueError as exc:
            raise ConfigError(f"store URL {display_url(url)!r}: {exc}; expected redis://HOST:PORT/DB") from exc
        # a reply that is an error is a refusal; anything else (unreachable, timed out, not speaking Redis) an outage
        self._refusals: tuple[type[Exception], ...] = (redis.ResponseError,)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self.url = display_url(url)
        self.namespace = namespace
        self.keys = RemoteKeys(namespace)
        self.chunk_bytes = chunk_bytes
        self.counters = RemoteCounters()
        self.breaker = CircuitBreaker(f"the shared module store at {self.url}", retry_after_s=retry_after_s,
                                      hint=" (check that the server runs and this machine reaches it)")
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # names this process's leases
        self._delete_if_same = self._client.register_script(_DELETE_IF_SAME)
        self._renew_if_mine = self._client.register_script(_RENEW_IF_MINE)
        self._release_if_mine = self._client.register_script(_RELEASE_IF_MINE)
        self._refusal_warned = False
        self._call("ping", lambda c: c.ping(), None)  # an unreachable server is reported now, once

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    def _call(self, what: str, call: Callable[[redis.Redis], T], default: T) -> T:
        """``call(client)``, or ``default`` when the breaker is open or the call fails (counted, logged once)."""
        if not self.breaker.allow():
            return default
        try:
            result = call(self._client)
        except self._refusals as exc:  # the server is up but said no: not an outage
            self.breaker.success()
            self.counters.refused += 1
            if not self._refusal_warned:
                self._refusal_warned = True
                logger.warning("the shared module store at %s refused %s: %s (a full server needs "
                               "maxmemory-policy allkeys-lru; further refusals are counted, not logged)",
                               self.url, what, exc)
            return default
        except self._errors as exc:
            self.breaker.failure(exc)
            return default
        self.breaker.success()
        return result

    # -- entries -------------------------------------------------------------------------------------------
    def read(self, key: EntryKey, expect: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray] | None:
        """The entry's header fields and payload, checked; None when absent, evicted, damaged or unreachable."""
        raw = self._call("a read", lambda c: c.get(self.keys.manifest(key)), None)
        if not isinstance(raw, bytes):
            self.counters.misses += 1
            return None
        where = f"remote entry {self.namespace}/{key.file_stem}"
        names: list[str] = []
        try:
            manifest = parse_manifest(raw, key, self.namespace, expect)
            names = [self.keys.chunk(key, manifest.write, i) for i in range(len(manifest.chunks))]
            found = self._call("a read", lambda c: c.mget(names) if names else [], None)
            if found is None:
                self.counters.misses += 1
                return None
            payload = join_chunks(manifest, [c if isinstance(c, bytes) else None for c in found], where=where)
        except CorruptEntryError as exc:
            self.counters.misses += 1
            self.counters.corrupt += 1
            logger.warning("ignoring a damaged entry of the shared module store: %s; it will be encoded again", exc)
            self._delete(key, raw, names)
            return None
        if payload is None:  # the server evicted a chunk: a normal miss under allkeys-lru
            self.counters.misses += 1
            self.counters.evicted += 1
            logger.info("%s: a chunk was evicted by the server; treating it as absent", where)
            self._delete(key, raw, names)
            return None
        self.counters.hits += 1
        self.counters.bytes_read += payload.nbytes
        return manifest.header, payload

    def write(self, key: EntryKey, fields: dict[str, Any], payload: np.ndarray) -> bool:
        """Store an entry (chunks first, the manifest last); False when the server could not take it."""
        manifest, write, chunks = split_entry(key, self.namespace, fields, payload, self.chunk_bytes)
        manifest_key = self.keys.manifest(key)

        def store(client: redis.Redis) -> tuple[bool, bytes | None]:
            old = client.get(manifest_key)
            pipe = client.pipeline(transaction=False)
            for index, chunk in enumerate(chunks):
                pipe.set(self.keys.chunk(key, write, index), chunk)
            pipe.set(manifest_key, manifest)
            pipe.sadd(self.keys.starts(key.content), key.start)
            pipe.execute()
            return True, old if isinstance(old, bytes) else None

        not_written: tuple[bool, bytes | None] = (False, None)
        written, old = self._call("a write", store, not_written)
        if not written:
            return False
        self.counters.writes += 1
        self.counters.bytes_written += payload.nbytes
        if old is not None:  # an entry written again (it was damaged, or two machines encoded it): drop old chunks
            self._drop_chunks(key, old, write)
        return True

    def exists(self, key: EntryKey) -> bool:
        return bool(self._call("a lookup", lambda c: c.exists(self.keys.manifest(key)), 0))

    def starts_of(self, content: str) -> set[int]:
        none: set[bytes | str] = set()
        members = self._call("a lookup", lambda c: c.smembers(self.keys.starts(content)), none)
        starts = set()
        for member in members:
            try:
                starts.add(int(member))
            except ValueError:
                continue
        return starts

    def _delete(self, key: EntryKey, manifest: bytes, chunk_names: Sequence[str] = ()) -> None:
        """Delete an entry found damaged or partly evicted, unless another machine has written it again since."""
        keys = [self.keys.manifest(key), *chunk_names]
        self._call("a delete", lambda c: self._delete_if_same(keys=keys, args=[manifest], client=c), None)

    def _drop_chunks(self, key: EntryKey, old_manifest: bytes, new_write: str) -> None:
        try:
            doc = json.loads(old_manifest)
            write, count = str(doc["write"]), len(doc["chunks"])
        except (ValueError, KeyError, TypeError):
            return  # an unreadable old manifest names no chunks; the server's LRU policy reclaims them
        if write != new_write and count:
            names = [self.keys.chunk(key, write, i) for i in range(count)]
            self._call("a delete", lambda c: c.delete(*names), 0)

    # -- encoding leases (see fleet.py) --------------------------------------------------------------------
    def claim(self, keys: Collection[EntryKey], ttl_ms: int) -> set[EntryKey] | None:
        """Take the lease of every key that nobody holds (SET NX PX); the keys taken, or None when the server
        cannot be asked (then nobody coordinates: encode them all)."""
        ordered = list(keys)

        def take(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in ordered:
                pipe.set(self.keys.lease(key), self.token, nx=True, px=ttl_ms)
            return pipe.execute()

        taken = self._call("a lease", take, None)
        if taken is None:
            return None
        return {key for key, ok in zip(ordered, taken, strict=True) if ok}

    def renew(self, keys: Collection[EntryKey], ttl_ms: int) -> None:
        def renew(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                self._renew_if_mine(keys=[self.keys.lease(key)], args=[self.token, ttl_ms], client=pipe)
            pipe.execute()

        self._call("a lease renewal", renew, None)

    def release(self, keys: Collection[EntryKey]) -> None:
        def release(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                self._release_if_mine(keys=[self.keys.lease(key)], args=[self.token], client=pipe)
            pipe.execute()

        self._call("a lease release", release, None)

    def leased(self, keys: Collection[EntryKey]) -> set[EntryKey]:
        """The keys whose lease someone holds now (none when the server cannot be asked)."""
        ordered = list(keys)

        def held(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in ordered:
                pipe.exists(self.keys.lease(key))
            return pipe.execute()

        found = self._call("a lease lookup", held, None)
        if found is None:
            return set()
        return {key for key, n in zip(ordered, found, strict=True) if n}

    def close(self) -> None:
        self._client.close()
