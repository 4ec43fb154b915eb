"""Sliding-window models (Gemma 3) on the real gemma-3-270m: states longer than the window saved and restored whole,
reused window cells detected, prefix and modular layouts, chats and shifted modules (see pccpu/engine/swa.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from greedy import assert_answers_close
from test_service import check_shifted_reuse

from pccpu.bench.fidelity import kl_divergence
from pccpu.engine import ContextSettings, LlamaContext, LlamaModel, swa
from pccpu.errors import StateError, WindowLostError
from pccpu.service.prompt_cache import PromptCache

N_SWA = 512
TOWNS = ("Arden", "Bellmoor", "Cresthaven", "Dunmere", "Elmsworth", "Farrow", "Glenbrook", "Harrowgate", "Ivybridge",
         "Juniper Falls", "Kestrel Bay", "Larkspur")
TRADES = ("salt", "wool", "glass", "timber", "copper", "cheese", "paper", "clocks", "rope", "honey", "silk", "tin")


def gazetteer(first: int, count: int) -> str:
    """Varied, deterministic prose: one short paragraph per town (about 60 tokens each)."""
    lines = []
    for i in range(first, first + count):
        town, trade = TOWNS[i % len(TOWNS)], TRADES[(i * 5) % len(TRADES)]
        lines.append(f"Entry {i}: {town} lies {3 + i % 17} miles from the coast and was founded in {1100 + 37 * i}. "
                     f"Its people trade in {trade}, its market opens on day {1 + i % 7} of the week, and its bridge "
                     f"has {2 + i % 9} arches. The mayor in year {1900 + i} was called {TOWNS[(i * 7) % 12]} Smith.")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def context(gemma_model: LlamaModel) -> Iterator[LlamaContext]:
    settings = ContextSettings(n_ctx=2048, n_batch=512, n_ubatch=512, n_seq_max=4, n_threads=2, n_threads_batch=2)
    with LlamaContext(gemma_model, settings) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def tokens(gemma_model: LlamaModel) -> list[int]:
    out = gemma_model.tokenize(gazetteer(0, 24), add_bos=True)
    assert len(out) > 1100, "the text must be longer than twice the window"
    return out


def decoded_after(ctx: LlamaContext, tokens: list[int], k: int, n: int) -> np.ndarray:
    """Logits of tokens[k:k+n] decoded into sequence 0 after what it holds."""
    out = ctx.decode(tokens[k : k + n], seq_id=0, start=k, logits="all")
    assert out is not None
    return out.copy()


def save_range(ctx: LlamaContext, tokens: list[int], p0: int, p1: int, decoded: int) -> np.ndarray:
    ctx.clear()
    ctx.decode(tokens[:decoded], seq_id=2, start=0, logits="none")
    ctx.seq_cp(2, 3, p0, p1)
    try:
        return ctx.state_seq_get(3).copy()
    finally:
        ctx.seq_rm(3)


def test_the_model_has_a_sliding_window(gemma_model: LlamaModel) -> None:
    assert gemma_model.info.n_swa == N_SWA


@pytest.mark.parametrize("k", [300, 700, 1000])
def test_a_restored_state_continues_like_the_sequence_it_was_saved_from(context: LlamaContext, tokens: list[int],
                                                                        k: int) -> None:
    """Saved after k tokens (below, above, twice the window), restored into a cleared cache, the next 16 tokens'
    logits equal those decoded in place after the same k tokens, bit for bit: every cell is saved and lands where
    it was (pccpu/engine/swa.py)."""
    context.clear()
    context.decode(tokens[:k], seq_id=0, start=0, logits="none")
    blob = context.state_seq_get(0).copy()
    in_place = decoded_after(context, tokens, k, 16)
    assert len(swa.unpack(blob)) == -(-k // swa.part_span(N_SWA))  # one part per half window
    context.clear()
    context.state_seq_set(0, blob)
    assert (context.seq_pos_min(0), context.seq_pos_max(0)) == (0, k - 1)
    assert np.array_equal(decoded_after(context, tokens, k, 16), in_place)

    # the same prefix as two stored modules (the schema's root text, then a document), restored the way the
    # assembler does it: each into a scratch sequence, copied into the request sequence
    root, doc = save_range(context, tokens, 0, 5, k), save_range(context, tokens, 5, k, k)
    context.clear()
    for blob in (root, doc):
        context.state_seq_set(1, blob)
        context.seq_cp(1, 0)
        context.seq_rm(1)
    assert np.array_equal(decoded_after(context, tokens, k, 16), in_place)


def test_llamacpp_alone_drops_the_cells_beyond_the_window(context: LlamaContext, tokens: list[int]) -> None:
    """What pccpu works around (docs/sliding-window.md): llama.cpp's own sequence state leaves out the SWA cells
    that the next token cannot see, even with swa_full; pccpu's state holds them all."""
    k = 1000
    context.clear()
    context.decode(tokens[:k], seq_id=0, start=0, logits="none")
    whole = context.state_seq_get(0).copy()
    own = context._state_get(0, None).copy()  # internal on purpose: llama.cpp's single blob
    assert own.nbytes < whole.nbytes
    context.clear()
    context._state_set(0, own)
    assert context.seq_pos_min(0) == k - N_SWA  # the SWA cache starts at the window
    context.state_seq_set(0, whole)
    assert context.seq_pos_min(0) == 0


def test_reused_window_cells_are_detected(context: LlamaContext, tokens: list[int]) -> None:
    """llama.cpp reuses a cell that its sequence can no longer see (and purges that sequence's older SWA cells):
    continuing at the end is still right, going back inside the window is refused, and so is a save."""
    context.clear()
    context.decode(tokens[:100], seq_id=1, start=0, logits="none")  # cells 0..99
    context.decode(tokens[:1000], seq_id=0, start=0, logits="none")  # cells 100..1099
    context.seq_rm(1)  # frees cells 0..99: llama.cpp searches from there
    assert context.window_intact(0, 600)
    context.decode(tokens[:200], seq_id=2, start=0, logits="none")  # takes 0..99, then seq 0's cells of pos 0..99
    assert context.seq_pos_min(0) == 100  # the SWA cache's view of sequence 0
    assert context.window_intact(0, 1000)
    assert not context.window_intact(0, 600)  # would need positions from 89
    with pytest.raises(WindowLostError, match="cannot be saved whole"):
        context.state_seq_get(0)
    context.seq_cp(0, 3, 0, 400)
    assert not context.window_intact(3, 400)  # a copy inherits the gap
    context.seq_rm(0, 600, -1)
    with pytest.raises(WindowLostError, match="reused them"):
        context.decode(tokens[600:610], seq_id=0, start=600)
    assert context.seq_pos_max(0) == 599  # the refused decode placed nothing
    context.decode(tokens[1000:1010], seq_id=2, start=200)  # other sequences are unaffected
    context.seq_rm(0)
    assert context.window_intact(0, 600)


def test_a_damaged_state_is_refused(context: LlamaContext, tokens: list[int]) -> None:
    context.clear()
    context.decode(tokens[:600], seq_id=0, start=0, logits="none")
    blob = context.state_seq_get(0).copy()
    for bad in (blob[:-10], blob[:20], np.frombuffer(b"not a state at all, too", dtype=np.uint8).copy()):
        with pytest.raises(StateError):
            context.state_seq_set(1, bad)
        assert context.seq_pos_max(1) == -1


# -- the service ---------------------------------------------------------------------------------------------
DOCS = {"a": gazetteer(0, 14), "b": gazetteer(14, 6), "c": gazetteer(20, 5)}
SCHEMA = ('<schema name="towns"><system>You answer questions about the towns below.</system><user>'
          + "".join(f'\n<module name="{m}">{text}</module>' for m, text in DOCS.items()) + "</schema>")
QUESTION = "\nQuestion: which town was founded in 1211, and what do its people trade in?</user>"


def prompt(*modules: str) -> str:
    return '<prompt schema="towns">' + "".join(f"<{m}/>" for m in modules) + QUESTION + "</prompt>"


@pytest.fixture(scope="module")
def cache(gemma_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromptCache]:
    with PromptCache(str(gemma_model_path), n_ctx=2048, n_threads=2, mode="sequential",
                     store_dir=tmp_path_factory.mktemp("gemma-store")) as pc:
        pc.add_schema(SCHEMA)
        yield pc


def first_logits(pc: PromptCache, text: str, **options: object) -> np.ndarray:
    logits = pc.ask(text, max_tokens=0, keep_logits=True, **options).result().first_logits  # type: ignore[arg-type]
    assert logits is not None
    return logits


def test_prefix_layout_matches_full_prefill(cache: PromptCache) -> None:
    """A document module longer than the window, from position 0: the cached answer is the full prefill's (greedy),
    its first-token logits within llama.cpp's batch-split noise on this CPU (Q4_K: the question decoded in a batch
    of its own is computed by other kernels than inside the full prompt's batch)."""
    plan = cache.plan(prompt("a")).plan
    assert plan.cached_tokens > 1.5 * N_SWA
    full = first_logits(cache, prompt("a"), cache=False)
    cached = first_logits(cache, prompt("a"))
    assert int(cached.argmax()) == int(full.argmax())
    assert kl_divergence(full, cached) < 0.01
    baseline = cache.ask(prompt("a"), cache=False, max_tokens=16).result()
    answer = cache.ask(prompt("a"), max_tokens=16).result()
    assert answer.cached_tokens == plan.cached_tokens
    assert answer.text == baseline.text


def test_modular_layout_is_close_to_full_prefill(cache: PromptCache) -> None:
    """Modules skipped and picked in another combination: the same fidelity bound as the other models' test."""
    for modules in (("a", "c"), ("b", "c"), ("c",)):
        full = first_logits(cache, prompt(*modules), cache=False)
        cached = first_logits(cache, prompt(*modules))
        assert kl_divergence(full, cached) < 1.0, modules


def test_a_chat_longer_than_the_window_keeps_its_cells(cache: PromptCache) -> None:
    """A conversation over a document longer than the window, continued: the second turn keeps the first turn's
    cells (the session), the document is restored from the store in another session, and both answer as a full
    prefill of the same conversation does."""
    messages = [{"role": "system", "content": "You answer questions about towns."},
                {"role": "user", "content": DOCS["a"] + "\nWhich town was founded in 1137?"}]
    session = cache.session()
    first = cache.chat(messages, session=session, max_tokens=8).result()
    follow = [*messages, {"role": "assistant", "content": first.text},
              {"role": "user", "content": "And what do its people trade in?"}]
    second = cache.chat(follow, session=session, max_tokens=8).result()
    assert second.session_tokens > 1.5 * N_SWA
    other = cache.chat(follow, session=cache.session(), max_tokens=8).result()
    assert other.cached_tokens > 1.5 * N_SWA and other.session_tokens == 0
    full = cache.chat(follow, cache=False, max_tokens=8).result()
    assert second.text == other.text == full.text


def test_shifted_module(gemma_model_path: Path) -> None:
    """A module found at another start is moved with llama.cpp's K-shift, per layer with the SWA layers' own RoPE
    base: as close to a fresh encode as for the other models."""
    check_shifted_reuse(gemma_model_path, "<system>You are a helpful assistant. Answer briefly.</system>")


GEMMA_IT = (Path(__file__).parent / "fixtures" / "chat_templates" / "gemma3-it.jinja").read_text(encoding="utf-8")


def test_a_chat_with_the_gemma3_instruction_template(gemma_model_path: Path) -> None:
    """The base model's GGUF has no template; given the Gemma 3 one, the system message goes into the first user
    turn, and the turn markers are the vocabulary's special tokens."""
    with PromptCache(str(gemma_model_path), n_ctx=1024, n_threads=2, persist=False, chat_template=GEMMA_IT) as pc:
        messages = [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What colour is the sky?"}]
        result = pc.chat(messages, max_tokens=4).result()
        expected = ("<start_of_turn>user\nAnswer in one word.\n\nWhat colour is the sky?<end_of_turn>\n"
                    "<start_of_turn>model\n")
        tokens = pc._runtime.model.tokenize(expected, add_bos=True)  # internal: the model's tokenizer
        assert result.prompt_tokens == len(tokens)
        assert len(pc._runtime.model.tokenize("<start_of_turn>")) == 1


def test_schema_show_reports_what_the_window_costs(gemma_model_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pccpu.cli import main

    schema = tmp_path / "towns.xml"
    schema.write_text(SCHEMA, encoding="utf-8")
    template = tmp_path / "gemma3-it.jinja"
    template.write_text(GEMMA_IT, encoding="utf-8")
    result = CliRunner().invoke(main, ["schema", "show", str(schema), "--model", str(gemma_model_path),
                                       "--chat-template", str(template), "--n-ctx", "4096"])
    assert result.exit_code == 0, result.output
    assert "sliding window: 15 of 18 layers see the last 512 positions" in result.output
    assert "a full n_ctx=4096 context is 72.0 MiB of KV, 27.0 MiB with llama.cpp's default" in result.output


def test_batched_answers_past_the_window_equal_answers_alone(gemma_model_path: Path, tmp_path: Path) -> None:
    """Batch lanes on a sliding-window model: three conversations over documents longer than the window, answered
    together (llama.cpp reuses the window cells one lane can no longer see for another lane's tokens, and the
    context follows every lane's window floor), give the answers given alone (up to rounding: ``greedy.py``), and
    so do their follow-ups, which continue from sessions parked out of the lanes."""
    def opening(n: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You answer questions about towns."},
                {"role": "user", "content": gazetteer(3 * n, 10) + f"\nWhen was entry {3 * n + 4} founded?"}]

    def follow_up(n: int, answer: str) -> list[dict[str, str]]:
        return [*opening(n), {"role": "assistant", "content": answer},
                {"role": "user", "content": "And how many arches has its bridge?"}]

    with PromptCache(str(gemma_model_path), n_ctx=4096, n_threads=2, store_dir=tmp_path) as pc:
        sessions = [pc.session(f"alone{n}") for n in range(3)]
        alone = [pc.chat(opening(n), session=s, max_tokens=24, top_logprobs=5).result()
                 for n, s in enumerate(sessions)]
        alone_next = [pc.chat(follow_up(n, alone[n].text), session=s, max_tokens=12, top_logprobs=5).result()
                      for n, s in enumerate(sessions)]
        pc.clear_store()
        sessions = [pc.session(f"batched{n}") for n in range(3)]
        with pc.batch(parallel=3) as batch:
            first = [batch.admit(pc.chat(opening(n), session=s, max_tokens=24, top_logprobs=5))
                     for n, s in enumerate(sessions)]
            while batch.active:
                batch.step()
            second = [batch.admit(pc.chat(follow_up(n, alone[n].text), session=s, max_tokens=12, top_logprobs=5))
                      for n, s in enumerate(sessions)]
            while batch.active:
                batch.step()
            assert batch.batched_tokens > 0
    batched = [t.result for t in first if t is not None]
    batched_next = [t.result for t in second if t is not None]
    assert len(batched) == len(batched_next) == 3 and all(r is not None for r in batched + batched_next)
    assert min(r.prompt_tokens for r in alone) > N_SWA  # every lane's tokens attend through a full window
    assert_answers_close(alone, batched)  # up to rounding (greedy.py)
    assert_answers_close(alone_next, batched_next)
