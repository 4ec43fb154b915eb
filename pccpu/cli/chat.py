"""``pccpu chat``: a multi-turn terminal chat with type-ahead, over files or a schema's modules.

Every edit of the input line goes to ``Draft.type()`` (prompt_toolkit's ``Buffer.on_text_changed``), so the
conversation and the question are decoded while they are typed, and after Enter little or nothing is left to decode;
each answer ends with the time from Enter to its first streamed piece.

**What the chat is about.** FILES become the first user message, one content part per file (``File: NAME`` and its
text; each part is its own module, stored and restored like any chat message), followed by the assistant's "I have
read the files.". A schema (``--schema``) becomes chat messages too, since type-ahead works on chat messages: its role
tags split it into messages and its modules' text becomes content parts, in document order (the same text the
schema renders; the module states that ``pccpu encode`` stores are not used, the chat stores its own). Without
``--module`` every module outside a union is included; ``--module NAME`` (a name or a path such as
``temperament/calm``) includes only the modules named, with their parents. Modules with parameters cannot be filled
in by a chat and are refused. ``--system`` sets the system message (replacing a schema's own).

**Commands.** ``/exit`` or Ctrl-D quits; ``/clear`` forgets the earlier turns (not the files); Ctrl-C stops an
answer (between two pieces: a SIGINT handler sets a flag, nothing is raised inside the library) and keeps the chat;
an error in one turn (a message longer than the context) is printed and the chat goes on.

When standard input is not a terminal, each line read from it is one question (typed at once, then submitted): the
command is scriptable. Answers go to standard output; the status lines and errors to standard error.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from pccpu.cli.files import check_input_file, read_input_file
from pccpu.cli.options import cache_options, open_prompt_cache
from pccpu.errors import LayoutOverflowError, PccpuError
from pccpu.service.options import GenerationOptions

if TYPE_CHECKING:
    from pccpu.pml.schema import Module, Node
    from pccpu.service import PromptCache
    from pccpu.service.answer import Answer
    from pccpu.service.chat import ChatReuse
    from pccpu.service.session import Session
    from pccpu.service.typeahead import Draft

Message = dict[str, Any]
EXIT_COMMAND = "/exit"
CLEAR_COMMAND = "/clear"
READ_FILES_REPLY = "I have read the files."


# -- what the chat is about -----------------------------------------------------------------------------------
def file_messages(files: Sequence[Path]) -> list[Message]:
    """The files as one user message (a content part per file) and the assistant's reply."""
    if not files:
        return []
    parts = []
    for path in files:
        check_input_file(path)
        text = read_input_file(path)
        # every part ends the same way wherever it stands: in compose mode a file is the same tokens anywhere
        parts.append({"type": "text", "text": f"File: {path}\n{text.rstrip()}\n\n"})
    return [{"role": "user", "content": parts}, {"role": "assistant", "content": READ_FILES_REPLY}]


@dataclass
class _MessageWriter:
    """Collects a schema's text into messages: role tags open and close them, module bounds split content parts."""

    messages: list[tuple[str, list[str]]] = field(default_factory=list)
    role: str | None = None
    part: list[str] = field(default_factory=list)

    def text(self, text: str, source: str) -> None:
        if self.role is None:
            if text.strip():
                raise click.UsageError(f"{source}: text outside a role tag ({text.strip()[:40]!r}) cannot be a chat "
                                       "message; put it inside <system>, <user> or <assistant>")
            return
        self.part.append(text)

    def end_part(self) -> None:
        if self.role is not None and self.part:
            self.messages[-1][1].append("".join(self.part))
        self.part = []

    def open(self, role: str) -> None:
        self.close()
        self.role = role
        self.messages.append((role, []))

    def close(self) -> None:
        self.end_part()
        self.role = None

    def result(self) -> list[Message]:
        self.close()
        out: list[Message] = []
        for role, parts in self.messages:
            parts = [p for p in parts if p]
            if parts:
                content: Any = parts[0] if len(parts) == 1 else [{"type": "text", "text": p} for p in parts]
                out.append({"role": role, "content": content})
        return out


def schema_messages(path: Path, modules: Sequence[str]) -> list[Message]:
    """The schema's text as chat messages: every module outside a union, or the ``modules`` named and their
    parents (see the module docstring)."""
    from pccpu.pml.schema import Module, Parameter, Text, Union, parse_schema

    check_input_file(path)
    schema = parse_schema(path)
    in_union: dict[str, bool] = {}

    def walk(body: Sequence[Node], prefix: str, union: bool) -> None:
        for node in body:
            if isinstance(node, Module):
                in_union[_join(prefix, node.name)] = union
                walk(node.body, _join(prefix, node.name), union)
            elif isinstance(node, Union):
                for member in node.members:
                    in_union[_join(prefix, member.name)] = True
                    walk(member.body, _join(prefix, member.name), True)

    walk(schema.body, "", False)
    if modules:
        chosen: set[str] = set()
        for name in modules:
            found = [name] if name in in_union else [p for p in in_union if p.rsplit("/", 1)[-1] == name]
            if not found:
                raise click.BadParameter(f"schema {schema.name!r} has no module {name!r} (its modules: "
                                         f"{', '.join(in_union) or 'none'})", param_hint="--module")
            if len(found) > 1:
                raise click.BadParameter(f"{name!r} names several modules ({', '.join(found)}): give its path",
                                         param_hint="--module")
            parts = found[0].split("/")
            chosen.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    else:
        chosen = {p for p, inside in in_union.items() if not inside}

    writer = _MessageWriter()
    source = str(path)

    def emit(body: Sequence[Node], prefix: str) -> None:
        for node in body:
            if isinstance(node, Text):
                for piece in node.pieces:
                    if isinstance(piece, str):
                        writer.text(piece, source)
                    elif piece.kind == "open":
                        writer.open(piece.role.value)
                    elif piece.kind == "close":
                        writer.close()
                    # an empty tag (<system/>): the template's default system turn, which chat writes by itself
            elif isinstance(node, Parameter):
                raise click.BadParameter(f"module {prefix!r} has the parameter {node.name!r}, which a chat cannot "
                                         "fill: leave the module out", param_hint="--module")
            else:
                members = [node] if isinstance(node, Module) else list(node.members)
                picked: list[Module] = [m for m in members if _join(prefix, m.name) in chosen]
                if len(picked) > 1:
                    raise click.BadParameter(f"{', '.join(m.name for m in picked)} are members of one union: "
                                             "choose one", param_hint="--module")
                for mod in picked:
                    writer.end_part()  # a module is a content part of its own
                    emit(mod.body, _join(prefix, mod.name))
                    writer.end_part()

    emit(schema.body, "")
    return writer.result()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """``messages`` with ``system`` as the system message (replacing one that opens them)."""
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}, *rest]


# -- the conversation -------------------------------------------------------------------------------------------
@contextmanager
def _stop_on_ctrl_c() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT) while the block runs: the answer is stopped between two pieces, never by an
    exception raised inside the library."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def status_line(ttft_ms: float, left: int, cached: int, finish_reason: str) -> str:
    """``[TTFT after Enter 12 ms · 0 tokens left to decode · 1,234 cached]``."""
    notes = {"length": " · cut at --max-tokens", "cancelled": " · stopped", "context": " · context full"}
    return (f"[TTFT after Enter {ttft_ms:,.0f} ms · {left:,} tokens left to decode · {cached:,} cached"
            f"{notes.get(finish_reason, '')}]")


class ChatLoop:
    """The turns of one chat: a draft per turn (type-ahead), the answer streamed, the history kept."""

    def __init__(self, pc: PromptCache, session: Session, history: list[Message], *, reuse: ChatReuse,
                 type_ahead: bool, options: GenerationOptions) -> None:
        self.pc = pc
        self.session = session
        self.prelude = list(history)  # what the chat is about: /clear goes back to it
        self.history = list(history)
        self.reuse: ChatReuse = reuse
        self.type_ahead = type_ahead
        self.options = options
        self.draft: Draft | None = None
        self.new_draft()

    def new_draft(self) -> None:
        """Drop the current draft (if any) and start typing a new message after the history."""
        self.close()
        if self.type_ahead:
            try:
                self.draft = self.session.draft(self.history, reuse=self.reuse)
            except PccpuError as exc:  # this turn goes without type-ahead
                _error(exc)

    def typed(self, text: str) -> None:
        """The whole input line after an edit."""
        if self.draft is not None:
            with suppress(PccpuError):  # never break the editor; submit() says what is wrong
                self.draft.type(text)

    def handle(self, text: str, entered: float) -> bool:
        """The line entered at ``entered`` (a perf_counter time): a command, nothing (a new draft), or a message
        to answer. False: quit."""
        command = text.strip()
        if command == EXIT_COMMAND:
            return False
        if command == CLEAR_COMMAND:
            self.history = list(self.prelude)
            click.echo(click.style("[earlier turns forgotten]", dim=True), err=True)
            self.new_draft()
        elif not command:
            self.new_draft()
        else:
            self.answer(text, entered)
        return True

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None

    def answer(self, text: str, entered: float) -> None:
        """Answer ``text`` (Enter was pressed at ``entered``, a perf_counter time), stream it, print the status
        line; a PccpuError is printed and the chat goes on."""
        printed = False
        try:
            answer = self._ask(text)
            first: float | None = None
            started = time.perf_counter()
            with _stop_on_ctrl_c() as stop:
                for piece in answer:
                    if stop.is_set():
                        answer.close()
                        break
                    if first is None:
                        first = time.perf_counter()
                    click.echo(piece, nl=False)
                    printed = True
                if stop.is_set():
                    answer.close()
            result = answer.result()
        except PccpuError as exc:
            if printed:
                click.echo()
            _error(exc)
            if isinstance(exc, LayoutOverflowError) and len(self.history) > len(self.prelude):
                click.echo(f"(the conversation is full: {CLEAR_COMMAND} forgets the earlier turns)", err=True)
            self.new_draft()  # the same history: the failed message is not kept
            return
        click.echo()
        ttft_ms = ((first if first is not None else started) - entered) * 1000
        if first is None:  # nothing streamed (an empty answer): the request's own time to its first token
            ttft_ms += result.ttft_ms
        if result.text or result.finish_reason != "cancelled":  # an answer stopped before it began is dropped
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        self.new_draft()  # the next message, typed after this turn
        line = status_line(ttft_ms, result.uncached_tokens, result.session_tokens + result.cached_tokens,
                           result.finish_reason)
        click.echo(click.style(line, dim=True), err=True)

    def _ask(self, text: str) -> Answer:
        if self.draft is not None:
            draft, self.draft = self.draft, None
            return draft.submit(text, options=self.options)
        return self.pc.chat([*self.history, {"role": "user", "content": text}], session=self.session,
                            reuse=self.reuse, options=self.options)


def _error(exc: PccpuError) -> None:
    click.echo(f"error: {exc}", err=True)


def run_lines(loop: ChatLoop, lines: Iterator[str]) -> None:
    """Each line a question (standard input that is not a terminal)."""
    for raw in lines:
        text = raw.rstrip("\r\n")
        if text.strip():
            loop.typed(text)
        if not loop.handle(text, time.perf_counter()):
            return


def run_terminal(loop: ChatLoop) -> None:
    """The interactive editor: every edit goes to the draft; Enter answers."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.buffer import Buffer

    session: PromptSession[str] = PromptSession()

    def changed(buffer: Buffer) -> None:
        loop.typed(buffer.text)

    session.default_buffer.on_text_changed += changed
    while True:
        try:
            text = session.prompt("> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is dropped
            loop.new_draft()
            continue
        except EOFError:  # Ctrl-D
            return
        if not loop.handle(text, time.perf_counter()):
            return


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schema", "-s", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Chat about a schema's modules instead of files (its role tags become the messages).")
@click.option("--module", "modules", multiple=True, metavar="NAME",
              help="With --schema: include this module (a name or a path; repeatable). Default: every module "
                   "outside a union.")
@click.option("--system", default=None, help="The system message (replaces a schema's own).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--reuse", type=click.Choice(["exact", "compose"]), default="exact", show_default=True,
              help="How stored messages are reused: after the same conversation only, or anywhere.")
@click.option("--no-type-ahead", is_flag=True, help="Decode nothing before Enter (to compare).")
@cache_options
def chat(files: tuple[Path, ...], schema: Path | None, modules: tuple[str, ...], system: str | None,
         max_tokens: int, temperature: float, reuse: str, no_type_ahead: bool, **opts: Any) -> None:
    """Chat about FILES (or a --schema) in the terminal, with type-ahead: the message is decoded while it is typed.
    After each answer: the time from Enter to its first piece. /exit or Ctrl-D quits, /clear forgets the earlier
    turns, Ctrl-C stops an answer."""
    if schema is not None and files:
        raise click.UsageError("give FILES or --schema, not both")
    if modules and schema is None:
        raise click.UsageError("--module needs --schema")
    history = schema_messages(schema, modules) if schema is not None else file_messages(files)
    history = with_system(history, system)
    options = GenerationOptions(max_tokens=max_tokens, temperature=temperature)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    with open_prompt_cache(**opts) as pc, pc.session() as session:
        loop = ChatLoop(pc, session, history, reuse="compose" if reuse == "compose" else "exact",
                        type_ahead=not no_type_ahead, options=options)
        try:
            if interactive:
                mode = "off" if no_type_ahead else "on"
                click.echo(click.style(f"pccpu chat · {pc.model_path.name} · type-ahead {mode} · {EXIT_COMMAND} or "
                                       "Ctrl-D quits, Ctrl-C stops an answer", dim=True), err=True)
                run_terminal(loop)
            else:
                run_lines(loop, iter(sys.stdin))
        finally:
            loop.close()
