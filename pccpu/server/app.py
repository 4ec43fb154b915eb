"""``pccpu serve``: an OpenAI-compatible HTTP server on one PromptCache.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events ending with ``data: [DONE]``, or not),
``POST /v1/chat/drafts`` (type-ahead: the message being typed in a conversation, decoded before it is sent),
``POST /v1/completions`` (a raw text prompt), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text). Every message of a chat is a stored module (``PromptCache.chat``): a conversation continued in its next
request reuses its cells, and any conversation that starts the same way, before or after a restart, restores what
was computed once.

Starlette and uvicorn, not FastAPI: the request bodies are checked by hand (``openai_api.py``) so that every error
names its parameter in OpenAI's shape, which leaves FastAPI's validation layer nothing to do. Conversations are
sessions, keyed by ``prompt_cache_key`` (else ``user``); a request with neither continues the conversation whose
last prompt it extends (found by content), else starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pccpu.errors import LayoutOverflowError, OptionError, PccpuError, PmlError
from pccpu.server.metrics import Metrics
from pccpu.server.openai_api import (
    ChatRequest,
    RequestError,
    chat_completion,
    chunk,
    completion_id,
    finish_reason,
    logprobs,
    parse_chat_request,
    parse_completion_request,
    parse_draft_request,
    text_chunk,
    text_completion,
)
from pccpu.server.worker import END, Job, QueueFullError, Worker
from pccpu.service import Draft, PromptCache, Result, Session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_queue: int = 16
    max_new_tokens: int = 512  # when a request gives no max_tokens
    max_conversations: int = 64  # sessions kept by key; the least recently used is closed beyond this
    request_timeout_s: float = 600.0
    pml_root: str | None = None  # the only folder PML schemas sent over HTTP may read src= files from
    parallel: int = 1  # chat answers generated together (continuous batching, worker.py)


class Conversations:
    """Sessions by conversation key, least recently used closed first. Used on the worker thread only."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, cache: PromptCache, key: str | None) -> Session | Literal["auto"]:
        if key is None:
            return "auto"  # found by content: the conversation this request continues, else a new one
        return self.keyed(cache, key)

    def keyed(self, cache: PromptCache, key: str) -> Session:
        session = self._sessions.get(key)
        if session is None:
            session = cache.session(key)
            self._sessions[key] = session
            while len(self._sessions) > self._limit:
                _, oldest = self._sessions.popitem(last=False)
                oldest.close()
        self._sessions.move_to_end(key)
        return session


def create_app(cache: PromptCache, settings: ServerSettings) -> Starlette:
    if settings.parallel > 1:
        cache.batch(settings.parallel).close()  # the settings checked now (lanes, model, resident modules)
    worker = Worker(cache, max_queue=settings.max_queue, parallel=settings.parallel)
    queues: dict[int, asyncio.Queue[Any]] = {}  # job id -> where its items arrive
    conversations = Conversations(settings.max_conversations)
    drafts: OrderedDict[str, Draft] = OrderedDict()  # conversation key -> the message typed in it (event loop only)
    metrics = Metrics()

    def refuse(exc: RequestError) -> JSONResponse:
        metrics.errors += 1
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def submit(job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFullError as exc:
            raise RequestError(str(exc), status=429, kind="rate_limit_error") from None

    async def respond(job: Job, parsed: ChatRequest, text: bool,
                      build: Callable[[Result, str], dict[str, Any]]) -> Response:
        """The answer streamed as server-sent events, or collected (under the request timeout) and built."""
        metrics.requests += 1
        ident = completion_id()
        if parsed.stream:
            return StreamingResponse(stream(job, ident, parsed.include_usage, text), media_type="text/event-stream")
        try:
            result = await asyncio.wait_for(collect(job), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled.set()
            return refuse(RequestError("the request timed out", status=504, kind="timeout"))
        except RequestError as exc:
            return refuse(exc)
        metrics.record(result)
        return JSONResponse(build(result, ident))

    def authorize(request: Request) -> None:
        if settings.api_key is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise RequestError("a valid API key is needed: send 'Authorization: Bearer KEY'", status=401,
                                   kind="authentication_error", code="invalid_api_key")

    async def checked_body(request: Request) -> Any:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise RequestError(f"the body is larger than {settings.max_body_bytes} bytes", status=413)
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise RequestError(f"the body is larger than {settings.max_body_bytes} bytes", status=413)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None

    def new_job(start: Callable[[PromptCache], Any]) -> Job:
        """A job whose items arrive in an asyncio queue of this event loop."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        job = Job(start, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        queues[id(job)] = items
        return job

    async def next_item(job: Job) -> Any:
        item = await queues[id(job)].get()
        if item is END:
            queues.pop(id(job), None)
        return item

    def job_for(parsed: ChatRequest) -> Job:
        draft = drafts.pop(parsed.conversation, None) if parsed.conversation is not None else None

        def start(pc: PromptCache) -> Any:
            session = conversations.get(pc, parsed.conversation)
            if isinstance(parsed.messages, str):
                if draft is not None:
                    draft.close()
                return pc.complete(parsed.messages, session=session, options=parsed.options)
            if draft is not None:
                last = parsed.messages[-1]
                if parsed.messages[:-1] == draft.messages and last.get("role") == "user" \
                        and isinstance(last.get("content"), str) and (parsed.reuse or pc.chat_reuse) == draft.reuse:
                    return draft.submit(last["content"], options=parsed.options)  # what was typed is decoded
                draft.close()
            return pc.chat(parsed.messages, session=session, reuse=parsed.reuse, options=parsed.options)

        job = new_job(start)
        job.batchable = draft is None  # a draft's answer continues its type-ahead: it runs alone
        return job

    async def draft_message(request: Request) -> Response:
        """``POST /v1/chat/drafts``: the message being typed in a conversation, sent again on every keystroke (or
        every few); decoded while it is typed, so the chat completion that sends it starts at once."""
        try:
            parsed = parse_draft_request(await checked_body(request))
            key = parsed.conversation
            draft = drafts.get(key)
            if draft is None or draft.messages != parsed.messages or draft.reuse != (parsed.reuse or cache.chat_reuse):
                if draft is not None:
                    draft.close()
                draft = await run_plain(lambda pc: pc.draft(parsed.messages, session=conversations.keyed(pc, key),
                                                             reuse=parsed.reuse))
                drafts[key] = draft
                while len(drafts) > settings.max_conversations:
                    drafts.popitem(last=False)[1].close()
            drafts.move_to_end(key)
            draft.type(parsed.text)
        except RequestError as exc:
            return refuse(exc)
        except PccpuError as exc:
            return refuse(as_request_error(exc))
        return JSONResponse({"object": "chat.draft", "prompt_cache_key": key, "keystrokes": draft.stats.keystrokes,
                             "decoded_tokens": draft.stats.decoded_tokens}, status_code=202)

    async def answer(request: Request, text: bool) -> Response:
        """``/v1/chat/completions`` (``text=False``) and ``/v1/completions`` (``text=True``)."""
        try:
            parse = parse_completion_request if text else parse_chat_request
            parsed = parse(await checked_body(request), settings.model_id, max_new_tokens=settings.max_new_tokens)
            job = job_for(parsed)
            submit(job)
        except RequestError as exc:
            return refuse(exc)
        build = text_completion if text else chat_completion
        return await respond(job, parsed, text, lambda result, ident: build(result, settings.model_id, ident))

    async def chat_completions(request: Request) -> Response:
        return await answer(request, text=False)

    async def completions(request: Request) -> Response:
        return await answer(request, text=True)

    async def collect(job: Job) -> Result:
        try:
            while True:
                item = await next_item(job)
                if isinstance(item, BaseException):
                    raise as_request_error(item)
                if isinstance(item, Result):
                    await next_item(job)  # END
                    return item
        finally:
            job.cancelled.set()  # a no-op once it finished; stops it if this coroutine was cancelled

    def event(ident: str, text: bool, piece: str | None = None, finish: str | None = None,
              result: Result | None = None, token_logprobs: dict[str, Any] | None = None) -> str:
        if text:
            return sse(text_chunk(settings.model_id, ident, piece or "", finish, result))
        delta = {} if piece is None else {"content": piece}
        return sse(chunk(settings.model_id, ident, delta, finish, result, token_logprobs))

    async def stream(job: Job, ident: str, include_usage: bool, text: bool) -> AsyncIterator[str]:
        try:
            if not text:
                yield sse(chunk(settings.model_id, ident, {"role": "assistant", "content": ""}))
            while True:
                item = await next_item(job)
                if item is END:
                    break
                if isinstance(item, str):
                    yield event(ident, text, item)
                elif isinstance(item, Result):
                    metrics.record(item)
                    # the answer's log-probabilities, whole, in the finishing chunk (clients join the chunks')
                    yield event(ident, text, finish=finish_reason(item), token_logprobs=logprobs(item))
                    if include_usage:
                        yield event(ident, text, result=item)
                else:  # an error after the response started: OpenAI's clients read an error event
                    error = as_request_error(item)
                    metrics.errors += 1
                    yield sse(error.body())
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away: the worker stops within one token

    # -- PML over HTTP -------------------------------------------------------------------------------------------
    async def run_plain(start: Any) -> Any:
        """Run ``start(cache)`` on the worker and return its value (or raise its error as a RequestError)."""
        job = new_job(start)
        submit(job)
        value = await next_item(job)
        await next_item(job)  # END
        if isinstance(value, BaseException):
            raise as_request_error(value)
        return value

    async def pml_add_schema(request: Request) -> Response:
        try:
            body = await checked_body(request)
            text = body.get("schema") if isinstance(body, dict) else None
            if not isinstance(text, str) or not text.lstrip().startswith("<"):
                raise RequestError("schema must be PML text starting with <schema (files are not read over HTTP)",
                                   param="schema")
            roots = [settings.pml_root] if settings.pml_root else []
            layout = await run_plain(lambda pc: pc.add_schema(text, allowed_roots=roots))
        except RequestError as exc:
            return refuse(exc)
        return JSONResponse({"name": layout.name, "modules": [p or "(root)" for p in layout.modules],
                             "span": layout.span})

    async def pml_list_schemas(request: Request) -> Response:
        try:
            authorize(request)
            layouts = await run_plain(lambda pc: pc.schemas)
        except RequestError as exc:
            return refuse(exc)
        return JSONResponse({"schemas": [{"name": name, "modules": [p or "(root)" for p in layout.modules]}
                                         for name, layout in layouts.items()]})

    async def pml_ask(request: Request) -> Response:
        """A PML prompt (``prompt``) or the escaped parts form (``schema``, ``modules``, ``question``), with the
        chat-completions parameters; the answer in chat-completion shape."""
        try:
            body = await checked_body(request)
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            prompt = body.pop("prompt", None)
            parts = {k: body.pop(k) for k in ("schema", "modules", "question") if k in body}
            if (prompt is None) == (not parts):
                raise RequestError("give either prompt (PML text) or schema with modules and question",
                                   param="prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise RequestError("prompt must be PML text", param="prompt")
            parsed = parse_chat_request(dict(body, messages=[{"role": "user", "content": "-"}]), settings.model_id,
                                        max_new_tokens=settings.max_new_tokens)

            def start(pc: PromptCache) -> Any:
                session = conversations.keyed(pc, parsed.conversation or "pml")
                if prompt is not None:
                    return pc.ask(prompt, session=session, options=parsed.options)
                return pc.ask_parts(str(parts.get("schema")), parts.get("modules") or {}, parts.get("question"),
                                    session=session, options=parsed.options)

            job = new_job(start)
            submit(job)
        except RequestError as exc:
            return refuse(exc)

        def build(result: Result, ident: str) -> dict[str, Any]:
            reply = chat_completion(result, settings.model_id, ident)
            reply["timings"]["pccpu"]["warnings"] = list(result.warnings)
            return reply

        return await respond(job, parsed, False, build)

    async def pml_store(request: Request) -> Response:
        try:
            authorize(request)
            if request.method == "DELETE":
                removed = await run_plain(lambda pc: pc.clear_store())
                return JSONResponse({"removed": removed})
            stats = await run_plain(lambda pc: pc.stats())
        except RequestError as exc:
            return refuse(exc)
        return JSONResponse({"store": stats.store.to_dict(), "sessions": dataclasses.asdict(stats.sessions)})

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as exc:
            return refuse(exc)
        return JSONResponse({"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                                         "created": 0, "owned_by": "pccpu"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": worker.queued, "in_flight": worker.in_flight,
                             "parallel": settings.parallel})

    async def metrics_text(request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as exc:
            return refuse(exc)
        # read off the worker thread: counters and sizes only, no iteration over what the worker changes
        return PlainTextResponse(metrics.render(cache.stats(), worker.queued),
                                 media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.stop()

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/chat/drafts", draft_message, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/pml/schemas", pml_add_schema, methods=["POST"]),
        Route("/v1/pml/schemas", pml_list_schemas, methods=["GET"]),
        Route("/v1/pml/ask", pml_ask, methods=["POST"]),
        Route("/v1/pml/store", pml_store, methods=["GET", "DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ], lifespan=lifespan)


def as_request_error(exc: BaseException) -> RequestError:
    """A library error as the HTTP error a client can act on."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, LayoutOverflowError):
        return RequestError(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (OptionError, PmlError)):
        return RequestError(str(exc))
    if isinstance(exc, PccpuError):
        return RequestError(f"{type(exc).__name__}: {exc}", status=500, kind="server_error")
    return RequestError(f"internal error ({type(exc).__name__}); see the server's log", status=500,
                        kind="server_error")


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
