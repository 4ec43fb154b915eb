"""The module store: a RAM tier in front of a persistent disk tier, both keyed exactly (see ``keys.py``), and
optionally a remote tier that many machines share (``remote.py``): a lookup goes RAM -> disk -> remote, and a
remote hit is kept on local disk and in RAM."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import psutil

from pccpu.errors import ConfigError, CorruptEntryError, StoreError
from pccpu.paths import store_dir
from pccpu.store.disk import DiskTier
from pccpu.store.entry import EntryMeta, StoredModule
from pccpu.store.keys import NAMESPACE_PATTERN, EntryKey
from pccpu.store.ram import RamTier

if TYPE_CHECKING:
    from pccpu.store.remote import RemoteTier

logger = logging.getLogger(__name__)

# where a hit came from (a remote hit is on local disk too by the time it is returned)
Tier = Literal["ram", "disk", "remote"]


def default_ram_budget() -> int:
    """A quarter of the memory available now."""
    return int(psutil.virtual_memory().available * 0.25)


def default_disk_budget(directory: Path) -> int:
    """Half of the free disk space where the store lives, at most 20 GiB."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 0
    return int(min(20 * 2**30, free * 0.5))


@dataclass(frozen=True)
class StoreStats:
    namespace: str
    ram_entries: int
    ram_bytes: int
    ram_budget_bytes: int
    ram_evictions: int
    disk_path: str | None  # None without a disk tier
    disk_entries: int
    disk_bytes: int
    disk_budget_bytes: int
    disk_write_errors: int
    remote_url: str | None = None  # None without a remote tier; credentials left out
    remote_available: bool = False  # False while its circuit breaker is open (the server is down or slow)
    remote_hits: int = 0
    remote_misses: int = 0  # absent, evicted or damaged
    remote_evicted: int = 0  # entries the server evicted in part: normal misses
    remote_corrupt: int = 0  # damaged entries (checksums): misses, deleted from the server
    remote_bytes_read: int = 0
    remote_writes: int = 0
    remote_bytes_written: int = 0
    remote_errors: int = 0  # calls that failed (unreachable, timed out) or that the server refused
    fleet_waits: int = 0  # modules another machine encoded while this process waited for them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Hit:
    """A stored state found for a key: the entry, the tier it came from, and the shift to apply to all of its
    cells (non-zero when the same content was stored at another start)."""

    entry: StoredModule
    tier: Tier
    shift: int = 0


class ModuleStore:
    """Module states in RAM (LRU under a byte budget, with pinning) and on disk (LRU under its own budget).

    ``namespace`` scopes everything: keys, files, listings and remote keys. ``persist=False`` keeps the disk tier
    out. ``remote_url`` (``redis://HOST:PORT/DB``) adds the remote tier; ``remote`` passes one that is open already
    (tests tune its timeouts and chunk size).
    """

    def __init__(
        self,
        *,
        directory: Path | str | None = None,
        namespace: str = "default",
        ram_budget: int | None = None,
        disk_budget: int | None = None,
        persist: bool = True,
        remote_url: str | None = None,
        remote: RemoteTier | None = None,
    ) -> None:
        if not NAMESPACE_PATTERN.match(namespace):
            raise ConfigError(f"namespace {namespace!r} must match {NAMESPACE_PATTERN.pattern}")
        for name, value in (("ram_budget", ram_budget), ("disk_budget", disk_budget)):
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 bytes, got {value}")
        self.namespace = namespace
        self.root = Path(directory).expanduser() if directory is not None else store_dir()
        self.ram = RamTier(default_ram_budget() if ram_budget is None else ram_budget)
        folder = self.root / namespace
        self.disk: DiskTier | None = (
            DiskTier(folder, default_disk_budget(folder) if disk_budget is None else disk_budget) if persist else None
        )
        self.disk_errors = 0
        if remote is not None and remote_url:
            raise ConfigError("give a remote_url or a remote tier, not both")
        if remote_url:
            from pccpu.store.remote import RemoteTier  # imports the redis client (~0.1 s) only when asked for

            remote = RemoteTier(remote_url, namespace)
        if remote is not None and remote.namespace != namespace:
            raise ConfigError(f"the remote tier is for namespace {remote.namespace!r}, the store for {namespace!r}")
        self.remote = remote

    def find(self, key: EntryKey, expect: dict[str, Any], *, runs: int) -> Hit | None:
        """The state stored under ``key``, else the same content stored at another start (then ``Hit.shift``
        moves it to ``key.start``). ``runs``: how many text runs the caller's module has; an entry with another
        count (written by a damaged or foreign store) is dropped and not returned."""
        exact = self.lookup(key, expect)  # the common case: no listing of the disk folder
        others = sorted(self.starts_of(key.content) - {key.start}) if exact is None else []
        for start in [key.start, *others]:
            candidate = EntryKey(key.content, start)
            hit = exact if start == key.start else self.lookup(candidate, expect)
            if hit is None:
                continue
            if len(hit.entry.meta.ranges) != runs:
                logger.warning("stored module %s holds %d text run(s) where its schema has %d; ignoring it",
                               candidate.file_stem, len(hit.entry.meta.ranges), runs)
                self.ram.discard(candidate)
                continue
            return Hit(hit.entry, hit.tier, key.start - start)
        return None

    def lookup(self, key: EntryKey, expect: dict[str, Any]) -> Hit | None:
        """The state stored under exactly ``key`` (RAM first, then disk, then remote), checked; None when absent
        or damaged. A disk or remote hit is kept in RAM; a remote hit is written to local disk too."""
        entry = self.ram.get(key)
        if entry is not None:
            return Hit(entry, "ram")
        if self.disk is not None:
            found = self.disk.read(key, expect)
            entry = self._entry(key, found, str(self.disk.path_for(key)))
            if entry is not None:
                self.ram.put(entry)
                return Hit(entry, "disk")
        if self.remote is not None:
            found = self.remote.read(key, expect)
            entry = self._entry(key, found, f"remote entry {self.namespace}/{key.file_stem}")
            if entry is not None:
                self._keep_local(entry)
                return Hit(entry, "remote")
        return None

    @staticmethod
    def _entry(key: EntryKey, found: tuple[dict[str, Any], np.ndarray] | None, where: str) -> StoredModule | None:
        if found is None:
            return None
        fields, state = found
        try:
            return StoredModule(key, state, EntryMeta.from_fields(fields, where=where))
        except CorruptEntryError as exc:  # damaged metadata is reported and treated as absent, as in disk.read
            logger.warning("ignoring a stored module: %s", exc)
            return None

    def contains(self, key: EntryKey) -> bool:
        """Whether a state is stored under ``key`` (without reading or checking it)."""
        return key in self.ram or (self.disk is not None and self.disk.path_for(key).is_file()) or (
            self.remote is not None and self.remote.exists(key))

    def starts_of(self, content: str) -> set[int]:
        starts = self.ram.starts_of(content)
        if self.disk is not None:
            starts |= self.disk.starts_of(content)
        if self.remote is not None:
            starts |= self.remote.starts_of(content)
        return starts

    def save(self, entry: StoredModule) -> None:
        """Keep in RAM, write to disk, then to the remote tier (synchronously: an encoding lease is released only
        after the entry is there). A disk or server that cannot be written is reported and skipped: the answer
        does not depend on persisting."""
        self._keep_local(entry)
        if self.remote is not None:
            self.remote.write(entry.key, entry.meta.to_fields(), entry.state)

    def encode_turns(self, groups: Sequence[Sequence[EntryKey]],
                     present: Callable[[EntryKey], bool]) -> Generator[list[EntryKey], None, None]:
        """The keys to encode, turn by turn. ``groups``: the missing keys, by encoding pass. With a remote tier,
        machines take leases so that each module is encoded once per fleet (``fleet.py``; close the iterator,
        e.g. with ``contextlib.closing``); without one, all keys in one turn. ``present(key)``: whether the entry
        can be read now (another machine stored it)."""
        if self.remote is None:
            keys = [k for g in groups for k in g]
            if keys:
                yield keys
            return
        from pccpu.store.fleet import encode_turns

        yield from encode_turns(self.remote, groups, present)

    def _keep_local(self, entry: StoredModule) -> None:
        self.ram.put(entry)
        if self.disk is None or not self.disk.writable:
            return
        try:
            self.disk.write(entry.key, entry.meta.to_fields(), entry.state)
        except StoreError as exc:
            self.disk_errors += 1
            self.disk.writable = False
            logger.warning("%s; modules will stay in RAM only for this session (check the folder's space and "
                           "permissions, or set PCCPU_HOME)", exc)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while encoding; see DiskTier.exclusive (a no-op without a disk tier)."""
        return self.disk.exclusive() if self.disk is not None else contextlib.nullcontext()

    def pin(self, key: EntryKey) -> None:
        self.ram.pin(key)

    def unpin(self, key: EntryKey) -> None:
        self.ram.unpin(key)

    def clear(self, *, ram: bool = True, disk: bool = True) -> int:
        """Forget the local tiers' entries; the number removed. A shared remote tier is never cleared from here:
        other machines use it (delete its ``pccpu:1:NAMESPACE:*`` keys on the server)."""
        removed = 0
        if ram:
            removed += len(self.ram)
            self.ram.clear()
        if disk and self.disk is not None:
            removed += self.disk.clear()
        return removed

    def stats(self) -> StoreStats:
        disk_infos = self.disk.infos() if self.disk is not None else []
        return StoreStats(
            namespace=self.namespace, ram_entries=len(self.ram), ram_bytes=self.ram.used_bytes,
            ram_budget_bytes=self.ram.budget_bytes, ram_evictions=self.ram.evictions,
            disk_path=str(self.disk.directory) if self.disk else None, disk_entries=len(disk_infos),
            disk_bytes=sum(i.size for i in disk_infos), disk_budget_bytes=self.disk.budget_bytes if self.disk else 0,
            disk_write_errors=self.disk_errors, **self._remote_stats(),
        )

    def _remote_stats(self) -> dict[str, Any]:
        if self.remote is None:
            return {}
        c = self.remote.counters
        return {"remote_url": self.remote.url, "remote_available": self.remote.available, "remote_hits": c.hits,
                "remote_misses": c.misses, "remote_evicted": c.evicted, "remote_corrupt": c.corrupt,
                "remote_bytes_read": c.bytes_read, "remote_writes": c.writes,
                "remote_bytes_written": c.bytes_written, "remote_errors": self.remote.breaker.failures + c.refused,
                "fleet_waits": c.fleet_waits}
