"""What identifies a model file: the GGUF magic and the file's sha256, remembered so a large file is hashed once.

Hashing a 1 GB file takes about a second, so a digest is remembered in ``<pccpu home>/fingerprints.json``, keyed by
the file's resolved path, size, mtime (ns) and inode: the file is hashed again as soon as any of them changes (an
edit, a touch, a copy renamed over it). Both the model fetcher (registry verification) and a loaded model's
fingerprint use this one record, so a model verified by ``pccpu models fetch`` is not hashed again when loaded.
The index is rewritten whole through a temporary file and ``os.replace``; entries whose file is gone or changed are
dropped then. A lost update (two processes writing at once) or a read-only home only costs a re-hash later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from pccpu.paths import pccpu_home

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
INDEX_NAME = "fingerprints.json"
_CHUNK = 1 << 22


def read_magic(path: str | os.PathLike[str]) -> bytes:
    """The first ``len(GGUF_MAGIC)`` bytes of the file (fewer for a shorter file). ``OSError`` passes through."""
    with open(path, "rb") as file:
        return file.read(len(GGUF_MAGIC))


def starts_with_gguf_magic(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts with the GGUF magic; ``False`` when it cannot be read."""
    try:
        return read_magic(path) == GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the file at ``path``, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remembered_sha256(path: str | os.PathLike[str]) -> str | None:
    """The remembered sha256 of ``path`` if its size, mtime and inode are still those it was hashed at; no hashing."""
    resolved = Path(path).resolve()
    return _load_index().get(_key(resolved, resolved.stat()))


def remember_sha256(path: str | os.PathLike[str], sha256: str) -> None:
    """Record that ``path``, as it is now, has ``sha256`` (a digest computed while writing it)."""
    resolved = Path(path).resolve()
    known = _load_index()
    known[_key(resolved, resolved.stat())] = sha256
    _store_index(known)


def file_sha256_cached(path: str | os.PathLike[str]) -> str:
    """sha256 of ``path``: the remembered one while the file is unchanged, else hashed now and remembered."""
    resolved = Path(path).resolve()
    st = resolved.stat()  # before hashing: a file changed meanwhile gets a key that no longer matches
    known = _load_index()
    key = _key(resolved, st)
    if key not in known:
        known[key] = file_sha256(resolved)
        _store_index(known)
    return known[key]


def _key(resolved: Path, st: os.stat_result) -> str:
    return f"{resolved}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _still_current(key: str) -> bool:
    path = Path(key.rsplit("|", 3)[0])
    try:
        return _key(path, path.stat()) == key
    except OSError:
        return False


def _index() -> Path:
    return pccpu_home() / INDEX_NAME


def _load_index() -> dict[str, str]:
    try:
        known = json.loads(_index().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}


def _store_index(known: dict[str, str]) -> None:
    index = _index()
    tmp = index.with_name(f".{INDEX_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({k: v for k, v in known.items() if _still_current(k)}), encoding="utf-8")
        os.replace(tmp, index)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not remember file fingerprints in %s (%s); files will be hashed again next time", index, exc)
