"""``pccpu schema check`` and ``pccpu schema show`` through click's test runner, with the real default model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pccpu.cli import main
from pccpu.cli.schema import human_bytes

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
SHIPPED = sorted(str(p) for p in SCHEMAS.glob("*.xml"))


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["schema", *args])


def assert_fails(result: Result, error: str, *fragments: str) -> None:
    """Exit 1 with one clean message naming the error type and every fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert f"Error: {error}: " in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.fixture(scope="module")
def model(default_model_path: Path) -> str:
    return str(default_model_path)


def test_check_every_shipped_schema_and_prompt(model: str) -> None:
    """One invocation: prompts are resolved against the schemas of the same command line, in any order."""
    assert any(".prompt." in p or "_prompt" in p for p in SHIPPED)
    result = run("check", "--model", model, *SHIPPED)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(SHIPPED)
    for path, line in zip(SHIPPED, lines, strict=True):
        assert line.startswith(f"OK {path}: "), line
        if "prompt" in Path(path).name:
            assert re.search(r": prompt for schema \S+, cached \d+ \+ uncached \d+ tokens", line), line
        else:
            assert re.search(r": schema \S+, \d+ modules?, span \d+ positions$", line), line


@pytest.mark.parametrize(("schema", "prompt"), [
    ("persona.xml", "persona.prompt.xml"),
    ("demo.xml", "demo_prompt.xml"),
    ("travel.xml", "travel.overseas.prompt.xml"),
    ("codebase.xml", "codebase.prompt.xml"),
])
def test_check_syntax_only_needs_no_model(schema: str, prompt: str) -> None:
    result = run("check", "--syntax-only", "--model", "/nonexistent/model.gguf",
                 str(SCHEMAS / prompt), str(SCHEMAS / schema))
    assert result.exit_code == 0, result.output
    assert re.search(r"OK \S+: prompt for schema \S+, \d+ module references? \(syntax only\)", result.output)
    assert re.search(rf"OK \S+{re.escape(schema)}: schema \S+, \d+ modules? \(syntax only\)", result.output)


def test_check_malformed_xml_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text('<schema name="x">\n  <module name="a">hello\n</schema>\n', encoding="utf-8")
    # the second file is fine: the error of the first one is still reported, and nothing crashes
    assert_fails(run("check", "--syntax-only", str(bad), str(SCHEMAS / "demo.xml")),
                 "PmlSyntaxError", str(bad), "line 3, column 3", "mismatched tag")


def test_check_unknown_module_lists_valid_names(model: str, tmp_path: Path) -> None:
    prompt = tmp_path / "p.xml"
    prompt.write_text('<prompt schema="persona"><nosuch/><user>hi</user></prompt>', encoding="utf-8")
    result = run("check", "--model", model, str(SCHEMAS / "persona.xml"), str(prompt))
    assert_fails(result, "UnknownModuleError", str(prompt), "'nosuch'", "temperament", "sociability", "work")
    assert result.output.startswith(f"OK {SCHEMAS / 'persona.xml'}: ")


def test_check_unknown_schema_lists_available_ones(tmp_path: Path) -> None:
    prompt = tmp_path / "p.xml"
    prompt.write_text('<prompt schema="nowhere"><user>hi</user></prompt>', encoding="utf-8")
    # reported before any model is loaded
    result = run("check", "--model", "/nonexistent/model.gguf", str(SCHEMAS / "demo.xml"), str(prompt))
    assert_fails(result, "UnknownSchemaError", str(prompt), "'nowhere'", "available schemas: 'demo'")


def test_check_schema_longer_than_n_ctx(model: str) -> None:
    assert_fails(run("check", "--model", model, "--n-ctx", "64", str(SCHEMAS / "demo.xml")),
                 "LayoutOverflowError", "demo.xml", "n_ctx=64", "spans")


@pytest.mark.parametrize(("content", "error", "fragment"), [
    (None, "SourceFileError", "no such file"),
    ("dir", "SourceFileError", "directory"),
    (b"\xff\xfe<schema name='x'/>", "SourceFileError", "not UTF-8"),
    (b"", "PmlSyntaxError", "no element found"),
    (b"<foo/>", "PmlStructureError", "must be <schema> or <prompt>"),
    (b"<schema name='d'>" + b"<module name='m'>" * 5000 + b"</module>" * 5000 + b"</schema>",
     "PmlStructureError", "nest more than 200 deep"),
])
def test_check_bad_files_give_a_message_not_a_traceback(
    tmp_path: Path, content: bytes | str | None, error: str, fragment: str
) -> None:
    path = tmp_path / "f.xml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    for command in (["check", "--model", "/nonexistent/model.gguf"], ["check", "--syntax-only"], ["show"]):
        assert_fails(run(*command, str(path)), error, str(path), fragment)


def test_show_prompt_is_refused() -> None:
    assert_fails(run("show", "--model", "/nonexistent/model.gguf", str(SCHEMAS / "demo_prompt.xml")),
                 "PmlStructureError", "demo_prompt.xml", "this is a prompt")


def test_show_tree_has_modules_ranges_and_memory(model: str) -> None:
    result = run("show", "--model", model, str(SCHEMAS / "travel.xml"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("schema travel  [0, ")
    for name in ("trip", "domestic", "overseas", "lisbon", "kyoto", "oaxaca"):
        assert re.search(rf"^\s+module {name} \[\d+, \d+\)  own \d+ tokens  KV [\d.]+ (KiB|MiB)$", out, re.M), name
    assert re.search(r"^\s+parameter duration \[\d+, \d+\)  length 6", out, re.M)
    assert re.search(r"^\s+union \[\d+, \d+\)  3 members  scaffold=lisbon$", out, re.M)
    assert re.search(r"^total: 6 modules, .* KV [\d.]+ MiB$", out, re.M)
    assert re.search(r"^memory warning: caching every module keeps [\d.]+ MiB of KV, [\d.]+x the ", out, re.M)


def test_show_json_kv_bytes(model: str, default_model) -> None:  # type: ignore[no-untyped-def]
    from pccpu.engine import ContextSettings

    for types in (("f16", "f16"), ("q8_0", "q4_0")):
        result = run("show", "--model", model, "--json", "--type-k", types[0], "--type-v", types[1],
                     str(SCHEMAS / "persona.xml"))
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        settings = ContextSettings(type_k=types[0], type_v=types[1], flash_attn=True)
        per_token = settings.kv_bytes_per_token(default_model.info)
        assert data["schema"] == "persona"
        assert data["kv_bytes_per_token"] == per_token
        assert (data["type_k"], data["type_v"], data["n_ctx"]) == (*types, 4096)
        modules = {m["path"]: m for m in data["modules"]}
        assert {"", "temperament", "temperament/wry", "work/lighthouse-keeper"} <= set(modules)
        for m in data["modules"]:
            assert m["kv_bytes"] == round(m["own_tokens"] * per_token), m
        assert modules["temperament/wry"]["kv_bytes"] > 0
        cached = [m for m in data["modules"] if m["cache"]]
        assert data["totals"]["cached_kv_bytes"] == sum(m["kv_bytes"] for m in cached)
        assert data["totals"]["span_kv_bytes"] == round(data["span"] * per_token)
        assert len(data["unions"]) == 4


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(1.2 * 1024 * 1024) == "1.2 MiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
