"""``pccpu chat``: piped questions (one a line), a real pseudo-terminal with keystrokes and edits, a message too long
for the context that leaves the chat going; and the schema/file → messages conversion (no model)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pccpu.cli import main
from pccpu.cli.chat import READ_FILES_REPLY, file_messages, schema_messages, status_line, with_system

DOCUMENT = ("The lighthouse of Kerrow was built in 1871 from granite brought by boat. Its lamp burns paraffin and "
            "turns once every twelve seconds; the keeper lives in the cottage below and logs every ship.\n")
TTFT = re.compile(r"\[TTFT after Enter ([\d,]+) ms · ([\d,]+) tokens left to decode · ([\d,]+) cached")


@pytest.fixture
def document(tmp_path: Path) -> Path:
    path = tmp_path / "kerrow.txt"
    path.write_text(DOCUMENT, encoding="utf-8")
    return path


def chat_args(model: Path, *extra: str) -> list[str]:
    return ["chat", *extra, "--max-tokens", "8", "--n-ctx", "2048", "--no-persist", "--threads", "2",
            "--model", str(model)]


def test_piped_questions_get_an_answer_and_a_ttft_line_each(default_model_path: Path, document: Path) -> None:
    result = CliRunner().invoke(main, chat_args(default_model_path, str(document)),
                                input="When was the lighthouse built?\nHow often does the lamp turn?\n")
    assert result.exit_code == 0, result.output
    assert len(TTFT.findall(result.stderr)) == 2, result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and all(a.strip() for a in answers), result.stdout
    # the second turn finds the first one's prompt and answer held by the session
    second = TTFT.findall(result.stderr)[1]
    assert int(second[2].replace(",", "")) > 0


def test_a_message_too_long_for_the_context_is_an_error_and_the_chat_goes_on(default_model_path: Path,
                                                                             document: Path) -> None:
    questions = "why " * 2000 + "\nWho lives in the cottage?\n/exit\nnever asked\n"
    result = CliRunner().invoke(main, chat_args(default_model_path, str(document)), input=questions)
    assert result.exit_code == 0, result.output
    assert "error: the conversation is" in result.stderr and "n_ctx=2048" in result.stderr
    assert len(TTFT.findall(result.stderr)) == 1, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout


def _pccpu_command() -> list[str]:
    """The venv's ``pccpu`` script (how users run it); ``python -c`` when the script is not installed."""
    script = Path(sys.executable).parent / "pccpu"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from pccpu.cli import main; main()"]


def _spawn_chat(args: list[str]) -> Any:
    """``pccpu chat ARGS`` in a real pseudo-terminal, past its banner and first prompt."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color"}
    command = [*_pccpu_command(), *args]
    child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=60, dimensions=(40, 120))
    child.expect_exact("Ctrl-C stops an answer")  # the banner, then the prompt
    child.expect_exact(">")
    return child


def test_a_terminal_session_with_keystrokes_an_edit_and_exit(default_model_path: Path, document: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = _spawn_chat(chat_args(default_model_path, str(document)))
    try:
        for ch in "When was the lighthousr":
            child.send(ch)
            time.sleep(0.03)
        child.send("\x7f")  # backspace: the draft drops the cells after the edit
        for ch in "e built?":
            child.send(ch)
            time.sleep(0.03)
        time.sleep(3)  # idle: type-ahead decodes the rest, the turn's ending included
        child.send("\r")
        child.expect(TTFT)
        left = int(child.match.group(2).replace(",", ""))
        assert left == 0, child.before
        child.expect_exact(">")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(default_model_path: Path, document: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    args = chat_args(default_model_path, str(document))
    args[args.index("--max-tokens") + 1] = "2000"  # this question makes SmolLM2 write until the context is full
    child = _spawn_chat(args)
    try:
        child.send("Write a long story about the lighthouse keeper and his life, with many chapters.\r")
        time.sleep(3)  # streaming by now: the whole answer takes far longer
        child.sendintr()
        child.expect(TTFT)
        child.expect_exact(" · stopped]")
        child.expect_exact(">")
        child.send("/clear\r")
        child.expect_exact("[earlier turns forgotten]")
        child.expect_exact(">")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


# -- no model ---------------------------------------------------------------------------------------------------
def test_files_become_one_user_message_with_a_part_each(document: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes.md"
    other.write_text("# Notes\nnothing\n", encoding="utf-8")
    messages = file_messages([document, other])
    assert messages[1] == {"role": "assistant", "content": READ_FILES_REPLY}
    parts = messages[0]["content"]
    assert [p["text"].splitlines()[0] for p in parts] == [f"File: {document}", f"File: {other}"]
    assert file_messages([]) == []
    assert with_system(messages, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_a_schema_becomes_messages_split_by_role_tags_with_a_part_per_module() -> None:
    schemas = Path(__file__).parent.parent / "schemas"
    messages = schema_messages(schemas / "codebase.xml", ())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    parts = [p["text"] for p in messages[1]["content"]]
    assert parts[0].endswith("File shapes.py:") and parts[1].startswith('"""Shapes')
    assert with_system(messages, "Short answers.")[0]["content"] == "Short answers."
    persona = schema_messages(schemas / "persona.xml", ("calm", "work/cartographer"))
    text = " ".join(p["text"] for p in persona[1]["content"])
    assert "calm and unhurried" in text and "outgoing" not in text.lower()


@pytest.mark.parametrize(("schema", "modules", "message"), [
    ("travel.xml", (), "has the parameter 'duration'"),
    ("persona.xml", ("default",), "names several modules"),
    ("persona.xml", ("nope",), "has no module 'nope'"),
    ("persona.xml", ("calm", "wry"), "members of one union"),
])
def test_schema_selections_a_chat_cannot_hold_are_refused(schema: str, modules: tuple[str, ...],
                                                          message: str) -> None:
    with pytest.raises(click.BadParameter, match=message):
        schema_messages(Path(__file__).parent.parent / "schemas" / schema, modules)


def test_schema_text_outside_a_role_tag_is_refused(tmp_path: Path) -> None:
    schema = tmp_path / "raw.xml"
    schema.write_text('<schema name="raw">Plain text <module name="a">and a module</module></schema>', encoding="utf-8")
    with pytest.raises(click.UsageError, match="outside a role tag"):
        schema_messages(schema, ())


def test_bad_option_combinations_are_usage_errors(document: Path) -> None:
    result = CliRunner().invoke(main, ["chat", str(document), "--schema", str(document)])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(main, ["chat", "--module", "x"])
    assert result.exit_code == 2 and "--module needs --schema" in result.output


def test_the_status_line() -> None:
    assert status_line(12.4, 0, 1234, "eog") == "[TTFT after Enter 12 ms · 0 tokens left to decode · 1,234 cached]"
    assert status_line(5, 3, 0, "cancelled").endswith(" · stopped]")
