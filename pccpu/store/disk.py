"""The disk tier: one file per module state under ``<store>/<namespace>/``, a byte budget with least recently used
pruning (a read refreshes the file's mtime), owner-only permissions. Survives restarts: another process finds the
states this one wrote."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pccpu.errors import CorruptEntryError, StoreError
from pccpu.store.entry_file import FILE_SUFFIX, read_entry, read_entry_header, write_entry
from pccpu.store.keys import EntryKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskEntryInfo:
    path: Path
    key: EntryKey
    size: int
    mtime: float


class DiskTier:
    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.writable = True

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise StoreError(f"cannot create the module store folder {self.directory}: {exc}") from exc

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """An inter-process lock on this folder (flock), held while encoding: two processes encoding the same
        schema take turns, and the second finds the states the first wrote instead of writing them again."""
        try:
            import fcntl
        except ImportError:  # Windows: atomic renames still keep every file whole
            yield
            return
        try:
            self._ensure_dir()
            fd = os.open(self.directory / ".encode.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except (OSError, StoreError) as exc:  # a read-only store: encode anyway, the answer matters more
            logger.warning("cannot lock the module store (%s); encoding without the lock", exc)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def path_for(self, key: EntryKey) -> Path:
        return self.directory / f"{key.file_stem}{FILE_SUFFIX}"

    def starts_of(self, content: str) -> set[int]:
        starts = set()
        for path in self.directory.glob(f"{content}@*{FILE_SUFFIX}"):
            try:
                starts.add(int(path.name[len(content) + 1 : -len(FILE_SUFFIX)]))
            except ValueError:
                continue
        return starts

    def read(self, key: EntryKey, expect: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray] | None:
        """The entry's header fields and state, or None if absent. A damaged or mismatched file is reported
        (warning) and treated as absent; it is replaced when the module is encoded again, never loaded."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            header, payload = read_entry(path, dict(expect, content=key.content, start=key.start))
        except CorruptEntryError as exc:
            logger.warning("ignoring a stored module: %s", exc)
            return None
        with contextlib.suppress(OSError):  # a read-only store still serves reads
            os.utime(path)  # least recently used pruning goes by mtime
        return header.fields, payload

    def write(self, key: EntryKey, header: dict[str, Any], state: np.ndarray) -> Path:
        self._ensure_dir()
        path = self.path_for(key)
        write_entry(path, dict(header, content=key.content, start=key.start), state)
        self.prune(keep=path)
        return path

    def infos(self) -> list[DiskEntryInfo]:
        out: list[DiskEntryInfo] = []
        if not self.directory.is_dir():
            return out
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(FILE_SUFFIX) or entry.name.startswith("."):
                continue
            stem = entry.name[: -len(FILE_SUFFIX)]
            content, _, start = stem.partition("@")
            try:
                stat = entry.stat()
                out.append(DiskEntryInfo(Path(entry.path), EntryKey(content, int(start)), stat.st_size,
                                         stat.st_mtime))
            except (OSError, ValueError):
                continue
        return out

    def header(self, info: DiskEntryInfo) -> dict[str, Any] | None:
        try:
            return read_entry_header(info.path).fields
        except (CorruptEntryError, StoreError) as exc:
            logger.warning("%s", exc)
            return None

    def used_bytes(self) -> int:
        return sum(i.size for i in self.infos())

    def prune(self, keep: Path | None = None) -> int:
        """Delete least recently used files until the folder fits the budget; the number deleted."""
        infos = sorted(self.infos(), key=lambda i: i.mtime)
        total = sum(i.size for i in infos)
        removed = 0
        for info in infos:
            if total <= self.budget_bytes:
                break
            if keep is not None and info.path == keep:
                continue
            try:
                info.path.unlink()
            except OSError as exc:
                logger.warning("cannot prune %s: %s", info.path, exc)
                continue
            total -= info.size
            removed += 1
        return removed

    def clear(self) -> int:
        removed = 0
        for info in self.infos():
            info.path.unlink(missing_ok=True)
            removed += 1
        # temp files of writers killed mid-write
        if self.directory.is_dir():
            for tmp in self.directory.glob(".*.tmp"):
                if time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink(missing_ok=True)
        return removed
