"""The fake engine (tests/fake_engine.py): its rules, and one cross-check of them against the real LlamaContext."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fake_engine import CHATML_TEMPLATE, FakeContext, FakeModel

from pccpu.engine.model import ModelInfo
from pccpu.engine.protocols import Context, Model
from pccpu.errors import ContextOverflowError, InvalidArgumentError, NoKvSlotError, PccpuError, StateError

DOC = [5 + (i * 7) % 200 for i in range(40)]  # a "module" of 40 byte tokens
QUESTION = [70, 71, 72, 73, 74]


@pytest.fixture
def model() -> FakeModel:
    return FakeModel(seed=1)


@pytest.fixture
def ctx(model: FakeModel) -> FakeContext:
    return FakeContext(model, n_ctx=128, n_batch=16, n_seq_max=4)


def span(ctx: FakeContext, seq_id: int) -> tuple[int, int]:
    return ctx.seq_pos_min(seq_id), ctx.seq_pos_max(seq_id)


# -- model ---------------------------------------------------------------------------------------------------
def test_tokenizer_is_byte_level_with_chatml_specials(model: FakeModel) -> None:
    assert model.tokenize("hé") == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    assert model.tokenize("<|im_start|>u<|im_end|>") == [259, ord("u") + 3, 260]
    assert model.tokenize("<|im_end|>", parse_special=False) == [ord(c) + 3 for c in "<|im_end|>"]
    assert model.tokenize("a", add_bos=True) == [1, ord("a") + 3]
    text = "<|im_start|>user\nQuelle île ?<|im_end|>\n"
    assert model.detokenize(model.tokenize(text)) == "user\nQuelle île ?\n"
    assert model.detokenize(model.tokenize(text), special=True) == text
    assert model.token_to_piece(260) == b"" and model.token_to_piece(260, special=True) == b"<|im_end|>"
    assert model.token_to_piece(ord("x") + 3) == b"x"
    with pytest.raises(InvalidArgumentError):
        model.token_to_piece(model.info.n_vocab)


def test_model_identity_and_shape() -> None:
    a, b = FakeModel(seed=1), FakeModel(n_vocab=300, seed=2)
    typed: tuple[Model, Context] = (a, FakeContext(a))  # mypy checks that the fakes implement the Protocols
    assert typed[1].n_ctx == 256
    assert isinstance(a.info, ModelInfo) and a.info.n_swa == 0 and a.info.n_vocab == 261 and b.info.n_vocab == 300
    assert a.fingerprint == FakeModel(seed=1).fingerprint != b.fingerprint
    int(a.fingerprint, 16)
    assert (a.placement, a.add_bos, a.bos_token, a.eos_token, a.path.name) == ("cpu", False, 1, 2, "fake.gguf")
    assert a.is_end_of_generation(2) and a.is_end_of_generation(260) and not a.is_end_of_generation(259)
    assert a.chat_template == CHATML_TEMPLATE
    with pytest.raises(InvalidArgumentError):
        FakeModel(n_vocab=100)


def test_chat_template_renders_chatml(model: FakeModel) -> None:
    jinja2 = pytest.importorskip("jinja2")
    assert model.chat_template is not None
    text = jinja2.Template(model.chat_template).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# -- decode --------------------------------------------------------------------------------------------------
def test_decode_returns_logits_like_llama_context(ctx: FakeContext) -> None:
    last = ctx.decode(DOC, seq_id=0, start=0)
    assert last is not None and last.shape == (261,) and last.dtype == np.float32
    every = ctx.decode(QUESTION, seq_id=0, start=40, logits="all")
    assert every is not None and every.shape == (5, 261)
    assert ctx.decode([9], seq_id=0, start=45, logits="none") is None
    assert span(ctx, 0) == (0, 45) and ctx.used_cells() == 46
    assert (ctx.decoded_tokens, ctx.decode_calls) == (46, 3)


def test_logits_depend_on_everything_attended_to(ctx: FakeContext) -> None:
    a = ctx.decode([10, 11, 12], seq_id=0, start=0)
    b = ctx.decode([10, 99, 12], seq_id=1, start=0)
    c = ctx.decode([10, 11, 12], seq_id=2, start=1)  # an empty seq may start anywhere
    d = ctx.decode([10, 11, 12], seq_id=3, start=0)
    assert a is not None and b is not None and c is not None and d is not None
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, d)  # same tokens at the same positions in another sequence
    other = FakeContext(FakeModel(seed=2)).decode([10, 11, 12], seq_id=0, start=0)
    assert other is not None and not np.array_equal(a, other)


def test_batch_split_does_not_change_logits(model: FakeModel) -> None:
    tokens = DOC + QUESTION
    one = FakeContext(model, n_ctx=64, n_batch=64).decode(tokens, seq_id=0, start=0, logits="all")
    split = FakeContext(model, n_ctx=64, n_batch=7)
    parts = [split.decode(tokens[:20], seq_id=0, start=0, logits="all"),
             split.decode(tokens[20:], seq_id=0, start=20, logits="all")]
    assert one is not None and np.array_equal(one, np.concatenate(parts))  # type: ignore[arg-type]
    assert split.decode_calls == 2 and split.decoded_tokens == len(tokens)


@pytest.mark.parametrize(("call", "error"), [
    (lambda c: c.decode([], seq_id=0, start=3), InvalidArgumentError),
    (lambda c: c.decode([261], seq_id=0, start=3), InvalidArgumentError),
    (lambda c: c.decode([-1], seq_id=0, start=3), InvalidArgumentError),
    (lambda c: c.decode([5], seq_id=4, start=0), InvalidArgumentError),
    (lambda c: c.decode([5], seq_id=-1, start=0), InvalidArgumentError),
    (lambda c: c.decode([5], seq_id=0, start=2), InvalidArgumentError),  # seq 0 ends at 2: only 3 extends it
    (lambda c: c.decode([5], seq_id=0, start=5), InvalidArgumentError),
    (lambda c: c.decode([5], seq_id=1, start=128), ContextOverflowError),
    (lambda c: c.decode([5], seq_id=1, start=-1), ContextOverflowError),
    (lambda c: c.decode([5, 6], seq_id=1, start=127), ContextOverflowError),
    (lambda c: c.seq_pos_max(4), InvalidArgumentError),
    (lambda c: c.seq_rm(-2), InvalidArgumentError),
    (lambda c: c.seq_cp(0, 0), InvalidArgumentError),
    (lambda c: c.seq_cp(0, 9), InvalidArgumentError),
    (lambda c: c.seq_add(0, 0, -1, 126), ContextOverflowError),
    (lambda c: c.seq_add(0, 0, -1, -1), ContextOverflowError),
    (lambda c: c.clear(keep=[7]), InvalidArgumentError),
    (lambda c: c.state_seq_get(0, into=np.zeros(64, dtype=np.int32)), InvalidArgumentError),
    (lambda c: c.state_seq_set(0, np.zeros(3, dtype=np.float32)), InvalidArgumentError),
    (lambda c: c.state_seq_set(0, b""), StateError),
])
def test_misuse_raises_llama_context_errors(ctx: FakeContext, call: Callable[[FakeContext], object],
                                            error: type[Exception]) -> None:
    ctx.decode([5, 6, 7], seq_id=0, start=0)
    with pytest.raises(error):
        call(ctx)


def test_no_free_cell_removes_the_calls_tokens(model: FakeModel) -> None:
    ctx = FakeContext(model, n_ctx=16, n_batch=4)
    ctx.decode(list(range(3, 13)), seq_id=0, start=0)
    with pytest.raises(NoKvSlotError):
        ctx.decode(list(range(3, 11)), seq_id=1, start=0)  # the first chunk of 4 fits, the second does not
    assert span(ctx, 1) == (-1, -1) and ctx.used_cells() == 10 and ctx.decoded_tokens == 14
    ctx.decode([3, 4, 5], seq_id=0, start=10)  # seq 0 is untouched and still extends
    assert span(ctx, 0) == (0, 12)


def test_closed_context_refuses_calls(ctx: FakeContext) -> None:
    ctx.close()
    with pytest.raises(InvalidArgumentError):
        ctx.decode([5], seq_id=0, start=0)


# -- sequence operations -------------------------------------------------------------------------------------
def test_seq_cp_shares_cells_and_seq_rm_frees_them(ctx: FakeContext) -> None:
    ctx.decode(DOC, seq_id=0, start=0, logits="none")
    ctx.seq_cp(0, 1, 10, 20)
    assert span(ctx, 1) == (10, 19) and ctx.used_cells() == 40  # zero copy
    ctx.seq_rm(0, 15, -1)
    assert span(ctx, 0) == (0, 14) and ctx.used_cells() == 20  # cells 15..19 are still held by seq 1
    ctx.seq_rm(-1, 12, 17)
    assert span(ctx, 0) == (0, 11) and span(ctx, 1) == (10, 19) and ctx.used_cells() == 15
    ctx.seq_cp(1, 2)
    ctx.seq_rm(1)
    assert span(ctx, 1) == (-1, -1) and span(ctx, 2) == (10, 19) and ctx.used_cells() == 15


def test_copied_module_is_attended_to(ctx: FakeContext) -> None:
    ctx.decode(DOC, seq_id=1, start=0, logits="none")
    ctx.seq_cp(1, 0)
    with_module = ctx.decode(QUESTION, seq_id=0, start=40)
    without = ctx.decode(QUESTION, seq_id=2, start=40)
    assert with_module is not None and without is not None and not np.array_equal(with_module, without)


def test_seq_add_moves_shared_cells_and_blocks_saving(ctx: FakeContext) -> None:
    ctx.decode(DOC[:10], seq_id=0, start=0, logits="none")
    ctx.seq_cp(0, 1, 5, -1)
    ctx.seq_add(1, 0, -1, 20)
    assert span(ctx, 1) == (25, 29) and span(ctx, 0) == (0, 29)  # a position belongs to the cell
    with pytest.raises(StateError):
        ctx.state_seq_get(2)  # pending, as in LlamaContext, for every sequence
    ctx.apply_pending_shift()
    ctx.state_seq_get(1)
    ctx.seq_add(1, 0, 27, -10)  # only positions 25, 26 move
    assert sorted(ctx._pos[i] for i in ctx.cells_of(1)) == [15, 16, 27, 28, 29]
    ctx.decode([5], seq_id=1, start=30)  # a decode applies the shift too
    ctx.state_seq_get(1)
    ctx.seq_add(3, 0, -1, 5)  # an empty sequence: nothing to shift, nothing pending
    ctx.seq_add(1, 0, -1, 0)
    ctx.state_seq_get(1)


def test_shifted_module_differs_and_unshifted_is_exact(model: FakeModel) -> None:
    full = FakeContext(model).decode(DOC + QUESTION, seq_id=0, start=0)
    ctx = FakeContext(model)
    ctx.decode(DOC, seq_id=1, start=0, logits="none")
    ctx.seq_cp(1, 0)
    cached = ctx.decode(QUESTION, seq_id=0, start=40)
    assert full is not None and cached is not None and np.array_equal(full, cached)
    ctx.clear()
    ctx.decode(DOC, seq_id=1, start=10, logits="none")
    ctx.seq_add(1, 0, -1, -10)
    ctx.seq_cp(1, 0)
    shifted = ctx.decode(QUESTION, seq_id=0, start=40)
    assert shifted is not None and not np.array_equal(full, shifted)


def test_shifts_are_summed_and_applied_by_the_next_decode(model: FakeModel) -> None:
    """As llama.cpp (checked on SmolLM2): +10 then -10 before a decode is exact, with a decode between it is not."""
    full = FakeContext(model).decode(DOC + QUESTION, seq_id=0, start=0)
    results = {}
    for mode in ("summed", "applied between"):
        ctx = FakeContext(model)
        ctx.decode(DOC, seq_id=0, start=0, logits="none")
        ctx.seq_add(0, 0, -1, 10)
        if mode == "applied between":
            ctx.apply_pending_shift()
        ctx.seq_add(0, 0, -1, -10)
        results[mode] = ctx.decode(QUESTION, seq_id=0, start=40)
    assert np.array_equal(full, results["summed"])  # type: ignore[arg-type]
    assert not np.array_equal(full, results["applied between"])  # type: ignore[arg-type]
    lazy, eager = FakeContext(model), FakeContext(model)
    for ctx in (lazy, eager):
        ctx.decode(DOC, seq_id=0, start=0, logits="none")
        ctx.seq_add(0, 0, -1, 10)
    eager.apply_pending_shift()
    after = [ctx.decode(QUESTION, seq_id=0, start=50) for ctx in (lazy, eager)]
    assert np.array_equal(after[0], after[1])  # type: ignore[arg-type]  # the decode attends to shifted cells


def test_modules_in_any_cell_order_give_full_prefill_logits(model: FakeModel) -> None:
    full = FakeContext(model).decode(DOC + QUESTION, seq_id=0, start=0, logits="all")
    encoder = FakeContext(model)
    encoder.decode(DOC, seq_id=1, start=0, logits="none")
    encoder.seq_cp(1, 2, 20, -1)
    encoder.seq_rm(1, 20, -1)
    first, second = encoder.state_seq_get(1).copy(), encoder.state_seq_get(2).copy()  # positions 0..19, 20..39
    ctx = FakeContext(model)
    ctx.state_seq_set(2, second)  # cells 0..19 hold positions 20..39
    ctx.state_seq_set(1, first)  # cells 20..39 hold positions 0..19
    ctx.seq_cp(1, 0)
    ctx.seq_cp(2, 0)
    assert [ctx._pos[i] for i in ctx.cells_of(0)] == list(range(20, 40)) + list(range(20))
    tail = ctx.decode(QUESTION, seq_id=0, start=40, logits="all")
    assert full is not None and tail is not None and np.array_equal(full[40:], tail)
    alone = FakeContext(model)
    alone.decode(DOC[20:], seq_id=0, start=20, logits="none")  # the second half encoded without the first
    alone.state_seq_set(1, first)
    alone.seq_cp(1, 0)
    tail = alone.decode(QUESTION, seq_id=0, start=40, logits="all")
    assert tail is not None and not np.array_equal(full[40:], tail)


def test_clear_with_and_without_keep(ctx: FakeContext) -> None:
    for seq in range(3):
        ctx.decode(DOC[:5], seq_id=seq, start=seq, logits="none")
    ctx.seq_cp(0, 3)
    ctx.clear(keep=[1, 3])
    assert [span(ctx, s) for s in range(4)] == [(-1, -1), (1, 5), (-1, -1), (0, 4)]
    assert ctx.used_cells() == 10
    ctx.decode(DOC[:3], seq_id=2, start=0, logits="none")
    assert ctx.cells_of(2) == [10, 11, 12]  # first free cells: the ones seq 2 left
    ctx.clear()
    assert ctx.used_cells() == 0 and all(span(ctx, s) == (-1, -1) for s in range(4))
    ctx.decode(DOC[:3], seq_id=2, start=0, logits="none")
    assert ctx.cells_of(2) == [0, 1, 2]


# -- sequence state ------------------------------------------------------------------------------------------
def test_prompt_cache_property_saved_module_restored_elsewhere(model: FakeModel) -> None:
    """A module saved, restored into another seq of a fresh context and copied in gives full-prefill logits."""
    full = FakeContext(model).decode(DOC + QUESTION, seq_id=0, start=0, logits="all")
    encoder = FakeContext(model)
    encoder.decode(DOC, seq_id=0, start=0, logits="none")
    blob = encoder.state_seq_get(0).copy()
    ctx = FakeContext(model)
    ctx.decode([50, 51], seq_id=3, start=0, logits="none")  # other cells in use: placement does not matter
    ctx.state_seq_set(2, blob)
    assert span(ctx, 2) == (0, 39) and ctx.restored_cells == 40 and ctx.cells_of(2) == list(range(2, 42))
    ctx.seq_cp(2, 1)
    cached = ctx.decode(QUESTION, seq_id=1, start=40, logits="all")
    assert full is not None and cached is not None and np.array_equal(full[40:], cached)
    assert ctx.decoded_tokens == 2 + len(QUESTION)


def test_state_set_replaces_and_reuses_buffers(ctx: FakeContext) -> None:
    ctx.decode(DOC[:10], seq_id=0, start=0, logits="none")
    into = np.zeros(4096, dtype=np.uint8)
    blob = ctx.state_seq_get(0, into=into)
    assert blob.dtype == np.uint8 and np.shares_memory(blob, into)
    assert ctx.state_seq_get(0, into=np.zeros(3, dtype=np.uint8)).nbytes == blob.nbytes  # too small: a new one
    ctx.decode(DOC[:30], seq_id=1, start=50, logits="none")
    ctx.state_seq_set(1, blob.tobytes())
    assert span(ctx, 1) == (0, 9)  # erased first: a restore replaces, never appends
    empty = ctx.state_seq_get(3)
    ctx.state_seq_set(1, empty)
    assert span(ctx, 1) == (-1, -1)


@pytest.mark.parametrize("damage", ["truncated", "magic", "other_model", "too_short"])
def test_bad_states_are_refused(ctx: FakeContext, damage: str) -> None:
    ctx.decode(DOC[:10], seq_id=0, start=0, logits="none")
    blob = ctx.state_seq_get(0).copy()
    if damage == "truncated":
        blob = blob[:-1]
    elif damage == "magic":
        blob[0] ^= 0xFF
    elif damage == "other_model":
        other = FakeContext(FakeModel(seed=9))
        other.decode(DOC[:10], seq_id=0, start=0, logits="none")
        blob = other.state_seq_get(0)
    else:
        blob = blob[:5]
    ctx.decode([5], seq_id=1, start=0)
    with pytest.raises(StateError):
        ctx.state_seq_set(1, blob)
    assert span(ctx, 1) == (-1, -1)  # the destination was erased, as llama.cpp does


def test_state_needs_contiguous_free_cells(model: FakeModel) -> None:
    ctx = FakeContext(model, n_ctx=8, n_batch=8)
    ctx.decode(DOC[:2], seq_id=1, start=0, logits="none")
    blob = ctx.state_seq_get(1)
    ctx.decode(DOC[:6], seq_id=0, start=0, logits="none")
    ctx.seq_rm(1)
    ctx.seq_rm(0, 2, 3)  # free cells: 0, 1 (together) and 4
    ctx.state_seq_set(2, blob)
    assert ctx.cells_of(2) == [0, 1]
    ctx.seq_rm(0, 5, -1)  # free cells: 4, 7 only
    with pytest.raises(StateError):
        ctx.state_seq_set(3, blob)
    small = FakeContext(model, n_ctx=8)
    small.decode([5], seq_id=0, start=7)
    tiny = FakeContext(model, n_ctx=4)
    with pytest.raises(StateError):  # positions this context does not have
        tiny.state_seq_set(0, small.state_seq_get(0))


# -- cross-check with llama.cpp ------------------------------------------------------------------------------
Step = tuple[str, str, list[tuple[int, int]]]  # name, error raised ("" for none), (pos_min, pos_max) of seqs 0..3


def run_script(c: Context) -> list[Step]:
    """The same operations on any Context; what each step raises and leaves."""
    n_ctx = c.n_ctx
    tokens = [3 + (i * 13) % 250 for i in range(n_ctx)]  # byte tokens: valid in both vocabularies
    blob: list[np.ndarray] = []
    seen: list[Step] = []

    def step(name: str, call: Callable[[], object]) -> None:
        error = ""
        try:
            call()
        except PccpuError as exc:
            error = type(exc).__name__
        seen.append((name, error, [(c.seq_pos_min(s), c.seq_pos_max(s)) for s in range(4)]))

    step("decode", lambda: c.decode(tokens[:100], seq_id=0, start=0, logits="none"))
    step("wrong start", lambda: c.decode(tokens[:3], seq_id=0, start=50))
    step("past n_ctx", lambda: c.decode(tokens[:3], seq_id=1, start=n_ctx))
    step("past the end", lambda: c.decode(tokens[:3], seq_id=1, start=n_ctx - 2))
    step("bad seq", lambda: c.decode(tokens[:3], seq_id=4, start=0))
    step("no tokens", lambda: c.decode([], seq_id=1, start=0))
    step("bad token", lambda: c.decode([10**6], seq_id=1, start=0))
    step("seq_cp", lambda: c.seq_cp(0, 1, 10, 60))
    step("seq_rm 1", lambda: c.seq_rm(1, 50, -1))
    step("seq_rm 0", lambda: c.seq_rm(0, 90, -1))
    step("seq_add", lambda: c.seq_add(1, 0, -1, 100))
    step("seq_add overflow", lambda: c.seq_add(1, 0, -1, n_ctx))
    step("get pending", lambda: c.state_seq_get(1))
    step("apply shift", lambda: c.apply_pending_shift())
    step("get", lambda: blob.append(c.state_seq_get(1).copy()))
    step("set", lambda: c.state_seq_set(2, blob[0]))
    step("extend restored", lambda: c.decode(tokens[:5], seq_id=2, start=150))
    step("extend wrong", lambda: c.decode(tokens[:5], seq_id=2, start=150))
    step("clear keep", lambda: c.clear(keep=[2]))
    step("set empty", lambda: c.state_seq_set(0, c.state_seq_get(0)))
    step("no slot", lambda: c.decode(tokens[: n_ctx - 6], seq_id=3, start=0, logits="none"))
    step("set truncated", lambda: c.state_seq_set(3, blob[0][:-4]))
    step("set again", lambda: c.state_seq_set(3, blob[0]))
    step("rm all seqs", lambda: c.seq_rm(-1, 140, -1))
    step("clear", lambda: c.clear())
    return seen


def test_script_on_the_fake() -> None:
    seen = {name: (error, spans) for name, error, spans in run_script(FakeContext(FakeModel(), n_ctx=256))}
    errors = {name: error for name, (error, _) in seen.items() if error}
    assert errors == {
        "wrong start": "InvalidArgumentError", "past n_ctx": "ContextOverflowError",
        "past the end": "ContextOverflowError", "bad seq": "InvalidArgumentError",
        "no tokens": "InvalidArgumentError", "bad token": "InvalidArgumentError",
        "seq_add overflow": "ContextOverflowError", "get pending": "StateError",
        "extend wrong": "InvalidArgumentError", "no slot": "NoKvSlotError", "set truncated": "StateError",
    }
    empty = (-1, -1)
    assert seen["seq_add"][1] == [(0, 149), (110, 149), empty, empty]  # the shared cells moved for seq 0 too
    assert seen["clear keep"][1] == [empty, empty, (110, 154), empty]
    assert seen["no slot"][1] == seen["set truncated"][1] == seen["clear keep"][1]
    assert seen["rm all seqs"][1] == [empty, empty, (110, 139), (110, 139)]
    assert seen["clear"][1] == [empty] * 4


@pytest.mark.slow
def test_fake_matches_llama_context(default_model) -> None:  # type: ignore[no-untyped-def]
    from pccpu.engine import ContextSettings, LlamaContext

    with LlamaContext(default_model, ContextSettings(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=4)) as real:
        expected = run_script(real)
        fake = FakeContext(FakeModel(), n_ctx=real.n_ctx, n_batch=real.n_batch, n_seq_max=real.n_seq_max)
        assert run_script(fake) == expected
