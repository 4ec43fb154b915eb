"""Robustness and isolation on the real default model (issue 6): faults injected into the store (a writer killed
mid-write, two encoders at once, foreign files, a full disk), the RAM budget, a context too small, namespaces, bad
models and hostile PML through the Python API and the CLI, and a soak of mixed prompts with its RSS curve.

Every test uses a small n_ctx and a private store under tmp_path. Fault injections are described in each test."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from click.testing import CliRunner

from pccpu.errors import (
    ConfigError,
    ContextOverflowError,
    CorruptEntryError,
    LayoutOverflowError,
    ModelError,
    OptionError,
    PccpuError,
    PmlError,
    PmlSecurityError,
    SourceFileError,
)
from pccpu.pml import parse_prompt, parse_schema
from pccpu.service.prompt_cache import PromptCache
from pccpu.store.entry_file import FILE_SUFFIX, read_entry, read_entry_header

N_CTX = 1024
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"

SCHEMA = """<schema name="town">
<system>You are a careful assistant. Answer questions about the notes you are given.</system>
<user>Notes:
<module name="history">The town of Lindenfeld lies on the river Aar. It was founded in 1204 by monks who built a stone
bridge, a water mill and a small chapel. In the fifteenth century the town grew rich from the salt trade.</module>
<module name="today">Today Lindenfeld is known for its clock museum and its cheese market held every October. The
mayor is Anna Keller, who was elected in 2019 and planted a thousand trees along the river.</module>
</schema>"""
PROMPT = '<prompt schema="town"><history/><today/>\nWho is the mayor of Lindenfeld?</user></prompt>'
SMALL_PROMPT = '<prompt schema="town"><today/>\nName the museum.</user></prompt>'
MODULES = {"", "history", "today"}


def make_cache(model_path: Path, **kw: Any) -> PromptCache:
    kw.setdefault("n_ctx", N_CTX)
    kw.setdefault("n_threads", 2)
    kw.setdefault("mode", "sequential")
    return PromptCache(model=str(model_path), **kw)


def store_files(folder: Path) -> dict[str, Path]:
    """Module path -> stored file, read from each file's header."""
    return {read_entry_header(p).fields["module"]: p for p in sorted(folder.glob(f"*{FILE_SUFFIX}"))}


def sources(result: Any) -> dict[str, str]:
    return {m.module: m.source for m in result.modules}


@pytest.fixture(scope="module")
def reference(default_model_path: Path) -> str:
    """The greedy answer to PROMPT by full prefill: what every cached answer below must reproduce."""
    with make_cache(default_model_path, persist=False) as pc:
        pc.add_schema(SCHEMA, encode=False)
        return pc.ask(PROMPT, cache=False, max_tokens=8).text()


def run_child(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout)


# -- 2. faults lose nothing ------------------------------------------------------------------------------
SLOW_WRITER = """
import os, sys, time
from pathlib import Path
import numpy as np
from pccpu.store import entry_file

target, header_json = Path(sys.argv[1]), sys.argv[2]
real_fdopen = os.fdopen

class Slow:
    # a file object that writes in 64 KiB pieces, slowly, so the parent can kill the process mid-write
    def __init__(self, f):
        self.f = f
    def write(self, data):
        view = memoryview(data).cast("B")
        for i in range(0, len(view), 1 << 16):
            self.f.write(view[i : i + (1 << 16)])
            self.f.flush()
            if i == 1 << 20:
                print("HALFWAY", flush=True)
            time.sleep(0.002)
        return len(view)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

os.fdopen = lambda fd, mode: Slow(real_fdopen(fd, mode))
import json
payload = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)  # 64 MiB
entry_file.write_entry(target, json.loads(header_json), payload)
print("FINISHED", flush=True)
"""


def test_writer_killed_mid_write_leaves_nothing_loadable(default_model_path: Path, tmp_path: Path,
                                                         reference: str) -> None:
    """Fault: a process writing the 'history' module's file (a 64 MiB payload, slowed) gets SIGKILL halfway.
    Expected: the final file never appears (only a hidden temp file is left), a fresh PromptCache on the folder
    loads the other modules from disk, encodes 'history' again and answers exactly as before."""
    store = tmp_path / "store"
    with make_cache(default_model_path, store_dir=store) as pc:
        pc.add_schema(SCHEMA)
        assert pc.ask(PROMPT, max_tokens=8).text() == reference
    folder = store / "default"
    files = store_files(folder)
    assert set(files) == MODULES
    target = files["history"]
    header = read_entry_header(target).fields
    target.unlink()  # the module is not stored: the killed writer was about to store it

    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), json.dumps(header)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "HALFWAY", line
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = list(folder.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1 << 20  # the partial write, hidden
    # the partial bytes can never be taken for an entry, even if renamed to the entry's name
    partial = folder / f"partial{FILE_SUFFIX}.bin"
    partial.write_bytes(leftovers[0].read_bytes())
    with pytest.raises(CorruptEntryError):
        read_entry(partial, {})
    partial.unlink()

    with make_cache(default_model_path, store_dir=store) as pc:  # the restart
        pc.add_schema(SCHEMA, encode=False)
        result = pc.ask(PROMPT, max_tokens=8).result()
    assert sources(result) == {"": "disk", "history": "encoded", "today": "disk"}
    assert result.text == reference
    read_entry(target, {"module": "history"})  # written again, whole


CONCURRENT_ENCODER = """
import json, sys
from pccpu.service.prompt_cache import PromptCache
model, store, schema, prompt, go = sys.argv[1:6]
import os, time
with PromptCache(model=model, n_ctx=1024, n_threads=1, store_dir=store, mode="sequential") as pc:
    while not os.path.exists(go):  # both processes start encoding at the same moment
        time.sleep(0.005)
    pc.add_schema(open(schema).read())
    r = pc.ask(open(prompt).read(), max_tokens=8).result()
    print(json.dumps({"encoded_tokens": pc.stats().encode.tokens, "text": r.text}))
"""


def test_two_processes_encoding_one_schema(default_model_path: Path, tmp_path: Path, reference: str) -> None:
    """Fault: two processes add the same schema to one empty store at the same moment. Expected (flock on the
    folder): one encodes, the other finds the states it wrote; one whole file per module, no temp files, equal
    answers."""
    store = tmp_path / "store"
    (tmp_path / "schema.xml").write_text(SCHEMA)
    (tmp_path / "prompt.xml").write_text(PROMPT)
    go = tmp_path / "go"
    args = [sys.executable, "-c", CONCURRENT_ENCODER, str(default_model_path), str(store),
            str(tmp_path / "schema.xml"), str(tmp_path / "prompt.xml"), str(go)]
    children = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.0)
    go.touch()
    outs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    folder = store / "default"
    files = store_files(folder)
    assert set(files) == MODULES
    assert len(list(folder.glob(f"*{FILE_SUFFIX}"))) == len(MODULES)
    assert not list(folder.glob(".*.tmp"))
    for module, path in files.items():
        read_entry(path, {"module": module})  # whole: magic, version, checksums, size
    assert sorted(o["encoded_tokens"] == 0 for o in outs) == [False, True], outs
    assert outs[0]["text"] == outs[1]["text"] == reference


def _rewrite_header(path: Path, *, version: int | None = None, **fields: Any) -> None:
    """Change a stored file's format version and/or header fields, with valid checksums (a well-formed file
    written by another pccpu or for another model)."""
    data = path.read_bytes()
    magic, old_version, reserved, header_len = struct.unpack_from("<8sHHI", data)
    header = json.loads(data[16 : 16 + header_len])
    header.update(fields)
    header_bytes = json.dumps(header, sort_keys=True).encode()
    rest = data[16 + header_len + 8 :]
    prefix = struct.pack("<8sHHI", magic, old_version if version is None else version, reserved, len(header_bytes))
    path.write_bytes(prefix + header_bytes + struct.pack("<Q", xxhash.xxh64_intdigest(header_bytes)) + rest)


def test_other_version_or_model_is_refused_and_reencoded(default_model_path: Path, tmp_path: Path,
                                                         reference: str, caplog: pytest.LogCaptureFixture) -> None:
    """Fault: 'history' is rewritten as store format version 2, 'today' as written for another model (fingerprint
    field changed, checksums valid). Expected: both refused with a warning that names the reason, encoded again,
    the answer unchanged; the root module still comes from disk."""
    store = tmp_path / "store"
    with make_cache(default_model_path, store_dir=store) as pc:
        pc.add_schema(SCHEMA)
    files = store_files(store / "default")
    _rewrite_header(files["history"], version=2)
    _rewrite_header(files["today"], model="0" * 64)
    with make_cache(default_model_path, store_dir=store) as pc, caplog.at_level(logging.WARNING):
        pc.add_schema(SCHEMA, encode=False)
        result = pc.ask(PROMPT, max_tokens=8).result()
    assert sources(result) == {"": "disk", "history": "encoded", "today": "encoded"}
    assert result.text == reference
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "format version 2" in warnings and "model is" in warnings
    assert read_entry_header(files["history"]).fields["module"] == "history"  # replaced by a good file


class _FullDisk:
    """A file object that fails with ENOSPC once 4 KiB were written (a disk filling up mid-write)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.written = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.written + size > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += size
        return int(self.f.write(data))

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_full_disk_warns_and_still_answers(default_model_path: Path, tmp_path: Path, reference: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Fault: every store write fails with ENOSPC after 4 KiB. Expected: one clear warning (no space, RAM only),
    no file or temp file left, the prompt answered from RAM-kept states, the error counted in stats."""
    store = tmp_path / "store"
    with make_cache(default_model_path, store_dir=store) as pc:
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
        with caplog.at_level(logging.WARNING):
            pc.add_schema(SCHEMA)
            result = pc.ask(PROMPT, max_tokens=8).result()
        monkeypatch.undo()
        assert result.text == reference
        assert set(sources(result).values()) == {"ram"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "No space left on device" in warnings[0] and "RAM only" in warnings[0]
        assert pc.stats().store.disk_write_errors == 1
        assert pc.ask(SMALL_PROMPT, max_tokens=4).text()  # later prompts too
    folder = store / "default"
    assert not list(folder.glob(f"*{FILE_SUFFIX}")) and not list(folder.glob(".*.tmp"))


# -- 3. memory stays within its budget -------------------------------------------------------------------
def test_ram_budget_holds_under_a_stream_of_schemas(default_model_path: Path) -> None:
    """A RAM-only store with a budget of about 3 schemas, fed 12 schemas (4x the budget): used bytes never exceed
    the budget, evictions happen, the pinned schema's modules are never evicted and answer from RAM."""
    def schema(i: int) -> str:
        return (f'<schema name="s{i}"><system>Note {i}.</system><module name="m">Fact number {i}: the parcel '
                f'for house {i} was left at the {["red", "blue", "green"][i % 3]} door next to the garden.</module>'
                "</schema>")

    with make_cache(default_model_path, persist=False, ram_budget=1 << 40) as pc:
        pc.add_schema(schema(0))
        per_schema = pc.stats().store.ram_bytes
    budget = int(per_schema * 3.5)
    with make_cache(default_model_path, persist=False, ram_budget=budget) as pc:
        pc.add_schema(schema(0))
        assert pc.stats().store.ram_budget_bytes == budget
        assert pc.pin("s0") == 2
        # internal on purpose: which entries the RAM tier holds has no public accessor
        pinned = {record.key for record in pc._schemas.get("s0").modules.values()}
        assert len(pinned) == 2 and all(key in pc._store.ram for key in pinned)
        for i in range(1, 12):
            pc.add_schema(schema(i))
            assert pc.stats().store.ram_bytes <= budget
            result = pc.ask(f'<prompt schema="s{i}"><m/><user>Which door?</user></prompt>', max_tokens=4).result()
            assert pc.stats().store.ram_bytes <= budget
            assert result.text is not None
            assert all(key in pc._store.ram for key in pinned)
        assert pc.stats().store.ram_evictions >= 8 * 2
        result = pc.ask('<prompt schema="s0"><m/><user>Which door?</user></prompt>', max_tokens=4).result()
        assert set(sources(result).values()) == {"ram"}


def test_context_too_small_is_a_clear_error_and_the_cache_still_answers(default_model_path: Path,
                                                                        reference: str) -> None:
    with make_cache(default_model_path, persist=False, n_ctx=256) as pc:
        pc.add_schema(SCHEMA)
        with pytest.raises((LayoutOverflowError, ContextOverflowError)) as info:
            pc.ask_parts("town", {"history": None, "today": None}, "Tell me everything. " * 60,
                         max_tokens=4).result()
        assert "n_ctx" in str(info.value)
        big = SCHEMA.replace('<module name="today">', '<module name="today">' + "More notes. " * 200)
        with pytest.raises(LayoutOverflowError, match="n_ctx"):
            pc.add_schema(big.replace('name="town"', 'name="big"'))
        assert pc.ask(PROMPT, max_tokens=8).text() == reference  # the same PromptCache is still good


# -- 4. isolation ----------------------------------------------------------------------------------------
def test_namespaces_never_share_states(default_model_path: Path, isolated_home: Path, reference: str) -> None:
    """alice and bob use the same store folder and the identical schema. bob never loads alice's states: all of
    his modules are encoded the first time, even after alice's files are copied under the names bob looks up
    (the header's key is checked); listings and stats show each namespace only its own modules."""
    store = isolated_home / "store"
    with make_cache(default_model_path, store_dir=store, namespace="alice") as alice:
        alice.add_schema(SCHEMA)
        assert alice.ask(PROMPT, max_tokens=8).text() == reference
    alice_files = store_files(store / "alice")
    assert set(alice_files) == MODULES
    alice_bytes = {p.name: p.read_bytes() for p in alice_files.values()}

    with make_cache(default_model_path, store_dir=store, namespace="bob") as bob:
        bob.add_schema(SCHEMA, encode=False)
        # internal on purpose: the forgery needs the file names bob looks up
        keys = {path: record.key for path, record in bob._schemas.get("town").modules.items()}
        disk = bob._store.disk
        assert disk is not None
        assert not {disk.path_for(k).name for k in keys.values()} & set(alice_bytes)
        (store / "bob").mkdir(mode=0o700)
        for module, key in keys.items():  # a forged copy: alice's file under bob's name
            disk.path_for(key).write_bytes(alice_files[module].read_bytes())
        result = bob.ask(PROMPT, max_tokens=8).result()
        assert sources(result) == {m: "encoded" for m in MODULES}
        assert bob.stats().encode.tokens > 0
        assert result.text == reference
        assert bob.stats().store.namespace == "bob"
    assert {p.name: p.read_bytes() for p in store_files(store / "alice").values()} == alice_bytes

    runner = CliRunner()
    for who in ("alice", "bob"):
        out = runner.invoke(cli_main(), ["cache", "ls", "--namespace", who, "--json"])
        assert out.exit_code == 0, out.output
        rows = json.loads(out.output)
        assert {r["file"] for r in rows} == {p.name for p in store_files(store / who).values()}
        assert len(rows) == len(MODULES)
        stats = json.loads(runner.invoke(cli_main(), ["cache", "stats", "--namespace", who, "--json"]).output)
        assert stats["namespace"] == who and stats["disk_entries"] == len(MODULES)
    alice_names = {p.name for p in store_files(store / "alice").values()}
    bob_names = {p.name for p in store_files(store / "bob").values()}
    assert not alice_names & bob_names
    for folder in (store / "alice", store / "bob"):
        assert folder.stat().st_mode & 0o077 == 0
        assert all(p.stat().st_mode & 0o077 == 0 for p in folder.glob(f"*{FILE_SUFFIX}"))


def cli_main() -> Any:
    from pccpu.cli import main

    return main


# -- 1. bad input never kills the process ----------------------------------------------------------------
def test_non_utf8_schema_file(default_model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.xml"
    path.write_bytes('<schema name="x"><module name="m">caf\xe9</module></schema>'.encode("latin-1"))
    with make_cache(default_model_path, persist=False) as pc:
        with pytest.raises(SourceFileError, match="not UTF-8"):
            pc.add_schema(path)
        with pytest.raises(SourceFileError, match="not UTF-8"):
            pc.add_schema(str(path))


def test_non_utf8_prompt_file(default_model_path: Path, tmp_path: Path) -> None:
    """A prompt given as a Path (the API takes ``str | Path``) that is not UTF-8, or missing: a PmlError."""
    bad = tmp_path / "latin1.prompt.xml"
    bad.write_bytes('<prompt schema="town"><today/>\ncaf\xe9?</user></prompt>'.encode("latin-1"))
    with make_cache(default_model_path, persist=False) as pc:
        pc.add_schema(SCHEMA, encode=False)
        for prompt in (bad, tmp_path / "missing.prompt.xml"):
            with pytest.raises(PmlError):
                pc.ask(prompt, max_tokens=2).result()
            with pytest.raises(PmlError):
                pc.plan(prompt)


def write_unknown_arch_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "nonexistent-arch")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LOAD_MODEL = """
import sys
from pccpu.errors import ModelError
from pccpu.service.prompt_cache import PromptCache
try:
    PromptCache(model=sys.argv[1], n_ctx=256, persist=False)
except ModelError as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("kind", ["text-as-gguf", "passwd", "truncated-gguf", "unknown-arch"])
def test_bad_model_files_are_refused(tmp_path: Path, default_model_path: Path, kind: str) -> None:
    """Not a GGUF, a GGUF cut short, a GGUF of an architecture llama.cpp does not know: a ModelError, first in a
    subprocess (a llama.cpp abort would kill only the child), then in this process."""
    if kind == "passwd":
        path = Path("/etc/passwd")
    elif kind == "text-as-gguf":
        path = tmp_path / "model.gguf"
        path.write_text("this is not a model\n")
    elif kind == "truncated-gguf":
        path = tmp_path / "cut.gguf"
        path.write_bytes(default_model_path.read_bytes()[: 1 << 20])
    else:
        path = tmp_path / "arch.gguf"
        write_unknown_arch_gguf(path)
    done = run_child(LOAD_MODEL, str(path), timeout=120)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr[-2000:]
    with pytest.raises(ModelError) as info:
        PromptCache(model=str(path), n_ctx=256, persist=False)
    assert str(path.name) in str(info.value)


DEEP = 10_000
HOSTILE_SCHEMAS = {
    "billion-laughs": ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                       + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">'
                                 for i in range(1, 10))
                       + ']><schema name="a"><module name="m">&lol9;</module></schema>'),
    "xxe-file": ('<!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                 '<schema name="a"><module name="m">&x;</module></schema>'),
    "xxe-parameter": ('<!DOCTYPE s [<!ENTITY % p SYSTEM "http://127.0.0.1:1/evil.dtd"> %p;]>'
                      '<schema name="a"><module name="m">x</module></schema>'),
    "undeclared-entity": '<schema name="a"><module name="m">&passwd;</module></schema>',
    "src-escape": '<schema name="a"><module name="m" src="../../../../etc/passwd"/></schema>',
    "deep-modules": ("<schema name='d'>" + "".join(f"<module name='m{i}'>" for i in range(DEEP)) + "x"
                     + "</module>" * DEEP + "</schema>"),
    "deep-unions": ("<schema name='d'>" + "<module name='m'><union>" * (DEEP // 2) + "<module name='z'>x</module>"
                    + "</union></module>" * (DEEP // 2) + "</schema>"),
    "unclosed-deep": "<schema name='d'>" + "<module name='m'>" * DEEP,
}
HOSTILE_PROMPTS = {
    "deep-refs": "<prompt schema='town'>" + "<today>" * DEEP + "</today>" * DEEP + "</prompt>",
    "billion-laughs": HOSTILE_SCHEMAS["billion-laughs"].replace("<schema name=\"a\">", "<prompt schema=\"town\">")
    .replace("</schema>", "</prompt>"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SCHEMAS))
def test_hostile_schema_text_is_a_pml_error(name: str, tmp_path: Path) -> None:
    """No model: parse_schema on text and on a file; RecursionError or any other exception must not escape."""
    text = HOSTILE_SCHEMAS[name]
    path = tmp_path / "sub" / "hostile.xml"
    path.parent.mkdir()
    path.write_text(text)
    for source in (text, path):
        try:
            parse_schema(source)
        except PmlError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            if name.startswith(("xxe", "billion")):
                assert isinstance(exc, PmlSecurityError)
        except BaseException as exc:  # the failure being tested for
            pytest.fail(f"{name}: {type(exc).__name__} escaped parse_schema: {str(exc)[:200]}")
        else:
            pytest.fail(f"{name}: accepted")


@pytest.mark.parametrize("name", sorted(HOSTILE_PROMPTS))
def test_hostile_prompt_text_is_a_pml_error(name: str) -> None:
    try:
        parse_prompt(HOSTILE_PROMPTS[name])
    except PmlError:
        pass
    except BaseException as exc:  # the failure being tested for
        pytest.fail(f"{name}: {type(exc).__name__} escaped parse_prompt: {str(exc)[:200]}")
    else:
        pytest.fail(f"{name}: accepted")


def test_hostile_input_through_prompt_cache(default_model_path: Path, reference: str) -> None:
    """The same hostile documents through PromptCache.add_schema and ask, plus huge text: PmlErrors only, and the
    PromptCache answers normally afterwards."""
    huge = "<schema name='huge'><module name='m'>" + "word " * 300_000 + "</module></schema>"
    escaped: list[str] = []
    with make_cache(default_model_path, persist=False) as pc:
        pc.add_schema(SCHEMA)
        for name, text in [*HOSTILE_SCHEMAS.items(), ("huge", huge)]:
            try:
                pc.add_schema(text)
                escaped.append(f"schema {name}: accepted")
            except PmlError:
                pass
            except BaseException as exc:
                escaped.append(f"schema {name}: {type(exc).__name__}")
        for name, text in HOSTILE_PROMPTS.items():
            try:
                pc.ask(text, max_tokens=2).result()
                escaped.append(f"prompt {name}: accepted")
            except PmlError:
                pass
            except BaseException as exc:
                escaped.append(f"prompt {name}: {type(exc).__name__}")
        assert pc.ask(PROMPT, max_tokens=8).text() == reference
    assert not escaped, escaped


# -- CLI: garbage in, one line out -----------------------------------------------------------------------
def _garbage(path: Path, seed: int) -> Path:
    data = bytearray(random.Random(seed).randbytes(4096))
    data[10] = 0xFF  # never valid UTF-8
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def garbage_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("garbage")
    deep = folder / "deep.prompt.xml"
    deep.write_text(HOSTILE_PROMPTS["deep-refs"])
    deep_schema = folder / "deep.xml"
    deep_schema.write_text(HOSTILE_SCHEMAS["deep-modules"])
    return {"bytes": _garbage(folder / "garbage.xml", 1), "bytes2": _garbage(folder / "garbage.prompt.xml", 2),
            "deep_prompt": deep, "deep_schema": deep_schema}


CLI_CASES = [
    ("schema-check-garbage", ["schema", "check", "{bytes}"]),
    ("schema-check-syntax-garbage", ["schema", "check", "--syntax-only", "{bytes}", "{bytes2}"]),
    ("schema-show-garbage", ["schema", "show", "{bytes}"]),
    ("encode-garbage", ["encode", "{bytes}", "--n-ctx", "512", "--no-persist"]),
    ("encode-deep", ["encode", "{deep_schema}", "--n-ctx", "512", "--no-persist"]),
    ("ask-garbage-prompt", ["ask", "{bytes2}", "--schema", str(SCHEMAS / "travel.xml"), "--no-persist"]),
    ("ask-garbage-schema", ["ask", str(SCHEMAS / "travel.domestic.prompt.xml"), "--schema", "{bytes}",
                            "--n-ctx", "512", "--no-persist"]),
    ("ask-deep-prompt", ["ask", "{deep_prompt}"]),
    ("ask-n-ctx-0", ["ask", str(SCHEMAS / "demo_prompt.xml"), "--n-ctx", "0"]),
    ("encode-n-ctx-0", ["encode", str(SCHEMAS / "demo.xml"), "--n-ctx", "0"]),
    ("ask-model-passwd", ["ask", str(SCHEMAS / "demo_prompt.xml"), "--model", "/etc/passwd"]),
    ("encode-model-passwd", ["encode", str(SCHEMAS / "demo.xml"), "--model", "/etc/passwd"]),
    ("demo-model-passwd", ["demo", "--model", "/etc/passwd"]),
    ("cache-ls-bad-namespace", ["cache", "ls", "--namespace", "../../etc"]),
    ("cache-clear-bad-namespace", ["cache", "clear", "--yes", "--namespace", "a/b"]),
    ("models-fetch-garbage", ["models", "fetch", "\x00\xff-no-such-model"]),
]


@pytest.mark.parametrize(("label", "args"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_garbage_gives_one_line_and_nonzero_exit(label: str, args: list[str], garbage_files: dict[str, Path],
                                                     isolated_home: Path, default_model_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCCPU_MODEL", str(default_model_path))
    runner = CliRunner()
    argv = [a.format(**{k: str(v) for k, v in garbage_files.items()}) for a in args]
    result = runner.invoke(cli_main(), argv)
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__} escaped: {str(result.exception)[:200]}")
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output[-2000:]


# -- 5. soak ---------------------------------------------------------------------------------------------
@pytest.fixture
def soak_cache(default_model_path: Path, tmp_path: Path) -> Iterator[PromptCache]:
    with make_cache(default_model_path, n_ctx=2048, store_dir=tmp_path / "store") as pc:
        yield pc


def test_soak_mixed_prompts(soak_cache: PromptCache) -> None:
    """50 mixed prompts (5 schemas, unions, parameters, hits from RAM and disk, misses), 8 tokens each: no error,
    every prefix-layout answer equals its full-prefill answer, RSS levels off (last sample within +15% of the
    sample after the first 10 prompts)."""
    from pccpu.bench.soak import add_schemas, build_prompts, run_soak

    add_schemas(soak_cache)
    report = run_soak(soak_cache, build_prompts(50), max_tokens=8, rss_every=10, log=print)
    print("soak:", json.dumps(report.as_dict()))
    assert not report.errors, report.errors
    assert report.prefix_checked >= 15
    assert report.prefix_equal == report.prefix_checked, report.prefix_mismatches
    assert {"ram", "disk", "encoded"} <= set(report.sources)
    first, last = report.rss_mb[0][1], report.rss_mb[-1][1]
    assert last <= first * 1.15, report.rss_mb


def test_errors_do_not_break_the_cache(default_model_path: Path, reference: str) -> None:
    """A mix of rejected calls (unknown module, argument too long, union conflict, bad option) between good ones."""
    with make_cache(default_model_path, persist=False) as pc:
        pc.add_schema(SCHEMA)
        bad = [
            '<prompt schema="town"><nowhere/></prompt>',
            '<prompt schema="town"><today extra="x"/></prompt>',
            '<prompt schema="nope"><today/></prompt>',
            "<prompt",
        ]
        for text in bad:
            with pytest.raises(PccpuError):
                pc.ask(text, max_tokens=2).result()
            assert pc.ask(PROMPT, max_tokens=8).text() == reference
        for options in ({"max_token": 2}, {"max_tokens": -1}, {"top_p": 0.0}):
            with pytest.raises(ConfigError):  # OptionError for names and counts, ConfigError for sampling values
                pc.ask(PROMPT, **options).result()
            assert pc.ask(PROMPT, max_tokens=8).text() == reference
        with pytest.raises(OptionError, match="max_tokens"):
            pc.ask(PROMPT, max_token=2)
        with pytest.raises(ConfigError):
            make_cache(default_model_path, persist=False, mode="parallel")
        assert pc.ask(PROMPT, max_tokens=8).text() == reference
