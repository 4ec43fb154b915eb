"""The remote tier of the module store, against a real ``redis-server`` started on a free port per test.

Fast tests (no model): chunks and manifests, checksums, evictions, namespaces, the circuit breaker, encoding leases,
and the encode path on the fake engine. Real-model tests (slow): processes with their own PCCPU_HOME that share one
server, as machines of a fleet do.

``redis-server`` comes from Debian's package (``scripts/test.sh`` installs it); without it these tests skip.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pccpu.errors import ConfigError, CorruptEntryError
from pccpu.store import EntryKey, EntryMeta, ModuleStore, StoredModule
from pccpu.store.disk import DiskTier
from pccpu.store.entry_file import read_entry
from pccpu.store.fleet import encode_turns
from pccpu.store.remote import RemoteTier, display_url
from pccpu.store.remote_format import RemoteKeys, join_chunks, parse_manifest, split_entry

redis = pytest.importorskip("redis", reason="the redis client is a runtime dependency: pip install -e .")

REDIS_SERVER = shutil.which("redis-server")
MISSING = "redis-server is not installed (Debian: apt-get install redis-server; scripts/test.sh installs it)"
# on a developer's machine without it these tests skip; in CI (CI=true) they must run, so they fail instead
needs_redis = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"), reason=MISSING)


def _require_redis_server() -> None:
    if REDIS_SERVER is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)

FP = {"model": "model-fp", "state": "state-fp"}
REPO = Path(__file__).resolve().parent.parent
BREAKER_LOGGER = "pccpu.store.breaker"


# -- a real server ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    directory: Path
    port: int
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{(self.directory / 'redis.log').read_text()[-2000:]}")
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _start_server(directory: Path, *extra: str) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # the free port may be taken between the probe and the start
        server = RedisServer(directory, _free_port(), extra)
        try:
            server.start()
            return server
        except RuntimeError:
            server.stop()
    raise RuntimeError("could not start redis-server on a free port")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """``redis-server --port <free> --bind 127.0.0.1 --save '' --appendonly no`` in a temp folder; stopped after."""
    _require_redis_server()
    server = _start_server(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def lru_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that evicts: 4 MB of memory, allkeys-lru."""
    _require_redis_server()
    server = _start_server(tmp_path / "redis-lru", "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru",
                           "--maxmemory-samples", "10")
    yield server
    server.stop()


# -- entries ------------------------------------------------------------------------------------------------------
def _entry(content: str = "c", start: int = 0, n: int = 4500, seed: int = 0) -> StoredModule:
    payload = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    meta = EntryMeta(schema="s", module=content, mode="sequential", ranges=((start, start + 4),), run_bytes=(n,),
                     model=FP["model"], state=FP["state"], model_file="m.gguf", created=1.0)
    return StoredModule(EntryKey(content, start), payload, meta)


def _remote(server: RedisServer, namespace: str = "default", **kw: Any) -> RemoteTier:
    kw.setdefault("chunk_bytes", 1000)
    kw.setdefault("retry_after_s", 0.2)
    return RemoteTier(server.url, namespace, **kw)


def _store(tmp_path: Path, name: str, remote: RemoteTier | None, **kw: Any) -> ModuleStore:
    return ModuleStore(directory=tmp_path / name, namespace=remote.namespace if remote else "default",
                       ram_budget=1 << 24, disk_budget=1 << 26, remote=remote, **kw)


def _breaker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == BREAKER_LOGGER and r.levelno >= logging.WARNING]


def test_chunks_and_manifest_carry_the_disk_tiers_bytes(tmp_path: Path) -> None:
    entry = _entry(n=4500)
    manifest_bytes, write, chunks = split_entry(entry.key, "default", entry.meta.to_fields(), entry.state, 1000)
    assert [len(c) for c in chunks] == [1000, 1000, 1000, 1000, 500]
    manifest = parse_manifest(manifest_bytes, entry.key, "default", FP)
    assert manifest.write == write and manifest.payload_size == 4500
    # the header and payload are the disk tier's, field for field and byte for byte
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    header, payload = read_entry(disk.write(entry.key, entry.meta.to_fields(), entry.state), {})
    assert manifest.header == header.fields
    joined = join_chunks(manifest, [bytes(c) for c in chunks], where="test")
    assert joined is not None and joined.tobytes() == payload.tobytes() == entry.state.tobytes()


def test_manifest_checks_key_namespace_and_fingerprints() -> None:
    entry = _entry()
    raw, _, _ = split_entry(entry.key, "default", entry.meta.to_fields(), entry.state, 1000)
    with pytest.raises(CorruptEntryError, match="describes"):
        parse_manifest(raw, entry.key, "other", FP)
    with pytest.raises(CorruptEntryError, match="describes"):
        parse_manifest(raw, EntryKey("c", 5), "default", FP)
    with pytest.raises(CorruptEntryError, match="model is 'model-fp', expected 'x'"):
        parse_manifest(raw, entry.key, "default", dict(FP, model="x"))
    with pytest.raises(CorruptEntryError, match="unreadable manifest"):
        parse_manifest(b"{not json", entry.key, "default", FP)


def test_join_tells_an_evicted_chunk_from_a_damaged_one() -> None:
    entry = _entry()
    raw, _, chunks = split_entry(entry.key, "default", entry.meta.to_fields(), entry.state, 1000)
    manifest = parse_manifest(raw, entry.key, "default", FP)
    parts: list[bytes | None] = [bytes(c) for c in chunks]
    assert join_chunks(manifest, [*parts[:2], None, *parts[3:]], where="t") is None
    damaged = bytearray(parts[1] or b"")
    damaged[7] ^= 1
    with pytest.raises(CorruptEntryError, match="chunk 1"):
        join_chunks(manifest, [parts[0], bytes(damaged), *parts[2:]], where="t")
    with pytest.raises(CorruptEntryError, match="chunk 4"):
        join_chunks(manifest, [*parts[:4], (parts[4] or b"")[:-1]], where="t")


def test_circuit_breaker_warns_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    from pccpu.store.breaker import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker("the server", retry_after_s=30, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger=BREAKER_LOGGER):
        breaker.failure(OSError("refused"))
        assert not breaker.allow() and breaker.is_open
        now[0] = 30.0
        assert breaker.allow()  # due for a retry
        breaker.failure(OSError("refused"))  # still down: quiet
        assert not breaker.allow()
        now[0] = 61.0
        breaker.success()
        assert breaker.allow() and not breaker.is_open
        breaker.failure(OSError("refused"))  # a new outage
    assert len(_breaker_warnings(caplog)) == 2 and breaker.failures == 3
    assert any("reachable again" in m for m in caplog.messages)


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"expected redis://HOST:PORT/DB"):
        RemoteTier("http://127.0.0.1:6379/0", "default")


def test_display_url_hides_credentials() -> None:
    assert display_url("redis://user:secret@db.example:6380/2") == "redis://db.example:6380/2"


def test_cli_store_url_option_and_environment() -> None:
    from unittest import mock

    from click.testing import CliRunner

    from pccpu.cli import main

    for args, env in ((["--store-url", "redis://10.0.0.5:6379/1"], {}),
                      ([], {"PCCPU_STORE_URL": "redis://10.0.0.5:6379/1"})):
        with mock.patch("pccpu.service.PromptCache") as cache:
            CliRunner(env=env).invoke(main, ["encode", str(REPO / "schemas" / "travel.xml"), *args])
        assert cache.call_args.kwargs["store_url"] == "redis://10.0.0.5:6379/1"


def test_prompt_cache_refuses_a_bad_store_url(fake_cache: Any) -> None:
    with pytest.raises(ConfigError, match="expected redis://HOST:PORT/DB"):
        fake_cache(store_url="memcached://127.0.0.1:11211")


# -- the remote tier in the store -----------------------------------------------------------------------------
@needs_redis
def test_remote_hit_is_kept_on_local_disk_and_in_ram(redis_server: RedisServer, tmp_path: Path) -> None:
    writer = _store(tmp_path, "a", _remote(redis_server))
    entry = _entry(n=4500)
    writer.save(entry)
    assert writer.stats().remote_writes == 1
    reader = _store(tmp_path, "b", _remote(redis_server))
    assert reader.contains(entry.key) and reader.starts_of("c") == {0}
    hit = reader.lookup(entry.key, FP)
    assert hit is not None and hit.tier == "remote"  # fetched, and on local disk now
    assert hit.entry.state.tobytes() == entry.state.tobytes() and hit.entry.meta == entry.meta
    assert reader.disk is not None and reader.disk.path_for(entry.key).is_file()
    stats = reader.stats()
    assert (stats.remote_hits, stats.remote_bytes_read, stats.disk_entries) == (1, 4500, 1)
    assert stats.remote_url == redis_server.url and stats.remote_available
    again = reader.lookup(entry.key, FP)
    assert again is not None and again.tier == "ram" and reader.stats().remote_hits == 1


@needs_redis
def test_local_tiers_are_asked_first(redis_server: RedisServer, tmp_path: Path) -> None:
    store = _store(tmp_path, "a", _remote(redis_server))
    entry = _entry()
    store.save(entry)
    store.clear(ram=True, disk=False)
    hit = store.lookup(entry.key, FP)
    assert hit is not None and hit.tier == "disk" and store.stats().remote_hits == 0


@needs_redis
def test_shifted_hit_through_the_remote_tier(redis_server: RedisServer, tmp_path: Path) -> None:
    _store(tmp_path, "a", _remote(redis_server)).save(_entry(start=10))
    reader = _store(tmp_path, "b", _remote(redis_server))
    hit = reader.find(EntryKey("c", 3), FP, runs=1)
    assert hit is not None and hit.shift == -7


@needs_redis
def test_corrupt_chunk_is_detected_and_a_miss(redis_server: RedisServer, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    remote = _remote(redis_server)
    _store(tmp_path, "a", remote).save(_entry())
    client = redis_server.client()
    [chunk] = client.keys("pccpu:1:default:c:c@0:*:2")
    client.setrange(chunk, 10, b"\xff\x00")
    reader = _store(tmp_path, "b", _remote(redis_server))
    with caplog.at_level(logging.WARNING):
        assert reader.lookup(EntryKey("c", 0), FP) is None
    assert any("damaged" in m for m in caplog.messages)
    stats = reader.stats()
    assert (stats.remote_corrupt, stats.remote_hits) == (1, 0)
    assert not client.exists(RemoteKeys("default").manifest(EntryKey("c", 0)))  # deleted: encoded again next
    assert not client.keys("pccpu:1:default:c:*")  # with its chunks
    assert not reader.contains(EntryKey("c", 0))


@needs_redis
def test_evicted_chunk_is_a_quiet_miss(redis_server: RedisServer, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    _store(tmp_path, "a", _remote(redis_server)).save(_entry())
    client = redis_server.client()
    client.delete(*client.keys("pccpu:1:default:c:c@0:*:1"))
    reader = _store(tmp_path, "b", _remote(redis_server))
    with caplog.at_level(logging.WARNING):
        assert reader.lookup(EntryKey("c", 0), FP) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert reader.stats().remote_evicted == 1


@needs_redis
def test_rewrite_drops_the_old_chunks(redis_server: RedisServer, tmp_path: Path) -> None:
    store = _store(tmp_path, "a", _remote(redis_server))
    store.save(_entry(seed=1))
    store.save(_entry(seed=2))
    chunks = redis_server.client().keys("pccpu:1:default:c:*")
    assert len(chunks) == 5
    hit = _store(tmp_path, "b", _remote(redis_server)).lookup(EntryKey("c", 0), FP)
    assert hit is not None and hit.entry.state.tobytes() == _entry(seed=2).state.tobytes()


@needs_redis
def test_namespaces_stay_apart(redis_server: RedisServer, tmp_path: Path) -> None:
    _store(tmp_path, "a", _remote(redis_server, "team-a")).save(_entry())
    other = _store(tmp_path, "b", _remote(redis_server, "team-b"))
    assert other.lookup(EntryKey("c", 0), FP) is None and not other.contains(EntryKey("c", 0))
    assert other.starts_of("c") == set()
    keys = [k.decode() for k in redis_server.client().keys("*")]
    assert keys and all(k.startswith("pccpu:1:team-a:") for k in keys)
    # a manifest copied under another namespace's key is refused, never loaded there
    client = redis_server.client()
    for key in client.keys("pccpu:1:team-a:[mc]:*"):
        client.set(key.replace(b"team-a", b"team-b"), client.get(key) or b"")
    assert other.lookup(EntryKey("c", 0), FP) is None and other.stats().remote_corrupt == 1
    with pytest.raises(ConfigError, match="namespace"):
        ModuleStore(directory=tmp_path / "c", namespace="team-a", remote=_remote(redis_server, "team-b"))


@needs_redis
def test_eviction_by_the_server_is_a_normal_miss(lru_server: RedisServer, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    writer = _store(tmp_path, "a", _remote(lru_server, chunk_bytes=64 << 10))
    entries = [_entry(content=f"m{i}", n=512 << 10, seed=i) for i in range(16)]  # 8 MB into 4 MB
    with caplog.at_level(logging.WARNING):
        for entry in entries:
            writer.save(entry)
        reader = _store(tmp_path, "b", _remote(lru_server, chunk_bytes=64 << 10))
        found = [reader.lookup(e.key, FP) is not None for e in entries]
    assert not all(found)  # Redis's LRU is approximate: which entries survive (if any) varies from run to run
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    stats = reader.stats()
    assert stats.remote_errors == 0 and stats.remote_corrupt == 0 and stats.remote_available
    assert stats.remote_hits == sum(found) and stats.remote_misses == len(found) - sum(found)


# -- faults --------------------------------------------------------------------------------------------------------
@needs_redis
def test_unreachable_server_at_start_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    with caplog.at_level(logging.INFO):
        store = _store(tmp_path, "a", RemoteTier(url, "default", retry_after_s=60))
        entry = _entry()
        store.save(entry)
        store.clear(ram=True, disk=False)
        hit = store.lookup(entry.key, FP)
        assert store.lookup(EntryKey("absent", 0), FP) is None
    assert hit is not None and hit.tier == "disk"
    assert len(_breaker_warnings(caplog)) == 1 and "127.0.0.1" in _breaker_warnings(caplog)[0]
    stats = store.stats()
    assert not stats.remote_available and stats.remote_errors == 1 and stats.disk_entries == 1


@needs_redis
def test_server_killed_mid_use_then_back(redis_server: RedisServer, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path, "a", _remote(redis_server, retry_after_s=0.3))
    store.save(_entry(content="before"))
    redis_server.stop()
    with caplog.at_level(logging.INFO):
        for i in range(5):
            store.save(_entry(content=f"during{i}"))
            assert store.lookup(EntryKey(f"during{i}", 0), FP) is not None  # from RAM: answers go on
            assert store.lookup(EntryKey("elsewhere", 0), FP) is None
            time.sleep(0.1)
        assert len(_breaker_warnings(caplog)) == 1
        assert not store.stats().remote_available
        redis_server.start()  # the same port
        time.sleep(0.35)
        store.save(_entry(content="after"))
    assert any("reachable again" in m for m in caplog.messages)
    assert redis_server.client().exists(RemoteKeys("default").manifest(EntryKey("after", 0)))
    assert store.stats().remote_available


@needs_redis
def test_slow_server_times_out_once(redis_server: RedisServer, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path, "a", _remote(redis_server, timeout_s=0.3, retry_after_s=60))
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # a server that accepts connections and never answers
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                assert store.lookup(EntryKey(f"k{i}", 0), FP) is None
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert store.stats().remote_errors == 1  # one timeout, then the breaker skips the server
    assert len(_breaker_warnings(caplog)) == 1 and "TimeoutError" in _breaker_warnings(caplog)[0]


# -- encoding leases ----------------------------------------------------------------------------------------------
@needs_redis
def test_a_module_is_encoded_once_while_another_waits(redis_server: RedisServer, tmp_path: Path) -> None:
    entry = _entry()
    stores = [_store(tmp_path, name, _remote(redis_server)) for name in ("a", "b")]
    encoded: list[str] = []
    first_in = threading.Event()

    def machine(name: str, store: ModuleStore) -> None:
        present = lambda key: store.lookup(key, FP) is not None  # noqa: E731
        for turn in store.encode_turns([[entry.key]], present):
            assert turn == [entry.key]
            encoded.append(name)
            first_in.set()
            time.sleep(0.5)  # encoding
            store.save(entry)

    a = threading.Thread(target=machine, args=("a", stores[0]))
    a.start()
    assert first_in.wait(5)
    machine("b", stores[1])
    a.join()
    assert encoded == ["a"]
    assert stores[1].stats().fleet_waits == 1 and stores[1].stats().disk_entries == 1
    assert not redis_server.client().keys("pccpu:1:default:l:*")  # leases released


@needs_redis
def test_a_dead_holders_lease_expires(redis_server: RedisServer, tmp_path: Path) -> None:
    key = EntryKey("c", 0)
    redis_server.client().set(RemoteKeys("default").lease(key), "dead-machine", px=400)
    store = _store(tmp_path, "a", _remote(redis_server))
    began = time.monotonic()
    turns = list(store.encode_turns([[key]], lambda k: store.lookup(k, FP) is not None))
    assert turns == [[key]] and 0.3 < time.monotonic() - began < 3


@needs_redis
def test_a_stuck_holder_is_waited_for_a_bounded_time(redis_server: RedisServer, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    key = EntryKey("c", 0)
    redis_server.client().set(RemoteKeys("default").lease(key), "stuck-machine", px=60_000)
    remote = _remote(redis_server)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        turns = list(encode_turns(remote, [[key]], lambda k: False, max_wait_s=0.5, poll_s=0.05))
    assert turns == [[key]] and time.monotonic() - began < 2
    assert any("encoding them here" in m for m in caplog.messages)


@needs_redis
def test_leases_are_renewed_while_encoding(redis_server: RedisServer, tmp_path: Path) -> None:
    key = EntryKey("c", 0)
    remote = _remote(redis_server)
    client = redis_server.client()
    for turn in encode_turns(remote, [[key]], lambda k: False, ttl_ms=300):
        time.sleep(0.7)  # longer than the lease: the heartbeat keeps it
        assert client.get(RemoteKeys("default").lease(key)) == remote.token.encode() and turn == [key]
    assert not client.exists(RemoteKeys("default").lease(key))


@needs_redis
def test_without_a_server_every_module_is_encoded_here(tmp_path: Path) -> None:
    remote = RemoteTier(f"redis://127.0.0.1:{_free_port()}/0", "default", retry_after_s=60)
    keys = [EntryKey("a", 0), EntryKey("b", 0)]
    assert list(encode_turns(remote, [keys[:1], keys[1:]], lambda k: False)) == [keys]


@needs_redis
def test_machines_split_a_schemas_passes(redis_server: RedisServer, tmp_path: Path) -> None:
    """A group (pass) another machine holds is skipped, the next one encoded here, the first fetched after."""
    first, second = _entry(content="first"), _entry(content="second")
    other = _store(tmp_path, "other", _remote(redis_server))
    client = redis_server.client()
    client.set(RemoteKeys("default").lease(first.key), "other-machine", px=10_000)  # it is encoding `first`
    store = _store(tmp_path, "here", _remote(redis_server))
    turns = []
    for turn in store.encode_turns([[first.key], [second.key]], lambda k: store.lookup(k, FP) is not None):
        turns.append(turn)
        store.save(second)
        other.save(first)  # meanwhile the other machine stores its module and lets its lease go
        client.delete(RemoteKeys("default").lease(first.key))
    assert turns == [[second.key]] and store.stats().fleet_waits == 1


# -- the encode path, on the fake engine --------------------------------------------------------------------------
FAKE_SCHEMA = """<schema name="docs"><system>You answer from the notes.</system><user>Notes:
<module name="a">Alpha: the bakery opens at six.</module>
<module name="b">Beta: the station closes at ten.</module></schema>"""
FAKE_PROMPT = '<prompt schema="docs"><a/><b/>When?</user></prompt>'


def _machine(fake_cache: Any, folder: Path, url: str) -> tuple[Any, str]:
    """A PromptCache on the fake engine with its own store folder; its answer to FAKE_PROMPT."""
    cache = fake_cache(store_dir=folder, store_url=url)
    cache.add_schema(FAKE_SCHEMA)
    return cache, cache.ask(FAKE_PROMPT, max_tokens=3).result().text


@needs_redis
def test_second_machine_encodes_nothing_fake_engine(redis_server: RedisServer, fake_cache: Any,
                                                    tmp_path: Path) -> None:
    first, reference = _machine(fake_cache, tmp_path / "one", redis_server.url)
    assert first.stats().encode.tokens > 0 and first.stats().store.remote_writes == 3
    second = fake_cache(store_dir=tmp_path / "two", store_url=redis_server.url)
    second.add_schema(FAKE_SCHEMA)
    result = second.ask(FAKE_PROMPT, max_tokens=3).result()
    assert second.stats().encode.tokens == 0 and result.text == reference
    assert {m.source for m in result.modules} == {"remote"} and second.stats().store.remote_hits == 3


@needs_redis
def test_the_servers_metrics_count_the_remote_tier(redis_server: RedisServer, fake_cache: Any,
                                                  tmp_path: Path) -> None:
    from pccpu.server.metrics import Metrics

    _machine(fake_cache, tmp_path / "one", redis_server.url)
    second, _ = _machine(fake_cache, tmp_path / "two", redis_server.url)
    text = Metrics().render(second.stats(), 0)
    assert "pccpu_remote_up 1" in text
    assert 'pccpu_remote_lookups_total{result="hit"} 3' in text
    assert "pccpu_remote_errors_total 0" in text
    local = fake_cache(store_dir=tmp_path / "three")
    assert "pccpu_remote" not in Metrics().render(local.stats(), 0)


@needs_redis
def test_damaged_remote_entry_is_encoded_again_fake_engine(redis_server: RedisServer, fake_cache: Any,
                                                           tmp_path: Path) -> None:
    _, reference = _machine(fake_cache, tmp_path / "one", redis_server.url)
    client = redis_server.client()
    for chunk in client.keys("pccpu:1:default:c:*"):
        client.setrange(chunk, 0, b"\x00\x01\x02\x03")
    second = fake_cache(store_dir=tmp_path / "two", store_url=redis_server.url)
    second.add_schema(FAKE_SCHEMA)  # the manifests are there: nothing is encoded yet
    result = second.ask(FAKE_PROMPT, max_tokens=3).result()
    assert result.text == reference and {m.source for m in result.modules} == {"encoded"}
    assert second.stats().store.remote_corrupt == 3 and second.stats().store.remote_writes == 3


# -- real model: processes with their own PCCPU_HOME share one server ---------------------------------------------
CHILD = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from pccpu.service.prompt_cache import PromptCache
model, url, namespace, schema, prompt, go = sys.argv[1:7]
with PromptCache(model=model, n_ctx=2048, n_threads=1, store_url=url or None, namespace=namespace) as pc:
    if go:  # start encoding together with the other process
        open(go + "." + str(os.getpid()), "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
    pc.add_schema(schema)
    r = pc.ask(open(prompt).read(), max_tokens=12).result()
    s = pc.stats()
    print(json.dumps({"encoded_tokens": s.encode.tokens, "text": r.text, "store": s.store.to_dict(),
                      "sources": sorted({m.source for m in r.modules})}))
"""
SCHEMA = REPO / "schemas" / "travel.xml"
PROMPT = REPO / "schemas" / "travel.domestic.prompt.xml"


def _child(model: Path, home: Path, url: str, namespace: str = "default", go: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PCCPU_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(model), url, namespace, str(SCHEMA), str(PROMPT), go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _run(model: Path, home: Path, url: str, namespace: str = "default") -> tuple[dict[str, Any], str]:
    return _result(_child(model, home, url, namespace))


@pytest.fixture(scope="module")
def reference(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The answer and encode count of one process without a remote tier."""
    return _run(default_model_path, tmp_path_factory.mktemp("home-ref"), "")[0]


@needs_redis
def test_second_machine_answers_with_nothing_encoded(default_model_path: Path, redis_server: RedisServer,
                                                     tmp_path: Path, reference: dict[str, Any]) -> None:
    first, _ = _run(default_model_path, tmp_path / "home-1", redis_server.url)
    assert first["encoded_tokens"] == reference["encoded_tokens"] > 0 and first["text"] == reference["text"]
    assert first["store"]["remote_writes"] > 0
    second, err = _run(default_model_path, tmp_path / "home-2", redis_server.url)
    assert second["encoded_tokens"] == 0 and second["text"] == reference["text"], err[-2000:]
    assert second["store"]["remote_hits"] > 0 and second["sources"] == ["remote"]
    assert list((tmp_path / "home-2" / "store" / "default").glob("*.pcm"))  # kept on the second machine's disk


@needs_redis
def test_server_killed_mid_use_answers_stay_right(default_model_path: Path, redis_server: RedisServer,
                                                  tmp_path: Path, reference: dict[str, Any],
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pccpu.service.prompt_cache import PromptCache

    _run(default_model_path, tmp_path / "home-1", redis_server.url)  # the fleet's store holds the schema
    monkeypatch.setenv("PCCPU_HOME", str(tmp_path / "home-2"))
    with caplog.at_level(logging.WARNING), \
            PromptCache(model=str(default_model_path), n_ctx=2048, n_threads=1, store_url=redis_server.url) as pc:
        pc.add_schema(SCHEMA)  # found in the remote tier: nothing encoded, nothing read yet
        assert pc.stats().encode.tokens == 0
        redis_server.stop()  # before the first read
        first = pc.ask(PROMPT.read_text(), max_tokens=12).result()
        second = pc.ask(PROMPT.read_text(), max_tokens=12).result()
        assert first.text == second.text == reference["text"]
        assert pc.stats().encode.tokens > 0 and not pc.stats().store.remote_available
    assert len(_breaker_warnings(caplog)) == 1


@needs_redis
def test_corrupt_chunk_is_encoded_again(default_model_path: Path, redis_server: RedisServer, tmp_path: Path,
                                        reference: dict[str, Any]) -> None:
    _run(default_model_path, tmp_path / "home-1", redis_server.url)
    client = redis_server.client()
    manifests = [json.loads(client.get(k)) for k in client.keys("pccpu:1:default:m:*")]
    domestic = next(m for m in manifests if m["header"]["module"] == "trip/domestic")  # used by the prompt
    chunk = f"pccpu:1:default:c:{domestic['stem']}:{domestic['write']}:0"
    client.setrange(chunk, client.strlen(chunk) // 2, b"\xde\xad\xbe\xef")
    second, err = _run(default_model_path, tmp_path / "home-2", redis_server.url)
    assert second["text"] == reference["text"]
    assert second["store"]["remote_corrupt"] == 1 and "damaged" in err
    assert 0 < second["encoded_tokens"] < reference["encoded_tokens"]  # only the damaged module's pass
    third, _ = _run(default_model_path, tmp_path / "home-3", redis_server.url)  # rewritten whole by the second
    assert third["encoded_tokens"] == 0 and third["text"] == reference["text"]


@needs_redis
def test_two_machines_encoding_at_once_encode_once(default_model_path: Path, redis_server: RedisServer,
                                                   tmp_path: Path, reference: dict[str, Any]) -> None:
    go = tmp_path / "go"
    procs = [_child(default_model_path, tmp_path / f"home-{i}", redis_server.url, go=str(go)) for i in (1, 2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.*"))) < 2 and time.monotonic() < deadline:  # both loaded the model
        assert all(p.poll() is None for p in procs), procs[0].stderr.read() if procs[0].stderr else ""
        time.sleep(0.05)
    go.touch()
    results = [_result(p)[0] for p in procs]
    # each module encoded once in the fleet: the two split the schema's passes, or one waits for the other
    assert sum(r["encoded_tokens"] for r in results) == reference["encoded_tokens"]
    modules = len(redis_server.client().keys("pccpu:1:default:m:*"))
    assert sum(r["store"]["remote_writes"] for r in results) == modules  # each module written once
    assert [r["text"] for r in results] == [reference["text"]] * 2
    assert sum(r["store"]["fleet_waits"] for r in results) > 0


@needs_redis
def test_namespaces_share_nothing(default_model_path: Path, redis_server: RedisServer, tmp_path: Path,
                                  reference: dict[str, Any]) -> None:
    _run(default_model_path, tmp_path / "home-1", redis_server.url, "team-a")
    other, _ = _run(default_model_path, tmp_path / "home-2", redis_server.url, "team-b")
    assert other["encoded_tokens"] == reference["encoded_tokens"] and other["store"]["remote_hits"] == 0
    assert other["text"] == reference["text"]


@needs_redis
def test_unreachable_server_at_start(default_model_path: Path, tmp_path: Path, reference: dict[str, Any]) -> None:
    result, err = _run(default_model_path, tmp_path / "home", f"redis://127.0.0.1:{_free_port()}/0")
    assert result["text"] == reference["text"] and result["encoded_tokens"] == reference["encoded_tokens"]
    assert err.count("is unavailable") == 1 and not result["store"]["remote_available"]
