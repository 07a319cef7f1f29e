"""The OpenAI API's completion requests and responses, as `mtp serve` reads and writes them.

`read_request` checks a /v1/completions or /v1/chat/completions body and returns what to decode; the other
functions lay out the responses and the streamed chunks (server-sent events) the API's clients expect. A field
the API defines and mtp does not do (n > 1, logprobs, penalties, tools) is refused with a message naming it,
never ignored: a client would otherwise get answers it did not ask for. Fields that change nothing (user,
metadata) are accepted. Sampling follows the API: temperature 0 is greedy, above 0 samples; a request without a
temperature gets greedy decoding (the server's lossless default: the answers greedy decoding gives).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ROLES = ("system", "user", "assistant")
# Fields mtp does not implement -> the value(s) that mean "not used" (anything else is refused).
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
               "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"})}


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), with the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded; requests with equal settings (and no seed) may share a batch."""

    max_tokens: int | None  # None: not given (the server gives what its default and the context allow)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class CompletionRequest:
    path: str  # COMPLETIONS or CHAT
    prompts: list  # completions: texts or token-id lists; chat: one conversation (a list of {"role", "content"})
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def read_request(path: str, body: object) -> CompletionRequest:
    """The request in `body` (parsed JSON), checked; a BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value not in unused:
            raise BadRequest(f"'{name}' is not supported by mtp serve (got {value!r})", name)
    prompts = [_messages(body.get("messages"))] if path == CHAT else _prompts(body.get("prompt"))
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if options and not stream:
        raise BadRequest("'stream_options' is only for a streamed request (stream: true)", "stream_options")
    include_usage = _typed(options, "include_usage", bool, False)
    return CompletionRequest(path, prompts, _sampling(body, path), stream, include_usage)


def _typed(body: dict, name: str, kind: type | tuple, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        names = {bool: "true or false", int: "an integer", dict: "an object", (int, float): "a number"}
        raise BadRequest(f"'{name}' must be {names.get(kind, kind)}, got {value!r}", name)
    return value


def _sampling(body: dict, path: str) -> Sampling:
    name = "max_completion_tokens" if path == CHAT and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, name, int, None)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"'{name}' must be at least 1, got {max_tokens}", name)
    seed = _typed(body, "seed", int, None)
    if seed is not None and not 0 <= seed < 2**64:
        raise BadRequest(f"'seed' must be in [0, 2**64), got {seed}", "seed")
    temperature = float(_typed(body, "temperature", (int, float), 0.0))
    top_p = float(_typed(body, "top_p", (int, float), 1.0))
    top_k = _typed(body, "top_k", int, 0)
    if not 0 <= temperature <= 2:
        raise BadRequest(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    if top_k < -1:
        raise BadRequest(f"'top_k' must be >= 0 (0 or -1: all tokens), got {top_k}", "top_k")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    for text in stop:
        _check_text(text, "stop")
    sample = temperature > 0
    return Sampling(max_tokens, sample, temperature if sample else 1.0, top_p if sample else 1.0,
                    max(top_k, 0) if sample else 0, seed if sample else None, tuple(s for s in stop if s))


def _check_text(text: str, param: str) -> str:
    """Text a tokenizer can take: JSON may carry a lone surrogate (\\ud800, as JavaScript writes a half emoji),
    which is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{param}' holds a lone surrogate (half of a character's UTF-16 pair)", param) from None
    return text


def _prompts(prompt) -> list[str | list[int]]:
    """A completion request's prompts: a text, a list of texts, token ids, or a list of token-id lists (as the
    API takes them; evaluation harnesses send tokens)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        raise BadRequest("'prompt' must be a string, a list of strings, token ids or a list of token-id lists",
                         "prompt")
    if not all(prompt):
        raise BadRequest("'prompt' holds an empty prompt: give at least one token", "prompt")
    return [_check_text(p, "prompt") if isinstance(p, str) else p for p in prompt]


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(messages) -> list[dict]:
    """The conversation of a chat request: roles system, user, assistant; a content given as parts (the API's
    [{"type": "text", "text": ...}]) joined into its text."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                         "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise BadRequest(f"messages[{i}]: 'role' must be one of {', '.join(ROLES)} (got {role!r})", "messages")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return _check_text(content, "messages")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return _check_text("".join(p["text"] for p in content), "messages")
    raise BadRequest(f"messages[{i}]: 'content' must be a string or a list of text parts (mtp serve reads text "
                     "only)", "messages")


# ---------------------------------------------------------------------------------------------------- responses
def new_id(path: str) -> str:
    return ("chatcmpl-" if path == CHAT else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(path: str, index: int, text: str, finish_reason: str | None, delta: bool = False) -> dict:
    """One choice of a response (delta: of a streamed chunk)."""
    if path == COMPLETIONS:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = ({"content": text} if text else {}) if delta else {"role": "assistant", "content": text}
    return {"index": index, "delta" if delta else "message": body, "logprobs": None, "finish_reason": finish_reason}


def response(path: str, rid: str, model: str, choices: list[dict], usage_: dict | None, extra: dict) -> dict:
    """A whole (not streamed) response; `extra` adds mtp's own fields."""
    kind = "chat.completion" if path == CHAT else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            **({"usage": usage_} if usage_ is not None else {}), **extra}


def chunk(path: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """One streamed chunk (a server-sent event's data)."""
    kind = "chat.completion.chunk" if path == CHAT else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            **({"usage": usage_} if usage_ is not None else {})}


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
