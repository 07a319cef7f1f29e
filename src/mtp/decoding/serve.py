"""`mtp serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models) whose answers
are decoded with any strategy; lossless speculative decoding by default, so clients get greedy's answers sooner.

One thread decodes (`mtp.decoding.batcher.Batcher`: requests waiting together are decoded as one batch); the
HTTP threads here only read requests, tokenize them and write what the decoding thread hands them. Streamed
answers are sent as their text becomes final, holding back what could be the start of a stop string
(`StreamedText`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from queue import Empty, Queue
from typing import Literal
from urllib.parse import urlsplit

from mtp.arguments import check_values
from mtp.decoding import openai_api as api
from mtp.decoding.batcher import Batcher, Finished, Job
from mtp.decoding.commands import IncrementalText, StreamedText, encode_prompts
from mtp.decoding.corpus import finish_corpus
from mtp.decoding.generate import context_limit, context_room
from mtp.decoding.options import DraftOptions, WeightOptions
from mtp.decoding.prefixes import PromptCache
from mtp.errors import MTPError, first_line
from mtp.evaluation.prompts import has_chat_template
from mtp.options import with_flat_keywords
from mtp.process import leaves_threads_running
from mtp.runtime import default_batch_rows


# ------------------------------------------------------------------------------------------------------ HTTP
class Handler(BaseHTTPRequestHandler):
    """The API's routes; `server` carries the batcher, the tokenizer and the model's name."""

    server: Server
    protocol_version = "HTTP/1.1"

    timeout = 60  # seconds a connection may stay silent (a stalled upload, an idle keep-alive): its thread ends

    @property
    def route(self) -> str:
        return urlsplit(self.path).path  # (a query string routes as its path)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route, model = self.route, self.server.model_name
        if route in ("/health", "/v1/health"):  # open without the key, as /metrics
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif route == "/metrics":
            batcher = self.server.batcher
            with batcher.ready:
                waiting = len(batcher.waiting)
            cache = batcher.prompt_cache
            data = batcher.counts.prometheus(waiting, cache.reused_tokens if cache else 0,
                                             batcher.decode.get("lookup_corpus")).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif route.startswith("/v1/") and not self._authorized():
            return
        elif route == "/v1/models":
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [_model_card(model)]})
        elif route == f"/v1/models/{model}":
            self._send_json(HTTPStatus.OK, _model_card(model))
        elif route in (api.COMPLETIONS, api.CHAT):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{route} takes POST (a JSON body), not GET", allow="POST")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {route} (GET /v1/models, /health, /metrics)")

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._post()
        except OSError:  # the connection broke or went silent: nobody to answer
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (a bug: the client gets a 500, the log the trace, the server goes on)
            traceback.print_exc()
            self.close_connection = True
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the server failed: {type(e).__name__}: {e}")
            except OSError:
                pass

    def _post(self) -> None:
        if not self._authorized():
            return
        if self.server.stopping:
            self._discard_body()
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping")
            return
        if self.route not in (api.COMPLETIONS, api.CHAT):
            self._discard_body()
            if self.route in ("/health", "/v1/health", "/metrics", "/v1/models") or self.route.startswith("/v1/models/"):
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.route} takes GET, not POST", allow="GET")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.route} (POST {api.COMPLETIONS}, {api.CHAT})")
            return
        try:
            request = api.read_request(self.route, self._read_json())
            rows, budgets = self.server.encode(request)
        except api.BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e), e.param)
            return
        events: Queue = Queue()
        tok = self.server.batcher.model.tokenizer
        jobs = [Job(ids, dataclasses.replace(request.sampling, max_tokens=budget), p * request.n + i, events,
                    StreamedText(tok, request.sampling.stop, ids) if request.stream else None, echo=request.echo,
                    first_choice=i == 0)
                for p, (ids, budget) in enumerate(zip(rows, budgets, strict=True)) for i in range(request.n)]
        with self.server.counting():  # (a stopping server waits for the requests it counts)
            self.server.batcher.submit(jobs)
            if request.stream:
                self._stream(request, jobs)
            else:
                self._answer(request, jobs)

    def _authorized(self) -> bool:
        """With --api-key, a request must carry it as OpenAI clients send theirs ("Authorization: Bearer KEY");
        one that does not gets 401 (its body, if any, is read and dropped: the connection stays usable)."""
        key = self.server.api_key
        scheme, _, sent = self.headers.get("Authorization", "").strip().partition(" ")
        if key is None or (scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), key.encode())):
            return True
        self._discard_body()
        self._error(HTTPStatus.UNAUTHORIZED, "invalid or missing API key (send \"Authorization: Bearer KEY\")")
        return False

    def _body(self) -> bytes:
        """The request's body: Content-Length bytes, or chunks (Transfer-Encoding: chunked); at most MAX_BODY."""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._chunks()
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                raise api.BadRequest(f"Content-Length must be a number of bytes up to {MAX_BODY}")
            body = self.rfile.read(length)
            if len(body) < length:
                raise api.BadRequest("the request body ended before its Content-Length")
            return body
        except TimeoutError:
            raise api.BadRequest(f"the request body stopped arriving (nothing for {self.timeout} s)") from None
        except api.BadRequest:
            self.close_connection = True  # what follows on the connection cannot be told apart from the body
            raise

    def _chunks(self) -> bytes:
        """A chunked body: hex sizes and chunks up to a zero size, then the trailer lines up to a blank one."""
        body = b""
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise api.BadRequest("a chunked body's chunk size is not a hex number") from None
            if size < 0 or len(body) + size > MAX_BODY:
                raise api.BadRequest(f"the request body is over {MAX_BODY} bytes")
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline(1024)  # the chunk's line end

    def _discard_body(self) -> None:
        """Read and drop a refused request's body, so that the connection can carry the next request."""
        try:
            self._body()
        except api.BadRequest:
            pass

    def _read_json(self) -> object:
        body = self._body()
        try:
            return json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise api.BadRequest(f"the request body is not JSON: {e}") from None
        except RecursionError:
            raise api.BadRequest("the request body nests too deep") from None

    def _events(self, jobs: list[Job]) -> Iterator[tuple[str, int, object]]:
        """The jobs' events as the decoding thread sends them. A client that hangs up meanwhile cancels its jobs
        (a job not started is dropped, a batch whose clients all left stops) and ends the iteration."""
        while True:
            try:
                yield jobs[0].events.get(timeout=0.25)
            except Empty:
                if self._client_left():
                    self._cancel(jobs)
                    return
                if not self.server.batcher.alive():  # (it logged why)
                    for job in jobs:
                        yield "error", job.index, (HTTPStatus.SERVICE_UNAVAILABLE, "the decoding thread stopped")
                    return

    def _client_left(self) -> bool:
        """Whether the client closed its end: the socket reads as ended (a waiting client sends nothing). One
        that only half-closes after its request (`nc -N`) reads the same and is taken as gone, as uvicorn takes
        it; HTTP clients keep their end open while they wait."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    @staticmethod
    def _cancel(jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled.set()

    def _answer(self, request: api.CompletionRequest, jobs: list[Job]) -> None:
        done: dict[int, Finished] = {}
        for kind, index, value in self._events(jobs):
            if kind == "error":  # the request fails whole: its other prompts need not be decoded
                self._cancel(jobs)
                self._error(*value)
                return
            if kind == "end":
                done[index] = value
                if len(done) == len(jobs):
                    break
        else:  # the client left
            self.close_connection = True
            return
        choices = [self._choice(request, jobs[i], done[i]) for i in range(len(jobs))]
        prompt_tokens = sum(len(j.ids) for j in jobs[::request.n])  # (n choices: the prompt counted once)
        completion_tokens = sum(len(d.tokens) for d in done.values())
        mtp = {"strategy": self.server.strategy, "batches": [done[i].batch for i in range(len(jobs))]}
        self._send_json(HTTPStatus.OK, api.response(request.path, api.new_id(request.path), self.server.model_name,
                                                    choices, api.usage(prompt_tokens, completion_tokens),
                                                    {"mtp": mtp}))

    def _choice(self, request: api.CompletionRequest, job: Job, done: Finished) -> dict:
        """A whole answer's choice: its text (after the prompt's, with echo) and the log-probabilities asked for."""
        text, tok = done.text, self.server.batcher.model.tokenizer
        if request.sampling.logprobs is None:
            prompt = self._echoed(request, job, [])[0] if request.echo else ""
            return api.choice(request.path, job.index, prompt + text, done.finish_reason)
        scores, tokens, offsets = done.logprobs or [], done.tokens, None
        if request.path == api.COMPLETIONS:
            offsets = self.server.text_offsets(IncrementalText(tok, job.ids), tokens, 0)[0]
        if request.echo:  # (completions only)
            prompt, offsets = self._echoed(request, job, offsets)
            text, scores, tokens = prompt + text, done.prompt_logprobs + scores, job.ids + tokens
        field = api.logprobs_field(request.path, scores, tokens, self.server.token_text, offsets)
        return api.choice(request.path, job.index, text, done.finish_reason, logprobs=field)

    def _echoed(self, request: api.CompletionRequest, job: Job, offsets: list[int]) -> tuple[str, list[int]]:
        """An echoed prompt's text (token ids: their text, special tokens left out as in answers) and the text
        offsets of its tokens followed by `offsets` (the answer's, moved past the prompt)."""
        prompt = request.prompts[job.index // request.n]
        if not isinstance(prompt, str):
            with self.server.tokenizer_lock:
                prompt = self.server.batcher.model.tokenizer.decode(prompt, skip_special_tokens=True)
        if request.sampling.logprobs is None:
            return prompt, []
        own = self.server.text_offsets(IncrementalText(self.server.batcher.model.tokenizer), job.ids, 0)[0]
        return prompt, own + [len(prompt) + o for o in offsets]

    def _stream(self, request: api.CompletionRequest, jobs: list[Job]) -> None:
        """Server-sent events: a chunk per piece of text, one with each choice's finish reason, the token counts
        when asked (stream_options.include_usage), then [DONE]. A client that leaves cancels its jobs (its batch
        stops if no other client is left in it)."""
        rid, path, name = api.new_id(request.path), request.path, self.server.model_name
        started = False
        completion_tokens, ended = 0, 0
        shown = [(IncrementalText(self.server.batcher.model.tokenizer, j.ids), 0) for j in jobs]  # (see `_piece`)

        def send(data: dict | str) -> None:
            nonlocal started
            if not started:  # the headers, and a chat's first chunk (the role), once there is something to send
                started = True
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                if path == api.CHAT:  # (each choice's role)
                    send(api.chunk(path, rid, name, [{"index": j.index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None} for j in jobs]))
            payload = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        try:
            for kind, index, value in self._events(jobs):
                if kind in ("echo", "text"):
                    send(api.chunk(path, rid, name, [self._piece(request, jobs[index], shown, kind, value)]))
                elif kind == "error" and not started:  # nothing sent yet: an HTTP error as any other
                    self._cancel(jobs)
                    self._error(*value)
                    return
                elif kind == "error":
                    send(api.error_body(value[1], value[0]))
                    ended += 1
                else:
                    ended += 1
                    completion_tokens += len(value.tokens)
                    rest = jobs[index].streamed.finish()
                    send(api.chunk(path, rid, name, [api.choice(path, index, rest, value.finish_reason, delta=True)]))
                if ended == len(jobs):
                    if request.include_usage:
                        usage = api.usage(sum(len(j.ids) for j in jobs[::request.n]), completion_tokens)
                        send(api.chunk(path, rid, name, [], usage))
                    send("[DONE]")
                    break
        except OSError:  # the client left (a reset, a broken pipe, a connection gone silent)
            self._cancel(jobs)
        self.close_connection = True

    def _piece(self, request: api.CompletionRequest, job: Job, shown: list, kind: str, value) -> dict:
        """A streamed chunk's choice: an echoed prompt (its text first, with its scores when asked) or a piece of
        the answer with its tokens' scores. `shown[index]`: the choice's text so far (an IncrementalText and its
        length), which a completion's text offsets count from."""
        path, index = request.path, job.index
        if kind == "echo":
            text, offsets = self._echoed(request, job, [])
            shown[index] = (IncrementalText(self.server.batcher.model.tokenizer, job.ids), len(text))
            field = None if value is None else api.logprobs_field(path, value, job.ids, self.server.token_text,
                                                                  offsets)
            return api.choice(path, index, text, None, True, field)
        piece, scores = value
        field = None
        if scores is not None:  # (a piece's tokens; its text may be held back for a stop string)
            tokens, offsets = [e.token for e in scores], None
            if path == api.COMPLETIONS:
                text, start = shown[index]
                offsets, end = self.server.text_offsets(text, tokens, start)
                shown[index] = (text, end)
            field = api.logprobs_field(path, scores, tokens, self.server.token_text, offsets)
        return api.choice(path, index, piece, None, True, field)

    def _other_method(self) -> None:
        """PUT, DELETE, PATCH: no route takes them (a body they carry is not read: the connection closes)."""
        self.close_connection = True
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.route} takes GET or POST, not {self.command}",
                    allow="GET, POST")

    do_PUT = do_DELETE = do_PATCH = _other_method  # noqa: N815 (http.server's names)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line or headers it cannot read, a method it has no handler for),
        as the API's JSON error body, not its HTML page."""
        text = message or self.responses.get(code, ("error",))[0]
        self.log_error("code %d, message %s", code, text)
        self.close_connection = True
        data = json.dumps(api.error_body(text, code)).encode()
        self.send_response(code, text)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(data)

    def _send_json(self, status: int, body: dict, allow: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:  # (a 405 names the methods the route takes)
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, allow: str | None = None) -> None:
        self._send_json(status, api.error_body(message, status, param), allow)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if self.server.access_log:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    """The HTTP server, bound before the model loads (a port in use is an error before any long work)."""

    daemon_threads = True
    # connections the system holds until the accepting thread takes them: a burst of clients connecting at once
    # (socketserver's 5 dropped the rest: their connects waited a second or more, or were reset)
    request_queue_size = 1024

    def __init__(self, host: str, port: int):
        if ":" in host:  # an IPv6 address ("::" listens on every interface, IPv4 too where the system maps it)
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise MTPError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.batcher: Batcher | None = None
        self.model_name = "mtp"
        self.strategy = "greedy"
        self.max_tokens = 256
        self.access_log = True
        self.api_key: str | None = None
        self.chat = False
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer may not be called from two threads at once
        self.requests = 0  # completion requests being answered
        self.requests_lock = threading.Lock()
        self.stopping = False  # new completion requests are refused (503)
        self.quantize = "none"  # the weights' format (int8 scores a prompt's token by the forward it is in)

    def _tokens(self, prompt: str | list[dict], path: str) -> list[int]:
        """A text's (chat: a conversation's, through the chat template) token ids."""
        with self.tokenizer_lock:
            try:
                ids, _ = encode_prompts(self.batcher.model.tokenizer, [prompt], chat=path == api.CHAT)
            except (MTPError, TypeError, ValueError) as e:  # (a template or a tokenizer that refuses the text)
                raise api.BadRequest(first_line(e), "messages" if path == api.CHAT else "prompt") from None
        return ids[0].tolist()

    def _check_text_length(self, request: api.CompletionRequest) -> None:
        """A text prompt (a conversation's contents) with more characters than the context's tokens can stand
        for is refused before it is tokenized: tokenizing holds the tokenizer, which every request needs, and a
        body of 20 MB held it for 34 s (2 CPU cores) only to be refused for its length."""
        if self.room is None:
            return
        limit = context_limit(self.batcher.model)
        for prompt in request.prompts:
            chars = len(prompt) if isinstance(prompt, str) else \
                sum(len(m["content"]) for m in prompt) if request.path == api.CHAT else 0
            if chars > limit * self.longest_token:
                raise api.BadRequest(f"this model's context is {limit} tokens; the prompt's {chars:,} characters are "
                                     "more than that many tokens hold", "messages" if request.path == api.CHAT
                                     else "prompt")

    def text_offsets(self, text: IncrementalText, tokens: list[int], start: int) -> tuple[list[int], int]:
        """Where each of `tokens` begins in the text `text` decodes (characters from `start`), and where the text
        ends after them, so that the offsets index the text a client is sent: a token ends where the text it
        completes ends; one that completes none (a piece of a character, a special token) takes no width."""
        offsets = []
        with self.tokenizer_lock:
            for t in tokens:
                end = start + len(text.add([t]))
                offsets.append(max(start, end - len(self._token_text(t)[0])))
                start = end
        return offsets, start

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes as responses show them (`openai_api.token_text`)."""
        with self.tokenizer_lock:
            return self._token_text(token)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count a request as being answered for the length of the block."""
        with self.requests_lock:
            self.requests += 1
        try:
            yield
        finally:
            with self.requests_lock:
                self.requests -= 1

    def handle_error(self, request, client_address) -> None:
        """A connection the client broke is no error of the server's: no traceback for it."""
        if not isinstance(sys.exc_info()[1], OSError):  # (a reset, a broken pipe, a silent connection)
            super().handle_error(request, client_address)

    def finish_requests(self, seconds: float) -> bool:
        """Stop taking completion requests and wait up to `seconds` for those being answered (False: some were
        left). The listening socket should be closed first: no new connection comes."""
        self.stopping = True
        deadline = time.monotonic() + seconds
        while self.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.requests

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def attach(self, batcher: Batcher, model_name: str, strategy: str, max_tokens: int) -> None:
        self.batcher, self.model_name, self.strategy, self.max_tokens = batcher, model_name, strategy, max_tokens
        self.chat = has_chat_template(batcher.model.tokenizer)
        self._token_text = api.token_text(batcher.model.tokenizer)
        self.room = context_room(batcher.model, **batcher.decode)  # a prompt and its answer together, at most
        # the most characters one token stands for (its vocabulary entry's: a byte-level token's has one a byte)
        self.longest_token = max(map(len, batcher.model.tokenizer.get_vocab()), default=1)

    def encode(self, request: api.CompletionRequest) -> tuple[list[list[int]], list[int]]:
        """Each prompt's token ids (a conversation through the chat template) and new tokens at most: the
        request's max_tokens, which must fit the context with the prompt, or else the server's default, as much
        of it as fits."""
        if request.path == api.CHAT and not self.chat:
            raise api.BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
        asked, logprobs = request.sampling.max_tokens, request.sampling.logprobs
        if logprobs is not None and request.echo and self.quantize == "int8":
            raise api.BadRequest("a prompt's scores under int8 weights depend on the other tokens of the forward "
                                 "(the activations' scale is the call's): serve with --quantize none or fp16 to score "
                                 "prompts", "echo")
        if logprobs is not None and asked != 0 and self.strategy not in ("greedy", "speculative"):
            raise api.BadRequest(f"log-probabilities are the model's scores of the tokens it verified; this server "
                                 f"decodes with {self.strategy}, which emits its heads' tokens unscored (serve "
                                 "with --strategy speculative or greedy)", "logprobs")
        self._check_text_length(request)
        rows = [p if isinstance(p, list) and request.path == api.COMPLETIONS else self._tokens(p, request.path)
                for p in request.prompts]
        vocab = self.batcher.model.config.vocab_size
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise api.BadRequest(f"'prompt' holds a token id outside the vocabulary (0 to {vocab - 1})", "prompt")
        if any(not 0 <= t < vocab for t, _ in request.sampling.logit_bias):
            raise api.BadRequest(f"'logit_bias' holds a token id outside the vocabulary (0 to {vocab - 1})",
                                 "logit_bias")
        longest, room = max(len(r) for r in rows), self.room
        if asked == 0 and room is not None:  # a prompt only scored: one forward, no drafts
            limit = context_limit(self.batcher.model)
            if longest > limit:
                raise api.BadRequest(f"this model's context is {limit} tokens; the prompt has {longest}", "prompt")
        elif room is not None and longest + (1 if asked is None else asked) > room:
            context = f"this model's context is {context_limit(self.batcher.model)} tokens ({room} for a prompt " \
                      f"and its answer, with this server's drafts); the prompt has {longest}"
            raise api.BadRequest(f"{context} and max_tokens asks {asked} more" if asked else
                                 f"{context}: no room for an answer", "max_tokens" if asked else "prompt")
        budgets = [asked if asked is not None else self.max_tokens if room is None else
                   min(self.max_tokens, room - len(r)) for r in rows]
        return rows, budgets


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          strategy: Literal["greedy", "speculative", "confadapt", "static"] = "speculative",
          max_new_tokens: int = 256, max_batch_size: int | None = None, batch_window_ms: float = 10.0,
          batching: Literal["continuous", "static"] = "continuous", prompt_cache_mb: int = 1024,
          api_key: str | None = None, access_log: bool = True,
          drafts: DraftOptions | None = None, weights: WeightOptions | None = None, **flat: object) -> int:
    """Serve a model over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions (streamed or not).

    Any OpenAI client works: base URL http://HOST:PORT/v1, any API key. A request's temperature 0 (or none) is
    greedy decoding, above 0 sampling (exact speculative sampling with --strategy speculative); max_tokens,
    top_p, top_k, seed, stop, stream, presence_penalty, frequency_penalty and logit_bias as the API defines them
    (vLLM's min_p and repetition_penalty too). Each response adds an "mtp" field: the
    figures of the batch it was decoded in (tokens per forward, tokens/s). Ctrl-C stops the server.

    Args:
        model: the embedded default (omit), a local folder, a .gguf file, a Meta checkpoint or a hub id.
        host: the address to listen on (0.0.0.0: every interface).
        port: the port to listen on (0: any free one, printed).
        served_model_name: the model's name in /v1/models and in responses (default: the folder's name).
        strategy: greedy | speculative (lossless: greedy's answers, sooner) | confadapt (lossy, tau) | static
            (lossy, k).
        max_new_tokens: tokens an answer has at most when its request gives no max_tokens.
        max_batch_size: requests (prompts) waiting together are decoded as one batch of at most this many rows,
            each with its own settings; requests that come while it decodes join it while a row is free (default:
            64 on a GPU, 8 on a CPU).
        batch_window_ms: a batch starts once no request came for this long (at most 10 such windows after
            its first) or it is full: a burst of requests is decoded together; 0: it starts at once.
        batching: continuous (requests that come while a batch decodes join it between two steps, where a row is
            free and they fit: their first tokens come at once) | static (they wait for the next batch).
        prompt_cache_mb: keys and values of recent prompts and their answers kept (MiB, on the model's device): a
            prompt that starts like one of them (a conversation's next turn, the same system prompt) feeds only the
            rest; 0: none.
        api_key: requests must carry this key ("Authorization: Bearer KEY", an OpenAI client's api_key); default:
            the environment's MTP_API_KEY, else none is asked (listen on 127.0.0.1 only, then).
        access_log: a line on stderr for every HTTP request (each decoded batch has its own line either way).
    """
    from mtp.hub import resolve_model

    drafts, weights = with_flat_keywords("serve", {"drafts": drafts or DraftOptions(),
                                                   "weights": weights or WeightOptions()}, flat).values()
    check_values({"max_new_tokens": max_new_tokens, "max_batch_size": max_batch_size, "port": port,
                  "batch_window_ms": batch_window_ms, "prompt_cache_mb": prompt_cache_mb})
    drafts.check()
    runtime, use_graphs = weights.runtime()
    max_batch_size = default_batch_rows(runtime.device) if max_batch_size is None else max_batch_size
    resolve_model(model)  # a model that is not there: one line before the port is taken
    server = Server(host, port)
    corpus = None
    try:
        m = weights.load(model, runtime, strategy)
        corpus = drafts.corpus(m)
        batcher = Batcher(m, dict(strategy=strategy, graphs=use_graphs, lookup_corpus=corpus,
                                  **drafts.generate_kwargs()), max_batch_size,
                          batch_window_ms / 1000, join=batching == "continuous",
                          prompt_cache=PromptCache(prompt_cache_mb << 20) if prompt_cache_mb else None)
        server.attach(batcher, served_model_name or model_label(model), strategy, max_new_tokens)
        server.access_log, server.quantize = access_log, weights.quantize
        server.api_key = api_key if api_key is not None else os.environ.get("MTP_API_KEY") or None
        if server.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            print(f"mtp serve: warning: listening on {host} without an API key: whoever reaches the port can use "
                  "the model (--api-key, or MTP_API_KEY)", file=sys.stderr, flush=True)
        batcher.warm_up()
        batcher.start()
        batching = "continuous" if batcher.join else "static"
        kept = f", a prompt cache of {prompt_cache_mb} MiB" if prompt_cache_mb else ""
        kept += ", lookup drafts from its answers too" if drafts.grow_corpus else ""
        kept += f" (kept in {drafts.save_corpus})" if drafts.save_corpus else ""
        print(f"mtp serve: {server.model_name} ({strategy} decoding on {weights.describe(runtime)}, {batching} "
              f"batching{kept}) at {server.url}/v1 (POST {api.COMPLETIONS}, {api.CHAT}; GET /v1/models); Ctrl-C "
              "stops", file=sys.stderr, flush=True)
        leaves_threads_running()  # (connection threads: daemons)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the requests being answered are finished first
            server.server_close()
            if server.requests:
                print(f"mtp serve: stopping: finishing {server.requests} request(s), at most {DRAIN_SECONDS} s "
                      "(Ctrl-C again stops now)", file=sys.stderr, flush=True)
                server.finish_requests(DRAIN_SECONDS)
            raise
    finally:
        server.server_close()
        if server.batcher is not None:
            server.batcher.stop()
            # the requests still being answered (Ctrl-C again, or the drain ran out) are told that decoding stopped
            # (their HTTP threads see it within a poll) rather than cut off: a streamed answer cut short reads as
            # whole to a client that does not look for its finish_reason
            server.finish_requests(1)
        finish_corpus(corpus)  # (--save-corpus: once the decoding thread has stopped)
    return 0


MAX_BODY = 64 * 2**20  # bytes a request body may have (a long conversation is a few hundred KB)
DRAIN_SECONDS = 30  # what a stopping server gives the requests it is answering (orchestrators wait about as long)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mtp"}


def model_label(spec: str | None) -> str:
    """The served model's name: the folder's or file's name (a hub id as given), or the embedded default's."""
    if spec is None:
        return "SmolLM2-135M-Instruct"
    path = Path(spec).expanduser()
    return path.name.removesuffix(".gguf") if path.exists() and path.name else spec
