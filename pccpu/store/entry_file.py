"""The on-disk format of one stored module state, and its atomic writer and checking reader.

Layout (little endian)::

    8 bytes   magic  b"PCCPUKV\\0"
    2 bytes   format version
    2 bytes   reserved (0)
    4 bytes   header length H
    H bytes   header: UTF-8 JSON (key, start, fingerprints, cells, payload size, payload xxh3-128, ...)
    8 bytes   xxh64 of the header bytes
    P bytes   payload: the llama.cpp sequence state, exactly as llama_state_seq_get_data wrote it

Writes go to a temporary file in the same folder, then ``os.replace``: a reader sees the old file or the whole new
one, never a part. A reader checks magic, version, both checksums, the size and the key before returning anything.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from pccpu.errors import CorruptEntryError, StoreError

MAGIC = b"PCCPUKV\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHI")
_HEADER_HASH = struct.Struct("<Q")
FILE_SUFFIX = ".pcm"


@dataclass(frozen=True)
class EntryHeader:
    fields: dict[str, Any]

    @property
    def payload_size(self) -> int:
        return int(self.fields["payload_size"])


def payload_checksum(payload: np.ndarray) -> str:
    return xxhash.xxh3_128(payload.data).hexdigest()


def write_entry(path: Path, header: dict[str, Any], payload: np.ndarray) -> None:
    """Write atomically (temp file + rename), readable by the owner only."""
    fields = dict(header, payload_size=int(payload.nbytes), payload_xxh3=payload_checksum(payload))
    header_bytes = json.dumps(fields, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)))
            f.write(header_bytes)
            f.write(_HEADER_HASH.pack(xxhash.xxh64_intdigest(header_bytes)))
            f.write(payload.data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc}") from exc


def read_header(f: Any, path: Path, file_size: int) -> tuple[EntryHeader, int]:
    prefix = f.read(_PREFIX.size)
    if len(prefix) != _PREFIX.size:
        raise CorruptEntryError(f"{path}: truncated ({file_size} bytes)")
    magic, version, _reserved, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CorruptEntryError(f"{path}: not a pccpu module file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(
            f"{path}: written by store format version {version}, this pccpu reads version {FORMAT_VERSION}; "
            "it will be encoded again"
        )
    if header_len > min(file_size, 1 << 26):
        raise CorruptEntryError(f"{path}: header length {header_len} is impossible")
    header_bytes = f.read(header_len)
    stored_hash = f.read(_HEADER_HASH.size)
    if len(header_bytes) != header_len or len(stored_hash) != _HEADER_HASH.size:
        raise CorruptEntryError(f"{path}: truncated header")
    if _HEADER_HASH.unpack(stored_hash)[0] != xxhash.xxh64_intdigest(header_bytes):
        raise CorruptEntryError(f"{path}: header checksum mismatch")
    try:
        fields = json.loads(header_bytes)
    except ValueError as exc:
        raise CorruptEntryError(f"{path}: unreadable header ({exc})") from exc
    offset = _PREFIX.size + header_len + _HEADER_HASH.size
    header = EntryHeader(fields)
    if offset + header.payload_size != file_size:
        raise CorruptEntryError(
            f"{path}: size {file_size} does not match the header ({offset + header.payload_size}); truncated?"
        )
    return header, offset


def read_entry_header(path: Path) -> EntryHeader:
    """Only the header (for listings): checks magic, version, header checksum and size, not the payload."""
    try:
        with path.open("rb") as f:
            return read_header(f, path, os.fstat(f.fileno()).st_size)[0]
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def read_entry(path: Path, expect: dict[str, Any]) -> tuple[EntryHeader, np.ndarray]:
    """Read and check one entry. ``expect`` lists header fields that must match exactly (key, fingerprints)."""
    try:
        with path.open("rb") as f:
            header, _offset = read_header(f, path, os.fstat(f.fileno()).st_size)
            for name, value in expect.items():
                if header.fields.get(name) != value:
                    raise CorruptEntryError(
                        f"{path}: {name} is {header.fields.get(name)!r}, expected {value!r}; it will be encoded again"
                    )
            payload = np.empty(header.payload_size, dtype=np.uint8)
            if f.readinto(payload.data) != header.payload_size:
                raise CorruptEntryError(f"{path}: truncated payload")
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if payload_checksum(payload) != header.fields.get("payload_xxh3"):
        raise CorruptEntryError(f"{path}: payload checksum mismatch (the file is damaged)")
    return header, payload
