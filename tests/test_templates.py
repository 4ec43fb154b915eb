"""Tests of pccpu.templates.ChatRoles against the real chat templates of the registry models and synthetic ones."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pccpu.errors import ConfigError, PccpuError, TemplateError
from pccpu.roles import Role, RoleRenderer, RoleTag
from pccpu.templates import ChatRoles

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# name -> (BOS text, EOS text) as the real GGUFs carry them (see fixtures/chat_templates/README.md).
MODELS = {
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5-coder-0.5b": ("<|endoftext|>", "<|im_end|>"),
    "qwen2.5-coder-1.5b": ("<|endoftext|>", "<|im_end|>"),
    "gemma3-it": ("<bos>", "<eos>"),
}
CHATML_MODELS = ["smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
QWEN_DEFAULT = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
SMOL_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

S, U, A = Role.SYSTEM, Role.USER, Role.ASSISTANT


def tag(role: Role, kind: str) -> RoleTag:
    return RoleTag(role, kind)  # type: ignore[arg-type]


def load(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def roles_for(name: str) -> ChatRoles:
    bos, eos = MODELS[name]
    return ChatRoles.from_template(load(name), bos_token=bos, eos_token=eos, name=name)


def reference_render(template: str, messages: list[tuple[Role, str]], agp: bool, bos: str, eos: str) -> str:
    """The template's own output, rendered independently of pccpu (as transformers does), minus a leading BOS.

    Only a BOS written through ``bos_token`` is dropped (a marker stands in for it), never text that merely equals
    the BOS text (SmolLM2's BOS text is ``<|im_start|>``).
    """
    marker = "\x02BOS\x03"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    env.globals["raise_exception"] = raise_exception
    out = env.from_string(template).render(
        messages=[{"role": r.value, "content": c} for r, c in messages],
        add_generation_prompt=agp,
        bos_token=marker,
        eos_token=eos,
    )
    return out.removeprefix(marker).replace(marker, bos)


def render_with_tags(roles: ChatRoles, messages: list[tuple[Role, str]], agp: bool) -> str:
    """What the PML layer does: role tags around text, ``<system/>`` when there is no system message."""
    tags: list[RoleTag] = []
    texts: list[str] = []
    if not messages or messages[0][0] is not S:
        tags.append(tag(S, "empty"))
        texts.append("")
    for role, content in messages:
        tags += [tag(role, "open"), tag(role, "close")]
        texts += [content, ""]
    rendered = roles.render_tags(tags)
    out = "".join(r + t for r, t in zip(rendered, texts, strict=True))
    return out + (roles.generation_prompt if agp else "")


CONVERSATIONS: list[tuple[list[tuple[Role, str]], bool]] = [
    ([(U, "Hello!")], False),
    ([(U, "Hello!")], True),
    ([(S, "You are a pirate.")], False),
    ([(S, "You are a pirate."), (U, "Where is the gold?")], True),
    ([(S, "Answer in French."), (U, "Hi"), (A, "Bonjour."), (U, "How are you?")], True),
    ([(S, "Answer in French."), (U, "Hi"), (A, "Bonjour."), (U, "How are you?")], False),
    ([(U, "def f(x):\n    return x < 3 & y"), (A, "It compares.\n\nDone."), (U, "Thanks")], True),
    ([(U, "one"), (A, "two"), (U, "three"), (A, "four"), (U, "five"), (A, "six"), (U, "seven")], True),
    ([(U, "Q"), (A, "R")], False),
]


# --------------------------------------------------------------------------------------------- real templates
def test_fixtures_present() -> None:
    for name in [*MODELS, "gemma3-270m"]:
        if name == "gemma3-270m":
            assert not (FIXTURES / "gemma3-270m.jinja").exists()
            assert "gemma-3-270m has no chat template" in (FIXTURES / "README.md").read_text(encoding="utf-8")
        else:
            assert load(name).strip(), name


@pytest.mark.parametrize("name", CHATML_MODELS)
def test_chatml_models_exact_strings(name: str) -> None:
    r = roles_for(name)
    assert r.source == "template"
    assert r.render(tag(U, "open")) == "<|im_start|>user\n"
    assert r.render(tag(U, "close")) == "<|im_end|>\n"
    assert r.render(tag(A, "open")) == "<|im_start|>assistant\n"
    assert r.render(tag(A, "close")) == "<|im_end|>\n"
    assert r.render(tag(S, "open")) == "<|im_start|>system\n"
    assert r.render(tag(S, "close")) == "<|im_end|>\n"
    assert r.generation_prompt == "<|im_start|>assistant\n"
    assert not r.system_folded and r.system_supported


def test_smollm2_default_system() -> None:
    r = roles_for("smollm2")
    assert r.render(tag(S, "empty")) == SMOL_DEFAULT
    assert r.default_system == SMOL_DEFAULT


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_default_system(name: str) -> None:
    """Qwen injects a default system message; <system/> is that block, <system>..</system> replaces it."""
    r = roles_for(name)
    assert r.render(tag(S, "empty")) == QWEN_DEFAULT
    tpl = load(name)
    bos, eos = MODELS[name]
    with_sys = reference_render(tpl, [(S, "Be brief."), (U, "Hi")], True, bos, eos)
    assert "You are Qwen" not in with_sys
    assert with_sys == (
        r.render(tag(S, "open"))
        + "Be brief."
        + r.render(tag(S, "close"))
        + r.render(tag(U, "open"))
        + "Hi"
        + r.render(tag(U, "close"))
        + r.generation_prompt
    )


def test_smollm2_bos_is_not_stripped_from_text() -> None:
    """SmolLM2's BOS text is <|im_start|>: only a BOS the template writes through bos_token may be dropped."""
    r = roles_for("smollm2")
    assert r.render_conversation([(U, "x")], add_generation_prompt=False).startswith("<|im_start|>system\n")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("messages", "agp"), CONVERSATIONS)
def test_reproduces_template(name: str, messages: list[tuple[Role, str]], agp: bool) -> None:
    """Rebuilding a conversation from the role pieces gives exactly the template's own output."""
    bos, eos = MODELS[name]
    r = roles_for(name)
    if r.system_folded and messages == [(S, "You are a pirate.")]:
        pytest.skip("Gemma drops a system message that no user turn follows; PML always follows it with <user>")
    expected = reference_render(load(name), messages, agp, bos, eos)
    assert r.render_conversation(messages, add_generation_prompt=agp) == expected
    assert render_with_tags(r, messages, agp) == expected


# --------------------------------------------------------------------------------------------- Gemma 3
def test_gemma3_it_folds_system() -> None:
    r = roles_for("gemma3-it")
    assert r.system_folded
    assert r.render(tag(U, "open")) == "<start_of_turn>user\n"
    assert r.render(tag(U, "close")) == "<end_of_turn>\n"
    assert r.render(tag(A, "open")) == "<start_of_turn>model\n"
    assert r.render(tag(A, "close")) == "<end_of_turn>\n"
    assert r.generation_prompt == "<start_of_turn>model\n"
    assert r.render(tag(S, "empty")) == ""
    # One tag at a time cannot express the fold: a clear error, not wrong text.
    with pytest.raises(TemplateError, match="folds the system message into the first user turn"):
        r.render(tag(S, "open"))
    seq = [tag(S, "open"), tag(S, "close"), tag(U, "open"), tag(U, "close"), tag(A, "open")]
    assert r.render_tags(seq) == ["<start_of_turn>user\n", "\n\n", "", "<end_of_turn>\n", "<start_of_turn>model\n"]
    # A later <user> (not right after </system>) opens a turn as usual.
    seq2 = [tag(S, "open"), tag(S, "close"), tag(U, "open"), tag(U, "close"), tag(A, "open"), tag(A, "close")]
    seq2 += [tag(U, "open")]
    assert r.render_tags(seq2)[-1] == "<start_of_turn>user\n"


def test_gemma3_it_bos_dropped() -> None:
    r = roles_for("gemma3-it")
    out = r.render_conversation([(U, "hi")], add_generation_prompt=True)
    assert out == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_270m_base_model_has_no_template(caplog: pytest.LogCaptureFixture) -> None:
    """The registry's gemma-3-270m GGUF carries no chat template: plain roles with a warning, an error on request."""
    from pccpu.service.runtime import chat_roles_for

    base = SimpleNamespace(chat_template=None, path=Path("gemma-3-270m-Q4_K_M.gguf"))
    with caplog.at_level(logging.WARNING, logger="pccpu.service"):
        plain = chat_roles_for(base)  # type: ignore[arg-type]
    assert plain.source == "plain"
    assert "gemma-3-270m-Q4_K_M.gguf has no chat template" in caplog.text
    assert all(plain.render(tag(role, k)) == "" for role in Role for k in ("open", "close", "empty"))
    assert plain.generation_prompt == ""
    with pytest.raises(ConfigError, match=r"has no chat template; use roles='plain'"):
        chat_roles_for(base, "template")  # type: ignore[arg-type]
    chatml = chat_roles_for(base, "chatml")  # type: ignore[arg-type]
    assert chatml.source == "chatml" and chatml.render(tag(U, "open")) == "<|im_start|>user\n"


def test_from_template_keeps_the_model_name() -> None:
    r = ChatRoles.from_template(
        load("qwen2.5-coder-1.5b"), bos_token="<|endoftext|>", eos_token="<|im_end|>", name="Qwen2.5 Coder"
    )
    assert r.name == "Qwen2.5 Coder" and r.default_system == QWEN_DEFAULT


# --------------------------------------------------------------------------------------------- other shapes
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
)


def test_llama3_style_bos_dropped() -> None:
    r = ChatRoles.from_template(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", name="llama3")
    assert r.render(tag(U, "open")) == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert r.render(tag(U, "close")) == "<|eot_id|>"
    assert r.render(tag(S, "open")) == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert r.render(tag(S, "empty")) == ""
    assert r.generation_prompt == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_llama2_is_unsplittable() -> None:
    with pytest.raises(TemplateError, match=r"^llama2: .*first user"):
        ChatRoles.from_template(LLAMA2, bos_token="<s>", eos_token="</s>", name="llama2")


def test_fallback_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pccpu.templates"):
        r = ChatRoles.from_template(LLAMA2, bos_token="<s>", eos_token="</s>", name="llama2", fallback="chatml")
    assert r.source == "chatml"
    assert "llama2" in caplog.text and "ChatML fallback" in caplog.text
    assert r.render(tag(U, "open")) == "<|im_start|>user\n"
    assert r.render(tag(S, "empty")) == ""
    assert r.generation_prompt == "<|im_start|>assistant\n"


def test_plain_fallback_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pccpu.templates"):
        r = ChatRoles.from_template(LLAMA2, bos_token="<s>", eos_token="</s>", name="llama2", fallback="plain")
    assert r.source == "plain" and r.name == "llama2 (plain fallback)"
    assert "llama2" in caplog.text and "plain (empty) roles" in caplog.text
    assert all(r.render(tag(role, k)) == "" for role in Role for k in ("open", "close", "empty"))
    assert r.generation_prompt == ""


def test_unknown_fallback() -> None:
    with pytest.raises(TemplateError, match="unknown fallback"):
        ChatRoles.from_template(LLAMA2, name="llama2", fallback="bogus")  # type: ignore[arg-type]


def test_position_dependent_header_unsplittable() -> None:
    tpl = "{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="numbered"):
        ChatRoles.from_template(tpl, name="numbered")


def test_verification_catches_late_differences() -> None:
    """Pieces derived from short conversations, but the template changes on the fifth message."""
    tpl = (
        "{% for m in messages %}{% if loop.index0 == 4 %}[LONG]{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(TemplateError, match="cannot be split into fixed role prefixes and suffixes"):
        ChatRoles.from_template(tpl, name="late")


def test_template_that_repeats_content() -> None:
    tpl = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="appears 2 times"):
        ChatRoles.from_template(tpl, name="echo")


def test_template_without_system_support() -> None:
    r = ChatRoles.from_template(NO_SYSTEM, name="nosys")
    assert not r.system_supported
    assert r.render(tag(U, "open")) == "<turn>user\n"
    assert r.render(tag(S, "empty")) == ""
    with pytest.raises(TemplateError, match="refuses system messages"):
        r.render(tag(S, "open"))


def test_template_refusing_plain_conversation() -> None:
    tpl = "{{ raise_exception('I refuse everything') }}"
    with pytest.raises(TemplateError, match="I refuse everything"):
        ChatRoles.from_template(tpl, name="refuser")


def test_template_syntax_error() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatRoles.from_template("{% for m in messages %}", name="broken")


def test_sandbox_blocks_unsafe_access() -> None:
    tpl = "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="unsafe"):
        ChatRoles.from_template(tpl, name="evil")


def test_template_helpers_available() -> None:
    tpl = (
        "{% set d = strftime_now('%Y') %}{{ {'k': 'ü'} | tojson }}\n"
        "{% for m in messages %}{% if loop.index0 > 100 %}{% break %}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    r = ChatRoles.from_template(tpl, name="helpers")
    assert r.default_system == '{"k": "ü"}\n'
    assert r.render(tag(U, "open")) == "<|user|>"


def test_empty_user_and_assistant_tags_render_empty_turns() -> None:
    r = roles_for("smollm2")
    assert r.render(tag(U, "empty")) == "<|im_start|>user\n<|im_end|>\n"


def test_plain_and_chatml_constructors() -> None:
    p = ChatRoles.plain()
    renderer: RoleRenderer = p
    assert renderer.render(tag(A, "open")) == "" and renderer.generation_prompt == ""
    c = ChatRoles.chatml(default_system="<|im_start|>system\nHi<|im_end|>\n")
    assert c.render(tag(S, "empty")) == "<|im_start|>system\nHi<|im_end|>\n"
    assert c.render(tag(A, "close")) == "<|im_end|>\n"


def test_template_error_is_package_error() -> None:
    assert issubclass(TemplateError, PccpuError)


# --------------------------------------------------------------------------------------------- a template given
def fake_runtime(template: str | None, roles: str = "auto") -> Any:
    from fake_engine import FakeContext, FakeModel

    from pccpu.engine import ContextSettings
    from pccpu.service.runtime import Runtime, chat_roles_for

    model = FakeModel()
    return Runtime(model=model, context=FakeContext(model), roles=chat_roles_for(model, roles, template),
                   settings=ContextSettings(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=4, n_threads=1,
                                            n_threads_batch=1))


def test_a_template_given_replaces_the_models_own() -> None:
    """gemma-3-270m's GGUF has no template: the Gemma 3 instruction template given instead folds the system message
    into the first user turn, in role tags and in chats alike."""
    assert not fake_runtime(None).roles.system_folded  # the fake model's own template is ChatML
    runtime = fake_runtime(load("gemma3-it"))
    assert runtime.roles.system_folded
    assert runtime.roles.generation_prompt == "<start_of_turn>model\n"


@pytest.mark.parametrize(("messages", "agp"), [c for c in CONVERSATIONS if c[1] and len(c[0]) > 1])
def test_a_chat_with_a_given_template_renders_as_the_template(messages: list[tuple[Role, str]], agp: bool) -> None:
    from pccpu.service.chat import build_chunks

    runtime = fake_runtime(load("gemma3-it"))
    chunks = build_chunks([{"role": r.value, "content": c} for r, c in messages], runtime, seed="t", n_ctx=4096,
                          min_chunk_tokens=1)
    text = runtime.model.detokenize([t for c in chunks for t in c.tokens], special=True)
    assert text == reference_render(load("gemma3-it"), messages, agp, *MODELS["gemma3-it"])


def test_a_template_given_with_roles_that_ignore_it_is_refused() -> None:
    with pytest.raises(ConfigError, match="roles='template'"):
        fake_runtime(load("gemma3-it"), roles="plain")
    with pytest.raises(ConfigError, match="empty"):
        fake_runtime("  ")


def test_a_pml_schema_and_prompt_render_a_folded_system_message_as_the_template() -> None:
    """PML renders role tags in document order, so a template that folds the system message into the first user turn
    (Gemma 3) works in schemas too: the schema's and the prompt's text together are the template's own output."""
    from pml_fakes import CharTokenizer

    from pccpu.pml import build_layout, parse_prompt, parse_schema, resolve_prompt

    roles = roles_for("gemma3-it")
    schema = parse_schema('<schema name="g"><system>Be brief.</system><user><module name="doc">The sky is '
                          'blue.</module></schema>')
    layout = build_layout(schema, CharTokenizer(), roles)
    plan = resolve_prompt(layout, parse_prompt('<prompt schema="g"><doc/> What colour?</user></prompt>'),
                          CharTokenizer(), roles)
    text = "".join(chr(t) for piece in plan.pieces for t in plan.piece_tokens(piece))
    expected = reference_render(load("gemma3-it"), [(S, "Be brief."), (U, "The sky is blue. What colour?")], False,
                                *MODELS["gemma3-it"])
    assert text == expected
