"""OpenAI's chat-completions format: request bodies checked into pccpu options, results written as OpenAI and
llama-server clients read them, and errors in OpenAI's shape.

Every parameter is either honoured, refused with a 400 that names it (``n`` other than 1, penalties, tools), or
unknown (also a 400): none is silently ignored. ``logprobs`` / ``top_logprobs`` are chat-completion parameters
(``generation/logprobs.py``); a stream carries the answer's log-probabilities in its finishing chunk.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pccpu.generation.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from pccpu.service import GenerationOptions, Result
from pccpu.service.chat import CHAT_REUSE, ChatReuse

# accepted with no effect on the answer: they only describe the request
DESCRIPTIVE = {"model", "messages", "stream", "stream_options", "user", "prompt_cache_key", "metadata", "store",
               "pccpu"}
SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "logprobs",
            "top_logprobs"}
# known OpenAI parameters pccpu does not implement: refused unless they hold their neutral value
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,),
    "service_tier": (None, "auto", "default"),
}
MAX_TOKENS_LIMIT = 1 << 16


class RequestError(Exception):
    """A client error: HTTP status, OpenAI error type, the parameter at fault, a message that says what to do."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]] | str  # a chat, or a raw text prompt (/v1/completions)
    options: GenerationOptions
    stream: bool
    include_usage: bool
    conversation: str | None  # prompt_cache_key, else user: which session it continues
    reuse: ChatReuse | None = None  # pccpu.reuse: exact or compose (None: the server's --reuse)


# /v1/completions: a prompt string instead of messages, and its own neutral parameters
COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
                                                  "logprobs": (None,), "top_logprobs": (None,)}


def parse_completion_request(body: Any, model_id: str, *, max_new_tokens: int) -> ChatRequest:
    """A ``/v1/completions`` body: ``prompt`` is one string (arrays of prompts or token ids are refused)."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (lists of prompts and token ids are not supported)",
                           param="prompt")
    chat_like = {k: v for k, v in body.items() if k != "prompt" and k not in COMPLETION_NEUTRAL}
    for name, neutral in COMPLETION_NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise RequestError(f"{name} is not supported by pccpu; leave it out", param=name)
    # OpenAI's default answer length for completions is 16 tokens
    parsed = _parse(dict(chat_like, messages=[]), model_id, max_new_tokens=16 if "max_tokens" not in body else
                    max_new_tokens, messages_required=False)
    return dataclasses.replace(parsed, messages=prompt)


def parse_chat_request(body: Any, model_id: str, *, max_new_tokens: int) -> ChatRequest:
    return _parse(body, model_id, max_new_tokens=max_new_tokens, messages_required=True)


def _parse(body: Any, model_id: str, *, max_new_tokens: int, messages_required: bool) -> ChatRequest:
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - DESCRIPTIVE - SAMPLING - set(NEUTRAL))
    if unknown:
        raise RequestError(f"unknown parameter {unknown[0]!r}; pccpu accepts: "
                           f"{', '.join(sorted(DESCRIPTIVE | SAMPLING | set(NEUTRAL)))}", param=unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise RequestError(f"{name} is not supported by pccpu; leave it out", param=name)
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"the model {model!r} does not exist here; this server serves {model_id!r}",
                           status=404, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or (messages_required and not messages):
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: pccpu answers one choice per request", param="n")
    stream = _typed(body, "stream", bool, False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise RequestError("stream_options must be an object", param="stream_options")
    include_usage = bool(stream_options.get("include_usage", False))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max_new_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}",
                           param="max_tokens")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("seed must be an integer", param="seed")
    conversation = body.get("prompt_cache_key") or body.get("user")
    if conversation is not None and not isinstance(conversation, str):
        raise RequestError("prompt_cache_key and user must be strings", param="prompt_cache_key")
    extension = body.get("pccpu") or {}
    if not isinstance(extension, Mapping) or set(extension) - {"reuse", "repair_tokens"}:
        raise RequestError('pccpu must be an object with "reuse" ("exact" or "compose") and/or "repair_tokens"',
                           param="pccpu")
    reuse = extension.get("reuse")
    if reuse is not None and reuse not in CHAT_REUSE:
        raise RequestError(f'pccpu.reuse must be "exact" or "compose", got {reuse!r}', param="pccpu.reuse")
    repair = extension.get("repair_tokens")
    if repair is not None and (not isinstance(repair, int) or isinstance(repair, bool) or not 0 <= repair <= 4096):
        raise RequestError(f"pccpu.repair_tokens must be an integer from 0 to 4096, got {repair!r}",
                           param="pccpu.repair_tokens")
    options = GenerationOptions(max_tokens=max_tokens, stop=tuple(stops), temperature=temperature,
                                top_p=top_p if top_p > 0 else 1e-6, seed=seed, repair_tokens=repair,
                                top_logprobs=_top_logprobs(body))
    return ChatRequest(messages, options, stream, include_usage, conversation, reuse)



@dataclass(frozen=True)
class DraftRequest:
    """``POST /v1/chat/drafts``: the user message being typed (``text``) after ``messages``, in a named
    conversation; the chat completion that sends it later (the same key, ``messages + [user: text]``) finds it
    decoded (type-ahead, ``pccpu.service.typeahead``)."""

    messages: list[dict[str, Any]]
    text: str
    conversation: str
    reuse: ChatReuse | None = None


def parse_draft_request(body: Any) -> DraftRequest:
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - {"messages", "text", "prompt_cache_key", "user", "pccpu"})
    if unknown:
        raise RequestError(f"unknown parameter {unknown[0]!r}; a draft takes messages, text, prompt_cache_key (or "
                           "user) and pccpu.reuse", param=unknown[0])
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise RequestError("messages must be the conversation before the message being typed (a list)",
                           param="messages")
    text = body.get("text")
    if not isinstance(text, str):
        raise RequestError("text must be the whole message typed so far (a string)", param="text")
    conversation = body.get("prompt_cache_key") or body.get("user")
    if not isinstance(conversation, str) or not conversation:
        raise RequestError("a draft needs its conversation's prompt_cache_key (or user): the chat request that "
                           "sends the message names the same key", param="prompt_cache_key")
    extension = body.get("pccpu") or {}
    if not isinstance(extension, Mapping) or set(extension) - {"reuse"}:
        raise RequestError('pccpu must be an object with "reuse" ("exact" or "compose")', param="pccpu")
    reuse = extension.get("reuse")
    if reuse is not None and reuse not in CHAT_REUSE:
        raise RequestError(f'pccpu.reuse must be "exact" or "compose", got {reuse!r}', param="pccpu.reuse")
    return DraftRequest(messages, text, conversation, reuse)


def _top_logprobs(body: Mapping[str, Any]) -> int | None:
    """OpenAI's pair: ``logprobs: true`` asks for them, ``top_logprobs`` (0-20) adds the most likely tokens."""
    wanted = _typed(body, "logprobs", bool, False)
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}",
                           param="top_logprobs")
    if not wanted and top:
        raise RequestError("top_logprobs needs logprobs: true", param="logprobs")
    return top if wanted else None


def _typed(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise RequestError(f"{name} must be a {kind.__name__}, got {type(value).__name__}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low} to {high}, got {value!r}", param=name)
    return float(value)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: Result) -> dict[str, Any]:
    """OpenAI's usage: ``cached_tokens`` counts every prompt token not decoded for this request. Whether those
    cells are exactly what a full prefill computes is in the ``pccpu`` block of ``timings`` (``exact``, and each
    module's ``composed``)."""
    reused = result.session_tokens + result.cached_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": reused},
    }


def timings(result: Result) -> dict[str, Any]:
    t = result.timings
    return {"prompt_n": result.uncached_tokens, "prompt_ms": result.ttft_ms, "cache_n": result.session_tokens
            + result.cached_tokens, "predicted_n": result.generated_tokens, "predicted_ms": t.generate_ms,
            "pccpu": {"session_tokens": result.session_tokens, "stored_tokens": result.cached_tokens,
                      "decoded_tokens": result.uncached_tokens, "exact": result.exact,
                      "composed_tokens": sum(m.tokens - m.repaired_tokens for m in result.modules if m.composed),
                      "repaired_tokens": sum(m.repaired_tokens for m in result.modules),
                      "restore_ms": t.restore_ms, "decode_ms": t.decode_ms,
                      "modules": [{"module": m.module, "source": m.source, "tokens": m.tokens,
                                   "composed": m.composed, "shifted": m.shifted,
                                   "repaired_tokens": m.repaired_tokens} for m in result.modules]}}


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason in ("length", "context") else "stop"


def logprobs(result: Result) -> dict[str, Any] | None:
    """A choice's ``logprobs`` in OpenAI's chat shape (None when the request did not ask for them)."""
    if result.logprobs is None:
        return None

    def entry(lp: TokenLogprob) -> dict[str, Any]:
        return {"token": lp.piece.decode("utf-8", errors="replace"), "logprob": lp.logprob, "bytes": list(lp.piece)}

    return {"content": [dict(entry(lp), top_logprobs=[entry(t) for t in lp.top]) for lp in result.logprobs],
            "refusal": None}


def chat_completion(result: Result, model_id: str, ident: str) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": finish_reason(result), "logprobs": logprobs(result)}],
            "usage": usage(result), "timings": timings(result)}


def text_completion(result: Result, model_id: str, ident: str) -> dict[str, Any]:
    return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result), "timings": timings(result)}


def text_chunk(model_id: str, ident: str, text: str, finish: str | None = None,
               result: Result | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model_id,
                            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if result is not None:
        body["choices"] = []
        body["usage"] = usage(result)
        body["timings"] = timings(result)
    return body


def chunk(model_id: str, ident: str, delta: dict[str, Any], finish: str | None = None,
          result: Result | None = None, token_logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                            "logprobs": token_logprobs}]}
    if result is not None:  # the usage chunk: no choices (stream_options.include_usage)
        body["choices"] = []
        body["usage"] = usage(result)
        body["timings"] = timings(result)
    return body
