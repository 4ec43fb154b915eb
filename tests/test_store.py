"""The module store without a model: keys, the entry file format, the RAM and disk tiers, ModuleStore."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from pccpu.errors import ConfigError, CorruptEntryError, StoreError
from pccpu.store import EntryKey, EntryMeta, ModuleStore, StoredModule, content_key, entry_file
from pccpu.store.disk import DiskTier
from pccpu.store.entry_file import FILE_SUFFIX, read_entry, read_entry_header, write_entry
from pccpu.store.ram import RamTier

FP = {"model": "model-fp", "state": "state-fp"}


def _key(**overrides: object) -> str:
    args: dict[str, object] = dict(
        namespace="default", model_fingerprint="m", state_fingerprint="s", mode="isolated",
        context=[(0, 1), (1, 50), (2, 51)], cells=[(3, 7), (4, 8), (5, 9)], start=3,
    )
    args.update(overrides)
    return content_key(**args)  # type: ignore[arg-type]


def _payload(n: int = 4096, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _meta(module: str, run_bytes: tuple[int, ...], start: int = 0) -> EntryMeta:
    """Metadata for a module of ``len(run_bytes)`` text runs of 4 cells each, from ``start``."""
    ranges = tuple((start + 8 * i, start + 8 * i + 4) for i in range(len(run_bytes)))
    return EntryMeta(schema="s", module=module, mode="sequential", ranges=ranges, run_bytes=run_bytes,
                     model=FP["model"], state=FP["state"], model_file="m.gguf", created=1.0)


def _entry(content: str = "c", start: int = 0, n: int = 100, seed: int = 0) -> StoredModule:
    return StoredModule(EntryKey(content, start), _payload(n, seed), _meta(content, (n,), start))


# -- keys ------------------------------------------------------------------------------------------------
def test_content_key_is_relative_to_start() -> None:
    base = _key()
    moved = _key(context=[(10, 1), (11, 50), (12, 51)], cells=[(13, 7), (14, 8), (15, 9)], start=13)
    assert moved == base


@pytest.mark.parametrize("change", [
    {"namespace": "other"},
    {"model_fingerprint": "m2"},
    {"state_fingerprint": "s2"},
    {"mode": "sequential"},
    {"cells": [(3, 7), (4, 8), (5, 10)]},  # one token
    {"context": [(0, 1), (1, 50), (2, 52)]},  # one context token
    {"context": [(0, 1), (1, 50)]},  # context shorter
    {"context": [(0, 1), (1, 50), (2, 51)], "cells": [(3, 7), (4, 8), (6, 9)]},  # one relative position
    {"context": [(-1, 1), (1, 50), (2, 51)]},  # a context position
])
def test_content_key_changes_with_any_input(change: dict[str, object]) -> None:
    assert _key(**change) != _key()


def test_content_key_context_and_cells_are_not_interchangeable() -> None:
    a = _key(context=[(0, 1)], cells=[(1, 2), (2, 3)], start=1)
    b = _key(context=[(0, 1), (1, 2)], cells=[(2, 3)], start=1)
    assert a != b


def test_entry_key_file_stem() -> None:
    assert EntryKey("abc", 17).file_stem == "abc@17"


# -- entry file format -----------------------------------------------------------------------------------
def _write(tmp_path: Path, payload: np.ndarray | None = None) -> tuple[Path, np.ndarray, dict[str, object]]:
    payload = _payload() if payload is None else payload
    path = tmp_path / f"k@5{FILE_SUFFIX}"
    header = dict(FP, content="k", start=5, module="doc")
    write_entry(path, header, payload)
    return path, payload, header


def test_entry_round_trip(tmp_path: Path) -> None:
    path, payload, header = _write(tmp_path)
    got_header, got = read_entry(path, {"model": "model-fp", "state": "state-fp", "content": "k", "start": 5})
    assert np.array_equal(got, payload)
    assert got.dtype == np.uint8
    for name, value in header.items():
        assert got_header.fields[name] == value
    assert got_header.payload_size == payload.nbytes
    assert read_entry_header(path).fields["module"] == "doc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_entry_round_trip_empty_payload(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path, np.empty(0, dtype=np.uint8))
    assert read_entry(path, {})[1].nbytes == 0


def _rewrite_prefix(path: Path, *, magic: bytes | None = None, version: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    old_magic, old_version, reserved, header_len = struct.unpack_from("<8sHHI", data)
    struct.pack_into("<8sHHI", data, 0, magic or old_magic, old_version if version is None else version, reserved,
                     header_len)
    path.write_bytes(bytes(data))


def _header_end(path: Path) -> int:
    header_len = struct.unpack_from("<I", path.read_bytes(), 12)[0]
    return 16 + header_len + 8


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "bad_magic":
        _rewrite_prefix(path, magic=b"NOTPCCPU")
        return
    if how == "other_version":
        _rewrite_prefix(path, version=entry_file.FORMAT_VERSION + 1)
        return
    if how == "header_byte":
        data[20] ^= 0x01  # inside the JSON header
    elif how == "header_hash":
        data[_header_end(path) - 3] ^= 0xFF
    elif how == "truncated_payload":
        data = data[: len(data) - 100]
    elif how == "truncated_header":
        data = data[:30]
    elif how == "truncated_prefix":
        data = data[:5]
    elif how == "empty":
        data = bytearray()
    elif how == "flipped_payload":
        middle = (_header_end(path) + len(data)) // 2
        data[middle] ^= 0x40
    elif how == "appended":
        data += b"\x00"
    elif how == "huge_header_len":
        struct.pack_into("<I", data, 12, 0xFFFFFFF0)
    else:  # pragma: no cover
        raise AssertionError(how)
    path.write_bytes(bytes(data))


CORRUPTIONS = ["bad_magic", "other_version", "header_byte", "header_hash", "truncated_payload", "truncated_header",
               "truncated_prefix", "empty", "flipped_payload", "appended", "huge_header_len"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_entry_is_detected(tmp_path: Path, how: str) -> None:
    path, _, _ = _write(tmp_path)
    _corrupt(path, how)
    with pytest.raises(CorruptEntryError):
        read_entry(path, dict(FP))


@pytest.mark.parametrize("how", ["bad_magic", "other_version", "header_hash", "truncated_payload", "empty"])
def test_corrupt_header_is_detected_by_header_reader(tmp_path: Path, how: str) -> None:
    path, _, _ = _write(tmp_path)
    _corrupt(path, how)
    with pytest.raises(CorruptEntryError):
        read_entry_header(path)


def test_version_error_names_versions(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path)
    _corrupt(path, "other_version")
    with pytest.raises(CorruptEntryError, match="version"):
        read_entry(path, {})


@pytest.mark.parametrize("field,value", [("model", "another-model"), ("state", "other-engine"), ("content", "x"),
                                         ("start", 6)])
def test_mismatched_expected_field_is_rejected(tmp_path: Path, field: str, value: object) -> None:
    path, _, _ = _write(tmp_path)
    expect = {"model": "model-fp", "state": "state-fp", "content": "k", "start": 5}
    expect[field] = value
    with pytest.raises(CorruptEntryError, match=field):
        read_entry(path, expect)


def test_missing_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        read_entry(tmp_path / "absent.pcm", {})


def test_atomic_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"k@0{FILE_SUFFIX}"

    def broken_replace(src: object, dst: object) -> None:
        # the temp file is complete here; the rename fails (disk full, permissions, ...)
        assert Path(str(src)).exists()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(entry_file.os, "replace", broken_replace)
    with pytest.raises(StoreError):
        write_entry(path, dict(FP), _payload())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_mid_payload_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old_payload, _ = _write(tmp_path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f: object) -> None:
            self._f = f
            self._writes = 0

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()  # type: ignore[attr-defined]

        def write(self, data: object) -> int:
            self._writes += 1
            if self._writes == 4:  # the payload: write half of it, then fail
                view = memoryview(data)  # type: ignore[arg-type]
                self._f.write(view[: len(view) // 2])  # type: ignore[attr-defined]
                raise OSError(5, "Input/output error")
            return self._f.write(data)  # type: ignore[attr-defined]

    monkeypatch.setattr(entry_file.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(StoreError):
        write_entry(path, dict(FP), _payload(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file
    assert path.read_bytes() == before  # the old entry is intact
    assert np.array_equal(read_entry(path, {})[1], old_payload)


# -- RAM tier --------------------------------------------------------------------------------------------
def test_ram_lru_eviction_under_budget() -> None:
    ram = RamTier(300)
    a, b, c, d = (_entry(x, n=100) for x in "abcd")
    for e in (a, b, c):
        assert ram.put(e)
    assert ram.used_bytes == 300
    assert ram.get(a.key) is a  # a becomes most recently used
    assert ram.put(d)  # evicts b, the least recently used
    assert b.key not in ram
    assert all(k in ram for k in (a.key, c.key, d.key))
    assert ram.used_bytes == 300
    assert ram.evictions == 1
    assert ram.starts_of("b") == set()
    assert ram.starts_of("a") == {0}


def test_ram_pinned_entries_survive() -> None:
    ram = RamTier(300)
    a, b, c, d, e = (_entry(x, n=100) for x in "abcde")
    for x in (a, b, c):
        ram.put(x)
    ram.pin(a.key)
    ram.pin(b.key)
    assert ram.put(d)  # only c can go
    assert a.key in ram and b.key in ram and c.key not in ram
    ram.pin(d.key)
    assert not ram.put(e)  # everything pinned: refused, nothing evicted
    assert e.key not in ram
    assert {a.key, b.key, d.key} <= set(x.key for x in ram.entries())
    assert ram.used_bytes <= ram.budget_bytes
    ram.unpin(a.key)
    assert ram.put(e)
    assert a.key not in ram


def test_ram_oversize_entry_refused() -> None:
    ram = RamTier(100)
    small = _entry("s", n=50)
    ram.put(small)
    assert not ram.put(_entry("big", n=101))
    assert len(ram) == 1 and small.key in ram  # nothing was evicted for it
    assert ram.used_bytes == 50


def test_ram_replacing_same_key_keeps_accounting() -> None:
    ram = RamTier(1000)
    ram.put(_entry("a", n=100))
    ram.put(_entry("a", n=200, seed=3))
    assert len(ram) == 1 and ram.used_bytes == 200


def test_ram_negative_budget_rejected() -> None:
    with pytest.raises(ConfigError):
        RamTier(-1)


# -- disk tier -------------------------------------------------------------------------------------------
def test_disk_prune_least_recently_used(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "ns", budget_bytes=10**9)
    keys = [EntryKey(f"c{i}", 0) for i in range(4)]
    for i, key in enumerate(keys):
        disk.write(key, dict(FP), _payload(1000, i))
    sizes = {i.key: i.size for i in disk.infos()}
    now = time.time()
    for age, key in zip((400, 300, 200, 100), keys, strict=True):  # c0 oldest
        os.utime(disk.path_for(key), (now - age, now - age))
    assert disk.read(keys[0], dict(FP)) is not None  # a read refreshes c0: now c1 is the oldest
    disk.budget_bytes = sizes[keys[0]] * 2 + 10
    assert disk.prune() == 2
    left = {i.key for i in disk.infos()}
    assert left == {keys[0], keys[3]}
    assert disk.used_bytes() <= disk.budget_bytes


def test_disk_write_prunes_but_keeps_new_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "ns", budget_bytes=10)  # smaller than any file
    first = EntryKey("one", 0)
    disk.write(first, dict(FP), _payload(500))
    second = EntryKey("two", 3)
    disk.write(second, dict(FP), _payload(500, 1))
    assert {i.key for i in disk.infos()} == {second}


def test_disk_read_corrupt_warns_and_returns_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskTier(tmp_path / "ns", budget_bytes=10**9)
    key = EntryKey("abc", 4)
    path = disk.write(key, dict(FP), _payload())
    _corrupt(path, "flipped_payload")
    with caplog.at_level(logging.WARNING):
        assert disk.read(key, dict(FP)) is None
    assert any("ignoring a stored module" in r.getMessage() for r in caplog.records)
    assert path.exists()  # reads never delete


def test_disk_read_rejects_file_renamed_to_another_key(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "ns", budget_bytes=10**9)
    path = disk.write(EntryKey("abc", 4), dict(FP), _payload())
    other = EntryKey("abc", 9)
    path.rename(disk.path_for(other))
    assert disk.read(other, dict(FP)) is None


def test_disk_permissions(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "store" / "ns", budget_bytes=10**9)
    path = disk.write(EntryKey("abc", 0), dict(FP), _payload())
    assert stat.S_IMODE(disk.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert disk.starts_of("abc") == {0}


# -- ModuleStore -----------------------------------------------------------------------------------------
def _store(root: Path, namespace: str = "default", **kw: object) -> ModuleStore:
    return ModuleStore(directory=root, namespace=namespace, ram_budget=kw.pop("ram_budget", 10**7),  # type: ignore[arg-type]
                       disk_budget=kw.pop("disk_budget", 10**8), **kw)  # type: ignore[arg-type]


def _stored(content: str, start: int = 0, seed: int = 0, run_bytes: tuple[int, ...] = (2000,)) -> StoredModule:
    return StoredModule(EntryKey(content, start), _payload(sum(run_bytes), seed), _meta(content, run_bytes, start))


def test_store_lookup_promotes_disk_to_ram(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    entry = _stored("abc", 7)
    writer.save(entry)
    hit = writer.lookup(entry.key, dict(FP))
    assert hit is not None and hit.tier == "ram"

    reader = _store(tmp_path)  # a restarted process: empty RAM
    assert len(reader.ram) == 0
    assert reader.starts_of("abc") == {7}
    hit = reader.lookup(entry.key, dict(FP))
    assert hit is not None and hit.tier == "disk"
    assert np.array_equal(hit.entry.state, entry.state)
    assert hit.entry.meta == entry.meta  # every field of the typed metadata survives the disk round trip
    again = reader.lookup(entry.key, dict(FP))
    assert again is not None and again.tier == "ram"


def test_store_lookup_rejects_other_model(tmp_path: Path) -> None:
    _store(tmp_path).save(_stored("abc"))
    assert _store(tmp_path).lookup(EntryKey("abc", 0), {"model": "other", "state": "state-fp"}) is None


def test_store_corrupt_disk_entry_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = _store(tmp_path)
    entry = _stored("abc")
    writer.save(entry)
    assert writer.disk is not None
    _corrupt(writer.disk.path_for(entry.key), "flipped_payload")
    with caplog.at_level(logging.WARNING):
        assert _store(tmp_path).lookup(entry.key, dict(FP)) is None
    assert caplog.records


def test_store_namespaces_are_isolated(tmp_path: Path) -> None:
    a = _store(tmp_path, "tenant-a")
    b = _store(tmp_path, "tenant-b")
    entry = _stored("same", 3)
    a.save(entry)
    assert b.lookup(entry.key, dict(FP)) is None
    assert b.starts_of("same") == set()
    assert _store(tmp_path, "tenant-b").lookup(entry.key, dict(FP)) is None
    assert _store(tmp_path, "tenant-a").lookup(entry.key, dict(FP)) is not None
    assert (tmp_path / "tenant-a").is_dir() and not (tmp_path / "tenant-b").exists()
    assert b.stats().disk_entries == 0 and a.stats().disk_entries == 1
    assert a.stats().namespace == "tenant-a" and b.stats().namespace == "tenant-b"


@pytest.mark.parametrize("namespace", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_store_bad_namespace_rejected(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(ConfigError):
        _store(tmp_path, namespace)


def test_store_negative_budget_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _store(tmp_path, ram_budget=-1)


def _check_unwritable_save(store: ModuleStore, caplog: pytest.LogCaptureFixture) -> None:
    entry = _stored("abc")
    with caplog.at_level(logging.WARNING):
        store.save(entry)  # no exception
    assert any("RAM only" in r.getMessage() for r in caplog.records)
    assert store.disk_errors == 1
    hit = store.lookup(entry.key, dict(FP))
    assert hit is not None and hit.tier == "ram"
    store.save(_stored("def", seed=1))  # later saves skip the disk without warning again
    assert store.disk_errors == 1
    assert store.lookup(EntryKey("def", 0), dict(FP)) is not None


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_store_read_only_folder_keeps_serving_from_ram(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        _check_unwritable_save(_store(root), caplog)
    finally:
        root.chmod(0o700)


def test_store_unwritable_disk_keeps_serving_from_ram(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-only case simulated (also as root): the folder's files cannot be created."""
    real_open = os.open

    def refuse(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(entry_file.os, "open", refuse)
    store = _store(tmp_path)
    _check_unwritable_save(store, caplog)
    assert store.disk is not None and store.disk.infos() == []
    assert not list(store.disk.directory.glob(".*.tmp"))


def test_store_persist_false_writes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path, persist=False)
    store.save(_stored("abc"))
    assert store.lookup(EntryKey("abc", 0), dict(FP)) is not None
    assert list(tmp_path.iterdir()) == []


def test_store_clear_and_stats(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(_stored("a"))
    store.save(_stored("b", seed=1))
    stats = store.stats()
    assert stats.ram_entries == 2 and stats.disk_entries == 2
    assert stats.disk_bytes > stats.ram_bytes == 4000
    assert stats.ram_budget_bytes == 10**7 and stats.disk_budget_bytes == 10**8
    assert stats.disk_path == str(tmp_path / "default") and stats.disk_write_errors == 0
    assert json.loads(json.dumps(stats.to_dict()))["disk_entries"] == 2
    assert store.clear() == 4
    assert store.stats().ram_entries == 0 and store.stats().disk_entries == 0


def test_store_clear_ram_only_keeps_disk(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = _stored("a")
    store.save(entry)
    assert store.clear(disk=False) == 1
    assert store.stats().ram_entries == 0 and store.stats().disk_entries == 1
    hit = store.lookup(entry.key, dict(FP))
    assert hit is not None and hit.tier == "disk"


# -- entries and find ------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_bytes,ranges", [
    ((60, 50), None),  # sizes that do not add up to the state
    ((100, 0), None),  # an empty run
    ((), None),  # no run at all
    ((100,), ((0, 4), (8, 12))),  # fewer sizes than text runs
    ((100,), ((4, 4),)),  # an empty text run
])
def test_stored_module_checks_run_sizes(run_bytes: tuple[int, ...], ranges: tuple[tuple[int, int], ...] | None) -> None:
    meta = _meta("m", run_bytes)
    if ranges is not None:
        meta = dataclasses.replace(meta, ranges=ranges)
    with pytest.raises(CorruptEntryError, match="run"):
        StoredModule(EntryKey("c", 0), _payload(100), meta)


def test_stored_module_splits_its_runs() -> None:
    entry = _stored("m", run_bytes=(700, 1300))
    runs = entry.runs()
    assert [r.nbytes for r in runs] == [700, 1300] and entry.nbytes == 2000
    assert np.array_equal(np.concatenate(runs), entry.state)
    assert entry.meta.n_cells == 8


def test_entry_meta_from_damaged_fields_is_corrupt() -> None:
    fields = _meta("m", (10,)).to_fields()
    assert EntryMeta.from_fields(fields, where="x") == _meta("m", (10,))
    del fields["ranges"]
    with pytest.raises(CorruptEntryError, match="unreadable metadata"):
        EntryMeta.from_fields(fields, where="x")


def test_store_find_exact_then_shifted(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = _stored("abc", 7)
    store.save(entry)
    exact = store.find(EntryKey("abc", 7), dict(FP), runs=1)
    assert exact is not None and exact.entry is entry and exact.tier == "ram" and exact.shift == 0
    moved = store.find(EntryKey("abc", 12), dict(FP), runs=1)  # the same content, stored at start 7
    assert moved is not None and moved.entry.key == entry.key and moved.shift == 5
    assert store.find(EntryKey("other", 7), dict(FP), runs=1) is None

    reader = _store(tmp_path)  # a restarted process finds it on disk, shifted too
    from_disk = reader.find(EntryKey("abc", 3), dict(FP), runs=1)
    assert from_disk is not None and from_disk.tier == "disk" and from_disk.shift == -4


def test_store_find_ignores_an_entry_with_another_run_count(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path, persist=False)
    entry = _stored("abc", run_bytes=(1000, 1000))
    store.save(entry)
    with caplog.at_level(logging.WARNING):
        assert store.find(entry.key, dict(FP), runs=3) is None
    assert any("text run" in r.getMessage() for r in caplog.records)
    assert entry.key not in store.ram  # dropped, so the module is encoded again
