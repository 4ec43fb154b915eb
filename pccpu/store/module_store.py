"""The module store: a RAM tier in front of a persistent disk tier, both keyed exactly (see ``keys.py``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from pccpu.errors import ConfigError, CorruptEntryError, StoreError
from pccpu.paths import store_dir
from pccpu.store.disk import DiskTier
from pccpu.store.entry import EntryMeta, StoredModule
from pccpu.store.keys import NAMESPACE_PATTERN, EntryKey
from pccpu.store.ram import RamTier

logger = logging.getLogger(__name__)

Tier = Literal["ram", "disk"]


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

    ``namespace`` scopes everything: keys, files and listings. ``persist=False`` keeps the disk tier out.
    """

    def __init__(
        self,
        *,
        directory: Path | str | None = None,
        namespace: str = "default",
        ram_budget: int | None = None,
        disk_budget: int | None = None,
        persist: bool = True,
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
        """The state stored under exactly ``key`` (RAM first, then disk), checked; None when absent or damaged."""
        entry = self.ram.get(key)
        if entry is not None:
            return Hit(entry, "ram")
        if self.disk is None:
            return None
        found = self.disk.read(key, expect)
        if found is None:
            return None
        fields, state = found
        where = str(self.disk.path_for(key))
        try:
            entry = StoredModule(key, state, EntryMeta.from_fields(fields, where=where))
        except CorruptEntryError as exc:  # damaged metadata is reported and treated as absent, as in disk.read
            logger.warning("ignoring a stored module: %s", exc)
            return None
        self.ram.put(entry)
        return Hit(entry, "disk")

    def contains(self, key: EntryKey) -> bool:
        """Whether a state is stored under ``key`` (without reading or checking it)."""
        return key in self.ram or (self.disk is not None and self.disk.path_for(key).is_file())

    def starts_of(self, content: str) -> set[int]:
        starts = self.ram.starts_of(content)
        if self.disk is not None:
            starts |= self.disk.starts_of(content)
        return starts

    def save(self, entry: StoredModule) -> None:
        """Keep in RAM and write to disk. A disk that cannot be written is reported and skipped: the answer
        does not depend on persisting."""
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
            disk_write_errors=self.disk_errors,
        )
