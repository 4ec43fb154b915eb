"""The module store: saved module states in RAM and on disk, keyed exactly."""

from __future__ import annotations

from pccpu.store.entry import EntryMeta, StoredModule
from pccpu.store.keys import EntryKey, content_key
from pccpu.store.lru import Lru
from pccpu.store.module_store import Hit, ModuleStore

__all__ = ["EntryKey", "EntryMeta", "Hit", "Lru", "ModuleStore", "StoredModule", "content_key"]
