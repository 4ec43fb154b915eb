"""Chats without a schema: every message (and every content part) of an OpenAI-style conversation becomes a module
on its own, stored the first time it is computed and restored when it comes again: in another request, another
session, another process after a restart.

**What context a chat module is encoded with, and where its positions come from.** Nothing is encoded apart: a
chunk's state is the KV the model computed for its tokens where it first appeared, after *every token before it in
that conversation*, at the positions they had there (BOS at 0, then the chunks back to back). Two ways to reuse it:

* ``reuse="exact"`` (the default): the key chains the key of the chunk before it with the chunk's own tokens, so a
  stored chunk is found only after the very same prefix, at the same position: a restored answer is the full
  prefill's, bit for bit where llama.cpp's results do not depend on batch sizes.
* ``reuse="compose"``: the key is the chunk's tokens alone, so a document is found wherever it appears, in any order
  and combination. A chunk found after the same prefix at the same position (its entry records the prefix digest)
  is exact; otherwise it is *composed*: moved to its new start (``seq_add``, which re-rotates K), its first
  ``repair_tokens`` tokens decoded in place after everything before them (boundary repair, ``repair.py``), the
  rest restored as computed elsewhere. Close to full prefill, not equal to it (bench/accuracy.py measures how
  close), and reported as such (``Result.exact``, ``ModuleUse.composed``). A role's opening tag ends the chunk
  before it, so a document part is the same tokens wherever it appears.

**What is stored.** Nothing is encoded on purpose: after a request, the chunks it decoded are copied out of the
request sequence (``seq_cp`` into a save sequence, ``llama_state_seq_get``) and stored, at the cost of a memory
copy. Chunks shorter than ``min_chunk_tokens`` are merged into the next one (a store entry per three-token "ok" is
not worth its lookup), unless a content part is marked with ``cache_control`` (a module of its own, however short).
So a short question travels with the assistant's opening, which is never stored; in compose mode a short piece
before a large one (a short system message before a document) stays a chunk of its own. Chunks the session already
held (a document in the first turn's question, held by the conversation) are stored too, from the held cells, so
they survive a restart. In compose mode a chunk decoded after composed cells is stored without its prefix digest: it
is never taken for exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pccpu.engine.protocols import LogitsMode
from pccpu.errors import EngineError, LayoutOverflowError, OptionError, WindowLostError
from pccpu.roles import Role, RoleTag
from pccpu.service.answering import Prefill
from pccpu.service.result import ModuleUse
from pccpu.service.reuse import TOKEN, CellTrace, common_prefix, matching_cells
from pccpu.service.runtime import Runtime
from pccpu.service.sessions import SessionState
from pccpu.store import EntryKey, EntryMeta, ModuleStore, StoredModule

CHAT_MODE = "chat-prefix"  # part of every exact chat module's key and metadata
COMPOSE_MODE = "chat-compose"  # part of every composable chat module's key and metadata
ChatReuse = Literal["exact", "compose"]
CHAT_REUSE: tuple[str, ...] = ("exact", "compose")
DEFAULT_MIN_CHUNK_TOKENS = 16  # measured: bench/chunk_size.py, docs/results/server-tuning.md
logger = logging.getLogger(__name__)
ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


@dataclass(frozen=True)
class ChatChunk:
    """Consecutive tokens of the conversation stored (or looked up) as one module."""

    label: str  # "message 2", "message 2 part 1"
    tokens: tuple[int, ...]
    start: int
    key: EntryKey | None  # None: never stored (the assistant's opening, and a short last message with it)
    # the chain digest of the conversation up to and including this chunk: in compose mode the key is the
    # chunk's content alone, and this tells whether a stored state was computed after the same prefix
    context: str = ""

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class MessageText:
    """One message's role and text parts; ``marked``: the parts with a ``cache_control`` marker."""

    role: Role
    parts: list[str]
    marked: frozenset[int] = frozenset()


def message_texts(messages: Sequence[Mapping[str, Any]]) -> list[MessageText]:
    """Role and text parts per message, checked: roles system/developer/user/assistant; content a string or a list
    of ``{"type": "text", "text": ...}`` parts. A part with ``cache_control`` (Anthropic's marker, ``{"type":
    "ephemeral"}``) ends a chunk however short it is: it is stored as a module of its own."""
    if not messages:
        raise OptionError("messages must hold at least one message")
    out: list[MessageText] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise OptionError(f"messages[{i}] must be an object with a role and a content")
        role = ROLES.get(str(message.get("role")))
        if role is None:
            raise OptionError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        content = message.get("content")
        marked: set[int] = set()
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list) and content:
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OptionError(f"messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", "
                                      "\"text\": ...}}); images and audio are not supported")
                if "cache_control" in part:
                    marker = part["cache_control"]
                    if not isinstance(marker, Mapping) or marker.get("type") != "ephemeral":
                        raise OptionError(f"messages[{i}].content[{j}].cache_control must be {{\"type\": "
                                          f"\"ephemeral\"}}, got {marker!r}")
                    marked.add(j)
                parts.append(str(part["text"]))
        else:
            raise OptionError(f"messages[{i}].content must be a string or a non-empty list of text parts")
        out.append(MessageText(role, parts, frozenset(marked)))
    return out


def check_reuse(reuse: object) -> ChatReuse:
    if reuse not in CHAT_REUSE:
        raise OptionError(f"reuse must be one of {', '.join(CHAT_REUSE)}, got {reuse!r}")
    return reuse  # type: ignore[return-value]


def build_chunks(messages: Sequence[Mapping[str, Any]], runtime: Runtime, *, seed: str, n_ctx: int,
                 add_generation_prompt: bool = True, min_chunk_tokens: int = DEFAULT_MIN_CHUNK_TOKENS,
                 reuse: ChatReuse = "exact", tokenize: Callable[[str], list[int]] | None = None) -> list[ChatChunk]:
    """The conversation as chunks of tokens at their positions (see the module docstring); ``seed`` starts the key
    chain (namespace, model and engine fingerprints). ``reuse="compose"`` keys each chunk by its own tokens.
    ``tokenize``: the model's tokenizer, or a memo of it (type-ahead builds the same conversation on every
    keystroke)."""
    texts = message_texts(messages)
    tags: list[RoleTag] = []
    if texts[0].role is not Role.SYSTEM:
        tags.append(RoleTag(Role.SYSTEM, "empty"))  # the system block the template writes when there is none
    for message in texts:
        tags += [RoleTag(message.role, "open"), RoleTag(message.role, "close")]
    rendered = runtime.roles.render_tags(tags)
    default_system = texts[0].role is not Role.SYSTEM
    lead = rendered[0] if default_system else ""  # goes before the first message's text
    tag_text = iter(rendered[1:] if default_system else rendered)
    pieces: list[tuple[str, str]] = []  # (label, text)
    marked: set[int] = set()  # indices into pieces: each is a chunk of its own (cache_control)
    for i, message in enumerate(texts):
        parts = message.parts
        opening, closing = next(tag_text), next(tag_text)
        for j, part in enumerate(parts):
            if j in message.marked:
                marked.add(len(pieces))
            label = f"message {i}" if len(parts) == 1 else f"message {i} part {j}"
            text = part + (closing if j == len(parts) - 1 else "")
            if j == 0 and reuse == "compose" and pieces:
                # the role's opening ends the previous piece: a document is the same tokens wherever it appears
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + opening)
            elif j == 0:
                text = opening + text
            pieces.append((label, (lead + text) if i == j == 0 else text))
    if add_generation_prompt:
        pieces.append(("assistant opening", runtime.roles.generation_prompt))
    tokenize = tokenize or runtime.model.tokenize
    token_lists = [(label, list(tokenize(text)) if text else []) for label, text in pieces]
    token_lists[0] = (token_lists[0][0], [*runtime.bos_tokens, *token_lists[0][1]])
    total = sum(len(t) for _, t in token_lists)
    if total > n_ctx - 1:
        raise LayoutOverflowError(f"the conversation is {total} tokens, more than the context of n_ctx={n_ctx} "
                                  "leaves room for (shorten it, or use a larger n_ctx: --n-ctx on the command line)")
    # the assistant's opening is decoded every time (a short last message merges into it)
    tail = 1 if add_generation_prompt else 0
    chunks: list[ChatChunk] = []
    digest = hashlib.sha256(f"{CHAT_MODE}\0{seed}".encode()).hexdigest()
    position = 0
    pending: list[int] = []
    labels: list[str] = []
    for index, (label, tokens) in enumerate(token_lists):
        pending += tokens
        labels.append(label)
        stored = index < len(token_lists) - tail
        # too small for a module of its own: merged into the next chunk, except into a marked part (cache_control:
        # a module of its own) and (compose mode) into a large one that will be stored: a document must stay the
        # same tokens wherever it appears
        next_large = index + 1 < len(token_lists) - tail and len(token_lists[index + 1][1]) >= min_chunk_tokens
        if (stored and len(pending) < min_chunk_tokens and index not in marked and index + 1 not in marked
                and not (reuse == "compose" and next_large)):
            continue
        key = None
        own = np.asarray(pending, dtype=np.int64).tobytes()
        digest = hashlib.sha256(digest.encode() + own).hexdigest()
        if stored:
            if reuse == "compose":
                content = hashlib.sha256(f"{COMPOSE_MODE}\0{seed}\0".encode() + own).hexdigest()
                key = EntryKey(content, position)
            else:
                key = EntryKey(digest, position)
        name = labels[0] if len(labels) == 1 else f"{labels[0]} .. {labels[-1]}"
        chunks.append(ChatChunk(name, tuple(pending), position, key, digest))
        position += len(pending)
        pending, labels = [], []
    return [c for c in chunks if c.tokens]


def text_chunks(text: str, runtime: Runtime, *, n_ctx: int) -> list[ChatChunk]:
    """A raw text prompt (``/v1/completions``): BOS and the text's tokens, decoded (a session still keeps them)."""
    if not isinstance(text, str) or not text:
        raise OptionError("prompt must be a non-empty string")
    tokens = (*runtime.bos_tokens, *runtime.model.tokenize(text))
    if len(tokens) > n_ctx - 1:
        raise LayoutOverflowError(f"the prompt is {len(tokens)} tokens, more than the context of n_ctx={n_ctx} "
                                  "leaves room for")
    return [ChatChunk("prompt", tokens, 0, None)]


def chunk_trace(chunks: Sequence[ChatChunk]) -> CellTrace:
    """Every cell as a decoded token: in exact-prefix mode a restored chunk holds the KV its tokens give after the
    same prefix, so a session's cells compare by token and position alone."""
    tokens = np.asarray([t for c in chunks for t in c.tokens], dtype=np.int64)
    n = len(tokens)
    return CellTrace(np.arange(n, dtype=np.int64), np.full(n, TOKEN, dtype=np.int64), tokens,
                     np.zeros(n, dtype=np.int64))


class ChatPath:
    """Brings a chat's chunks into the request sequence: the session's cells first, then stored chunks in order
    until the first one missing, then the rest decoded in one call; afterwards the decoded chunks are stored."""

    def __init__(self, runtime: Runtime, store: ModuleStore, *, request_seq: int, save_seq: int,
                 expect: dict[str, str], keep_seqs: Callable[[], list[int]]) -> None:
        self._keep_seqs = keep_seqs  # resident runs: never cleared
        self._runtime = runtime
        self._store = store
        self._request_seq = request_seq
        self._save_seq = save_seq
        self._expect = expect

    def prefill(self, chunks: list[ChatChunk], trace: CellTrace, state: SessionState, clock: dict[str, float],
                reuse: bool, *, compose: bool = False, repair_tokens: int = 0, min_decode: int = 1) -> Prefill:
        """``trace``: ``chunk_trace(chunks)``, computed once by the caller. ``compose``: chunks built with
        ``reuse="compose"``, restored wherever they are found (see ``_prefill_composed``). ``min_decode``: the
        fewest tokens decoded at the end (exact mode; type-ahead asks for 2: on the CPU, llama.cpp computes a batch
        of one token by another kernel, whose cells differ in the last bits from the same token in a larger batch)."""
        kept, state.kept = state.kept, None
        ready, state.ready = state.ready, None
        # type-ahead left exactly this prompt's cells and the logits after them: nothing to decode
        ready_logits = ready[1] if ready is not None and ready[0] is kept and kept is not None and reuse \
            and len(kept) == len(trace) and matching_cells(kept, trace) == len(trace) else None
        held = self._keep_held(kept, trace, reuse, whole=ready_logits is not None)
        if compose:
            return self._prefill_composed(chunks, trace, kept, held, clock, reuse, repair_tokens, ready_logits)
        context = self._runtime.context
        started = time.perf_counter()
        uses: list[ModuleUse] = []
        restored = 0
        cursor = held  # the next position to fill
        missing_from: int | None = None
        for index, chunk in enumerate(chunks):
            if chunk.end <= cursor:
                continue
            if chunk.key is None:
                missing_from = index
                break
            hit = self._store.lookup(chunk.key, self._expect)
            if hit is None:
                missing_from = index
                break
            begun = time.perf_counter()
            context.state_seq_set(self._save_seq, hit.entry.state)  # a scratch: restores replace, so copy over
            context.seq_cp(self._save_seq, self._request_seq, cursor, chunk.end)
            context.seq_rm(self._save_seq)
            clock["restore_ms"] = clock.get("restore_ms", 0.0) + (time.perf_counter() - begun) * 1000
            uses.append(ModuleUse(chunk.label, hit.tier, chunk.end - cursor, hit.entry.nbytes))
            restored += chunk.end - cursor
            cursor = chunk.end
        clock["lookup_ms"] = (time.perf_counter() - started) * 1000 - clock.get("restore_ms", 0.0)
        rest = trace.values[cursor:].tolist()
        if len(rest) < min_decode and ready_logits is None:
            # everything (or all but the last few) was held or stored: decode the last cells again
            back = min(min_decode - len(rest), cursor)
            restored -= min(back, cursor - held)
            held -= max(back - (cursor - held), 0)
            cursor -= back
            context.seq_rm(self._request_seq, cursor, -1)
            rest = trace.values[cursor:].tolist()
        begun = time.perf_counter()
        logits = context.decode(rest, seq_id=self._request_seq, start=cursor) if rest else ready_logits
        clock["decode_ms"] = (time.perf_counter() - begun) * 1000
        if logits is None:
            raise EngineError("llama.cpp returned no logits after the conversation")
        decoded = chunks[missing_from:] if missing_from is not None else []
        uses += [ModuleUse(c.label, "encoded" if c.key is not None else "uncached", len(c.tokens)) for c in decoded]
        # chunks the session held that the store has not seen (the first turn's last message) are stored as well
        unstored = [c for c in chunks if c.key is not None and c.end <= held and not self._store.contains(c.key)]
        # storing copies every chunk out of the KV cache: after the answer, so the first token does not wait
        to_store = [*unstored, *decoded]
        return Prefill(logits, trace.positions.size, trace if reuse else None, session_tokens=held,
                       cached_tokens=restored, uses=tuple(uses),
                       after_answer=(lambda seq: self._store_chunks(to_store, seq=seq)) if to_store else None)

    def _keep_held(self, kept: CellTrace | None, trace: CellTrace, reuse: bool, *, whole: bool = False) -> int:
        """How many first cells of the conversation the session already holds; clears the rest of the cache.
        ``whole``: it holds them all (and the logits after them), else at least the last is decoded again."""
        context = self._runtime.context
        held = len(trace) if whole else common_prefix(kept, trace) if reuse and kept is not None else 0
        if held:  # the session's first cells stay; new cells go right after them (see assembler.assemble)
            context.clear(keep=[*self._keep_seqs(), self._request_seq])
            context.seq_rm(self._request_seq, held, -1)
            if not context.window_intact(self._request_seq, held):  # a sliding window's cells were reused
                held = 0
        if not held:
            context.clear(keep=self._keep_seqs())
        return held

    def _prefill_composed(self, chunks: list[ChatChunk], trace: CellTrace, kept: CellTrace | None, held: int,
                          clock: dict[str, float], reuse: bool, repair_tokens: int,
                          ready_logits: np.ndarray | None = None) -> Prefill:
        """Compose mode: every stored chunk is restored wherever it appears, in any order and combination; what is
        not stored is decoded at its turn.

        A chunk found stored after the same prefix at the same position is exact. Otherwise (another prefix, another
        position: moved by ``seq_add``) it is *composed*: its first ``repair_tokens`` tokens are decoded in place,
        after everything before them (boundary repair, ``repair.py``), and the rest of its cells restored as stored.
        Cells computed after a composed cell are approximate too: chunks are stored as exact (with their prefix
        digest) only when nothing before their end was composed.
        """
        context = self._runtime.context
        started = time.perf_counter()
        first_composed = kept.first_composed if kept is not None and kept.composed_within(held) else -1
        uses: list[ModuleUse] = []
        restored = 0
        filled = held  # the request sequence holds cells [0, filled)
        pending: list[int] = []  # tokens to decode at ``filled``
        restored_chunks: set[int] = set()

        def flush(want: LogitsMode) -> np.ndarray | None:
            nonlocal filled, pending
            if not pending:
                return None
            begun = time.perf_counter()
            logits = context.decode(pending, seq_id=self._request_seq, start=filled, logits=want)
            clock["decode_ms"] = clock.get("decode_ms", 0.0) + (time.perf_counter() - begun) * 1000
            filled += len(pending)
            pending = []
            return logits

        for index, chunk in enumerate(chunks):
            if chunk.end <= held:
                continue
            hit = self._store.find(chunk.key, self._expect, runs=1) if chunk.key is not None and chunk.start >= held \
                else None
            if hit is None:
                pending += chunk.tokens[max(held - chunk.start, 0):]
                continue
            flush("none")
            same_prefix = hit.shift == 0 and hit.entry.meta.context == chunk.context
            n_live = 0 if same_prefix else min(repair_tokens, len(chunk.tokens))
            if n_live:
                pending = list(chunk.tokens[:n_live])
                flush("none")
            begun = time.perf_counter()
            if n_live < len(chunk.tokens):
                context.state_seq_set(self._save_seq, hit.entry.state)  # a scratch: restores replace
                if hit.shift:
                    context.seq_add(self._save_seq, -1, -1, hit.shift)
                context.seq_cp(self._save_seq, self._request_seq, chunk.start + n_live, chunk.end)
                context.seq_rm(self._save_seq)
                if not same_prefix and first_composed < 0:
                    first_composed = chunk.start + n_live
            clock["restore_ms"] = clock.get("restore_ms", 0.0) + (time.perf_counter() - begun) * 1000
            filled = chunk.end
            restored += len(chunk.tokens) - n_live
            restored_chunks.add(index)
            uses.append(ModuleUse(chunk.label, hit.tier, len(chunk.tokens), hit.entry.nbytes, shifted=hit.shift != 0,
                                  composed=not same_prefix, repaired_tokens=n_live))
        clock["lookup_ms"] = (time.perf_counter() - started) * 1000 - clock.get("restore_ms", 0.0) \
            - clock.get("decode_ms", 0.0)
        if not pending and ready_logits is not None:  # type-ahead held every cell and the logits after them
            logits: np.ndarray | None = ready_logits
        elif not pending:  # the prompt ends with held or restored cells: decode its last token again for the logits
            filled -= 1
            context.seq_rm(self._request_seq, filled, -1)
            pending = [int(trace.values[-1])]
            last = uses[-1] if len(chunks) - 1 in restored_chunks else None
            if last is None:
                held -= 1
            elif last.repaired_tokens < last.tokens:
                restored -= 1
        if pending:
            logits = flush("last")
        if logits is None:
            raise EngineError("llama.cpp returned no logits after the conversation")
        decoded = [c for i, c in enumerate(chunks) if i not in restored_chunks and c.end > held]
        uses += [ModuleUse(c.label, "encoded" if c.key is not None else "uncached", len(c.tokens)) for c in decoded]
        to_store = [c for i, c in enumerate(chunks)
                    if c.key is not None and i not in restored_chunks and not self._store.contains(c.key)]
        exact_below = first_composed if first_composed >= 0 else trace.positions.size
        composed_trace = dataclasses.replace(trace, first_composed=first_composed)
        return Prefill(logits, trace.positions.size, composed_trace if reuse else None, session_tokens=held,
                       cached_tokens=restored, uses=tuple(uses), exact=first_composed < 0,
                       after_answer=(lambda seq: self._store_chunks(to_store, exact_below, seq)) if to_store else None)

    def _store_chunks(self, chunks: Sequence[ChatChunk], exact_below: int | None = None,
                      seq: int | None = None) -> None:
        """Copy chunks out of the request sequence (or ``seq``, where a batched answer moved its cells) into the
        store (a memory copy each). In compose mode
        (``exact_below`` set) a chunk records its prefix digest only when its cells are exact (it ends at or before
        ``exact_below``): only then may a later request treat it as computed after the same prefix."""
        context = self._runtime.context
        for chunk in chunks:
            if chunk.key is None:
                continue
            context.seq_cp(self._request_seq if seq is None else seq, self._save_seq, chunk.start, chunk.end)
            try:
                state = context.state_seq_get(self._save_seq)
            except WindowLostError as exc:  # a sliding-window model reused some of the chunk's cells
                logger.info("%s is not stored: %s", chunk.label, exc)
                continue
            finally:
                context.seq_rm(self._save_seq)
            exact = exact_below is None or chunk.end <= exact_below
            meta = EntryMeta(schema="chat", module=chunk.label,
                             mode=CHAT_MODE if exact_below is None else COMPOSE_MODE,
                             ranges=((chunk.start, chunk.end),), run_bytes=(state.nbytes,),
                             model=self._expect["model"], state=self._expect["state"],
                             model_file=self._runtime.model.path.name, created=time.time(),
                             context=chunk.context if exact else "")
            self._store.save(StoredModule(chunk.key, state, meta))
