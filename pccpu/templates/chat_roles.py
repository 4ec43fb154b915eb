"""Role wrappers derived from a model's own chat template (GGUF ``tokenizer.chat_template``).

A chat template is a Jinja program that turns a list of messages into one prompt string. PML role tags need the
pieces of that string around each message: the text before a message's content (the role's *open*), the text
after it (*close*), the system block the template writes when a conversation has none (*default system*, what
``<system/>`` renders) and the text that starts the assistant's answer (*generation prompt*).

:meth:`ChatRoles.from_template` finds them by rendering the template in a Jinja sandbox on small conversations whose
contents are unique sentinels, and cutting the output around the sentinels:

* ``[user U]`` gives ``default_system + open(user)`` before ``U`` and ``close(user)`` after it; with
  ``add_generation_prompt`` the extra tail is the generation prompt;
* ``[user U, assistant A]`` gives ``close(user) + open(assistant)`` between them and ``close(assistant)`` after ``A``;
* ``[user U, assistant A, user U2]`` gives ``close(assistant) + open(user)``, which fixes ``open(user)`` and hence
  the default system block;
* ``[system S, user U]`` gives ``open(system)`` and ``close(system) + open(user)``.

The split is then verified: every test conversation, rebuilt from the pieces, must equal the template's own output
exactly. A template that fails (roles that depend on position in a way fixed pieces cannot express, such as a
Llama-2 ``<<SYS>>`` block inside the first ``[INST]``) raises :class:`~pccpu.errors.TemplateError`, or, only when
the caller asks with ``fallback="chatml"`` / ``fallback="plain"``, returns that fallback with a logged warning.

Semantics the renderer follows:

* ``<system>S</system>`` replaces the template's default system block (Qwen's "You are Qwen ..."); ``<system/>``
  renders the default block itself (``""`` for templates without one). A PML document with no system tag gets no
  system block at all: write ``<system/>`` to get the one the template would add.
* A BOS token the template writes through ``bos_token`` at the very start is dropped (the engine adds BOS itself).
  Templates that hard-code the BOS text as a literal are not detected (the text is ambiguous: SmolLM2's BOS token is
  ``<|im_start|>``).
* ``<user/>`` and ``<assistant/>`` render an empty turn (open + close).
* **Folded system messages** (Gemma): some templates have no system turn and put the system text at the start of
  the first user turn, followed by a separator (Gemma 3: ``<start_of_turn>user\\nS\\n\\nU<end_of_turn>\\n``). Such a
  template is accepted and marked :attr:`ChatRoles.system_folded`: ``<system>`` renders the first user turn's open,
  ``</system>`` the separator, and a ``<user>`` that directly follows ``</system>`` must render nothing. That last
  rule depends on the previous tag, which :meth:`ChatRoles.render` (one tag, no context) cannot know; so for a
  folded template :meth:`ChatRoles.render` refuses system open/close tags with a :class:`TemplateError`, and
  :meth:`ChatRoles.render_tags` (a whole tag sequence) renders them correctly. (Gemma's template drops a system
  message that no user turn follows; pccpu's pieces do not: write ``<user>`` after ``</system>``.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pccpu.errors import TemplateError
from pccpu.roles import Role, RoleTag

log = logging.getLogger(__name__)

Fallback = Literal["error", "chatml", "plain"]

# Sentinel contents: no whitespace (templates trim), no markup, unlikely in any template.
_S = "PccpuSentinelSys7q"
_U1 = "PccpuSentinelUsrA3k"
_A1 = "PccpuSentinelAstB8m"
_U2 = "PccpuSentinelUsrC2w"
_A2 = "PccpuSentinelAstD5x"
_U3 = "PccpuSentinelUsrE9z"
_BOS = "PccpuSentinelBos0j"

Message = tuple[Role, str]


class _TemplateRaised(Exception):
    """The template called ``raise_exception`` (it refuses this conversation)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Same behaviour as transformers' chat-template ``tojson`` (no HTML escaping, unicode kept).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class _Pieces:
    opens: dict[Role, str]
    closes: dict[Role, str]
    default_system: str
    generation_prompt: str
    system_supported: bool
    system_folded: bool


def _rebuild(p: _Pieces, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The prompt the pieces produce for ``messages`` (the reference the template's own output must equal)."""
    out: list[str] = []
    if not messages or messages[0][0] is not Role.SYSTEM:
        out.append(p.default_system)
    prev: Role | None = None
    for role, content in messages:
        if not (p.system_folded and role is Role.USER and prev is Role.SYSTEM):
            out.append(p.opens[role])
        out.append(content)
        out.append(p.closes[role])
        prev = role
    if add_generation_prompt:
        out.append(p.generation_prompt)
    return "".join(out)


class ChatRoles:
    """A :class:`pccpu.roles.RoleRenderer` built from a chat template, ChatML, or nothing (:meth:`plain`).

    Build it with :meth:`from_template`, :meth:`chatml` or :meth:`plain`.
    """

    def __init__(
        self,
        *,
        opens: Mapping[Role, str],
        closes: Mapping[Role, str],
        default_system: str = "",
        generation_prompt: str = "",
        system_supported: bool = True,
        system_folded: bool = False,
        source: str = "template",
        name: str = "",
    ) -> None:
        missing = [r.value for r in Role if r not in opens or r not in closes]
        if missing:
            raise TemplateError(f"{name or 'chat roles'}: no open/close text for role(s) {', '.join(missing)}")
        self._p = _Pieces(
            opens=dict(opens),
            closes=dict(closes),
            default_system=default_system,
            generation_prompt=generation_prompt,
            system_supported=system_supported,
            system_folded=system_folded,
        )
        #: Where the pieces came from: ``"template"``, ``"chatml"`` (built in) or ``"plain"`` (no-op).
        self.source = source
        #: The model or template name used in messages.
        self.name = name

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_template(
        cls,
        template: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "chat template",
        fallback: Fallback = "error",
    ) -> ChatRoles:
        """Split ``template`` into role pieces; see the module docstring.

        ``bos_token`` / ``eos_token`` are the token texts the template may reference. ``name`` (the model name)
        appears in error messages. ``fallback``: what to return when the template cannot be split: ``"error"``
        (raise :class:`TemplateError`, the default), ``"chatml"`` (:meth:`chatml`) or ``"plain"`` (:meth:`plain`);
        a fallback is logged as a warning.
        """
        _check_fallback(fallback)
        try:
            pieces = _split(template, bos_token=bos_token, eos_token=eos_token, name=name)
        except TemplateError as exc:
            return cls._fallback(fallback, name, exc)
        return cls(
            opens=pieces.opens,
            closes=pieces.closes,
            default_system=pieces.default_system,
            generation_prompt=pieces.generation_prompt,
            system_supported=pieces.system_supported,
            system_folded=pieces.system_folded,
            source="template",
            name=name,
        )

    @classmethod
    def chatml(cls, *, default_system: str = "", name: str = "ChatML") -> ChatRoles:
        """The ChatML wrappers (``<|im_start|>ROLE\\n`` ... ``<|im_end|>\\n``), with no default system block."""
        return cls(
            opens={r: f"<|im_start|>{r.value}\n" for r in Role},
            closes={r: "<|im_end|>\n" for r in Role},
            default_system=default_system,
            generation_prompt="<|im_start|>assistant\n",
            source="chatml",
            name=name,
        )

    @classmethod
    def plain(cls, *, name: str = "plain") -> ChatRoles:
        """A no-op renderer: every role tag and the generation prompt render to ``""`` (for base models)."""
        empty = {r: "" for r in Role}
        return cls(opens=empty, closes=empty, source="plain", name=name)

    @classmethod
    def _fallback(cls, fallback: Fallback, name: str, exc: TemplateError) -> ChatRoles:
        if fallback == "chatml":
            log.warning("%s; using the ChatML fallback roles as asked", exc)
            return cls.chatml(name=f"{name} (ChatML fallback)")
        if fallback == "plain":
            log.warning("%s; using plain (empty) roles as asked", exc)
            return cls.plain(name=f"{name} (plain fallback)")
        raise exc

    # ----------------------------------------------------------------------------------------- renderer API
    @property
    def generation_prompt(self) -> str:
        """Text that starts the assistant's turn, appended after a prompt that ends a user turn."""
        return self._p.generation_prompt

    @property
    def default_system(self) -> str:
        """What ``<system/>`` renders: the system block the template writes when there is no system message."""
        return self._p.default_system

    @property
    def system_folded(self) -> bool:
        """True when the template folds the system text into the first user turn (Gemma); see the module doc."""
        return self._p.system_folded

    @property
    def system_supported(self) -> bool:
        """False when the template refuses conversations with a system message."""
        return self._p.system_supported

    def open(self, role: Role) -> str:
        return self._p.opens[role]

    def close(self, role: Role) -> str:
        return self._p.closes[role]

    def render(self, tag: RoleTag) -> str:
        """The text for one role tag. Raises :class:`TemplateError` where the text depends on context."""
        role = Role(tag.role)
        if role is Role.SYSTEM and tag.kind == "empty":
            return self._p.default_system
        if role is Role.SYSTEM and not self._p.system_supported:
            raise TemplateError(f"{self.name}: the chat template refuses system messages; drop the <system> tags")
        if role is Role.SYSTEM and self._p.system_folded:
            raise TemplateError(
                f"{self.name}: the chat template folds the system message into the first user turn, so "
                "<system>/</system> cannot be rendered one tag at a time; render the tag sequence with "
                "ChatRoles.render_tags()"
            )
        return self._render(role, tag.kind)

    def render_tags(self, tags: Iterable[RoleTag]) -> list[str]:
        """Render a sequence of tags in document order (needed for templates that fold the system message).

        For a folded template, ``<system>`` renders the user open, ``</system>`` the separator and a ``<user>``
        that comes right after ``</system>`` renders ``""``. Otherwise it is ``[render(t) for t in tags]``.
        """
        out: list[str] = []
        prev: RoleTag | None = None
        for tag in tags:
            out.append(self.render_after(tag, prev))
            prev = tag
        return out

    def render_after(self, tag: RoleTag, previous: RoleTag | None) -> str:
        """The text of ``tag`` where ``previous`` is the role tag before it in the document (see ``render_tags``)."""
        role = Role(tag.role)
        if role is Role.SYSTEM and self._p.system_folded and tag.kind != "empty":
            return self._render(role, tag.kind)
        if (self._p.system_folded and role is Role.USER and tag.kind == "open" and previous is not None
                and previous.role is Role.SYSTEM and previous.kind == "close"):
            return ""
        return self.render(tag)

    def _render(self, role: Role, kind: str) -> str:
        if kind == "open":
            return self._p.opens[role]
        if kind == "close":
            return self._p.closes[role]
        if kind == "empty":
            return self._p.opens[role] + self._p.closes[role]
        raise TemplateError(f"unknown role tag kind {kind!r}")

    def render_conversation(self, messages: Sequence[tuple[Role | str, str]], *, add_generation_prompt: bool) -> str:
        """The prompt these roles produce for a conversation, as the template would (without BOS).

        A conversation that does not start with a system message gets the default system block first.
        """
        return _rebuild(self._p, [(Role(r), c) for r, c in messages], add_generation_prompt)

    def __repr__(self) -> str:
        p = self._p
        opens = {r.value: v for r, v in p.opens.items()}
        closes = {r.value: v for r, v in p.closes.items()}
        return (
            f"ChatRoles(name={self.name!r}, source={self.source!r}, opens={opens}, "
            f"closes={closes}, default_system={p.default_system!r}, "
            f"generation_prompt={p.generation_prompt!r}, system_folded={p.system_folded})"
        )


# --------------------------------------------------------------------------------------------- splitting
def _split(template: str, *, bos_token: str, eos_token: str, name: str) -> _Pieces:
    env = _make_env()
    try:
        tpl = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{name}: the chat template does not compile: {exc}") from exc

    def render(messages: Sequence[Message], agp: bool) -> str:
        what = _describe(messages, agp)
        try:
            out = tpl.render(
                messages=[{"role": r.value, "content": c} for r, c in messages],
                add_generation_prompt=agp,
                bos_token=_BOS,
                eos_token=eos_token,
                tools=None,
            )
        except _TemplateRaised as exc:
            raise _Refused(f"{name}: the chat template refuses {what}: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{name}: rendering the chat template failed on {what}: {exc}") from exc
        except Exception as exc:  # a template can fail in arbitrary ways (bad indexing, type errors)
            raise TemplateError(f"{name}: rendering the chat template failed on {what}: {exc!r}") from exc
        if out.startswith(_BOS):
            out = out[len(_BOS) :]
        return out.replace(_BOS, bos_token)

    def cut(text: str, *markers: str, what: str) -> list[str]:
        """Split ``text`` around ``markers`` (each must occur exactly once, in order)."""
        parts: list[str] = []
        rest = text
        for m in markers:
            if text.count(m) != 1:
                raise TemplateError(
                    f"{name}: message content appears {text.count(m)} times (expected once) when rendering {what}; "
                    "the template transforms or repeats message contents, so it cannot be split into role pieces"
                )
            i = rest.find(m)
            if i < 0:
                raise TemplateError(f"{name}: message contents come out of order when rendering {what}")
            parts.append(rest[:i])
            rest = rest[i + len(m) :]
        parts.append(rest)
        return parts

    def after(text: str, prefix: str, what: str) -> str:
        if not text.startswith(prefix):
            raise TemplateError(
                f"{name}: cannot split {what}: expected it to start with {prefix!r}, got {text!r}; "
                "the template writes role wrappers that depend on the position in the conversation"
            )
        return text[len(prefix) :]

    # 1. user close, generation prompt, default system + user open.
    conv_u: list[Message] = [(Role.USER, _U1)]
    try:
        r_u = render(conv_u, False)
        r_ug = render(conv_u, True)
        r_ua = render([(Role.USER, _U1), (Role.ASSISTANT, _A1)], False)
        r_uau = render([(Role.USER, _U1), (Role.ASSISTANT, _A1), (Role.USER, _U2)], False)
    except _Refused as exc:
        raise TemplateError(f"{exc}; a plain user/assistant conversation must render") from exc
    before_u, user_close = cut(r_u, _U1, what="[user]")
    before_ug, tail_ug = cut(r_ug, _U1, what="[user] with the generation prompt")
    if before_ug != before_u:
        raise TemplateError(f"{name}: the generation prompt changes the text before the first user message")
    generation_prompt = after(tail_ug, user_close, "the generation prompt after the user close")
    # 2. assistant open and close.
    b_ua, gap_ua, asst_close = cut(r_ua, _U1, _A1, what="[user, assistant]")
    if b_ua != before_u:
        raise TemplateError(f"{name}: the text before the first user message depends on what follows it")
    asst_open = after(gap_ua, user_close, "the user close + assistant open")
    # 3. user open, then the default system block.
    _, _, gap_au, _ = cut(r_uau, _U1, _A1, _U2, what="[user, assistant, user]")
    user_open = after(gap_au, asst_close, "the assistant close + user open")
    if not before_u.endswith(user_open):
        raise TemplateError(
            f"{name}: the first user turn starts with {before_u!r}, which does not end with the later user turns' "
            f"open {user_open!r}; the template treats the first user message specially"
        )
    default_system = before_u[: len(before_u) - len(user_open)]
    # 4. system open and close (or folding, or no system support).
    system_supported = True
    system_folded = False
    sys_open = sys_close = ""
    try:
        r_su = render([(Role.SYSTEM, _S), (Role.USER, _U1)], False)
    except _Refused as exc:
        log.info("%s; its roles will refuse <system> tags", exc)
        system_supported = False
    if system_supported:
        sys_open, gap_su, _ = cut(r_su, _S, _U1, what="[system, user]")
        if gap_su.endswith(user_open):
            sys_close = gap_su[: len(gap_su) - len(user_open)]
        else:
            # The system text sits inside the first user turn (Gemma): open is that turn's open, close the separator.
            system_folded = True
            sys_close = gap_su
    pieces = _Pieces(
        opens={Role.SYSTEM: sys_open, Role.USER: user_open, Role.ASSISTANT: asst_open},
        closes={Role.SYSTEM: sys_close, Role.USER: user_close, Role.ASSISTANT: asst_close},
        default_system=default_system,
        generation_prompt=generation_prompt,
        system_supported=system_supported,
        system_folded=system_folded,
    )
    # 5. Verify: rebuilt conversations must equal the template's output exactly.
    for messages, agp in _verification_set(system_supported):
        try:
            expected = render(messages, agp)
        except _Refused as exc:
            raise TemplateError(f"{exc}; pccpu needs it to render") from exc
        got = _rebuild(pieces, messages, agp)
        if got != expected:
            raise TemplateError(
                f"{name}: the chat template cannot be split into fixed role prefixes and suffixes: for "
                f"{_describe(messages, agp)} it renders {_ellipsize(expected)} but the pieces give {_ellipsize(got)}"
            )
    log.debug("split chat template of %s: %s", name, pieces)
    return pieces


def _check_fallback(fallback: str) -> None:
    if fallback not in ("error", "chatml", "plain"):
        raise TemplateError(f"unknown fallback {fallback!r} (use 'error', 'chatml' or 'plain')")


class _Refused(TemplateError):
    """The template raised through ``raise_exception`` for one conversation."""


def _verification_set(system: bool) -> list[tuple[list[Message], bool]]:
    u1, a1, u2 = (Role.USER, _U1), (Role.ASSISTANT, _A1), (Role.USER, _U2)
    a2, u3 = (Role.ASSISTANT, _A2), (Role.USER, _U3)
    # Contents with inner spaces and newlines too, to catch templates that rewrite text.
    w1, w2 = (Role.USER, "What is 2+2?\nAnswer briefly."), (Role.ASSISTANT, "It is 4.")
    convs: list[tuple[list[Message], bool]] = [
        ([u1], False),
        ([u1], True),
        ([u1, a1], False),
        ([u1, a1, u2], False),
        ([u1, a1, u2], True),
        ([u1, a1, u2, a2, u3], True),
        ([w1, w2, u2], True),
    ]
    if system:
        s = (Role.SYSTEM, _S)
        convs += [
            ([s, u1], False),
            ([s, u1], True),
            ([s, u1, a1, u2], False),
            ([s, u1, a1, u2], True),
            ([s, u1, a1, u2, a2, u3], True),
            ([(Role.SYSTEM, "Be terse.\nUse English."), w1, w2, u2], True),
        ]
    return convs


def _describe(messages: Sequence[Message], agp: bool) -> str:
    roles = ", ".join(r.value for r, _ in messages)
    return f"[{roles}]" + (" with the generation prompt" if agp else "")


def _ellipsize(text: str, limit: int = 300) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"
