"""How one stored module state is laid out in a shared key-value store (Redis or Valkey): a manifest and chunks.

Keys; ``ns`` is the store namespace (``keys.NAMESPACE_PATTERN``: no colon, so keys never run into each other) and
``stem`` the entry key's ``content@start``, the disk tier's file name::

    pccpu:1:{ns}:m:{stem}                 the manifest (UTF-8 JSON, below)
    pccpu:1:{ns}:c:{stem}:{write}:{i}     chunk i of the payload, raw bytes
    pccpu:1:{ns}:s:{content}              the starts this content is stored at (for shifted hits)
    pccpu:1:{ns}:l:{stem}                 the encoding lease (``fleet.py``)

Manifest: ``{"format": 1, "namespace", "stem", "write", "header", "chunk_size", "chunks": [[size, xxh3-64], ...]}``.
``header`` holds the entry's header fields exactly as the disk tier's file does (key, fingerprints, runs,
payload_size, payload_xxh3 = xxh3-128 of the payload); the chunks, concatenated, are the disk file's payload byte for
byte. ``write`` is a random id per write: two machines writing one entry at once never mix their chunks, the manifest
written last names its own.

A reader checks each chunk's size and xxh3-64, the sizes against ``payload_size``, the whole payload's xxh3-128, and
the header's key and fingerprints against what it asked for. A chunk that is absent (evicted by the server's LRU
policy) is a plain miss; one that is there but wrong is damage (:class:`CorruptEntryError`). Checksums catch damage,
not forgery: anyone who can write to the server can write a valid entry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from pccpu.errors import CorruptEntryError
from pccpu.store.entry_file import payload_checksum
from pccpu.store.keys import EntryKey

REMOTE_FORMAT = 1
DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class RemoteKeys:
    """The Redis key names of one namespace."""

    namespace: str

    @property
    def prefix(self) -> str:
        return f"pccpu:{REMOTE_FORMAT}:{self.namespace}:"

    def manifest(self, key: EntryKey) -> str:
        return f"{self.prefix}m:{key.file_stem}"

    def chunk(self, key: EntryKey, write: str, index: int) -> str:
        return f"{self.prefix}c:{key.file_stem}:{write}:{index}"

    def starts(self, content: str) -> str:
        return f"{self.prefix}s:{content}"

    def lease(self, key: EntryKey) -> str:
        return f"{self.prefix}l:{key.file_stem}"


@dataclass(frozen=True)
class Manifest:
    write: str
    header: dict[str, Any]
    chunks: tuple[tuple[int, str], ...]  # (size, xxh3-64 hex) per chunk

    @property
    def payload_size(self) -> int:
        return sum(size for size, _ in self.chunks)


def chunk_checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64(data).hexdigest()


def split_entry(key: EntryKey, namespace: str, fields: dict[str, Any], payload: np.ndarray,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[bytes, str, list[memoryview]]:
    """The manifest (JSON bytes), the write id and the payload's chunks (views, no copy) of one entry.
    ``fields``: its metadata (``EntryMeta.to_fields()``); the key and payload fields are added as the disk tier
    adds them."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    data = np.ascontiguousarray(payload, dtype=np.uint8).data.cast("B")
    header = dict(fields, content=key.content, start=key.start, payload_size=len(data),
                  payload_xxh3=payload_checksum(payload))
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    write = uuid.uuid4().hex[:16]
    manifest = {"format": REMOTE_FORMAT, "namespace": namespace, "stem": key.file_stem, "write": write,
                "header": header, "chunk_size": chunk_bytes,
                "chunks": [[len(c), chunk_checksum(c)] for c in chunks]}
    return json.dumps(manifest, sort_keys=True).encode(), write, chunks


def parse_manifest(raw: bytes, key: EntryKey, namespace: str, expect: dict[str, Any]) -> Manifest:
    """Check a manifest read for ``key``: format, namespace, key, the header's fingerprints (``expect``)."""
    where = f"remote entry {namespace}/{key.file_stem}"
    try:
        doc = json.loads(raw)
        if doc.get("format") != REMOTE_FORMAT:
            raise CorruptEntryError(f"{where}: remote format {doc.get('format')!r}, this pccpu reads "
                                    f"{REMOTE_FORMAT}; it will be encoded again")
        header = dict(doc["header"])
        chunks = tuple((int(size), str(digest)) for size, digest in doc["chunks"])
        manifest = Manifest(str(doc["write"]), header, chunks)
        namespace_found, stem_found = doc["namespace"], doc["stem"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntryError(f"{where}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if namespace_found != namespace or stem_found != key.file_stem:
        raise CorruptEntryError(f"{where}: the manifest describes {namespace_found}/{stem_found}")
    for name, value in dict(expect, content=key.content, start=key.start).items():
        if header.get(name) != value:
            raise CorruptEntryError(f"{where}: {name} is {header.get(name)!r}, expected {value!r}")
    if manifest.payload_size != header.get("payload_size") or any(size <= 0 for size, _ in chunks):
        raise CorruptEntryError(f"{where}: chunk sizes {[s for s, _ in chunks]} do not add up to the payload size "
                                f"{header.get('payload_size')!r}")
    return manifest


def join_chunks(manifest: Manifest, chunks: Sequence[bytes | None], *, where: str) -> np.ndarray | None:
    """The payload from its chunks, checked; None when a chunk is absent (evicted: a miss, not damage)."""
    if len(chunks) != len(manifest.chunks):
        raise CorruptEntryError(f"{where}: {len(chunks)} chunks read for {len(manifest.chunks)} listed")
    present = [c for c in chunks if c is not None]
    if len(present) != len(chunks):
        return None
    payload = np.empty(manifest.payload_size, dtype=np.uint8)
    offset = 0
    for index, (data, (size, digest)) in enumerate(zip(present, manifest.chunks, strict=True)):
        if len(data) != size:
            raise CorruptEntryError(f"{where}: chunk {index} holds {len(data)} bytes, the manifest lists {size}")
        if chunk_checksum(data) != digest:
            raise CorruptEntryError(f"{where}: chunk {index} is damaged (checksum mismatch)")
        payload[offset : offset + size] = np.frombuffer(data, dtype=np.uint8)
        offset += size
    if payload_checksum(payload) != manifest.header.get("payload_xxh3"):
        raise CorruptEntryError(f"{where}: payload checksum mismatch")
    return payload
