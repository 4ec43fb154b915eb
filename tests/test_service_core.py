"""The request path of PromptCache on the fake engine (tests/fake_engine.py): options, answers, requests, sessions,
errors. Milliseconds each; what needs llama.cpp's numbers is tested on the real model in test_service.py and
test_reuse.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeCacheFactory
from fake_engine import FakeModel

from pccpu.errors import (
    BusyError,
    ConfigError,
    LayoutOverflowError,
    OptionError,
    PccpuError,
    SessionError,
    UnknownSchemaError,
)
from pccpu.service import GenerationOptions, PromptCache, Result
from pccpu.store.entry_file import FILE_SUFFIX

SCHEMA = """<schema name="docs"><system>You answer from the notes.</system><user>Notes:
<module name="a">Alpha: the bakery opens at six.</module>
<module name="b">Beta: the station closes at ten.</module>
<module name="c">Gamma: the park has ducks.</module></schema>"""


def prompt(refs: str = "<a/><b/><c/>", question: str = "When?") -> str:
    return f'<prompt schema="docs">{refs}{question}</user></prompt>'


@pytest.fixture
def pc(fake_cache: FakeCacheFactory) -> PromptCache:
    cache: PromptCache = fake_cache()
    cache.add_schema(SCHEMA)
    return cache


def ask(pc: PromptCache, text: str, **options: object) -> Result:
    return pc.ask(text, **options).result()  # type: ignore[arg-type]


# -- options -------------------------------------------------------------------------------------------------------
def test_unknown_option_names_the_valid_ones(pc: PromptCache) -> None:
    with pytest.raises(OptionError, match=r"unknown option 'max_token' \(did you mean 'max_tokens'\?\).*temperature"):
        pc.ask(prompt(), max_token=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(("options", "message"), [
    ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"stop": "END"}, "stop must be a list of strings"),
    ({"stop": [""]}, "stop strings must not be empty"),
])
def test_invalid_option_values_are_refused_when_asked(pc: PromptCache, options: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(OptionError, match=message):
        pc.ask(prompt(), **options)  # type: ignore[arg-type]


def test_options_object_and_keywords_combine(pc: PromptCache) -> None:
    base = GenerationOptions(max_tokens=2)
    assert ask(pc, prompt(), options=base).generated_tokens == 2
    assert ask(pc, prompt(), options=base, max_tokens=3).generated_tokens == 3  # keywords win


# -- answers -------------------------------------------------------------------------------------------------------
def test_answer_is_lazy_streams_and_gives_its_result(pc: PromptCache) -> None:
    encoded = pc.stats().encode.tokens
    answer = pc.ask(prompt(), max_tokens=5)
    assert not answer.done
    pieces = list(answer)
    result = answer.result()
    assert "".join(pieces) == result.text == answer.text()
    assert list(answer) == pieces  # a finished answer gives its pieces again
    assert result.generated_tokens == 5 and result.finish_reason == "length"
    assert pc.stats().encode.tokens == encoded


def test_nothing_runs_before_the_answer_is_read(pc: PromptCache) -> None:
    pc.ask(prompt("<a/>"), max_tokens=2)  # never read
    result = ask(pc, prompt(), max_tokens=2)
    assert result.session_tokens == 0  # the first request never ran, so it left no cells


def test_closing_an_answer_early_cancels_it_and_keeps_its_cells(pc: PromptCache) -> None:
    answer = pc.ask(prompt(), max_tokens=50)
    next(iter(answer))
    answer.close()
    result = answer.result()
    assert result.finish_reason == "cancelled"
    follow = ask(pc, prompt(), max_tokens=2)
    assert follow.session_tokens == follow.prompt_tokens - 1  # the cancelled answer's cells were kept


def test_an_unfinished_answer_holds_the_cache(pc: PromptCache) -> None:
    answer = pc.ask(prompt(), max_tokens=50)
    next(iter(answer))
    with pytest.raises(BusyError, match="earlier answer is still being streamed"):
        ask(pc, prompt())
    answer.close()
    assert ask(pc, prompt(), max_tokens=1).generated_tokens == 1


def test_closed_before_start_has_no_result(pc: PromptCache) -> None:
    answer = pc.ask(prompt())
    answer.close()
    with pytest.raises(SessionError, match="closed before it started"):
        answer.result()


def test_a_failed_request_raises_its_error_every_time(pc: PromptCache) -> None:
    answer = pc.ask('<prompt schema="nope"><user>Hi</user></prompt>')
    for _ in range(2):
        with pytest.raises(UnknownSchemaError, match="'nope' was not added"):
            answer.result()


def test_prefill_only_keeps_the_logits(pc: PromptCache) -> None:
    result = ask(pc, prompt(), max_tokens=0, keep_logits=True)
    assert result.text == "" and result.generated_tokens == 0 and result.finish_reason == "length"
    assert result.first_logits is not None and result.first_logits.shape == (pc.model_info.n_vocab,)


# -- the request path ----------------------------------------------------------------------------------------------
def test_cached_answer_equals_full_prefill(pc: PromptCache) -> None:
    cached = ask(pc, prompt(), max_tokens=4, keep_logits=True)
    full = ask(pc, prompt(), cache=False, max_tokens=4, keep_logits=True)
    assert np.array_equal(cached.first_logits, full.first_logits) and cached.text == full.text
    assert cached.cached_tokens + cached.uncached_tokens == full.uncached_tokens == full.prompt_tokens
    assert [m.module for m in cached.modules] == ["", "a", "b", "c"]
    assert {m.source for m in cached.modules} == {"ram"}


def test_plan_then_ask_the_request(pc: PromptCache) -> None:
    request = pc.plan(prompt("<b/>"))
    assert request.modules == ("", "b")
    unrepaired = ask(pc, request, max_tokens=2, repair_tokens=0)  # type: ignore[arg-type]
    assert unrepaired.cached_tokens == request.plan.cached_tokens
    # b follows the schema text without a (it was encoded after a): composed, its first tokens decoded in place
    repaired = ask(pc, request, max_tokens=2, repair_tokens=4)  # type: ignore[arg-type]
    assert repaired.session_tokens + repaired.cached_tokens == request.plan.cached_tokens - 4  # the root is held
    assert [(m.module, m.composed, m.repaired_tokens) for m in repaired.modules] == [
        ("", False, 0), ("b", True, 4)]
    with pytest.raises(OptionError, match="pass it to plan"):
        pc.ask(request, add_generation_prompt=False)


def test_a_request_planned_before_its_schema_changed_is_refused(pc: PromptCache) -> None:
    request = pc.plan(prompt())
    pc.add_schema(SCHEMA.replace("ducks", "swans"))
    with pytest.raises(ConfigError, match="plan it again"):
        ask(pc, request)  # type: ignore[arg-type]


def test_out_of_order_references_warn_and_use_schema_order(pc: PromptCache, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = ask(pc, prompt("<c/><a/>"), max_tokens=2)
    assert result.warnings == ("modules c, a are referenced out of schema order; they are placed at their schema "
                               "positions, in the order a, c",)
    assert "out of schema order" in caplog.text
    assert [m.module for m in result.modules] == ["", "a", "c"]
    assert ask(pc, prompt("<a/><c/>"), max_tokens=2).warnings == ()


def test_errors_leave_the_cache_working(pc: PromptCache) -> None:
    long_question = "word " * 3000
    with pytest.raises(LayoutOverflowError):
        ask(pc, prompt(question=long_question))
    with pytest.raises(UnknownSchemaError):
        ask(pc, '<prompt schema="nope"><user>Hi</user></prompt>')
    result = ask(pc, prompt(), max_tokens=2, keep_logits=True)
    assert np.array_equal(result.first_logits, ask(pc, prompt(), cache=False, max_tokens=0,
                                                    keep_logits=True).first_logits)


def test_a_module_missing_from_the_store_is_encoded_for_the_request(pc: PromptCache) -> None:
    pc.clear_store()
    result = ask(pc, prompt("<b/>"), max_tokens=1)
    assert {m.module: m.source for m in result.modules} == {"": "encoded", "b": "encoded"}
    assert result.timings.encode_ms > 0
    assert {m.source for m in ask(pc, prompt("<b/>"), max_tokens=1).modules} == {"ram"}


def test_damaged_metadata_on_disk_is_reencoded(fake_cache: FakeCacheFactory, tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    first = fake_cache(store_dir=store)
    first.add_schema(SCHEMA)
    reference = ask(first, prompt(), max_tokens=3).text
    files = sorted((store / "default").glob(f"*{FILE_SUFFIX}"))
    assert len(files) == 4
    from pccpu.store.entry_file import read_entry_header, write_entry

    for path in files:  # well-formed files whose metadata lies about the run sizes
        header = read_entry_header(path).fields
        payload = np.fromfile(path, dtype=np.uint8)[-header["payload_size"]:]
        write_entry(path, dict(header, run_bytes=[header["payload_size"] + 1]), payload)
    second = fake_cache(store_dir=store)
    second.add_schema(SCHEMA, encode=False)
    result = ask(second, prompt(), max_tokens=3)
    assert {m.source for m in result.modules} == {"encoded"} and result.text == reference


# -- sessions ------------------------------------------------------------------------------------------------------
def test_sessions_keep_their_cells_across_switches(pc: PromptCache) -> None:
    one, two = pc.session("one"), pc.session("two")
    first = ask(one, prompt(), max_tokens=3)  # type: ignore[arg-type]
    ask(two, prompt("<b/>"), max_tokens=3)  # type: ignore[arg-type]
    back = one.ask(prompt(), max_tokens=3, keep_logits=True).result()
    assert back.session_tokens == first.prompt_tokens - 1 and back.cached_tokens == 0
    assert back.uncached_tokens == 1 and back.timings.switch_ms > 0
    stats = pc.stats().sessions
    assert stats.parked == 1 and stats.sessions == 3  # the default session, one and two
    assert one.held_tokens == back.prompt_tokens + back.generated_tokens - 1  # the last sampled token is not decoded


def test_a_session_budget_drops_the_least_recently_used_state(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(session_budget=1)  # nothing fits: every switch drops the leaving session's cells
    pc.add_schema(SCHEMA)
    one, two = pc.session(), pc.session()
    ask(one, prompt(), max_tokens=2)  # type: ignore[arg-type]
    ask(two, prompt(), max_tokens=2)  # type: ignore[arg-type]
    back = one.ask(prompt(), max_tokens=2).result()
    assert back.session_tokens == 0 and back.cached_tokens > 0  # starts over from the module store
    assert one.held_tokens > 0


def test_closed_sessions_and_foreign_sessions_are_refused(pc: PromptCache,
                                                          fake_cache: FakeCacheFactory) -> None:
    with pc.session() as chat:
        ask(chat, prompt(), max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(SessionError, match="was closed"):
        chat.ask(prompt())
    other = fake_cache()
    with pytest.raises(SessionError, match="another PromptCache"):
        other.ask(prompt(), session=pc.session())


def test_full_prefill_in_a_session_leaves_nothing_to_reuse(pc: PromptCache) -> None:
    chat = pc.session()
    ask(chat, prompt(), max_tokens=2)  # type: ignore[arg-type]
    assert ask(chat, prompt(), cache=False, max_tokens=2).session_tokens == 0  # type: ignore[arg-type]
    assert ask(chat, prompt(), max_tokens=2).session_tokens == 0  # type: ignore[arg-type]


def test_reuse_off_assembles_every_request_from_the_store(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache(reuse_previous=False)
    pc.add_schema(SCHEMA)
    ask(pc, prompt(), max_tokens=2)
    again = ask(pc, prompt(), max_tokens=2)
    assert again.session_tokens == 0 and again.cached_tokens == again.prompt_tokens - again.uncached_tokens


# -- construction --------------------------------------------------------------------------------------------------
def test_runtime_and_model_together_are_refused(fake_cache: FakeCacheFactory) -> None:
    pc = fake_cache()
    with pytest.raises(ConfigError, match="not both"):
        PromptCache("smollm2", runtime=pc._runtime)


def test_every_error_is_a_pccpu_error(pc: PromptCache) -> None:
    for bad in ("<prompt", '<prompt schema="docs"><zzz/></prompt>', prompt("<a/><a/>")):
        with pytest.raises(PccpuError):
            ask(pc, bad)


def test_two_fake_models_never_share_states(fake_cache: FakeCacheFactory, tmp_path: Path) -> None:
    store = tmp_path / "one-store"
    first = fake_cache(store_dir=store, model=FakeModel(seed=1))
    first.add_schema(SCHEMA)
    second = fake_cache(store_dir=store, model=FakeModel(seed=2))
    second.add_schema(SCHEMA, encode=False)
    assert {m.source for m in ask(second, prompt(), max_tokens=1).modules} == {"encoded"}


def test_an_answer_dropped_mid_stream_frees_the_cache(pc: PromptCache) -> None:
    answer = pc.ask(prompt(), max_tokens=50)
    next(iter(answer))
    del answer  # no close(): the answer is freed at once, which closes its request
    assert ask(pc, prompt(), max_tokens=1).generated_tokens == 1
