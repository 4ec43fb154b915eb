"""The engine layer against the real default model: sequence state, shifts, copies and refused calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pccpu.bench.fidelity import kl_divergence as kl
from pccpu.engine import ContextSettings, LlamaContext, LlamaModel, gpu_offload_supported, parse_gpu_layers
from pccpu.errors import (
    ConfigError,
    ContextOverflowError,
    InvalidArgumentError,
    PccpuError,
    StateError,
    UnsupportedModelError,
)

DOC = (
    "Marta keeps bees on the roof of the old library. Every spring she counts the hives, and this year there "
    "were eleven of them, painted blue and yellow. The honey tastes of lime blossom. "
)


@pytest.fixture
def context(default_model: LlamaModel) -> Iterator[LlamaContext]:
    with LlamaContext(default_model, ContextSettings(n_ctx=1024, n_batch=256, n_ubatch=256, n_seq_max=4)) as ctx:
        yield ctx


def test_restored_state_gives_the_same_logits(context: LlamaContext, default_model: LlamaModel) -> None:
    doc = default_model.tokenize(DOC * 3)
    question = default_model.tokenize(" How many hives?")
    context.decode(doc, seq_id=0, start=0, logits="none")
    blob = context.state_seq_get(0).copy()
    original = context.decode(question, seq_id=0, start=len(doc))
    context.clear()
    context.state_seq_set(2, blob)
    assert (context.seq_pos_min(2), context.seq_pos_max(2)) == (0, len(doc) - 1)
    restored = context.decode(question, seq_id=2, start=len(doc))
    assert original is not None and restored is not None
    assert kl(original, restored) < 1e-6


def test_shifted_module_matches_module_decoded_in_place(context: LlamaContext, default_model: LlamaModel) -> None:
    module = default_model.tokenize(DOC)
    follow = default_model.tokenize(" Bees")
    offset = 300
    context.decode(module, seq_id=0, start=offset, logits="none")
    direct = context.decode(follow, seq_id=0, start=offset + len(module))
    context.decode(module, seq_id=1, start=0, logits="none")
    context.seq_add(1, 0, -1, offset)
    shifted = context.decode(follow, seq_id=1, start=offset + len(module))
    assert direct is not None and shifted is not None
    max_diff = float(np.abs(direct - shifted).max())
    print(f"max |logit difference| after a shift of {offset}: {max_diff:.5f}; KL {kl(direct, shifted):.2e}")
    # llama.cpp's K-shift is not bit-exact: on SmolLM2 (f16 K) we see KL ~3e-3 and max logit
    # differences ~0.6 for any shift, with the same top token. Decoding without a shift is exact (next test).
    assert int(np.argmax(direct)) == int(np.argmax(shifted))
    assert kl(direct, shifted) < 2e-2


def test_copied_module_is_attended_to(context: LlamaContext, default_model: LlamaModel) -> None:
    fact = default_model.tokenize("The secret password is PINEAPPLE. ")
    question = default_model.tokenize("The secret password is")
    context.decode(fact, seq_id=1, start=0, logits="none")
    context.seq_cp(1, 0)
    with_module = context.decode(question, seq_id=0, start=len(fact))
    without_module = context.decode(question, seq_id=2, start=len(fact))
    assert with_module is not None and without_module is not None
    assert kl(with_module, without_module) > 0.1
    pineapple = default_model.tokenize(" PINEAPPLE")[0]
    assert with_module[pineapple] > without_module[pineapple]


def test_decode_refuses_calls_that_would_abort(context: LlamaContext, default_model: LlamaModel) -> None:
    with pytest.raises(InvalidArgumentError, match="seq_id"):
        context.decode([1, 2], seq_id=context.n_seq_max, start=0)
    with pytest.raises(InvalidArgumentError, match="seq_id"):
        context.decode([1, 2], seq_id=-1, start=0)
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        context.decode([1] * 10, seq_id=0, start=context.n_ctx - 5)
    with pytest.raises(ContextOverflowError):
        context.decode([1], seq_id=0, start=-3)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        context.decode([default_model.info.n_vocab + 7], seq_id=0, start=0)
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        context.decode([], seq_id=0, start=0)
    context.decode([1, 2, 3], seq_id=0, start=0, logits="none")
    with pytest.raises(InvalidArgumentError, match="must start at 3"):
        context.decode([4], seq_id=0, start=10)
    with pytest.raises(InvalidArgumentError):
        context.seq_cp(0, 99)
    with pytest.raises(ContextOverflowError):
        context.seq_add(0, 0, -1, -50)
    with pytest.raises(StateError):
        context.state_seq_set(1, b"\x00" * 64)


def test_more_tokens_than_n_batch_are_chunked(context: LlamaContext, default_model: LlamaModel) -> None:
    tokens = default_model.tokenize(DOC * 12)
    assert len(tokens) > context.n_batch
    whole = context.decode(tokens, seq_id=0, start=0)
    context.clear()
    for i in range(0, len(tokens), 100):
        last = context.decode(tokens[i : i + 100], seq_id=0, start=i)
    assert whole is not None and last is not None
    assert kl(whole, last) < 1e-4


def test_failed_decode_leaves_the_sequence_as_it_was(default_model: LlamaModel) -> None:
    with LlamaContext(default_model, ContextSettings(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=2)) as ctx:
        ctx.decode([1] * 200, seq_id=0, start=0, logits="none")
        with pytest.raises(PccpuError):  # only 56 free cells remain for 100 tokens
            ctx.decode([2] * 100, seq_id=1, start=0, logits="none")
        assert ctx.seq_pos_max(1) == -1
        assert ctx.seq_pos_max(0) == 199


def test_state_save_refused_while_a_shift_is_pending(context: LlamaContext) -> None:
    context.decode([1, 2, 3, 4], seq_id=0, start=0, logits="none")
    context.seq_add(0, 0, -1, 10)
    with pytest.raises(StateError, match="shift"):
        context.state_seq_get(0)


def test_settings_are_validated() -> None:
    with pytest.raises(InvalidArgumentError):
        ContextSettings(n_ubatch=1024, n_batch=512)
    with pytest.raises(InvalidArgumentError):
        ContextSettings(type_k="q3_weird")
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        ContextSettings(type_v="q8_0")
    with pytest.raises(InvalidArgumentError):
        ContextSettings(n_seq_max=1000)


def test_not_a_gguf_is_refused_before_llama_cpp(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(UnsupportedModelError, match="not a GGUF"):
        LlamaModel(bogus)


def test_fingerprints_are_stable_and_tokenizer_round_trips(default_model: LlamaModel) -> None:
    assert default_model.fingerprint == default_model.fingerprint
    assert len(default_model.fingerprint) == 64
    a = ContextSettings().state_fingerprint()
    assert a == ContextSettings().state_fingerprint()
    assert a != ContextSettings(flash_attn=True).state_fingerprint()
    text = "Hello, world! <|im_start|>"
    tokens = default_model.tokenize(text)
    assert default_model.detokenize(tokens, special=True) == text
    assert default_model.tokenize("<|im_start|>") == [1]


def test_clear_keeps_the_sequences_asked_for(context: LlamaContext, default_model: LlamaModel) -> None:
    doc = default_model.tokenize(DOC)
    question = default_model.tokenize(" How many hives?")
    context.decode(doc, seq_id=2, start=0, logits="none")
    context.seq_cp(2, 0)
    context.decode(question, seq_id=0, start=len(doc), logits="none")
    context.decode(doc, seq_id=1, start=0, logits="none")
    context.clear(keep=[2])
    assert context.seq_pos_max(0) == -1 and context.seq_pos_max(1) == -1
    assert (context.seq_pos_min(2), context.seq_pos_max(2)) == (0, len(doc) - 1)
    # the kept cells still answer: extend sequence 2 and compare with a fresh decode of the same tokens
    kept = context.decode(question, seq_id=2, start=len(doc))
    context.clear()
    fresh = context.decode([*doc, *question], seq_id=0, start=0)
    assert kept is not None and fresh is not None
    # other batches over other cells: close, not bit-equal (KL 0.02 with AMX kernels on an AVX-512 CPU)
    assert int(np.argmax(kept)) == int(np.argmax(fresh)) and kl(fresh, kept) < 5e-2
    with pytest.raises(InvalidArgumentError):
        context.clear(keep=[99])


@pytest.mark.parametrize(("text", "layers"), [("all", -1), ("none", 0), ("0", 0), ("12", 12), (7, 7)])
def test_parse_gpu_layers(text: str | int, layers: int) -> None:
    assert parse_gpu_layers(text) == layers


@pytest.mark.parametrize("bad", ["some", "-2", "", "1.5", True])
def test_parse_gpu_layers_refuses(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="all"):
        parse_gpu_layers(bad)  # type: ignore[arg-type]


def test_gpu_layers_without_a_gpu_build_is_a_clear_error(default_model_path: Path) -> None:
    if gpu_offload_supported():
        pytest.skip("this build has a GPU backend: tests/test_cuda.py covers offload")
    with pytest.raises(ConfigError, match=r"no GPU backend.*PCCPU_BACKEND=cuda"):
        LlamaModel(default_model_path, n_gpu_layers="all")


def test_placement_is_part_of_the_state_fingerprint() -> None:
    settings = ContextSettings()
    assert settings.state_fingerprint("cpu") != settings.state_fingerprint("gpu:all")
    assert settings.state_fingerprint() == settings.state_fingerprint("cpu")
