"""The OpenAI API's completion requests and responses, as `mtp serve` reads and writes them.

`read_request` checks a /v1/completions or /v1/chat/completions body and returns what to decode; the other
functions lay out the responses and the streamed chunks (server-sent events) the API's clients expect, with the
tokens' log-probabilities where a request asks for them (`logprobs`; a completion's `echo` scores its prompt
too, as evaluation harnesses score a continuation); `n` choices of a prompt are rows of one batch. A field the
API defines and mtp does not do (best_of, penalties, tools) is refused with a message naming it, never ignored:
a client would otherwise get answers it did not ask for. Fields that change nothing (user, metadata) are
accepted. Sampling follows the API: temperature 0 is greedy, above 0 samples; a request without a
temperature gets greedy decoding (the server's lossless default: the answers greedy decoding gives).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from mtp.arguments import RULES
from mtp.decoding.logprobs import MOST_ALTERNATIVES, TokenLogprob

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MOST_CHOICES = 16  # `n`: choices per prompt (each a row of the batch)
ROLES = ("system", "user", "assistant")
# Fields mtp does not implement -> the value(s) that mean "not used" (anything else is refused).
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
               "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"})}


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), with the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded (requests without a seed share batches, each row with its own settings)."""

    max_tokens: int | None  # None: not given (the server gives what its default and the context allow)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # the new tokens' log-probabilities, with this many alternatives each; None: none
    presence_penalty: float = 0.0  # OpenAI's penalties on the answer's tokens (`mtp.decoding.penalties`)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers' on the prompt's and the answer's (a vLLM extra field)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), by token id
    min_p: float = 0.0  # vLLM's extra field: sampling from tokens at least this times as likely as the top one
    min_tokens: int = 0  # vLLM's extra field: no end token before the answer has this many


@dataclass
class CompletionRequest:
    path: str  # COMPLETIONS or CHAT
    prompts: list  # completions: texts or token-id lists; chat: one conversation (a list of {"role", "content"})
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    echo: bool = False  # completions: the answer begins with the prompt (and its tokens' log-probabilities)
    n: int = 1  # choices per prompt (choice p * n + i is prompt p's i-th)


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
    echo = _echo(body, path)
    sampling = _sampling(body, path, echo)
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MOST_CHOICES:
        raise BadRequest(f"'n' must be in [1, {MOST_CHOICES}], got {n}", "n")
    return CompletionRequest(path, prompts, sampling, stream, include_usage, echo, n)


def _echo(body: dict, path: str) -> bool:
    echo = _typed(body, "echo", bool, False) if path == COMPLETIONS else body.get("echo")
    if path == CHAT and echo not in (None, False):
        raise BadRequest(f"'echo' is a field of {COMPLETIONS}, not of chat completions (got {echo!r})", "echo")
    return bool(echo)


def _logprobs(body: dict, path: str) -> int | None:
    """Alternatives per token whose log-probabilities the request asks for (0: the tokens' own), or None:
    completions take `logprobs` as a count, chat `logprobs: true` with `top_logprobs`."""
    if path == COMPLETIONS:
        if body.get("top_logprobs") not in (None, 0):
            raise BadRequest(f"'top_logprobs' is a chat completions field; {COMPLETIONS} takes 'logprobs': a "
                             "count", "top_logprobs")
        count, name = _typed(body, "logprobs", int, None), "logprobs"
    else:
        count, name = _typed(body, "top_logprobs", int, None), "top_logprobs"
        if not _typed(body, "logprobs", bool, False):
            if count:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        count = count or 0
    if count is not None and not 0 <= count <= MOST_ALTERNATIVES:
        raise BadRequest(f"'{name}' must be in [0, {MOST_ALTERNATIVES}], got {count}", name)
    return count


def _typed(body: dict, name: str, kind: type | tuple, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        names = {bool: "true or false", int: "an integer", dict: "an object", (int, float): "a number"}
        raise BadRequest(f"'{name}' must be {names.get(kind, kind)}, got {value!r}", name)
    return value


def _sampling(body: dict, path: str, echo: bool = False) -> Sampling:
    name = "max_completion_tokens" if path == CHAT and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, name, int, None)
    if max_tokens is not None and max_tokens < (0 if echo else 1):  # (echo and 0 new tokens: a prompt's scores)
        raise BadRequest(f"'{name}' must be at least 1 (0 with echo), got {max_tokens}", name)
    seed = _typed(body, "seed", int, None)
    if seed is not None and not 0 <= seed < 2**64:
        raise BadRequest(f"'seed' must be in [0, 2**64), got {seed}", "seed")
    temperature = _number(body, "temperature", 0.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _typed(body, "top_k", int, 0)
    if not 0 <= temperature <= 2:
        raise BadRequest(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    if top_k < -1:
        raise BadRequest(f"'top_k' must be >= 0 (0 or -1: all tokens), got {top_k}", "top_k")
    min_p = _ranged(body, "min_p", 0.0)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    for text in stop:
        _check_text(text, "stop")
    sample = temperature > 0
    return Sampling(max_tokens, sample, temperature if sample else 1.0, top_p if sample else 1.0,
                    max(top_k, 0) if sample else 0, seed if sample else None, tuple(s for s in stop if s),
                    _logprobs(body, path), *_penalties(body), _logit_bias(body), min_p if sample else 0.0,
                    _min_tokens(body, max_tokens))


def _penalties(body: dict) -> tuple[float, float, float]:
    """(presence, frequency, repetition): OpenAI's two, and transformers' (vLLM's extra field)."""
    return (_ranged(body, "presence_penalty", 0.0), _ranged(body, "frequency_penalty", 0.0),
            _ranged(body, "repetition_penalty", 1.0))


def _number(body: dict, name: str, default: float) -> float:
    """A JSON number as a float; an integer too large for one (JSON has no bound) is the request's error."""
    value = _typed(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:
        raise BadRequest(f"'{name}' is out of range, got an integer of {len(str(value))} digits", name) from None


def _ranged(body: dict, name: str, default: float) -> float:
    """A number within the bounds every command and `generate` hold it to (`mtp.arguments.RULES`)."""
    value = _number(body, name, default)
    if not RULES[name].holds(value):
        raise BadRequest(f"'{name}' must be {RULES[name]}, got {value:g}", name)
    return value


def _min_tokens(body: dict, max_tokens: int | None) -> int:
    """vLLM's `min_tokens`: at least 0, at most max_tokens where given."""
    value = _typed(body, "min_tokens", int, 0)
    if value < 0 or (max_tokens is not None and value > max_tokens):
        raise BadRequest(f"'min_tokens' must be in [0, max_tokens], got {value}", "min_tokens")
    return value


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]} (ids beyond the vocabulary: the server says, knowing it)."""
    bias = _typed(body, "logit_bias", dict, {})
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise BadRequest(f"'logit_bias' maps token ids to biases; {key!r} is no token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise BadRequest(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


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


def choice(path: str, index: int, text: str, finish_reason: str | None, delta: bool = False,
           logprobs: dict | None = None) -> dict:
    """One choice of a response (delta: of a streamed chunk); `logprobs` as `logprobs_field` lays them out."""
    if path == COMPLETIONS:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body = ({"content": text} if text else {}) if delta else {"role": "assistant", "content": text}
    return {"index": index, "delta" if delta else "message": body, "logprobs": logprobs,
            "finish_reason": finish_reason}


# A token as a response shows it: its text and its bytes (a character split over tokens has a piece in each).
TokenText = Callable[[int], tuple[str, bytes]]


def logprobs_field(path: str, entries: list[TokenLogprob | None], tokens: list[int], token_text: TokenText,
                   offsets: list[int] | None) -> dict:
    """The `logprobs` of a choice: chat's `content` list of {token, logprob, bytes, top_logprobs}; a
    completion's parallel lists: tokens, token_logprobs, top_logprobs (the chosen token's included, as OpenAI's
    completions have it) and text_offset (`offsets`: each token's first character in the choice's text; chat:
    None). An
    entry None is an echoed prompt's first token, which nothing scores. A log-probability is at least -9999 (as
    OpenAI's): JSON has no -Infinity."""
    if path == CHAT:
        def item(token: int, logprob: float) -> dict:
            text, raw = token_text(token)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def alternatives(e: TokenLogprob) -> dict[str, float]:
        top: dict[str, float] = {}
        for t, lp in (*e.top, (e.token, e.logprob)):  # two tokens may show as one text: the likelier one's
            top.setdefault(token_text(t)[0], _finite(lp))
        return top

    return {"tokens": [token_text(t)[0] for t in tokens],
            "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": [None if e is None else alternatives(e) for e in entries],
            "text_offset": offsets}


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB) if logprob == logprob else LOWEST_LOGPROB  # (NaN: no number)


LOWEST_LOGPROB = -9999.0


def token_text(tokenizer) -> TokenText:
    """How a response shows this tokenizer's tokens: the text a token adds after other text (special tokens
    included) and its bytes. A byte-level token that holds part of a character decodes to U+FFFD; its bytes are
    then the token's own (GPT-2's byte-to-character table, or a "<0xE2>" byte token)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    anchor_text = tokenizer.decode(anchor) if anchor else None

    @cache
    def show(token: int) -> tuple[str, bytes]:
        # decoded after an anchor ("a"): a SentencePiece tokenizer (Llama 2, Mistral) drops the word-start
        # space of a text's first token, so "▁is" alone shows "is"; after the anchor, " is" (as vLLM shows it),
        # and the tokens' texts add up to the answer's
        after = tokenizer.decode(anchor + [token]) if anchor_text is not None else ""
        text = after[len(anchor_text):] if anchor_text and after.startswith(anchor_text) else tokenizer.decode([token])
        if "\ufffd" not in text:
            return text, text.encode()
        raw = tokenizer.convert_ids_to_tokens(token) or ""
        byte, table = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw), _byte_of_char()
        if byte:  # (SentencePiece's byte fallback)
            return text, bytes([int(byte.group(1), 16)])
        if raw and all(c in table for c in raw):
            return text, bytes(table[c] for c in raw)
        return text, text.encode()

    return show


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


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
