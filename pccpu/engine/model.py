"""A loaded GGUF model: tokenizer, metadata and a stable fingerprint. One object per ``llama_model``."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pccpu.engine._lib import lib
from pccpu.errors import ConfigError, InvalidArgumentError, ModelError, UnsupportedModelError
from pccpu.fingerprint import GGUF_MAGIC, file_sha256_cached, read_magic

logger = logging.getLogger(__name__)

ALL_LAYERS = -1  # n_gpu_layers: offload every layer


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, ...) that layers can be offloaded to."""
    return bool(lib().llama_supports_gpu_offload())


def parse_gpu_layers(value: str | int) -> int:
    """``all``, ``none`` or a count of layers, as given on a command line, to an ``n_gpu_layers`` value.

    >>> parse_gpu_layers("all"), parse_gpu_layers("none"), parse_gpu_layers("12")
    (-1, 0, 12)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return ALL_LAYERS if value.strip().lower() == "all" else 0
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        number = int(value)
    else:
        raise InvalidArgumentError(f"GPU layers must be 'all', 'none' or a number of layers, got {value!r}")
    if number < ALL_LAYERS:
        raise InvalidArgumentError(f"GPU layers must be 'all', 'none' or a number >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class ModelInfo:
    """What pccpu needs to know about a model's shape (read from the loaded model)."""

    architecture: str
    n_ctx_train: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_swa: int  # sliding-window size; 0 when every layer attends to the whole context
    size_bytes: int
    n_params: int

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """Theoretical KV size of one token: layers x KV heads x (K dim + V dim) x bytes per element."""
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * bytes_per_element


class LlamaModel:
    """Loads a GGUF file once; contexts are created from it (see ``LlamaContext``).

    Free contexts before their model: ``close()`` here refuses while contexts are still open.
    """

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0, use_mmap: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        _check_gguf_file(self.path)
        n_gpu_layers = parse_gpu_layers(n_gpu_layers)
        if n_gpu_layers != 0 and not gpu_offload_supported():
            raise ConfigError(
                f"n_gpu_layers={n_gpu_layers} asks for GPU offload, but this llama.cpp build has no GPU backend. "
                "Install the CUDA build (PCCPU_BACKEND=cuda bash scripts/setup.sh, see the README) or use "
                "n_gpu_layers=0"
            )
        self.n_gpu_layers = n_gpu_layers
        llama_cpp = lib()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        logger.info("loading model %s", self.path)
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise UnsupportedModelError(
                f"llama.cpp could not load {self.path}: the file is damaged or its architecture is not supported "
                "by this llama.cpp build (run with --verbose to see llama.cpp's reason)"
            )
        self._handle = handle
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self._open_contexts = 0
        self._lock = threading.Lock()
        self.info = self._read_info()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_token = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_token = int(llama_cpp.llama_vocab_eos(self._vocab))
        self._fingerprint: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise InvalidArgumentError("this model was closed; load it again")
        return self._handle

    def _context_opened(self) -> None:
        with self._lock:
            self._open_contexts += 1

    def _context_closed(self) -> None:
        with self._lock:
            self._open_contexts -= 1

    def close(self) -> None:
        if self._handle is None:
            return
        if self._open_contexts:
            raise InvalidArgumentError(f"close the model's {self._open_contexts} open context(s) before the model")
        lib().llama_model_free(self._handle)
        self._handle = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata --------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        llama_cpp = lib()
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    @property
    def placement(self) -> str:
        """Where the model's layers run: ``cpu``, or ``gpu:N`` with N offloaded layers (``gpu:all``)."""
        if self.n_gpu_layers == 0:
            return "cpu"
        offloaded = self.n_gpu_layers if 0 < self.n_gpu_layers <= self.info.n_layer else "all"
        return f"gpu:{offloaded}"

    @property
    def chat_template(self) -> str | None:
        raw = lib().llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8") if raw else None

    def _read_info(self) -> ModelInfo:
        llama_cpp = lib()
        h = self._handle
        arch = self.meta("general.architecture") or "unknown"
        n_embd = llama_cpp.llama_model_n_embd(h)
        n_head = llama_cpp.llama_model_n_head(h)
        default_dim = n_embd // n_head if n_head else 0
        key_len = self.meta(f"{arch}.attention.key_length")
        value_len = self.meta(f"{arch}.attention.value_length")
        if llama_cpp.llama_model_has_encoder(h) or llama_cpp.llama_model_is_recurrent(h):
            raise UnsupportedModelError(
                f"{self.path.name} ({arch}) is an encoder-decoder or recurrent model; pccpu caches attention KV of "
                "decoder-only transformers"
            )
        return ModelInfo(
            architecture=arch,
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(h),
            n_layer=llama_cpp.llama_model_n_layer(h),
            n_head=n_head,
            n_head_kv=llama_cpp.llama_model_n_head_kv(h),
            n_embd=n_embd,
            head_dim_k=int(key_len) if key_len else default_dim,
            head_dim_v=int(value_len) if value_len else default_dim,
            n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab),
            n_swa=llama_cpp.llama_model_n_swa(h),
            size_bytes=llama_cpp.llama_model_size(h),
            n_params=llama_cpp.llama_model_n_params(h),
        )

    # -- tokenizer -------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Text to token ids. Special tokens written in the text (``<|im_start|>``) are parsed by default."""
        llama_cpp = lib()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos, parse_special)
            if n < 0:
                raise InvalidArgumentError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(tokens[:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character: join bytes before decoding)."""
        self._check_token(token)
        llama_cpp = lib()
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lib().llama_vocab_is_eog(self._vocab, token))

    def _check_token(self, token: int) -> None:
        if not 0 <= token < self.info.n_vocab:
            raise InvalidArgumentError(
                f"token id {token} is outside this model's vocabulary (0..{self.info.n_vocab - 1})"
            )

    # -- identity --------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the model file: stable across runs, different as soon as the file changes.

        Hashing a 1 GB file takes about a second, so the digest is remembered per (path, size, mtime, inode).
        """
        if self._fingerprint is None:
            self._fingerprint = file_sha256_cached(self.path)
        return self._fingerprint


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model file not found: {path} (give a registry name such as 'smollm2' or a .gguf path)")
    try:
        magic = read_magic(path)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise UnsupportedModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
