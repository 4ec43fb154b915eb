"""The module store: saved module states in RAM and on disk, keyed exactly."""

from __future__ import annotations

from pccpu.store.keys import EntryKey, content_key
from pccpu.store.module_store import Hit, ModuleStore
from pccpu.store.ram import StoredModule

__all__ = ["EntryKey", "Hit", "ModuleStore", "StoredModule", "content_key"]
