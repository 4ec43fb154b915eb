"""Write a GGUF model with a real model's exact tensor shapes and random weights, for timing llama.cpp.

    python bench/random_gguf.py donor --from MODEL.gguf --out tok.gguf       # once, where a real model exists
    python bench/random_gguf.py write --shape llama3.1-8b --tokenizer tok.gguf --out model.gguf [--dtype f16]
    python bench/random_gguf.py shapes                                        # the presets and their sizes

Why random weights are fine for timing: a transformer's forward pass is a fixed sequence of dense matmuls, norms,
RoPE, softmax and element-wise ops whose cost depends only on the tensor shapes, the weight type (f16, q8_0, ...), the
number of tokens and the context length, never on the weight values (GPU and CPU kernels have no value-dependent
branches or sparsity shortcuts). Prefill time, decode time, KV-cache size and the size of a saved sequence state are
therefore those of the real model. What random weights do not give is meaningful text: the generated tokens are
garbage, and anything that depends on *which* token comes out (stopping at end-of-generation, output lengths) must be
fixed by the benchmark (e.g. a fixed number of generated tokens), not left to the model.

Speed: an 8B-shaped f16 file is 16 GB. Drawing 8G random numbers would take minutes, so one pool of random values
(32 MiB by default, normal(0, 0.02), no NaN/inf, f16 subnormals flushed to zero) is drawn once and every weight
tensor is written by tiling that pool from a random offset, straight to disk, one tensor at a time: memory use is
the pool plus GGUF metadata, and the write runs at disk speed. Norm weights are ~1.0 and biases small, both f32
(1-D tensors are always f32, as in converted models). Block-quantized weight types (q8_0, q4_0, q4_k, q6_k) tile a
pool of valid blocks (finite f16 scales, random quants), so a quantized model's timing can be measured too.

The vocabulary comes from a *tokenizer donor*: a small GGUF that holds only the ``tokenizer.*`` key-values of a real
model (no tensors; a few MB), made once with ``donor`` where the real model exists and copied to the machine that
times. The random model's vocabulary size is the donor's, whatever the preset: ``llama3.1-8b`` written with the
Qwen2.5 donor has 151936 tokens instead of Llama 3's 128256. That only changes the embedding lookup (a row gather,
independent of the vocabulary size) and the output matmul, which llama.cpp computes only for the tokens whose logits
are requested (the last one of a prefill): 2 x 4096 x 23680 = 0.19 GFLOP and 194 MB (f16) of extra weights read per
sampled token, about 1.2% of one decode step (16 GFLOP, 16 GB), and 1/N of that over an N-token prefill.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    MODEL_TENSORS,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

TOKENIZER_PREFIX = "tokenizer."
DEFAULT_POOL_BYTES = 32 * 1024 * 1024
WEIGHT_STD = 0.02  # a typical initializer scale; keeps activations of a random network finite


# -- shapes ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's RoPE frequency scaling, written as the ``rope_freqs`` tensor (as convert_hf_to_gguf.py does)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True)
class Shape:
    """The hyperparameters that fix a decoder's tensor shapes (the vocabulary size comes from the tokenizer donor)."""

    arch: str  # a llama.cpp architecture name that this module knows the tensors of: "qwen2" or "llama"
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int
    rope_freq_base: float
    rms_eps: float
    qkv_bias: bool = False  # attn_q/k/v biases (Qwen2)
    tied_embeddings: bool = False  # no output.weight: llama.cpp uses token_embd for the output matmul
    head_dim: int = 0  # 0: n_embd // n_head
    llama3_rope: Llama3Rope | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; known: {sorted(_ARCHS)}")
        for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) is not a multiple of n_head ({self.n_head}); give head_dim")

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


# Architectures whose tensors tensor_specs() knows; both are plain pre-norm decoders (RMSNorm, SwiGLU FFN, RoPE).
_ARCHS: dict[str, MODEL_ARCH] = {MODEL_ARCH_NAMES[a]: a for a in (MODEL_ARCH.QWEN2, MODEL_ARCH.LLAMA)}

SHAPES: dict[str, Shape] = {
    # Qwen/Qwen2.5-1.5B(-Instruct, -Coder) config.json: tie_word_embeddings true, q/k/v biases.
    "qwen2.5-1.5b": Shape(
        arch="qwen2", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960, context_length=32768,
        rope_freq_base=1_000_000.0, rms_eps=1e-6, qkv_bias=True, tied_embeddings=True,
        description="Qwen2.5 1.5B (1.54e9 parameters with the 151936-token Qwen vocabulary)",
    ),
    # meta-llama/Llama-3.1-8B config.json (rope_scaling "llama3": factor 8, low 1, high 4, original 8192).
    "llama3.1-8b": Shape(
        arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, context_length=131072,
        rope_freq_base=500_000.0, rms_eps=1e-5, llama3_rope=Llama3Rope(),
        description="Llama 3.1 8B (8.03e9 parameters with its own 128256 tokens; 8.22e9 with a 151936 vocabulary)",
    ),
    # A few MB with a small donor vocabulary: for tests.
    "tiny": Shape(
        arch="qwen2", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, context_length=2048,
        rope_freq_base=1_000_000.0, rms_eps=1e-6, qkv_bias=True, tied_embeddings=True,
        description="a 2-layer qwen2 for tests",
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its GGUF name, its shape in numpy order (reversed ggml ``ne``) and what it holds."""

    name: str
    shape: tuple[int, ...]
    role: str  # "weight" (2-D, the chosen weight type), "norm" (~1.0, f32), "bias" (small, f32), "rope_freqs" (f32)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def tensor_specs(shape: Shape, n_vocab: int) -> list[TensorSpec]:
    """Every tensor llama.cpp loads for ``shape``, named as in gguf.constants (what llama.cpp looks up)."""
    arch = _ARCHS[shape.arch]
    allowed = MODEL_TENSORS[arch]
    d, hd = shape.n_embd, shape.n_embd_head
    n_q, n_kv = shape.n_head * hd, shape.n_head_kv * hd

    def spec(kind: MODEL_TENSOR, suffix: str, dims: tuple[int, ...], role: str, bid: int | None = None) -> TensorSpec:
        if kind not in allowed:
            raise ValueError(f"{kind.name} is not a tensor of {shape.arch} in gguf.constants")
        base = TENSOR_NAMES[kind].format(bid=bid) if bid is not None else TENSOR_NAMES[kind]
        return TensorSpec(f"{base}.{suffix}", dims, role)

    specs = [spec(MODEL_TENSOR.TOKEN_EMBD, "weight", (n_vocab, d), "weight")]
    if shape.llama3_rope is not None:
        specs.append(spec(MODEL_TENSOR.ROPE_FREQS, "weight", (hd // 2,), "rope_freqs"))
    for i in range(shape.n_layer):
        specs.append(spec(MODEL_TENSOR.ATTN_NORM, "weight", (d,), "norm", i))
        # numpy (out, in) = ggml ne (in, out): llama.cpp's create_tensor({n_embd, n_embd_head * n_head}) etc.
        specs.append(spec(MODEL_TENSOR.ATTN_Q, "weight", (n_q, d), "weight", i))
        specs.append(spec(MODEL_TENSOR.ATTN_K, "weight", (n_kv, d), "weight", i))
        specs.append(spec(MODEL_TENSOR.ATTN_V, "weight", (n_kv, d), "weight", i))
        if shape.qkv_bias:
            specs.append(spec(MODEL_TENSOR.ATTN_Q, "bias", (n_q,), "bias", i))
            specs.append(spec(MODEL_TENSOR.ATTN_K, "bias", (n_kv,), "bias", i))
            specs.append(spec(MODEL_TENSOR.ATTN_V, "bias", (n_kv,), "bias", i))
        specs.append(spec(MODEL_TENSOR.ATTN_OUT, "weight", (d, n_q), "weight", i))
        specs.append(spec(MODEL_TENSOR.FFN_NORM, "weight", (d,), "norm", i))
        specs.append(spec(MODEL_TENSOR.FFN_GATE, "weight", (shape.n_ff, d), "weight", i))
        specs.append(spec(MODEL_TENSOR.FFN_UP, "weight", (shape.n_ff, d), "weight", i))
        specs.append(spec(MODEL_TENSOR.FFN_DOWN, "weight", (d, shape.n_ff), "weight", i))
    specs.append(spec(MODEL_TENSOR.OUTPUT_NORM, "weight", (d,), "norm"))
    if not shape.tied_embeddings:
        specs.append(spec(MODEL_TENSOR.OUTPUT, "weight", (n_vocab, d), "weight"))
    return specs


def parameter_count(shape: Shape, n_vocab: int) -> int:
    """Parameters of ``shape`` with an ``n_vocab`` vocabulary (embeddings included; rope_freqs is not a parameter)."""
    return sum(t.n_elements for t in tensor_specs(shape, n_vocab) if t.role != "rope_freqs")


def _llama3_rope_factors(shape: Shape) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE, as convert_hf_to_gguf.py computes them."""
    rope = shape.llama3_rope
    assert rope is not None
    hd = shape.n_embd_head
    freqs = 1.0 / (shape.rope_freq_base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    low_wavelen = rope.original_context_length / rope.low_freq_factor
    high_wavelen = rope.original_context_length / rope.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope.factor)
        else:
            smooth = (rope.original_context_length / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / rope.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# -- weight types ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightType:
    ggml: GGMLQuantizationType
    file_type: LlamaFileType

    @property
    def block_size(self) -> int:  # elements per block (1 for f16/f32)
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def type_size(self) -> int:  # bytes per block
        return GGML_QUANT_SIZES[self.ggml][1]

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


WEIGHT_TYPES: dict[str, WeightType] = {
    "f16": WeightType(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "f32": WeightType(GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "q8_0": WeightType(GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": WeightType(GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k": WeightType(GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q6_k": WeightType(GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}


def _f16_field(blocks: np.ndarray, offset: int, values: np.ndarray) -> None:
    """Write f16 ``values`` (one per block) at byte ``offset`` of every block."""
    blocks[:, offset : offset + 2] = values.astype("<f2").view(np.uint8).reshape(-1, 2)


def make_pool(wtype: WeightType, pool_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """About ``pool_bytes`` of valid random weights of ``wtype`` (whole blocks), as a flat uint8 array.

    f16/f32: normal(0, 0.02) values, f16 subnormals flushed to zero. Block types: random quants with finite, normal
    f16 scales chosen so that the dequantized weights have a spread of about 0.02 too (layouts from ggml-common.h).
    """
    n_blocks = max(1, pool_bytes // wtype.type_size)
    if wtype.ggml in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
        values = rng.standard_normal(n_blocks, dtype=np.float32) * np.float32(WEIGHT_STD)
        if wtype.ggml == GGMLQuantizationType.F16:
            values = values.astype(np.float16)
            values[np.abs(values) < np.finfo(np.float16).tiny] = 0
        assert np.isfinite(values).all()
        return values.view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, wtype.type_size), dtype=np.uint8)

    def scales(std_of_quant_product: float) -> np.ndarray:
        return WEIGHT_STD / std_of_quant_product * rng.uniform(0.5, 1.5, n_blocks)

    if wtype.ggml == GGMLQuantizationType.Q8_0:  # d, qs[32] int8: w = d * q
        _f16_field(blocks, 0, scales(74.0))
    elif wtype.ggml == GGMLQuantizationType.Q4_0:  # d, qs[16] nibbles: w = d * (q - 8)
        _f16_field(blocks, 0, scales(4.6))
    elif wtype.ggml == GGMLQuantizationType.Q4_K:  # d, dmin, scales[12] (6-bit sc, m), qs[128]: w = d*sc*q - dmin*m
        d = scales(31.5 * 4.6)
        _f16_field(blocks, 0, d)
        _f16_field(blocks, 2, d * 7.5)  # centres the weights: mean d*sc*q = d*31.5*7.5, mean dmin*m = dmin*31.5
    elif wtype.ggml == GGMLQuantizationType.Q6_K:  # ql[128], qh[64], scales[16] int8, d: w = d * sc * (q - 32)
        blocks[:, 192:208] = rng.integers(1, 9, size=(n_blocks, 16), dtype=np.uint8)  # small positive scales
        _f16_field(blocks, 208, scales(4.5 * 18.5))
    else:
        raise ValueError(f"no block layout for {wtype.ggml.name}")
    return blocks.reshape(-1)


class _TiledTensor:
    """``nbytes`` bytes made by tiling a pool from a start offset; written with ``tofile`` in pool-sized writes.

    Quacks like the numpy array that GGUFWriter.write_tensor_data expects (it uses ``nbytes`` and ``tofile``), so the
    writer keeps its bookkeeping (tensor order, sizes, alignment padding) while nothing tensor-sized is allocated.
    """

    def __init__(self, pool: memoryview, nbytes: int, start: int) -> None:
        self.pool = pool
        self.nbytes = nbytes
        self.start = start

    def tofile(self, fp: IO[bytes]) -> None:
        remaining, pos = self.nbytes, self.start
        while remaining:
            n = min(remaining, len(self.pool) - pos)
            fp.write(self.pool[pos : pos + n])
            remaining -= n
            pos = 0


# -- tokenizer donor ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyValue:
    """A GGUF key-value with its exact types, ready for GGUFWriter.add_key_value."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def _field_to_kv(name: str, field: Any) -> KeyValue | None:
    """A GGUFReader field as a KeyValue (strings as raw bytes, never re-encoded); None for an empty array."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if len(field.types) == 1:  # empty array: its element type is not even recorded; GGUFWriter refuses them
            return None
        if len(field.types) != 2:
            raise ValueError(f"{name}: nested arrays are not supported")
        sub = field.types[1]
        if sub == GGUFValueType.STRING:
            items: list[Any] = [bytes(field.parts[i]) for i in field.data]
        else:
            items = np.concatenate([field.parts[i] for i in field.data]).tolist()
        return KeyValue(name, items, main, sub)
    if main == GGUFValueType.STRING:
        return KeyValue(name, bytes(field.parts[field.data[0]]), main)
    return KeyValue(name, field.parts[field.data[0]].tolist()[0], main)


def read_tokenizer(path: str | Path, reader: GGUFReader | None = None) -> list[KeyValue]:
    """The ``tokenizer.*`` key-values of a GGUF file (a real model or a donor made by ``extract_tokenizer``)."""
    reader = reader or GGUFReader(Path(path))
    kvs = [_field_to_kv(name, f) for name, f in reader.fields.items() if name.startswith(TOKENIZER_PREFIX)]
    out = [kv for kv in kvs if kv is not None]
    if not any(kv.key == "tokenizer.ggml.tokens" for kv in out):
        raise ValueError(f"{path} has no tokenizer.ggml.tokens: not a model or tokenizer donor with a vocabulary")
    return out


def vocab_size(kvs: Sequence[KeyValue]) -> int:
    return next(len(kv.value) for kv in kvs if kv.key == "tokenizer.ggml.tokens")


def _add_kvs(writer: GGUFWriter, kvs: Sequence[KeyValue]) -> None:
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)


def extract_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Write a tokenizer donor: a GGUF with ``src``'s ``tokenizer.*`` key-values and no tensors. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    reader = GGUFReader(src)
    kvs = read_tokenizer(src, reader)
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else "llama"
    partial = dst.with_name(dst.name + ".partial")
    writer = GGUFWriter(partial, arch)
    writer.add_name(f"tokenizer donor from {src.name}")
    writer.add_description("tokenizer.* key-values only, no tensors (pccpu bench/random_gguf.py)")
    _add_kvs(writer, kvs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    os.replace(partial, dst)
    return dst


# -- the random model --------------------------------------------------------------------------------------------------
def _small_tensor(spec: TensorSpec, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    if spec.role == "norm":
        return (1.0 + WEIGHT_STD * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.role == "bias":
        return (WEIGHT_STD * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.role == "rope_freqs":
        return _llama3_rope_factors(shape)
    raise ValueError(f"{spec.name}: {spec.role} is not a small tensor")


def write_random_model(
    shape: str | Shape,
    tokenizer: str | Path,
    out: str | Path,
    dtype: str = "f16",
    seed: int = 0,
    *,
    pool_bytes: int = DEFAULT_POOL_BYTES,
) -> Path:
    """Write a GGUF with ``shape``'s tensors (random weights of ``dtype``) and ``tokenizer``'s vocabulary.

    ``shape``: a name in SHAPES or a Shape. ``tokenizer``: a donor from extract_tokenizer, or any GGUF model with a
    vocabulary. The file is streamed tensor by tensor into ``out`` + ".partial" and renamed when complete.
    """
    shape_name = shape if isinstance(shape, str) else "custom"
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if dtype not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {dtype!r}; known: {sorted(WEIGHT_TYPES)}")
    wtype = WEIGHT_TYPES[dtype]
    out = Path(out)
    for t in tensor_specs(shape, n_vocab=1):  # row lengths do not depend on the vocabulary: check before reading it
        if t.role == "weight" and t.shape[-1] % wtype.block_size:
            raise ValueError(f"{t.name}: rows of {t.shape[-1]} are not a multiple of {dtype}'s {wtype.block_size}")
    kvs = read_tokenizer(tokenizer)
    n_vocab = vocab_size(kvs)
    specs = tensor_specs(shape, n_vocab)

    partial = out.with_name(out.name + ".partial")
    writer = GGUFWriter(partial, shape.arch)
    writer.add_name(f"random {shape_name} ({dtype})")
    writer.add_description(
        f"random weights with the tensor shapes of {shape_name}, for timing only (pccpu bench/random_gguf.py, "
        f"seed {seed}); vocabulary from {Path(tokenizer).name}"
    )
    writer.add_file_type(int(wtype.file_type))
    if wtype.block_size > 1:
        writer.add_quantization_version(2)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_rope_dimension_count(shape.n_embd_head)
    if shape.head_dim:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(n_vocab)
    _add_kvs(writer, kvs)

    for t in specs:
        if t.role == "weight":
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), wtype.nbytes(t.n_elements), wtype.ggml)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 4 * t.n_elements)

    rng = np.random.default_rng(seed)
    pool = make_pool(wtype, pool_bytes, rng)
    pool_view = memoryview(pool).cast("B")
    n_pool_blocks = len(pool) // wtype.type_size
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in specs:
            if t.role == "weight":
                start = int(rng.integers(0, n_pool_blocks)) * wtype.type_size
                data: Any = _TiledTensor(pool_view, wtype.nbytes(t.n_elements), start)
            else:
                data = _small_tensor(t, shape, rng)
            writer.write_tensor_data(data)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, out)
    return out


# -- command line ------------------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_donor = sub.add_parser("donor", help="extract the tokenizer.* key-values of a GGUF model into a small GGUF")
    p_donor.add_argument("--from", dest="src", type=Path, required=True, help="a GGUF model with a vocabulary")
    p_donor.add_argument("--out", type=Path, required=True)
    p_write = sub.add_parser("write", help="write a random model of a preset shape")
    p_write.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p_write.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer donor (or any GGUF model)")
    p_write.add_argument("--out", type=Path, required=True)
    p_write.add_argument("--dtype", default="f16", choices=sorted(WEIGHT_TYPES), help="type of 2-D weights")
    p_write.add_argument("--seed", type=int, default=0)
    p_shapes = sub.add_parser("shapes", help="list the preset shapes with their parameter counts")
    p_shapes.add_argument("--vocab", type=int, default=151936, help="vocabulary size to count with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    if args.command == "donor":
        path = extract_tokenizer(args.src, args.out)
        n = vocab_size(read_tokenizer(path))
        print(f"{path}: {_size(path.stat().st_size)}, {n} tokens, {time.perf_counter() - t0:.1f} s")
    elif args.command == "write":
        path = write_random_model(args.shape, args.tokenizer, args.out, dtype=args.dtype, seed=args.seed)
        print(f"{path}: {_size(path.stat().st_size)} in {time.perf_counter() - t0:.1f} s")
    else:
        for name, shape in SHAPES.items():
            n = parameter_count(shape, args.vocab)
            print(f"{name:14s} {shape.arch:6s} {n / 1e9:6.3f}e9 params  f16 {_size(2 * n):>9s}  {shape.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
