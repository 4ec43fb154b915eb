"""bench/random_gguf.py: random-weight models with real shapes load in llama.cpp and keep the donor's tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from pccpu.bench.random_gguf import (
    SHAPES,
    Llama3Rope,
    Shape,
    extract_tokenizer,
    parameter_count,
    read_tokenizer,
    tensor_specs,
    vocab_size,
    write_random_model,
)
from pccpu.engine import ContextSettings, LlamaContext, LlamaModel

QWEN_VOCAB = 151936
TEXT = "<|im_start|>user\nThe quick brown fox, naïve café: 12345 tokens!<|im_end|>"


def test_preset_parameter_counts() -> None:
    # Qwen2.5-1.5B: 1.54e9 published, embeddings included (tied: no separate output matrix)
    assert parameter_count(SHAPES["qwen2.5-1.5b"], QWEN_VOCAB) == pytest.approx(1.54e9, rel=0.05)
    llama = SHAPES["llama3.1-8b"]
    # With its own 128256-token vocabulary the shape is exactly Llama 3.1 8B's published 8,030,261,248 parameters.
    assert parameter_count(llama, 128256) == 8_030_261_248
    # With the Qwen donor's 151936 tokens: per layer q,o 4096x4096, k,v 1024x4096, gate/up/down 3 x 4096x14336, two
    # norms -> 218,112,000 x 32 layers = 6,979,584,000; embeddings + untied output 2 x 151936 x 4096 = 1,244,659,712;
    # output norm 4096: 8,224,247,808, i.e. 8.0e9 + 2.8%.
    expected = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 2 * QWEN_VOCAB * 4096 + 4096
    assert expected == 8_224_247_808
    assert parameter_count(llama, QWEN_VOCAB) == expected
    assert expected == pytest.approx(8.0e9, rel=0.05)


def test_tensor_shapes_follow_llama_cpp_layout() -> None:
    specs = {t.name: t.shape for t in tensor_specs(SHAPES["qwen2.5-1.5b"], QWEN_VOCAB)}
    assert len(specs) == 3 + 28 * 12 - 1  # token_embd, output_norm, (no output: tied) + 12 per layer
    assert specs["token_embd.weight"] == (QWEN_VOCAB, 1536)  # ggml ne (1536, 151936), as in the real file
    assert specs["blk.0.attn_k.weight"] == (256, 1536)
    assert specs["blk.27.ffn_down.weight"] == (1536, 8960)
    assert specs["blk.3.attn_v.bias"] == (256,)
    assert "output.weight" not in specs
    llama = {t.name: t.shape for t in tensor_specs(SHAPES["llama3.1-8b"], QWEN_VOCAB)}
    assert llama["output.weight"] == (QWEN_VOCAB, 4096)
    assert llama["rope_freqs.weight"] == (64,)
    assert "blk.0.attn_q.bias" not in llama


@pytest.fixture(scope="module")
def donor(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_tokenizer(default_model_path, tmp_path_factory.mktemp("donor") / "tok.gguf")


def test_donor_holds_only_the_tokenizer(donor: Path, default_model_path: Path) -> None:
    reader = GGUFReader(donor)
    assert len(reader.tensors) == 0
    assert donor.stat().st_size < 5_000_000
    kvs = read_tokenizer(donor, reader)
    assert kvs == read_tokenizer(default_model_path)  # same keys, types and values
    assert vocab_size(kvs) == 49152
    assert all(name.startswith(("tokenizer.", "general.", "GGUF.")) for name in reader.fields)


def _check_model(path: Path, reference: LlamaModel, shape: Shape) -> None:
    model = LlamaModel(path)
    try:
        info = model.info
        assert (info.architecture, info.n_layer, info.n_embd) == (shape.arch, shape.n_layer, shape.n_embd)
        assert (info.n_head, info.n_head_kv, info.n_vocab) == (shape.n_head, shape.n_head_kv, reference.info.n_vocab)
        # llama.cpp counts every tensor, rope_freqs included (parameter_count leaves it out, as published counts do)
        assert info.n_params == sum(t.n_elements for t in tensor_specs(shape, reference.info.n_vocab))
        assert model.tokenize(TEXT) == reference.tokenize(TEXT)
        assert (model.add_bos, model.bos_token, model.eos_token) == (
            reference.add_bos, reference.bos_token, reference.eos_token,
        )
        settings = ContextSettings(n_ctx=256, n_seq_max=1, n_threads=1, n_threads_batch=1)
        with LlamaContext(model, settings) as ctx:
            logits = ctx.decode(model.tokenize(TEXT), seq_id=0, start=0)
        assert logits is not None
        assert logits.shape == (reference.info.n_vocab,)
        assert np.isfinite(logits).all()
        assert logits.std() > 0
    finally:
        model.close()


def test_tiny_model_loads_and_decodes(donor: Path, default_model: LlamaModel, tmp_path: Path) -> None:
    path = write_random_model("tiny", donor, tmp_path / "tiny.gguf")
    assert path == tmp_path / "tiny.gguf"
    assert not (tmp_path / "tiny.gguf.partial").exists()
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 1
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert abs(float(np.mean(norm.data)) - 1.0) < 0.05
    weight = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert weight.data.dtype == np.float16
    assert np.isfinite(weight.data).all()
    assert 0.01 < float(np.std(weight.data.astype(np.float32))) < 0.04
    _check_model(path, default_model, SHAPES["tiny"])


def test_quantized_llama_with_rope_freqs(donor: Path, default_model: LlamaModel, tmp_path: Path) -> None:
    # rows of 256: the k-quant block; llama arch with Llama 3.1's rope_freqs tensor
    shape = Shape(arch="llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, context_length=4096,
                  rope_freq_base=500_000.0, rms_eps=1e-5, llama3_rope=Llama3Rope())
    _check_model(write_random_model(shape, donor, tmp_path / "q.gguf", dtype="q4_k", seed=1), default_model, shape)


def test_block_type_needs_whole_blocks_per_row(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        write_random_model("tiny", tmp_path / "unread.gguf", tmp_path / "x.gguf", dtype="q4_k")
