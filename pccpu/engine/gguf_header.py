"""A small, stdlib-only reader of the key-value metadata at the head of a GGUF file.

GGUF layout (versions 2 and 3; version 1 used 32-bit counts and is not accepted)::

    magic "GGUF" | uint32 version | uint64 tensor_count | uint64 kv_count
    kv_count x (string key | uint32 value_type | value)
    tensor infos ... | padding | tensor data

Strings are ``uint64 length`` + UTF-8 bytes; arrays are ``uint32 element_type`` + ``uint64 count`` + elements.
Only the header is read, through a buffered file object, never the tensor data: the reader therefore works on the
first part of a split model (a file cut anywhere after the metadata). Tensor infos are not parsed.

Hostile or damaged files are refused with :class:`~pccpu.errors.UnsupportedModelError`: a wrong magic, an unknown
version or value type, a header that ends early, and counts or lengths beyond the caps (``max_array_len``,
``max_string_len``, :data:`MAX_KV_COUNT`) or beyond what the rest of the file could possibly hold. Files written
big-endian (a byte-swapped version field) are read too.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pccpu.errors import UnsupportedModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

#: Default cap on the element count of one array value. The largest real vocabularies (Gemma 3: 262k tokens)
#: are far below it.
DEFAULT_MAX_ARRAY_LEN = 1 << 22
#: Default cap on the byte length of one string (keys and values). Chat templates are a few KB.
DEFAULT_MAX_STRING_LEN = 1 << 24
#: Cap on the number of key-value pairs. Real files have well under a hundred.
MAX_KV_COUNT = 1 << 16
#: Cap on the declared tensor count (sanity only; tensor infos are not read).
MAX_TENSOR_COUNT = 1 << 24
#: Cap on the nesting of arrays of arrays.
MAX_ARRAY_DEPTH = 8

# GGUF value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)

# value type -> (struct format character, size in bytes) for fixed-size scalars.
_SCALAR: dict[int, tuple[str, int]] = {
    _UINT8: ("B", 1),
    _INT8: ("b", 1),
    _UINT16: ("H", 2),
    _INT16: ("h", 2),
    _UINT32: ("I", 4),
    _INT32: ("i", 4),
    _FLOAT32: ("f", 4),
    _BOOL: ("?", 1),
    _UINT64: ("Q", 8),
    _INT64: ("q", 8),
    _FLOAT64: ("d", 8),
}
_TYPE_NAMES = {
    _UINT8: "uint8",
    _INT8: "int8",
    _UINT16: "uint16",
    _INT16: "int16",
    _UINT32: "uint32",
    _INT32: "int32",
    _FLOAT32: "float32",
    _BOOL: "bool",
    _STRING: "string",
    _ARRAY: "array",
    _UINT64: "uint64",
    _INT64: "int64",
    _FLOAT64: "float64",
}


@dataclass(frozen=True)
class GgufHeader:
    """The parsed head of a GGUF file: format version, declared tensor count and the key-value metadata."""

    path: str
    version: int
    tensor_count: int
    metadata: dict[str, object]
    byte_order: str = "<"
    #: Byte offset where the metadata ends (and the tensor infos begin).
    metadata_end: int = 0


class _Reader:
    """Sequential reads from a binary file with bounds checks against the file size."""

    def __init__(self, f: BinaryIO, path: str, size: int, max_array_len: int, max_string_len: int) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.pos = 0
        self.bo = "<"
        self.max_array_len = max_array_len
        self.max_string_len = max_string_len

    def fail(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.path}: not a readable GGUF header: {what} (at byte {self.pos})")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"file ends inside {what} (needs {n} bytes, {max(self.size - self.pos, 0)} left)")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"file ends inside {what}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"file ends inside {what}")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, vtype: int, what: str) -> object:
        fmt, size = _SCALAR[vtype]
        return struct.unpack(self.bo + fmt, self.read(size, what))[0]

    def u32(self, what: str) -> int:
        return int(struct.unpack(self.bo + "I", self.read(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack(self.bo + "Q", self.read(8, what))[0])

    def string(self, what: str, *, strict: bool = False) -> str:
        n = self.u64(f"length of {what}")
        if n > self.max_string_len:
            raise self.fail(f"{what} claims {n} bytes, over the cap of {self.max_string_len}")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if strict:
                raise self.fail(f"{what} is not valid UTF-8") from exc
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, depth: int = 0) -> object:
        if vtype in _SCALAR:
            return self.scalar(vtype, f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"string value of {key!r}")
        if vtype == _ARRAY:
            return self.array(key, depth)
        raise self.fail(f"unknown value type {vtype} for key {key!r}")

    def array(self, key: str, depth: int) -> list[object]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} in {key!r}")
        etype = self.u32(f"element type of array {key!r}")
        count = self.u64(f"length of array {key!r}")
        if etype not in _TYPE_NAMES:
            raise self.fail(f"unknown element type {etype} in array {key!r}")
        if count > self.max_array_len:
            raise self.fail(f"array {key!r} claims {count} elements, over the cap of {self.max_array_len}")
        # Every element takes at least this many bytes; a count the rest of the file cannot hold is a lie.
        min_size = _SCALAR[etype][1] if etype in _SCALAR else (8 if etype == _STRING else 12)
        if count * min_size > self.size - self.pos:
            raise self.fail(
                f"array {key!r} claims {count} {_TYPE_NAMES[etype]} elements; the file ends before they could fit"
            )
        if etype in _SCALAR:
            fmt, size = _SCALAR[etype]
            data = self.read(count * size, f"array {key!r}")
            return list(struct.unpack(f"{self.bo}{count}{fmt}", data))
        if etype == _STRING:
            return [self.string(f"element {i} of array {key!r}") for i in range(count)]
        return [self.array(f"{key}[{i}]", depth + 1) for i in range(count)]


def read_gguf_header(
    path: str | os.PathLike[str],
    *,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
    max_string_len: int = DEFAULT_MAX_STRING_LEN,
) -> GgufHeader:
    """Read the version, tensor count and all key-value metadata of the GGUF file at ``path``.

    Raises :class:`UnsupportedModelError` for a file that is not GGUF, a version other than 2 or 3, a header cut
    short, or a count or length over the caps. ``OSError`` (missing file, no permission) passes through.
    """
    p = str(Path(path))
    size = os.path.getsize(p)
    with open(p, "rb", buffering=1 << 16) as f:
        r = _Reader(f, p, size, max_array_len, max_string_len)
        magic = r.read(4, "the magic number") if size >= 4 else b""
        if magic != GGUF_MAGIC:
            raise UnsupportedModelError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        raw_version = r.read(4, "the version")
        version = struct.unpack("<I", raw_version)[0]
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack(">I", raw_version)[0]
            if swapped in SUPPORTED_VERSIONS:
                r.bo = ">"
                version = swapped
            else:
                raise UnsupportedModelError(
                    f"{p}: GGUF version {version} is not supported (only {', '.join(map(str, SUPPORTED_VERSIONS))})"
                )
        tensor_count = r.u64("the tensor count")
        kv_count = r.u64("the key-value count")
        if tensor_count > MAX_TENSOR_COUNT:
            raise r.fail(f"tensor count {tensor_count} is over the cap of {MAX_TENSOR_COUNT}")
        if kv_count > MAX_KV_COUNT:
            raise r.fail(f"key-value count {kv_count} is over the cap of {MAX_KV_COUNT}")
        metadata: dict[str, object] = {}
        for i in range(kv_count):
            key = r.string(f"key {i}", strict=True)
            vtype = r.u32(f"value type of {key!r}")
            if key in metadata:
                raise r.fail(f"duplicate key {key!r}")
            metadata[key] = r.value(vtype, key)
    log.debug("read GGUF v%d header of %s: %d keys, %d tensors", version, p, len(metadata), tensor_count)
    return GgufHeader(
        path=p, version=version, tensor_count=tensor_count, metadata=metadata, byte_order=r.bo, metadata_end=r.pos
    )


def read_gguf_metadata(
    path: str | os.PathLike[str],
    *,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
    max_string_len: int = DEFAULT_MAX_STRING_LEN,
) -> dict[str, object]:
    """The key-value metadata of the GGUF file at ``path`` (see :func:`read_gguf_header`).

    Values are Python ``int``, ``float``, ``bool``, ``str`` or (possibly nested) ``list`` of those.
    """
    return read_gguf_header(path, max_array_len=max_array_len, max_string_len=max_string_len).metadata


def _int(md: Mapping[str, object], key: str) -> int | None:
    v = md.get(key)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        # Per-layer arrays (some architectures store head counts per layer): report the largest.
        return max(int(x) for x in v)  # type: ignore[arg-type]
    return None


def _str(md: Mapping[str, object], key: str) -> str | None:
    v = md.get(key)
    return v if isinstance(v, str) else None


def _token_text(md: Mapping[str, object], id_key: str) -> str | None:
    tid = md.get(id_key)
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tid, int) and not isinstance(tid, bool) and isinstance(tokens, list) and 0 <= tid < len(tokens):
        text = tokens[tid]
        return text if isinstance(text, str) else None
    return None


@dataclass(frozen=True)
class GgufInfo:
    """The handful of metadata fields pccpu needs, with the architecture prefix resolved.

    Fields are ``None`` when the file does not carry them. ``head_count`` / ``head_count_kv`` stored per layer are
    reported as their maximum. ``bos_token`` / ``eos_token`` are the token texts looked up in the vocabulary.
    """

    architecture: str
    name: str | None = None
    context_length: int | None = None
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    metadata: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_metadata(cls, md: Mapping[str, object], *, source: str = "GGUF file") -> GgufInfo:
        """Build from a metadata dict; raises :class:`UnsupportedModelError` without ``general.architecture``."""
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise UnsupportedModelError(f"{source}: no general.architecture in the GGUF metadata")
        return cls(
            architecture=arch,
            name=_str(md, "general.name"),
            context_length=_int(md, f"{arch}.context_length"),
            block_count=_int(md, f"{arch}.block_count"),
            embedding_length=_int(md, f"{arch}.embedding_length"),
            head_count=_int(md, f"{arch}.attention.head_count"),
            head_count_kv=_int(md, f"{arch}.attention.head_count_kv"),
            key_length=_int(md, f"{arch}.attention.key_length"),
            value_length=_int(md, f"{arch}.attention.value_length"),
            sliding_window=_int(md, f"{arch}.attention.sliding_window"),
            chat_template=_str(md, "tokenizer.chat_template"),
            bos_token=_token_text(md, "tokenizer.ggml.bos_token_id"),
            eos_token=_token_text(md, "tokenizer.ggml.eos_token_id"),
            metadata=md,
        )

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **kwargs: int) -> GgufInfo:
        """Read the header of ``path`` (keyword caps as for :func:`read_gguf_metadata`) and build the info."""
        return cls.from_metadata(read_gguf_metadata(path, **kwargs), source=str(path))
