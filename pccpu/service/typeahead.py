"""Type-ahead: the user's message is decoded while it is typed, so the answer starts when Enter is pressed.

    chat = pc.session()
    draft = chat.draft(messages)          # the conversation so far: system, documents, earlier turns
    draft.type("What is the")             # on every keystroke, the whole current text; returns at once
    draft.type("What is the capital of")
    answer = draft.submit()               # pc.chat(messages + [user: text]) in the session: little is left to decode

**What the worker decodes, in order.** A background thread (one per PromptCache) works on the draft typed last, one
short step at a time, always toward the prompt that ``submit()`` of the current text would run (the conversation,
the user's turn with the text, the assistant's opening):

1. the whole chunks before the text (system message, documents, earlier turns), through the chat path: held by the
   session, restored from the store, or decoded;
2. the text's *stable* tokens, ``batch_tokens`` at a time: those that more typing at the end cannot change. The last
   word is kept back (letters added to it retokenize it), which is found by comparing the prompt with the text, with
   the text less its last word, and with the text plus a probe word; the longest prefix the three share is stable;
3. once the input has been idle ``speculate_after_ms`` (default 0: at once), the last word in a batch of its own (so
   that punctuation typed after it finds it decoded; punctuation alone goes with the ending), then the end of the
   user's turn and the assistant's opening *speculatively*, with the logits of the last token kept: if Enter comes on
   that text, the first token is sampled from them and nothing is decoded after Enter.

Every step compares the session's cells with the current prompt, cell by cell, and removes (``seq_rm``) everything
from the first difference: an edit anywhere (backspace, a changed word, a paste) costs only the cells after it. The
cells are the session's own, so ``submit()`` is an ordinary ``chat()`` request that finds its prompt already held
(``reuse.py``); type-ahead can never change an answer, only what is left to decode. The speculation is decoded into the
request sequence itself rather than a fork: dropping it is the same ``seq_rm`` either way, and the answer needs it
there.

**Threading rules.** One llama.cpp context serves everything, one thread at a time (``lock.py``): a foreground call
(``ask``, ``chat``, ``submit``'s answer) holds it for its whole run; the worker takes it only when nobody holds or
waits for it, and gives it back after each step. ``type()`` never touches the context: it records the text under the
lock's condition (microseconds) and interrupts the worker's decode when the new text makes it useless: a speculated
ending of an older text, or a last word that changed (not when punctuation or a space follows it).
Interrupting is llama.cpp's abort callback (``LlamaContext.interrupt``), a C function reading one byte, so llama.cpp's
compute threads never take Python's GIL; ``llama_decode`` runs without the GIL (ctypes releases it), so the UI thread
runs while the worker decodes, and a keystroke never waits for a decode. A foreground call that finds the worker
decoding waits for that step to end, or interrupts it when it does not need it (a speculation of another text, work
for another session); ``submit()`` waits for a step on its own text (that work is the answer's). Interrupted work is
lost (llama.cpp removes the batch's cells) and counted in ``TypingStats``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from pccpu.errors import DecodeInterrupted, OptionError, PccpuError, SessionError
from pccpu.service.answer import Answer
from pccpu.service.answering import REQUEST_SEQ
from pccpu.service.chat import ChatChunk, ChatPath, ChatReuse, chunk_trace
from pccpu.service.lock import CacheLock
from pccpu.service.options import GenerationKwargs, GenerationOptions
from pccpu.service.reuse import CellTrace, matching_cells
from pccpu.service.runtime import Runtime
from pccpu.service.sessions import SessionState, SessionTable

if TYPE_CHECKING:
    from pccpu.service.session import Session

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 16
# the fewest tokens decoded at once: llama.cpp's CPU kernels compute a batch of one token another way (matrix-vector)
# whose cells differ in the last bits from the same token in a larger batch, where a full prefill computes it
MIN_BATCH = 2
_LAST_WORD = re.compile(r"\s*\S*\Z")  # the word being typed, and the spaces before it
_PROBE = " x"  # a word typed after the text: where the text's own tokens end
_MEMO_ENTRIES = 64

BuildChunks = Callable[[Sequence[Mapping[str, Any]]], list[ChatChunk]]


@dataclass
class TypingStats:
    """What type-ahead did for one draft."""

    keystrokes: int = 0  # type() calls
    decoded_tokens: int = 0  # tokens the worker decoded (before the text, the text, speculated endings)
    decode_ms: float = 0.0  # the worker's time in decodes and restores (interrupted ones included)
    discarded_tokens: int = 0  # of those, cells removed before an answer used them (edits, a text that changed)
    discarded_ms: float = 0.0  # their decode time, and that of interrupted decodes: CPU spent for nothing
    interrupted: int = 0  # decodes stopped by a keystroke or another call
    max_type_ms: float = 0.0  # the longest a type() call took (it never waits for a decode)
    speculated_tokens: int = 0  # the last speculation of a turn's ending: its tokens and decode time
    speculation_ms: float = 0.0
    ready: bool = False  # at submit: the logits after the whole prompt were ready (nothing left to decode)
    held_tokens: int = 0  # at submit: the prompt's cells the session held, of ``prompt_tokens``
    prompt_tokens: int = 0


@dataclass(frozen=True)
class _Target:
    """The prompt that ``submit()`` of one text would run, and how far the worker may decode it without Enter."""

    text: str
    chunks: list[ChatChunk]
    trace: CellTrace
    stable: int  # its first ``stable`` tokens do not change when more is typed at the end
    whole: int  # the end of the last whole chunk within them (the conversation before the text)
    text_end: int  # where the text's own tokens end (the end of the user's turn follows)


class TokenMemo:
    """The model's tokenizer with a memo: the pieces before the text are the same on every keystroke."""

    def __init__(self, tokenize: Callable[[str], list[int]]) -> None:
        self._tokenize = tokenize
        self._memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        tokens = self._memo.get(text)
        if tokens is None:
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            tokens = self._memo[text] = self._tokenize(text)
        return tokens


class Draft:
    """A user message being typed in a session's conversation (see the module docstring)."""

    def __init__(self, worker: TypeAhead, session: Session, state: SessionState,
                 messages: Sequence[Mapping[str, Any]], reuse: ChatReuse, build: BuildChunks,
                 tokenize: Callable[[str], list[int]], *, speculate_after_ms: float, batch_tokens: int) -> None:
        self._worker = worker
        self._session = session
        self.state = state
        self.messages = list(messages)
        self.reuse: ChatReuse = reuse
        self._build = build
        self._tokenize = tokenize  # the memo ``build`` uses: submit() tokenizes with it too
        self.speculate_after_s = speculate_after_ms / 1000
        self.batch_tokens = batch_tokens
        self.stats = TypingStats()
        self.text = ""
        self.version = 0  # counts type() calls that changed the text
        self.settled = -1  # the version the worker has nothing more to do for
        self.typed_at = time.monotonic()
        self.not_before = 0.0  # the worker waits until then (speculate_after_ms)
        self.submitted: str | None = None
        self.closed = False
        self.error: PccpuError | None = None  # why the worker stopped on the current text (it will say so again)
        self.costs: dict[int, float] = {}  # position -> decode ms, of the typed cells the session holds
        self._target: _Target | None = None

    # -- the caller's side ---------------------------------------------------------------------------------
    def type(self, text: str) -> None:
        """The whole input as it is now (call on every keystroke). Returns at once: decoding happens in the
        background."""
        started = time.perf_counter()
        if not isinstance(text, str):
            raise OptionError(f"type() takes the whole input as a string, got {type(text).__name__}")
        self._worker.typed(self, text)
        self.stats.max_type_ms = max(self.stats.max_type_ms, (time.perf_counter() - started) * 1000)

    def submit(self, text: str | None = None, *, options: GenerationOptions | None = None,
               **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """Send the message (``text``, default: the last typed): ``chat(messages + [user: text])`` in the draft's
        session, which finds what type-ahead decoded. The draft is finished afterwards."""
        final = self.text if text is None else text
        if not isinstance(final, str):
            raise OptionError(f"submit() takes the message as a string, got {type(final).__name__}")
        opts = GenerationOptions.from_kwargs(kwargs, options)
        self._worker.submit(self, final)
        messages = [*self.messages, {"role": "user", "content": final}]
        return self._session._cache._chat(messages, True, self._session, self.reuse, opts, self._tokenize)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until type-ahead has done all it can for the current text (True), or ``timeout`` seconds passed
        (False). An app never needs this (``submit()`` takes what is there); tests and benchmarks do."""
        return self._worker.wait(self, timeout)

    def close(self) -> None:
        """Stop working on this draft (the cells it decoded stay with the session)."""
        self._worker.close_draft(self)

    def __enter__(self) -> Draft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "submitted" if self.submitted is not None else "closed" if self.closed else "open"
        return f"<Draft {state} in {self._session.name!r}: {self.text[-40:]!r}>"

    # -- the worker's side ---------------------------------------------------------------------------------
    def target(self, text: str) -> _Target:
        """The prompt for ``text`` (cached for the last text asked)."""
        if self._target is not None and self._target.text == text:
            return self._target
        chunks = self._build([*self.messages, {"role": "user", "content": text}])
        trace = chunk_trace(chunks)
        cut = text[:_LAST_WORD.search(text).start()]  # type: ignore[union-attr]  # always matches
        before_last_word, text_end = (matching_cells(trace, chunk_trace(
            self._build([*self.messages, {"role": "user", "content": other}]))) for other in (cut, text + _PROBE))
        stable = min(before_last_word, text_end)
        whole = max((c.end for c in chunks if c.end <= stable), default=0)
        self._target = _Target(text, chunks, trace, stable, whole, max(text_end, stable))
        return self._target


@dataclass
class _Step:
    """What the worker is decoding now (read under the lock's condition by ``type()`` and foreground calls)."""

    draft: Draft
    text: str
    speculative: bool = False  # the turn's ending: stale as soon as the text changes
    word: bool = False  # the last word: stale when the word changes, not when punctuation or a space follows it

    def stale_for(self, draft: Draft, text: str) -> bool:
        """Whether this step's decode is of no use once ``draft`` reads ``text``."""
        if self.draft is not draft:
            return self.speculative
        if text == self.text:
            return False
        if self.speculative:
            return True
        added = text[len(self.text):] if text.startswith(self.text) else None
        return self.word and (added is None or any(c.isalnum() for c in added))


@dataclass
class TypeAhead:
    """The background worker of one PromptCache (see the module docstring)."""

    lock: CacheLock
    runtime: Runtime
    sessions: SessionTable
    chat_path: ChatPath
    repair_tokens: Callable[[], int]
    drafts: list[Draft] = field(default_factory=list)  # open drafts, the last typed last
    current: _Step | None = None
    stopping: bool = False
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.lock.preempt = self._preempt

    # -- called by drafts and the cache (any thread) -------------------------------------------------------
    def open(self, draft: Draft) -> Draft:
        with self.lock.cond:
            if self.stopping:
                raise SessionError("this PromptCache was closed")
            self.drafts.append(draft)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="pccpu-type-ahead", daemon=True)
                self.thread.start()
            self.lock.cond.notify_all()
        return draft

    def typed(self, draft: Draft, text: str) -> None:
        with self.lock.cond:
            if draft.submitted is not None or draft.closed:
                raise SessionError("this draft was submitted or closed; start a new one with draft()")
            draft.stats.keystrokes += 1
            draft.typed_at = time.monotonic()
            if text == draft.text:
                return
            draft.text = text
            draft.version += 1
            draft.error = None
            self.drafts.remove(draft)
            self.drafts.append(draft)
            step = self.current
            if step is not None and step.stale_for(draft, text):
                self.runtime.context.interrupt()  # an ending, or a last word, that is not this text's
            self.lock.cond.notify_all()

    def submit(self, draft: Draft, text: str) -> None:
        """Mark the draft submitted with ``text``; wait for a step on it to end (interrupting one on another
        text); account the cells the answer will not use."""
        with self.lock.cond:
            if draft.submitted is not None or draft.closed:
                raise SessionError("this draft was submitted or closed; start a new one with draft()")
            draft.submitted = text
            self.drafts.remove(draft)
            while self.current is not None and self.current.draft is draft:
                if self.current.text != text:
                    self.runtime.context.interrupt()
                self.lock.cond.wait()
            state = draft.state
            try:
                target = draft.target(text)
            except PccpuError:  # chat() says why
                return
            kept = state.kept
            held = matching_cells(kept, target.trace) if kept is not None else 0
            self._discard(draft, held)
            draft.stats.held_tokens = held
            draft.stats.prompt_tokens = len(target.trace)
            draft.stats.ready = held == len(target.trace) and state.ready is not None and state.ready[0] is kept

    def wait(self, draft: Draft, timeout: float | None) -> bool:
        with self.lock.cond:
            return self.lock.cond.wait_for(
                lambda: draft.settled == draft.version or draft.error is not None or draft.closed
                or draft.submitted is not None or self.stopping, timeout)

    def close_draft(self, draft: Draft) -> None:
        with self.lock.cond:
            draft.closed = True
            if draft in self.drafts:
                self.drafts.remove(draft)
            if self.current is not None and self.current.draft is draft:
                self.runtime.context.interrupt()

    def stop(self) -> None:
        """End the worker thread (the PromptCache is closing)."""
        with self.lock.cond:
            self.stopping = True
            if self.current is not None:
                self.runtime.context.interrupt()
            self.lock.cond.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join()

    def _preempt(self) -> None:
        """A foreground call waits for the cache (under the condition): interrupt a decode it does not need."""
        step = self.current
        if step is not None and step.draft.submitted != step.text:
            self.runtime.context.interrupt()

    # -- the worker thread ---------------------------------------------------------------------------------
    def _next(self) -> tuple[Draft | None, float | None]:
        """The draft to work on now, or how long to wait (None: until notified). Under the condition."""
        now = time.monotonic()
        wait: float | None = None
        for draft in reversed(self.drafts):
            if draft.settled == draft.version or draft.error is not None:
                continue
            if draft.not_before > now:
                wait = draft.not_before - now if wait is None else min(wait, draft.not_before - now)
                continue
            return draft, None
        return None, wait

    def _run(self) -> None:
        cond = self.lock.cond
        while True:
            with cond:
                while True:
                    if self.stopping:
                        return
                    draft, wait = self._next()
                    if draft is not None and self.lock.free_for_background():
                        break
                    cond.wait(wait)
                self.lock.holder = "background"
                step = self.current = _Step(draft, draft.text)
                version = draft.version
            outcome: bool | float = True
            try:
                outcome = self._step(step)
            except DecodeInterrupted:
                pass  # counted by _decode
            except PccpuError as exc:
                logger.info("type-ahead stopped on this text: %s", exc)
                with cond:
                    if draft.version == version:
                        draft.error = exc
            except Exception:  # a bug: never let it kill the thread silently
                logger.exception("type-ahead step failed")
                with cond:
                    if draft.version == version:
                        draft.error = PccpuError("type-ahead failed (see the log)")
            finally:
                with cond:
                    self.runtime.context.clear_interrupt()  # never left set for the next holder
                    self.current = None
                    self.lock.holder = None
                    if outcome is False and draft.version == version:
                        draft.settled = version
                    elif not isinstance(outcome, bool):
                        draft.not_before = outcome
                    cond.notify_all()

    def _step(self, step: _Step) -> bool | float:
        """One unit of work toward the draft's prompt: True (more to do), False (done for this text), or a monotonic
        time to come back at (waiting for idle input before speculating)."""
        draft = step.draft
        state = draft.state
        self.sessions.check(state)
        self.sessions.activate(state)
        target = draft.target(step.text)
        trace = target.trace
        kept = state.kept
        held = matching_cells(kept, trace) if kept is not None else 0
        if kept is None:  # the session holds nothing: make sure its sequence is empty too
            self.runtime.context.seq_rm(REQUEST_SEQ)
        elif held < len(kept):  # an edit, or an ending of another text: from there on it goes
            if not self._keep_first(draft, kept, held):
                return True  # a sliding window's cells were lost: the next step starts over
            kept = state.kept
        if held < target.whole:
            self._prefill_whole(draft, target)
            return True
        if held + MIN_BATCH <= target.stable:
            n = min(target.stable - held, draft.batch_tokens)
            self._decode(step, held, held + n, speculative=False)
            return True
        ready = state.ready is not None and state.ready[0] is kept
        if held == len(trace) and ready:
            return False
        idle_until = draft.typed_at + draft.speculate_after_s
        if time.monotonic() < idle_until:
            return idle_until
        if self._word_first(target, held):  # the last word on its own: punctuation typed next finds it decoded
            start = self._back_up(draft, kept, held, target.text_end)
            if start is not None:
                self._decode(step, start, target.text_end, speculative=False, word=True)
            return True
        start = self._back_up(draft, kept, held, len(trace))
        if start is not None:
            self._decode(step, start, len(trace), speculative=True)
        return True

    def _word_first(self, target: _Target, held: int) -> bool:
        """Whether the last word's tokens (``held`` up to the end of the text) are decoded before the turn's ending,
        in a batch of their own: yes, unless they are punctuation alone, most often the last key of a question
        (then it goes with the ending, one batch: the fewest tokens after the last key)."""
        n = target.text_end - held
        if n <= 0 or len(target.trace) - target.text_end < MIN_BATCH:
            return False
        if n == 1:
            piece = self.runtime.model.detokenize([int(target.trace.values[held])]).strip()
            return bool(piece) and any(c.isalnum() for c in piece)
        return True

    def _back_up(self, draft: Draft, kept: CellTrace | None, held: int, end: int) -> int | None:
        """Make the batch ``[start, end)`` at least MIN_BATCH tokens long by removing held cells before it (they are
        decoded again, the same tokens at the same positions); its start, or None when the session had to be
        emptied instead (see ``_keep_first``)."""
        start = min(held, max(end - MIN_BATCH, 0))
        if start < held and not self._keep_first(draft, kept, start):
            return None
        return start

    def _keep_first(self, draft: Draft, kept: CellTrace | None, n: int) -> bool:
        """The session keeps its first ``n`` cells; the rest are removed (and counted if type-ahead decoded them).
        False when a sliding-window model no longer holds the cells a decode at ``n`` needs: then it keeps none."""
        context = self.runtime.context
        context.seq_rm(REQUEST_SEQ, n, -1)
        intact = context.window_intact(REQUEST_SEQ, n)
        if not intact:
            context.seq_rm(REQUEST_SEQ)
            n = 0
        with self.lock.cond:
            self._discard(draft, n)
        draft.state.kept = kept.head(n) if kept is not None else None
        return intact

    def _prefill_whole(self, draft: Draft, target: _Target) -> None:
        """Bring the whole chunks before the text into the session (held, restored or decoded: the chat path)."""
        chunks = [c for c in target.chunks if c.end <= target.whole]
        trace = target.trace.head(target.whole)
        state = draft.state
        started = time.perf_counter()
        clock: dict[str, float] = {}
        try:
            prefill = self.chat_path.prefill(chunks, trace, state, clock, reuse=True, min_decode=MIN_BATCH,
                                             compose=draft.reuse == "compose", repair_tokens=self.repair_tokens())
        except DecodeInterrupted:
            self.runtime.context.seq_rm(REQUEST_SEQ)
            self.sessions.forget_active()
            self._interrupted(draft, started)
            raise
        except BaseException:
            self.runtime.context.seq_rm(REQUEST_SEQ)
            self.sessions.forget_active()
            raise
        state.kept = prefill.trace
        state.prompt_cells = len(trace)
        if prefill.after_answer is not None:
            prefill.after_answer(REQUEST_SEQ)  # stores the chunks it decoded
        draft.costs.clear()
        draft.stats.decoded_tokens += len(trace) - prefill.session_tokens - prefill.cached_tokens
        draft.stats.decode_ms += (time.perf_counter() - started) * 1000

    def _decode(self, step: _Step, start: int, end: int, *, speculative: bool, word: bool = False) -> None:
        """Decode the target's tokens [start, end) after the session's cells; a speculation keeps the last logits.
        A speculation (or the last word's batch) is interrupted by a key that makes it stale (``_Step.stale_for``)."""
        draft = step.draft
        state = draft.state
        tokens = draft.target(step.text).trace.values[start:end].tolist()
        if speculative or word:
            with self.lock.cond:
                step.speculative, step.word = speculative, word
                if step.stale_for(draft, draft.text):  # typed meanwhile: already stale
                    return
        started = time.perf_counter()
        try:
            logits = self.runtime.context.decode(tokens, seq_id=REQUEST_SEQ, start=start,
                                                 logits="last" if speculative else "none")
        except DecodeInterrupted:
            self._interrupted(draft, started)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        kept = state.kept if state.kept is not None else draft.target(step.text).trace.head(0)
        state.kept = kept.extended(tokens, start)
        state.prompt_cells = len(state.kept)
        if speculative and logits is not None:
            state.ready = (state.kept, logits)
            draft.stats.speculated_tokens, draft.stats.speculation_ms = len(tokens), elapsed
        per_token = elapsed / len(tokens)
        draft.costs.update({p: per_token for p in range(start, end)})
        draft.stats.decoded_tokens += len(tokens)
        draft.stats.decode_ms += elapsed

    @staticmethod
    def _interrupted(draft: Draft, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        draft.stats.interrupted += 1
        draft.stats.decode_ms += elapsed
        draft.stats.discarded_ms += elapsed

    @staticmethod
    def _discard(draft: Draft, held: int) -> None:
        """The session keeps only its first ``held`` cells: typed cells after them were decoded for nothing."""
        dropped = [p for p in draft.costs if p >= held]
        for p in dropped:
            draft.stats.discarded_ms += draft.costs.pop(p)
        draft.stats.discarded_tokens += len(dropped)


def check_draft_settings(speculate_after_ms: float, batch_tokens: int) -> None:
    if not isinstance(speculate_after_ms, (int, float)) or isinstance(speculate_after_ms, bool) \
            or not 0 <= speculate_after_ms < 60_000:
        raise OptionError(f"speculate_after_ms must be a number of milliseconds from 0 to 60000, got "
                          f"{speculate_after_ms!r}")
    if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens < 1:
        raise OptionError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")

