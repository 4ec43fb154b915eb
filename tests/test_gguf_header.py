"""Tests of pccpu.engine.gguf_header against files written by the ``gguf`` package, and damaged or hostile files."""

from __future__ import annotations

import contextlib
import math
import struct
from pathlib import Path

import gguf  # the test extra: pip install -e '.[test]'
import numpy as np
import pytest

from pccpu.engine.gguf_header import (
    GgufInfo,
    read_gguf_header,
    read_gguf_metadata,
)
from pccpu.errors import ModelError, UnsupportedModelError

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "héllo", "wörld"]


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    endian: object = None,
    tensors: bool = True,
    extra: dict[str, object] | None = None,
) -> Path:
    """A small but complete GGUF file with every value type and one tensor."""
    kwargs = {"endianess": endian} if endian is not None else {}
    w = gguf.GGUFWriter(str(path), arch, **kwargs)
    w.add_name("Tiny Test Model")
    w.add_context_length(4096)
    w.add_block_count(6)
    w.add_embedding_length(256)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_sliding_window(512)
    w.add_chat_template(TEMPLATE)
    w.add_token_list(TOKENS)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_uint8("test.u8", 255)
    w.add_int8("test.i8", -128)
    w.add_uint16("test.u16", 65535)
    w.add_int16("test.i16", -32768)
    w.add_uint32("test.u32", 4294967295)
    w.add_int32("test.i32", -2147483648)
    w.add_float32("test.f32", 1.5)
    w.add_uint64("test.u64", 2**64 - 1)
    w.add_int64("test.i64", -(2**63))
    w.add_float64("test.f64", math.pi)
    w.add_bool("test.true", True)
    w.add_bool("test.false", False)
    w.add_string("test.unicode", "snowman ☃ and emoji 🦙")
    w.add_array("test.ints", [1, 2, 3, -4])
    w.add_array("test.floats", [0.5, 0.25])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    for key, value in (extra or {}).items():
        w.add_string(key, str(value))
    if tensors:
        w.add_tensor("blk.0.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


def test_reads_every_value_type(model: Path) -> None:
    md = read_gguf_metadata(model)
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "Tiny Test Model"
    assert md["llama.context_length"] == 4096
    assert md["test.u8"] == 255
    assert md["test.i8"] == -128
    assert md["test.u16"] == 65535
    assert md["test.i16"] == -32768
    assert md["test.u32"] == 4294967295
    assert md["test.i32"] == -2147483648
    assert md["test.f32"] == 1.5
    assert md["test.u64"] == 2**64 - 1
    assert md["test.i64"] == -(2**63)
    assert md["test.f64"] == math.pi
    assert md["test.true"] is True and md["test.false"] is False
    assert md["test.unicode"] == "snowman ☃ and emoji 🦙"
    assert md["test.ints"] == [1, 2, 3, -4]
    assert md["test.floats"] == [0.5, 0.25]
    assert md["test.bools"] == [True, False, True]
    assert md["test.nested"] == [[1, 2], [3]]
    assert md["tokenizer.ggml.tokens"] == TOKENS
    assert md["tokenizer.chat_template"] == TEMPLATE


def test_matches_gguf_reader(model: Path) -> None:
    """Every key the gguf package's own reader sees, with the same scalar/string values."""
    ref = gguf.GGUFReader(str(model))
    md = read_gguf_metadata(model)
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(md) == ref_keys
    for key in ref_keys:
        field = ref.fields[key]
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            assert md[key] == bytes(field.parts[field.data[0]]).decode("utf-8")


def test_header_fields_and_info(model: Path) -> None:
    h = read_gguf_header(model)
    assert h.version == 3
    assert h.tensor_count == 1
    assert h.byte_order == "<"
    assert 24 < h.metadata_end < model.stat().st_size
    info = GgufInfo.from_path(model)
    assert info.architecture == "llama"
    assert info.name == "Tiny Test Model"
    assert info.context_length == 4096
    assert info.block_count == 6
    assert info.embedding_length == 256
    assert info.head_count == 8
    assert info.head_count_kv == 2
    assert info.key_length == 32 and info.value_length == 32
    assert info.sliding_window == 512
    assert info.chat_template == TEMPLATE
    assert info.bos_token == "<|im_start|>" and info.eos_token == "<|im_end|>"
    assert info.metadata["test.u8"] == 255


def test_info_missing_fields_are_none(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = GgufInfo.from_path(tmp_path / "bare.gguf")
    assert info.architecture == "qwen2"
    assert info.chat_template is None and info.context_length is None and info.bos_token is None
    assert info.sliding_window is None and info.key_length is None


def test_info_requires_architecture() -> None:
    with pytest.raises(UnsupportedModelError, match=r"general\.architecture"):
        GgufInfo.from_metadata({"general.name": "x"}, source="m.gguf")


def test_per_layer_head_counts_report_max() -> None:
    info = GgufInfo.from_metadata({"general.architecture": "x", "x.attention.head_count_kv": [2, 4, 1]})
    assert info.head_count_kv == 4


def test_version_2_is_read(model: Path, tmp_path: Path) -> None:
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(data))
    h = read_gguf_header(p)
    assert h.version == 2
    assert h.metadata == read_gguf_metadata(model)


@pytest.mark.parametrize("version", [1, 4, 0x7FFFFFFF])
def test_unsupported_version(model: Path, tmp_path: Path, version: int) -> None:
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", version)
    p = tmp_path / "vx.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match=f"version {version} is not supported"):
        read_gguf_metadata(p)


def test_big_endian_file(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    h = read_gguf_header(p)
    assert h.byte_order == ">"
    assert h.metadata["test.i64"] == -(2**63)
    assert h.metadata["test.f64"] == math.pi
    assert h.metadata["tokenizer.ggml.tokens"] == TOKENS
    assert h.metadata == read_gguf_metadata(write_gguf(tmp_path / "le.gguf"))


def test_file_cut_after_metadata_is_read(model: Path, tmp_path: Path) -> None:
    """The first part of a split model holds the whole header and a piece of the tensor data."""
    end = read_gguf_header(model).metadata_end
    p = tmp_path / "part00"
    p.write_bytes(model.read_bytes()[:end])
    assert read_gguf_metadata(p) == read_gguf_metadata(model)


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 12, 23, 30, -1, -2, -20])
def test_truncated_header(model: Path, tmp_path: Path, cut: int) -> None:
    end = read_gguf_header(model).metadata_end
    size = cut if cut >= 0 else end + cut
    p = tmp_path / "cut.gguf"
    p.write_bytes(model.read_bytes()[:size])
    with pytest.raises(UnsupportedModelError) as exc:
        read_gguf_metadata(p)
    assert str(p) in str(exc.value)
    assert ("file ends" in str(exc.value)) or ("not a GGUF file" in str(exc.value))


@pytest.mark.parametrize(
    "content",
    [b"", b"GGU", b"not a model at all, just some text\n", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"PK\x03\x04" * 10],
)
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(content)
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        read_gguf_metadata(p)


def test_errors_are_model_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"nope")
    with pytest.raises(ModelError):
        read_gguf_metadata(p)


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf_metadata(tmp_path / "absent.gguf")


# ----------------------------------------------------------------------------------------------- hostile files
def _header(kv_count: int, tensor_count: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count)


def _gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "hostile.gguf"
    p.write_bytes(data)
    return p


def test_huge_kv_count(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="key-value count"):
        read_gguf_metadata(_write(tmp_path, _header(2**63)))


def test_huge_tensor_count(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="tensor count"):
        read_gguf_metadata(_write(tmp_path, _header(0, tensor_count=2**62)))


def test_huge_string_length(tmp_path: Path) -> None:
    data = _header(1) + struct.pack("<Q", 2**62) + b"abc"
    with pytest.raises(UnsupportedModelError, match="over the cap"):
        read_gguf_metadata(_write(tmp_path, data))


def test_string_longer_than_file(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<I", 8) + struct.pack("<Q", 1000) + b"short"
    with pytest.raises(UnsupportedModelError, match="file ends"):
        read_gguf_metadata(_write(tmp_path, data))


def test_huge_array_count(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<IIQ", 9, 4, 2**40) + b"\0" * 64
    with pytest.raises(UnsupportedModelError, match="over the cap"):
        read_gguf_metadata(_write(tmp_path, data))


def test_array_count_beyond_file(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<IIQ", 9, 8, 1000) + b"\0" * 64
    with pytest.raises(UnsupportedModelError, match="the file ends before"):
        read_gguf_metadata(_write(tmp_path, data))


def test_max_array_len_is_honoured(model: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.tokens"):
        read_gguf_metadata(model, max_array_len=4)
    assert read_gguf_metadata(model, max_array_len=5)["tokenizer.ggml.tokens"] == TOKENS


def test_max_string_len_is_honoured(model: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="over the cap"):
        read_gguf_metadata(model, max_string_len=len(TEMPLATE.encode()) - 1)


def test_unknown_value_type(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<I", 99) + b"\0" * 16
    with pytest.raises(UnsupportedModelError, match="unknown value type 99"):
        read_gguf_metadata(_write(tmp_path, data))


def test_unknown_array_element_type(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<IIQ", 9, 42, 1) + b"\0" * 16
    with pytest.raises(UnsupportedModelError, match="unknown element type 42"):
        read_gguf_metadata(_write(tmp_path, data))


def test_deeply_nested_arrays(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 50 + b"\0" * 64
    with pytest.raises(UnsupportedModelError, match="nested deeper"):
        read_gguf_metadata(_write(tmp_path, data))


def test_duplicate_key(tmp_path: Path) -> None:
    kv = _gstr("k") + struct.pack("<IB", 0, 1)
    with pytest.raises(UnsupportedModelError, match="duplicate key"):
        read_gguf_metadata(_write(tmp_path, _header(2) + kv + kv))


def test_key_not_utf8(tmp_path: Path) -> None:
    data = _header(1) + _gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1)
    with pytest.raises(UnsupportedModelError, match="UTF-8"):
        read_gguf_metadata(_write(tmp_path, data))


def test_empty_string_and_zero_kv(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<I", 8) + _gstr("")
    assert read_gguf_metadata(_write(tmp_path, data)) == {"k": ""}
    assert read_gguf_metadata(_write(tmp_path, _header(0))) == {}
    empty_array = _header(1) + _gstr("a") + struct.pack("<IIQ", 9, 8, 0)
    assert read_gguf_metadata(_write(tmp_path, empty_array)) == {"a": []}


def test_string_value_not_utf8_is_replaced(tmp_path: Path) -> None:
    data = _header(1) + _gstr("k") + struct.pack("<I", 8) + _gstr(b"ok\xff")
    assert read_gguf_metadata(_write(tmp_path, data)) == {"k": "ok\ufffd"}


def test_random_corruption_only_raises_package_errors(model: Path, tmp_path: Path) -> None:
    """Flip bytes all over the header: the reader returns or raises UnsupportedModelError, nothing else."""
    import random

    rng = random.Random(1234)
    data = model.read_bytes()
    end = read_gguf_header(model).metadata_end
    p = tmp_path / "fuzz.gguf"
    for _ in range(300):
        buf = bytearray(data[:end])
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(4, end)] = rng.randrange(256)
        p.write_bytes(bytes(buf))
        with contextlib.suppress(UnsupportedModelError):
            read_gguf_metadata(p, max_array_len=10_000, max_string_len=100_000)
