"""`mtp serve`: the OpenAI API's completions over HTTP, answers equal to greedy decoding's (the server's default
is lossless speculative decoding), streamed pieces that add up to the answer, stop strings, batches of requests,
seeds, and requests refused with the API's error bodies."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_mtp, tiny_tokenizer
from mtp.decoding import batcher as batcher_module
from mtp.decoding import serve as serve_module
from mtp.decoding.batcher import Batcher
from mtp.decoding.commands import StreamedText, encode_prompts
from mtp.decoding.corpus import LookupCorpus
from mtp.decoding.generate import generate
from mtp.decoding.logprobs import prompt_logprobs
from mtp.decoding.options import DraftOptions
from mtp.decoding.prefixes import PromptCache
from mtp.decoding.serve import Server
from mtp.errors import MTPError
from test_cli import run_cli

PROMPTS = ["What is 7 + 5?", "Janet has 3 eggs.", "The answer is"]
POLL_S = 0.02  # how often a test's server looks for its shutdown


@pytest.fixture(scope="module")
def model():
    """A tiny float64 model whose weights are large enough that its greedy text varies (a plain random tiny model
    repeats one token), incomplete characters included."""
    tok = tiny_tokenizer()
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tok), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=gen)
    m.tokenizer = tok
    return m


@contextmanager
def served(model, start: bool = True, max_batch_size: int = 8, batch_window: float = 0.01, log=None,
           prompt_cache: bool = True, **decode):
    """A server of `model` on a free port (as `mtp serve` makes it: continuous batching and a prompt cache,
    which keeps prompts of 4 tokens or more here, so that the tests' short prompts start from each other)."""
    server = Server("127.0.0.1", 0)
    batcher = Batcher(model, {"strategy": "speculative", "graphs": False} | decode, max_batch_size, batch_window,
                      log=log or (lambda line: None), prompt_cache=PromptCache(min_tokens=4) if prompt_cache else None)
    server.attach(batcher, "tiny", decode.get("strategy", "speculative"), max_tokens=16)
    server.access_log = False
    if start:
        batcher.start()
    # (serve_forever looks for a shutdown every poll interval: 0.5 s by default, which each test would wait)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_S,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        batcher.stop()


def post(server, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json",
                                                                            **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events(server, path: str, body: dict) -> list:
    """A streamed request's server-sent events' data (parsed JSON, or the final "[DONE]")."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body | {"stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = r.read().decode().split("\n\n")
    data = [line.removeprefix("data: ") for line in lines if line]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def wait_until(condition, seconds: float = 30) -> None:
    """Poll `condition` until it holds; a test whose server never gets there fails (it does not hang)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def posted_together(server, bodies: list[dict]) -> list[tuple[int, dict]]:
    """Completion requests sent at once to a server whose decoding thread starts once they all wait: the
    (status, body) of each."""
    results: dict[int, tuple[int, dict]] = {}
    threads = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, post(server, "/v1/completions", b)))
               for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    wait_until(lambda: len(server.batcher.waiting) == len(bodies))
    server.batcher.start()
    for t in threads:
        t.join(60)
    return [results[i] for i in range(len(bodies))]


def greedy(model, ids: list[int], max_new_tokens: int = 16, **kw):
    return generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, **kw)


def finish_reason(model, tokens: list[int], max_tokens: int) -> str:
    return "length" if len(tokens) == max_tokens and tokens[-1] != model.tokenizer.eos_token_id else "stop"


def test_completions_are_greedys_answers(model):
    """Several prompts in one request: each choice is the prompt's greedy answer decoded alone (the server
    decodes them together, speculatively), with the API's token counts and finish reasons."""
    tok = model.tokenizer
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"model": "whatever", "prompt": PROMPTS, "max_tokens": 12})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    expected = [greedy(model, tok(p).input_ids, 12) for p in PROMPTS]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [r.texts[0] for r in expected]
    assert [c["finish_reason"] for c in body["choices"]] == [finish_reason(model, r.tokens[0], 12) for r in expected]
    prompt_tokens = sum(len(tok(p).input_ids) for p in PROMPTS)
    completion_tokens = sum(len(r.tokens[0]) for r in expected)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    assert body["mtp"]["strategy"] == "speculative" and body["mtp"]["batches"][0]["rows"] == 3


def test_penalized_completions_are_penalized_greedys_answers(model):
    """OpenAI's presence and frequency penalties, vLLM's repetition_penalty and min_tokens: each choice is what
    greedy decoding with the same penalties gives its prompt alone (the server decodes speculatively, in a batch);
    a penalty out of range is refused."""
    tok = model.tokenizer
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.3, "min_tokens": 6}
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12, **penalties})
        _, plain = post(server, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12})
        bad, error = post(server, "/v1/completions", {"prompt": "hi", "frequency_penalty": 2.5})
    expected = [greedy(model, tok(p).input_ids, 12, min_new_tokens=6,
                       **{k: v for k, v in penalties.items() if k != "min_tokens"}).texts[0] for p in PROMPTS]
    assert status == 200 and [c["text"] for c in body["choices"]] == expected
    assert expected != [c["text"] for c in plain["choices"]]  # (the penalties change the answers)
    assert bad == 400 and error["error"]["param"] == "frequency_penalty"
    with served(model, strategy="confadapt") as server:
        refused, why = post(server, "/v1/completions", {"prompt": "hi", "presence_penalty": 1.0})
    assert refused == 400 and "presence_penalty" in why["error"]["message"]


def test_min_p_reaches_the_sampling(model):
    """vLLM's `min_p` field: sampling with min_p 1 keeps only the most likely token, which is greedy's answer."""
    ids = model.tokenizer(PROMPTS[1]).input_ids
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1.0,
                                                         "min_p": 1.0})
    assert status == 200 and body["choices"][0]["text"] == greedy(model, ids, 10).texts[0]


def test_a_logit_bias_shapes_the_answer_as_it_shapes_greedys(model):
    """OpenAI's `logit_bias` ({"token id": bias}): the answer is greedy's with the same biases; a token banned
    with -100 is not in it; malformed biases are refused."""
    tok = model.tokenizer
    ids = tok(PROMPTS[0]).input_ids
    plain = greedy(model, ids, 12).tokens[0]
    bias = {plain[0]: -100.0, plain[1]: 5.0}
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12,
                                                         "logit_bias": {str(k): v for k, v in bias.items()}})
        bad = [post(server, "/v1/completions", {"prompt": "hi", "logit_bias": b})
               for b in ({"x": 1}, {"3": 200}, [1], {str(len(tok) + 5): 1})]
    expected = greedy(model, ids, 12, logit_bias=bias)
    assert status == 200 and body["choices"][0]["text"] == expected.texts[0] and plain[0] not in expected.tokens[0]
    assert [code for code, _ in bad] == [400] * 4 and all(b["error"]["param"] == "logit_bias" for _, b in bad)
    assert [b["error"]["message"] for _, b in bad][:2] == ["'logit_bias' maps token ids to biases; 'x' is no token id",
                                                          "'logit_bias' values must be numbers in [-100, 100], got 200"]


def test_prompts_given_as_token_ids_are_answered_as_their_text(model):
    """The API's token-id prompts (one list of ids, or a list of them, as evaluation harnesses send): the same
    answers as the texts they encode."""
    tok = model.tokenizer
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    with served(model) as server:
        _, by_text = post(server, "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 8})
        _, by_ids = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 8})
        _, one = post(server, "/v1/completions", {"prompt": ids[1], "max_tokens": 8})
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert one["choices"][0]["text"] == by_text["choices"][1]["text"] and by_ids["usage"] == by_text["usage"]


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_a_mask_token_model_serves_every_strategy(adapter):
    """A self-distilled (mask-token) model behind the server: speculative answers are greedy's, ConfAdapt's are
    what `generate` gives with the same threshold."""
    from test_mask_decoding import mask_model

    tok = tiny_tokenizer()
    m = mask_model("llama", adapter, 1, len(tok))
    m.tokenizer = tok
    body = {"prompt": PROMPTS, "max_tokens": 8}
    for strategy, expected in (("speculative", {}), ("confadapt", {"strategy": "confadapt", "tau": 0.3, "k": 3})):
        with served(m, strategy=strategy, **({"tau": 0.3, "k": 3} if strategy == "confadapt" else {})) as server:
            _, answer = post(server, "/v1/completions", body)
        assert [c["text"] for c in answer["choices"]] == [
            greedy(m, tok(p).input_ids, 8, **expected).texts[0] for p in PROMPTS]


def test_chat_completions_answer_the_conversation_through_the_template(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"},
                {"role": "assistant", "content": "12"},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "x 2?"}]}]
    with served(model, tree="auto", tree_size=4, lookup=3) as server:
        status, body = post(server, "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 10})
    as_text = [*messages[:3], {"role": "user", "content": "And x 2?"}]
    ids, _ = encode_prompts(model.tokenizer, [as_text], chat=True)
    expected = greedy(model, ids[0].tolist(), 10)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.texts[0]}
    assert body["usage"]["prompt_tokens"] == ids.shape[1]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_pieces_add_up_to_the_answer(model, path):
    body = {"prompt": PROMPTS[0]} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": PROMPTS[0]}]}
    body |= {"max_tokens": 16}
    with served(model) as server:
        _, whole = post(server, path, body)
        streamed = events(server, path, body | {"stream_options": {"include_usage": True}})
    assert streamed[-1] == "[DONE]"
    *chunks, usage = streamed[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    if path == "/v1/completions":
        pieces = [c["choices"][0]["text"] for c in chunks]
        answer = whole["choices"][0]["text"]
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
        answer = whole["choices"][0]["message"]["content"]
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_end_the_answer_before_them(model):
    """A stop string taken from the middle of the greedy answer: the answer ends before it (finish reason stop),
    whole or streamed; no streamed piece shows any of it."""
    tok = model.tokenizer
    text = greedy(model, tok(PROMPTS[1]).input_ids, 24).texts[0]
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    body = {"prompt": PROMPTS[1], "max_tokens": 24, "stop": [stop, "never in it"]}
    with served(model) as server:
        _, whole = post(server, "/v1/completions", body)
        streamed = events(server, "/v1/completions", body)
    assert whole["choices"][0]["text"] == text[:text.find(stop)]
    assert whole["choices"][0]["finish_reason"] == "stop"
    pieces = [c["choices"][0]["text"] for c in streamed[:-1]]
    assert "".join(pieces) == text[:text.find(stop)]


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(3, 299), min_size=1, max_size=30), data=st.data())
def test_streamed_text_is_the_answer_cut_at_its_first_stop_string(tokens, data):
    """Any tokens, fed in any chunks, with stop strings taken from the text (or not in it): the pieces add up to
    the text `generate` returns, and no piece is sent past it. `generate` ends a row at the first token whose
    text completes a stop string and cuts its text before the first stop string in it."""
    tok = _tokenizer()
    text = tok.decode(tokens, skip_special_tokens=True)
    stops = []
    for _ in range(data.draw(st.integers(0, 3))):
        start = data.draw(st.integers(0, max(len(text) - 1, 0)))
        stops.append(data.draw(st.sampled_from([text[start:start + data.draw(st.integers(1, 4))] or "x", "zq"])))
    end = next((j for j in range(1, len(tokens) + 1)
                if any(s in tok.decode(tokens[:j], skip_special_tokens=True) for s in stops)), len(tokens))
    tokens, text = tokens[:end], tok.decode(tokens[:end], skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    expected = text[:min(cuts)] if cuts else text
    streamed, pieces, i = StreamedText(tok, tuple(stops)), [], 0
    while i < len(tokens):
        n = data.draw(st.integers(1, 4))
        pieces.append(streamed.add(tokens[i:i + n]))
        assert expected.startswith("".join(pieces))
        i += n
    pieces.append(streamed.finish())
    assert "".join(pieces) == expected


_SP_TOKENIZER = []


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streamed_byte_fallback_text_adds_up_to_the_answer(data):
    """A SentencePiece tokenizer's byte tokens decode as runs, and a run that is not UTF-8 all as U+FFFDs: "X"
    (<0x58>) becomes "\ufffd" once a stray <0xBC> follows it. Any mix of byte tokens (whole characters, stray
    continuation bytes) and others, fed in any chunks: the pieces add up to the answer's text (streamed, "X" was
    sent before the run turned out invalid)."""
    from conftest import tiny_sentencepiece_tokenizer
    from mtp.decoding.commands import answer_text, byte_tokens

    if not _SP_TOKENIZER:
        _SP_TOKENIZER.append(tiny_sentencepiece_tokenizer())
    tok = _SP_TOKENIZER[0]
    byte = sorted(byte_tokens(tok))
    assert len(byte) == 256
    others = [i for i in range(3, len(tok)) if i not in set(byte)]
    pick = st.one_of(st.sampled_from(byte[0x41:0x5B] + byte[0x80:0xC0] + byte[0xE4:0xE5]), st.sampled_from(others))
    tokens = data.draw(st.lists(pick, min_size=1, max_size=24))
    prompt = tok("What is", add_special_tokens=False).input_ids
    streamed, pieces, i = StreamedText(tok, (), prompt), [], 0
    while i < len(tokens):
        n = data.draw(st.integers(1, 3))
        pieces.append(streamed.add(tokens[i:i + n]))
        i += n
    pieces.append(streamed.finish())
    assert "".join(pieces) == answer_text(tok, tokens, prompt)


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(tiny_tokenizer())
    return _TOKENIZER[0]


def test_requests_waiting_together_share_a_batch_and_keep_their_answers(model):
    """Five requests sent before the decoding thread starts: the three greedy ones (each its own max_tokens) are
    decoded as one batch, the two seeded sampling ones (same settings) each alone (a seed reproduces its draws
    only alone); every answer is the one it gets alone."""
    tok = model.tokenizer
    budgets = [10, 3, 7]
    bodies = [{"prompt": p, "max_tokens": n} for p, n in zip(PROMPTS, budgets, strict=True)]
    bodies += [{"prompt": p, "max_tokens": 10, "temperature": 0.9, "seed": 3} for p in PROMPTS[1::-1]]
    with served(model, start=False) as server:
        results = [body for _, body in posted_together(server, bodies)]
        _, again = post(server, "/v1/completions", bodies[-1])
    assert sorted(server.batcher.batch_sizes[:3]) == [1, 1, 3]
    for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True)):
        alone = greedy(model, tok(p).input_ids, n)
        assert results[i]["choices"][0]["text"] == alone.texts[0]
        assert results[i]["choices"][0]["finish_reason"] == finish_reason(model, alone.tokens[0], n)
    for i, p in zip((3, 4), PROMPTS[1::-1], strict=True):
        sampled = greedy(model, tok(p).input_ids, 10, strategy="speculative", do_sample=True, temperature=0.9,
                         seed=3, adaptive_draft=False)
        assert results[i]["choices"][0]["text"] == sampled.texts[0]
    assert again["choices"][0]["text"] == results[4]["choices"][0]["text"]


def test_requests_with_their_own_settings_share_a_batch(model):
    """Requests that ask for different temperatures, filters, penalties, biases and stop strings, sent together,
    are decoded as one batch, each row with its own: the greedy ones, and the sampled ones whose filter leaves one
    token, answer what greedy decoding with their settings answers alone; a freely sampled one answers."""
    tok = model.tokenizer
    alone = greedy(model, tok(PROMPTS[0]).input_ids, 12).texts[0]
    stop = alone[len(alone) // 2:][:2]
    asked = [({}, {}), ({"presence_penalty": 0.5, "repetition_penalty": 1.3},
                        {"presence_penalty": 0.5, "repetition_penalty": 1.3}),
             ({"stop": [stop]}, {"stop_strings": [stop]}), ({"temperature": 0.8, "top_k": 1}, {}),
             ({"temperature": 1.2, "min_p": 1.0, "frequency_penalty": 1.0}, {"frequency_penalty": 1.0}),
             ({"temperature": 1.0, "top_p": 0.9}, None), ({"logit_bias": {"5": -100}}, {"logit_bias": {5: -100}})]
    bodies = [{"prompt": PROMPTS[0], "max_tokens": 12, **fields} for fields, _ in asked]
    with served(model, start=False) as server:
        results = posted_together(server, bodies)
    assert server.batcher.batch_sizes == [len(bodies)] and all(status == 200 for status, _ in results)
    for (_, body), (fields, same) in zip(results, asked, strict=True):
        if same is not None:
            expected = greedy(model, tok(PROMPTS[0]).input_ids, 12, tokenizer=tok, **same).texts[0]
            assert body["choices"][0]["text"] == expected, fields
    assert len({body["choices"][0]["text"] for _, body in results}) >= 3  # (the settings change the answers)


def held_until_waiting(server, count: int):
    """Make the decoding thread's first chance to take joining jobs wait until `count` jobs wait (a request that
    comes while a batch decodes, without racing the tiny model's few milliseconds a batch)."""
    batcher, original, held = server.batcher, server.batcher._joining, [True]

    def joining(jobs, sent, active, fits):
        if held.pop() if held else False:
            wait_until(lambda: len(batcher.waiting) >= count)
        return original(jobs, sent, active, fits)

    batcher._joining = joining


def test_the_log_says_once_that_other_processes_slowed_a_batch(model, monkeypatch):
    """A batch whose threads waited for a core (`CoreWait`) 10% of its time or more: one log line naming
    --threads 1, once a server."""
    import mtp.decoding.batcher as batcher_module

    monkeypatch.setattr(batcher_module.CoreWait, "fraction", lambda self: 0.3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lines: list[str] = []
    with served(model, log=lines.append) as server:
        for _ in range(2):
            assert post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 3})[0] == 200
    notes = [line for line in lines if "waited for a CPU core 30% of the time" in line]
    assert len(notes) == 1 and "--threads 1" in notes[0] and len(server.batcher.batch_sizes) == 2


def test_a_request_that_comes_while_a_batch_decodes_joins_it(model):
    """Continuous batching: requests that come while a batch decodes join it between two steps (the log says how
    many), and each answer is the one it gets alone, streamed or not."""
    tok = model.tokenizer
    lines: list[str] = []
    with served(model, log=lines.append) as server:
        held_until_waiting(server, 2)
        first = threading.Thread(target=lambda: results.__setitem__(0, post(server, "/v1/completions",
                                                                              {"prompt": PROMPTS[0], "max_tokens": 12})))
        results: dict[int, tuple[int, dict]] = {}
        first.start()
        wait_until(lambda: server.batcher.decoding)
        later = threading.Thread(target=lambda: results.__setitem__(1, post(server, "/v1/completions",
                                                                              {"prompt": PROMPTS[1], "max_tokens": 9})))
        later.start()
        streamed = events(server, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 7})
        for t in (first, later):
            t.join(60)
    assert server.batcher.batch_sizes == [3] and "a batch of 3 (2 joined)" in lines[0]
    for (p, n), text in zip([(PROMPTS[0], 12), (PROMPTS[1], 9)], [results[0][1], results[1][1]], strict=True):
        assert text["choices"][0]["text"] == greedy(model, tok(p).input_ids, n).texts[0]
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == greedy(model, tok(PROMPTS[2]).input_ids, 7).texts[0]


def test_a_request_with_settings_of_its_own_joins_a_batch_that_computes_them(model):
    """A greedy request with a stop string of its own joins a batch that samples (top-k 1 there: greedy's
    tokens), and each answer is the one it gets alone with its settings."""
    tok = model.tokenizer
    alone = greedy(model, tok(PROMPTS[1]).input_ids, 9).texts[0]
    stop = alone[len(alone) // 2:][:2]
    results: dict[int, tuple[int, dict]] = {}
    with served(model) as server:
        held_until_waiting(server, 1)
        first = threading.Thread(target=lambda: results.__setitem__(0, post(server, "/v1/completions", {
            "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0.7, "top_k": 1})))
        first.start()
        wait_until(lambda: server.batcher.decoding)
        results[1] = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 9, "stop": [stop]})
        first.join(60)
    assert server.batcher.batch_sizes == [2]
    assert results[0][1]["choices"][0]["text"] == greedy(model, tok(PROMPTS[0]).input_ids, 12).texts[0]
    assert results[1][1]["choices"][0]["text"] == greedy(model, tok(PROMPTS[1]).input_ids, 9, tokenizer=tok,
                                                         stop_strings=[stop]).texts[0] != alone


def test_a_joined_request_is_answered_when_its_row_ends_not_when_the_batch_does(model):
    """A request's answer goes out once its own row ended, while the batch decodes on (the review's case: under
    steady traffic a batch that keeps taking requests never ends, and a 16-token answer waited for all of it):
    a short request that joins a long one is answered while the long one still decodes."""
    tok = model.tokenizer
    long_answer = greedy(model, tok(PROMPTS[0]).input_ids, 40)
    assert len(long_answer.tokens[0]) == 40  # (it decodes 40 steps: no end token)
    answered = threading.Event()
    results: dict[str, tuple[int, dict]] = {}
    with served(model) as server:
        batcher, original = server.batcher, server.batcher._joining

        def joining(jobs, sent, active, fits):  # once the short request joined, each step takes a while
            if len(jobs) > 1 and not answered.is_set():
                time.sleep(0.05)
            return original(jobs, sent, active, fits)

        batcher._joining = joining
        first = threading.Thread(target=lambda: results.__setitem__("long", post(
            server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 40})))
        first.start()
        wait_until(lambda: batcher.decoding)
        results["short"] = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 3})
        batches_then = list(batcher.batch_sizes)
        answered.set()
        first.join(60)
    assert batches_then == [] and batcher.batch_sizes == [2]  # (answered while its batch went on)
    assert results["short"][1]["choices"][0]["text"] == greedy(model, tok(PROMPTS[1]).input_ids, 3).texts[0]
    assert results["long"][1]["choices"][0]["text"] == long_answer.texts[0]
    assert batcher.counts.answered == 2 and batcher.counts.generated_tokens == 43


def test_a_request_that_cannot_join_waits_and_so_do_those_after_it(model):
    """Jobs join in the order they came: one that asks for what the batch's steps do not compute (sampling, in a
    greedy batch) waits for the next batch, and a later one that could join waits behind it (nothing overtakes); with joining off (`--batching static`) none
    joins."""
    bodies = [{"prompt": PROMPTS[0], "max_tokens": 12}, {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0.5},
              {"prompt": PROMPTS[2], "max_tokens": 5}]

    def sent_while_the_first_decodes(join: bool) -> tuple[list[int], list[int]]:
        results: dict[int, tuple[int, dict]] = {}

        def send(i: int) -> threading.Thread:
            thread = threading.Thread(target=lambda: results.__setitem__(i, post(server, "/v1/completions",
                                                                                   bodies[i])))
            thread.start()
            return thread

        with served(model) as server:
            server.batcher.join = join
            if join:
                held_until_waiting(server, 2)
            threads = [send(0)]
            wait_until(lambda: server.batcher.decoding)
            for i in (1, 2):
                threads.append(send(i))
                if join:  # (the first batch is held until both wait; without joining it may be done by now)
                    wait_until(lambda i=i: len(server.batcher.waiting) >= i)
            for t in threads:
                t.join(60)
        return server.batcher.batch_sizes, [results[i][0] for i in range(3)]

    for join in (True, False):
        sizes, statuses = sent_while_the_first_decodes(join)
        assert sizes[0] == 1 and sum(sizes) == 3 and statuses == [200] * 3


def test_a_request_of_many_prompts_takes_turns_with_those_after_it(model):
    """A request's prompts beyond a batch wait behind the first batch-full of each request sent after it: a
    request of six prompts, then one of one (two rows a batch, static batching): the second is the second batch,
    answered before the first request is (it was the fourth batch, after all six prompts)."""
    done: list[str] = []

    def send(name: str, body: dict) -> threading.Thread:
        def run() -> None:
            assert post(server, "/v1/completions", body)[0] == 200
            done.append(name)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with served(model, start=False, max_batch_size=2) as server:
        server.batcher.join = False
        threads = [send("many", {"prompt": PROMPTS[:1] * 6, "max_tokens": 3})]
        wait_until(lambda: len(server.batcher.waiting) == 6)
        threads.append(send("one", {"prompt": PROMPTS[1], "max_tokens": 3}))
        wait_until(lambda: len(server.batcher.waiting) == 7)
        server.batcher.start()
        for t in threads:
            t.join(60)
    assert done == ["one", "many"] and server.batcher.batch_sizes == [2, 2, 2, 1]


def test_n_choices_of_a_prompt_are_rows_of_one_batch(model):
    """`n`: each prompt's choices, indexed prompt by prompt; greedy choices are the greedy answer; a seeded
    request's choices (of two prompts) are one batch of their own, differ from one another and come again with
    the seed; the prompt counts once in `usage`."""
    tok = model.tokenizer
    sampled = {"prompt": PROMPTS[:2], "max_tokens": 10, "temperature": 1.5, "seed": 11, "n": 3}
    with served(model) as server:
        _, greedy_choices = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "n": 3})
        _, first = post(server, "/v1/completions", sampled)
        _, again = post(server, "/v1/completions", sampled)
        chunks = events(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 6, "n": 2})
        _, echoed = post(server, "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 2, "n": 2, "echo": True,
                                                     "logprobs": 1})
    assert [c["text"][:len(PROMPTS[c["index"] // 2])] for c in echoed["choices"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert echoed["mtp"]["batches"][0]["scored_tokens"] == sum(len(tok(p).input_ids) for p in PROMPTS[:2])  # once
    alone = greedy(model, tok(PROMPTS[0]).input_ids, 8)
    assert [c["text"] for c in greedy_choices["choices"]] == alone.texts * 3
    assert [c["index"] for c in first["choices"]] == list(range(6)) and server.batcher.batch_sizes[1:3] == [6, 6]
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1
    assert first["usage"]["prompt_tokens"] == sum(len(tok(p).input_ids) for p in PROMPTS[:2])
    assert 6 <= first["usage"]["completion_tokens"] <= 60  # (each choice's own tokens, summed)
    roles = [c["index"] for c in chunks[0]["choices"]]
    streamed = ["".join(c["choices"][0].get("delta", {}).get("content", "") for c in chunks[1:-1]
                        if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)]
    assert roles == [0, 1] and streamed[0] == streamed[1] != ""


def test_a_seeded_requests_choices_beyond_one_batch_are_drawn_anew(model):
    """n choices past --max-batch-size: the later batches draw from a seed of their own (made from the request's),
    so no choice repeats an earlier batch's, and the request again gets the same choices."""
    body = {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 1.5, "seed": 5, "n": 4}
    with served(model, max_batch_size=2) as server:
        first = [c["text"] for c in post(server, "/v1/completions", body)[1]["choices"]]
        again = [c["text"] for c in post(server, "/v1/completions", body)[1]["choices"]]
    assert server.batcher.batch_sizes == [2, 2, 2, 2] and first == again and len(set(first)) == 4
    assert server.batcher.counts.prompt_tokens == 2 * len(model.tokenizer(PROMPTS[0]).input_ids)  # (once a request)


def test_a_streamed_echo_leaves_a_refused_batch_to_be_split(model):
    """A batch that `generate` refuses whole is decoded a request at a time; a streamed echo sends its prompt only
    once its batch decodes, so that split still happens (a request the strategy refuses is an HTTP 400, as
    without echo)."""
    long_prompt = list(range(5, 5 + 235))  # with the server's default 16 new tokens and "Hi"'s: over the context
    with served(model) as server:
        chunks = events(server, "/v1/completions", {"prompt": [long_prompt, "Hi"], "echo": True})
    ends = [c["choices"][0] for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(e["index"] for e in ends) == [0, 1] and not any("error" in c for c in chunks[:-1])
    with served(model, strategy="confadapt") as server:
        status, body = post(server, "/v1/completions", {"prompt": ["A", "B"], "temperature": 1, "stream": True,
                                                        "echo": True})
    assert status == 400 and "sampling is available with" in body["error"]["message"]


def test_a_row_whose_client_left_ends_while_its_batch_goes_on(model):
    """A client that leaves while its prompt shares a batch with others: its row ends at the next step, the
    other rows decode on to the answers they get alone."""
    from queue import Queue

    from mtp.decoding import openai_api as api
    from mtp.decoding.batcher import Job

    tok = model.tokenizer

    class Leaving(Queue):  # the client of job 0 leaves once its first piece is out
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if item[0] == "text":
                jobs[0].cancelled.set()

    prompts = [tok(p).input_ids for p in PROMPTS[:2]]
    jobs = [Job(prompts[0], api.Sampling(max_tokens=40), 0, Leaving(), StreamedText(tok)),
            Job(prompts[1], api.Sampling(max_tokens=40), 1, Queue())]
    batcher = Batcher(model, {"strategy": "speculative", "graphs": False}, log=lambda line: None)
    batcher.decode_batch(jobs)
    ends = [[e for e in list(j.events.queue) if e[0] == "end"] for j in jobs]
    alone = [greedy(model, p, 40, strategy="speculative").tokens[0] for p in prompts]
    assert len(alone[0]) == 40 and ends[1][0][2].tokens == alone[1]
    assert 1 <= len(ends[0][0][2].tokens) < 40 and alone[0][:len(ends[0][0][2].tokens)] == ends[0][0][2].tokens


def test_a_burst_of_requests_is_one_batch(model):
    """Requests arriving one after another, each within the batch window (long here) of the one before, join
    the first one's batch, which starts as soon as it is full."""
    results: dict[int, dict] = {}
    with served(model, max_batch_size=3, batch_window=30.0) as server:
        threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(
            i, post(server, "/v1/completions", {"prompt": p, "max_tokens": 6})[1])) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
    assert server.batcher.batch_sizes == [3] and len(results) == 3


def _sent_raw(server, body: dict) -> socket.socket:
    """A request written on a socket of its own, for a client that hangs up."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def _slow_decoding(monkeypatch) -> list[int]:
    """generate with a pause after each row's step (the count of those steps, as they run)."""
    real, steps = batcher_module.generate_tokens, [0]

    def slow(m, ids, mask, *, streamer, **kw):
        def paused(row, new):
            steps[0] += 1
            time.sleep(0.01)
            streamer(row, new)
        return real(m, ids, mask, streamer=paused, **kw)

    monkeypatch.setattr(batcher_module, "generate_tokens", slow)
    return steps


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_leaves_stops_its_decoding(model, monkeypatch, stream):
    """A client hanging up, streamed (after its first piece) or waiting for the whole answer: its batch, which
    no other client shares, stops at its next step; the server goes on answering."""
    steps, lines = _slow_decoding(monkeypatch), []
    with served(model, log=lines.append) as server:
        sock = _sent_raw(server, {"prompt": PROMPTS[0], "max_tokens": 200, "stream": stream})
        if stream:
            received = b""
            while b"data: " not in received:
                received += sock.recv(4096)
        else:
            wait_until(lambda: steps[0] >= 3)
        sock.close()
        wait_until(lambda: lines)
        status, _ = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 4})
    assert lines[0] == "mtp serve: a batch of 1 stopped: its clients left" and steps[0] < 100 and status == 200


def test_a_request_whose_client_left_before_its_batch_is_never_decoded(model, monkeypatch):
    real, decoded = batcher_module.generate_tokens, []

    def spy(m, ids, mask, **kw):
        decoded.extend(row[r.bool()].tolist() for row, r in zip(ids, mask, strict=True))
        return real(m, ids, mask, **kw)

    monkeypatch.setattr(batcher_module, "generate_tokens", spy)
    with served(model, start=False) as server:
        sock = _sent_raw(server, {"prompt": PROMPTS[0], "max_tokens": 8})
        wait_until(lambda: server.batcher.waiting)
        sock.close()
        wait_until(lambda: server.batcher.waiting[0].cancelled.is_set())
        server.batcher.start()
        status, _ = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 4})
    assert status == 200 and decoded == [model.tokenizer(PROMPTS[1]).input_ids]
    assert server.batcher.counts.cancelled == 1


def test_a_request_its_batch_cannot_take_fails_alone(model, monkeypatch):
    """generate refusing a batch (here: any batch holding the second prompt) before decoding: each request is
    decoded on its own, so only the one at fault gets the error."""
    real, bad = batcher_module.generate_tokens, model.tokenizer(PROMPTS[1]).input_ids

    def refusing(m, ids, mask, **kw):
        if any(row[m_.bool()].tolist() == bad for row, m_ in zip(ids, mask, strict=True)):
            raise MTPError("refused\nmore detail")
        return real(m, ids, mask, **kw)

    monkeypatch.setattr(batcher_module, "generate_tokens", refusing)
    with served(model, start=False) as server:
        results = posted_together(server, [{"prompt": p, "max_tokens": 6} for p in PROMPTS[:2]])
    assert results[0][0] == 200 and results[0][1]["choices"][0]["text"] == greedy(
        model, model.tokenizer(PROMPTS[0]).input_ids, 6).texts[0]
    assert results[1] == (400, {"error": {"message": "refused", "type": "invalid_request_error", "param": None,
                                          "code": None}})


def test_a_request_that_fails_stops_decoding_its_other_prompts(model, monkeypatch):
    """One prompt of a request refused: the request fails whole (400), and its other prompt, decoded on its own
    after the split (the refused one first here), is dropped or stops at its next step instead of decoding for
    nobody."""
    steps, bad = _slow_decoding(monkeypatch), model.tokenizer(PROMPTS[1]).input_ids
    slow = batcher_module.generate_tokens

    def refusing(m, ids, mask, **kw):
        if any(row[r.bool()].tolist() == bad for row, r in zip(ids, mask, strict=True)):
            raise MTPError("refused")
        return slow(m, ids, mask, **kw)

    monkeypatch.setattr(batcher_module, "generate_tokens", refusing)
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"prompt": [PROMPTS[1], PROMPTS[0]], "max_tokens": 100})
        wait_until(lambda: not server.batcher.decoding and not server.batcher.waiting)
    assert status == 400 and body["error"]["message"] == "refused"
    assert server.batcher.counts.answered == 0 and steps[0] < 100


def test_a_streamed_request_refused_before_its_first_piece_is_an_http_error(model, monkeypatch):
    def refusing(*a, **kw):
        raise MTPError("refused")

    monkeypatch.setattr(batcher_module, "generate_tokens", refusing)
    with served(model) as server:
        status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                             "stream": True})
    assert status == 400 and body["error"]["message"] == "refused"


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", b"{not json", None, "the request body is not JSON"),
    ("/v1/completions", [1, 2], None, "the request body must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, "prompt", "'prompt' must be a string, a list of strings, token ids"),
    ("/v1/completions", {"prompt": ""}, "prompt", "'prompt' holds an empty prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt", "'prompt' holds an empty prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "'prompt' must be a string, a list of strings, token ids"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt", "'prompt' must be a string, a list of strings, token ids"),
    ("/v1/completions", {"prompt": [5, 300]}, "prompt", "'prompt' holds a token id outside the vocabulary (0 to "),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n", "'n' must be in [1, 16], got 0"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n", "'n' must be in [1, 16], got 17"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, "n", "'n' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of", "'best_of' is not supported by mtp serve"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty",
     "'repetition_penalty' must be in [0.01, 100]"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1" * 5000: 5}}, "logit_bias",
     "'logit_bias' maps token ids to biases"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, "min_p", "'min_p' must be in [0, 1], got 1.5"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens",
     "'min_tokens' must be in [0, max_tokens], got 5"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "'logprobs' must be in [0, 20], got 21"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs", "'logprobs' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs",
     "'top_logprobs' is a chat completions field; /v1/completions takes 'logprobs'"),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, "echo", "'echo' must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo",
     "'echo' is a field of /v1/completions, not of chat completions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
     "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs", "'top_logprobs' must be in [0, 20], got 30"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1 (0 with "
     "echo), got 0"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens",
     "'max_tokens' must be at least 1 (0 with echo), got -1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, "max_tokens", "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature", "'temperature' must be between 0 and 2"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1, "top_p": 0}, "top_p", "'top_p' must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, "stop", "'stop' must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream", "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     "'stream_options' is only for a streamed request"),
    ("/v1/completions", {"prompt": "hi " * 200, "max_tokens": 100}, "max_tokens", "this model's context is 256"),
    ("/v1/completions", {"prompt": list(range(3, 257))}, "prompt", "this model's context is 256 tokens (254 for a "
     "prompt and its answer, with this server's drafts); the prompt has 254: no room for an answer"),
    ("/v1/completions", {"prompt": list(range(3, 250)), "max_tokens": 8}, "max_tokens",
     "this model's context is 256 tokens (254 for"),
    # (refused before the tokenizer reads them: too many characters for the context's tokens)
    ("/v1/completions", {"prompt": ["hi", "x" * 100_000]}, "prompt",
     "this model's context is 256 tokens; the prompt's 100,000 characters are more than that many tokens hold"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100_000}]}, "messages",
     "this model's context is 256 tokens; the prompt's 100,000 characters are more than that many tokens hold"),
    ("/v1/completions", b'{"prompt": "half \\ud83d of an emoji"}', "prompt", "'prompt' holds a lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages",
     "'messages' holds a lone surrogate"),
    ("/v1/completions", {"prompt": "hi", "stop": "\udc00"}, "stop", "'stop' holds a lone surrogate"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     "the request body nests too deep"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "no"}},
     "include_usage", "'include_usage' must be true or false"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1, "seed": 2**64}, "seed", "'seed' must be in [0, 2**64)"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, "seed", "'seed' must be an integer"),
    # (an integer too large for a float: a 500 of an OverflowError)
    ("/v1/completions", {"prompt": "hi", "temperature": 10**400}, "temperature",
     "'temperature' is out of range, got an integer of 401 digits"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 10**400}, "repetition_penalty",
     "'repetition_penalty' is out of range"),
    ("/v1/chat/completions", {"messages": []}, "messages", "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages",
     "messages[0]: 'role' must be one of system, user, assistant"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0]: 'content' must be a string or a list of text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools", "'tools' is not supported"),
])
def test_bad_requests_are_refused_with_the_apis_error_body(model, path, body, param, message):
    with served(model) as server:
        status, answer = post(server, path, body)
    assert status == 400 and answer["error"]["message"].startswith(message)
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert server.batcher.batch_sizes == []  # refused before any decoding


KEY = b"Authorization: Bearer sesame\r\n"


@pytest.mark.parametrize("headers, status, says", [
    (KEY + b"Content-Length: -5", 400, b"Content-Length must be a number of bytes"),
    (KEY + b"Content-Length: lots", 400, b"Content-Length must be a number of bytes"),
    (KEY + b"Content-Length: 99999999999", 400, b"Content-Length must be a number of bytes"),
    (b"Authorization: Bearer \xe9t\xe9\r\nContent-Length: 2", 401, b"invalid or missing API key"),
])
def test_malformed_http_is_refused_at_once(model, headers, status, says):
    """A length that is no byte count (read as one, a negative one would wait for the connection to end) or an
    API key with bytes outside ASCII: an answer at once, never a hang or a crash of the handler."""
    with served(model) as server:
        server.api_key = "sesame"
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n{}")
            answer = b""
            while says not in answer and (piece := sock.recv(65536)):  # the headers and the body may come apart
                answer += piece
    assert answer.startswith(b"HTTP/1.1 %d" % status) and says in answer


def _raw_answer(server, data: bytes) -> tuple[bytes, dict]:
    """(status line and headers, JSON body) of the answer to `data` sent as it is on a connection of its own."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while piece := sock.recv(65536):  # (each of these answers closes the connection)
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_what_http_server_refuses_itself_is_the_apis_json_error(model):
    """A method no route takes, a header line too long: the API's JSON error body (http.server sent an HTML page,
    which OpenAI clients cannot read)."""
    with served(model) as server:
        put = _raw_answer(server, b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        long = _raw_answer(server, b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    assert put[0].startswith(b"HTTP/1.1 405") and b"Allow: GET, POST" in put[0]
    assert put[1]["error"]["message"] == "/v1/completions takes GET or POST, not PUT"
    assert long[0].startswith(b"HTTP/1.1 431") and b"Content-Type: application/json" in long[0]
    assert long[1]["error"]["type"] == "invalid_request_error" and long[1]["error"]["message"] == "Line too long"


def _get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_health_and_unknown_routes(model):
    """GET /v1/models, /health; an unknown route is a 404, a route asked with the other method a 405 naming the
    one it takes (`Allow`)."""
    with served(model) as server:
        models, one, other = _get(server, "/v1/models"), _get(server, "/v1/models/tiny"), _get(server, "/v1/models/x")
        health = _get(server, "/health")
        status, missing = post(server, "/v1/embeddings", {"input": "x"})
        queried = post(server, "/v1/completions?api-version=1", {"prompt": "hi", "max_tokens": 2})
        for path, method, allow in (("/v1/completions", "GET", "POST"), ("/v1/chat/completions", "GET", "POST"),
                                    ("/v1/models", "POST", "GET")):
            request = urllib.request.Request(server.url + path, data=b"{}" if method == "POST" else None,
                                             method=method)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            body = json.loads(refused.value.read())
            assert refused.value.code == 405 and refused.value.headers["Allow"] == allow, path
            assert f"{path} takes {allow}" in body["error"]["message"]
    assert [m["id"] for m in models[1]["data"]] == ["tiny"] and health == (200, {"status": "ok"})
    assert one == (200, models[1]["data"][0]) and other[0] == 404  # (the openai client's models.retrieve)
    assert status == 404 and "no route /v1/embeddings" in missing["error"]["message"]
    assert queried[0] == 200  # a query string routes as its path


def test_a_burst_of_connections_waits_for_the_accepting_thread():
    """Clients connecting at once while the accepting thread is busy (here: not started) are held by the system
    until it takes them: each connects at once and is answered (socketserver's queue of 5 dropped the rest)."""
    server = Server("127.0.0.1", 0)
    server.access_log = False
    clients = [socket.create_connection(server.server_address[:2], timeout=2) for _ in range(32)]
    thread = threading.Thread(target=server.serve_forever, args=(POLL_S,), daemon=True)
    thread.start()
    try:
        for sock in clients:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [sock.recv(4096).split(b"\r\n")[0] for sock in clients]
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()
    assert answers == [b"HTTP/1.1 200 OK"] * 32


def test_a_request_without_max_tokens_gets_what_fits(model):
    """No max_tokens: the server's default (16 here), or less where the prompt leaves less of the context (254
    tokens with 2 drafts' lookahead): never a refusal for a number the client did not send."""
    long = list(range(3, 250))  # 247 tokens: room for 7
    with served(model) as server:
        _, short = post(server, "/v1/completions", {"prompt": PROMPTS[0]})
        _, full = post(server, "/v1/completions", {"prompt": long})
    assert short["usage"]["completion_tokens"] <= 16
    expected = greedy(model, long, 254 - len(long))
    assert full["choices"][0]["text"] == expected.texts[0] and full["usage"]["completion_tokens"] <= 7


def test_a_stopping_server_finishes_the_requests_it_answers(model, monkeypatch):
    """What Ctrl-C or SIGTERM does once the listening socket is closed: the request being decoded is answered in
    full; a request after that is refused (503)."""
    steps, results = _slow_decoding(monkeypatch), {}
    with served(model) as server:
        asking = threading.Thread(target=lambda: results.setdefault("answer", post(
            server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 30})))
        asking.start()
        wait_until(lambda: steps[0] >= 2)
        assert server.finish_requests(30)
        asking.join(30)
        late = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})
    status, body = results["answer"]
    assert status == 200 and body["choices"][0]["text"] == greedy(model, model.tokenizer(PROMPTS[0]).input_ids,
                                                                  30).texts[0]
    assert late[0] == 503 and late[1]["error"]["message"] == "the server is stopping"


def test_a_server_stopped_at_once_tells_the_clients_it_was_answering(tiny_mtp_folder, monkeypatch, tmp_path):
    """Ctrl-C twice (or a drain that ran out) stops decoding at once: the streamed request being answered gets an
    error event and [DONE] before `serve` returns (the process then exits), not a stream cut short. A growing
    lookup corpus with --save-corpus is written as it stops."""
    steps, received, servers = _slow_decoding(monkeypatch), [], []
    monkeypatch.setattr(serve_module, "DRAIN_SECONDS", 0)

    class Interrupted(Server):  # serves until its request has decoded a few tokens, then is interrupted
        def serve_forever(self):
            servers.append(self)
            warmed = steps[0]  # (the warm-up's steps)
            threading.Thread(target=super().serve_forever, args=(POLL_S,), daemon=True).start()
            client = threading.Thread(target=lambda: received.extend(
                events(self, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 200})))
            client.start()
            wait_until(lambda: steps[0] >= warmed + 3)
            self.shutdown()
            raise KeyboardInterrupt

    monkeypatch.setattr(serve_module, "Server", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve_module.serve(str(tiny_mtp_folder), port=0, access_log=False, prompt_cache_mb=0,
                           drafts=DraftOptions(lookup=2, grow_corpus=True, save_corpus=str(tmp_path / "c.safetensors")))
    assert servers[0].requests == 0  # (answered before serve returned)
    assert LookupCorpus.load(tmp_path / "c.safetensors").answers == 0  # (the warm-up's answer is not one)
    wait_until(lambda: received)
    assert received[-2] == {"error": {"message": "the decoding thread stopped", "type": "server_error",
                                      "param": None, "code": None}} and received[-1] == "[DONE]"


def test_a_prompt_the_model_computes_nan_for_fails_alone_as_a_server_error():
    """A token whose embedding is NaN (a dtype that overflows on one input does the same): the request holding it
    gets a 500 server_error (the model's fault: a client must not take it as malformed); the request batched with
    it is answered."""
    tok = tiny_tokenizer()
    broken = tiny_mtp("llama", num_heads=3, vocab_size=len(tok), dtype=torch.float64)
    bad = tok("~").input_ids[-1]
    with torch.no_grad():  # untied first: the other prompt's logits stay finite
        embedding = broken.base.model.embed_tokens
        embedding.weight = torch.nn.Parameter(embedding.weight.clone())
        embedding.weight[bad] = float("nan")
    broken.tokenizer = tok
    with served(broken, start=False, prompt_cache=False) as server:
        (nan_status, nan_body), (ok_status, ok_body) = posted_together(
            server, [{"prompt": "What is ~?", "max_tokens": 4}, {"prompt": PROMPTS[0], "max_tokens": 4}])
    assert nan_status == 500 and nan_body["error"]["type"] == "server_error"
    assert "NaN or infinite logits" in nan_body["error"]["message"]
    assert ok_status == 200 and ok_body["choices"][0]["text"] == greedy(broken, tok(PROMPTS[0]).input_ids, 4).texts[0]


def test_a_request_to_a_server_whose_decoding_thread_died_is_refused(model):
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    with served(model, start=False) as server:
        server.batcher.thread = dead
        status, body = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 503 and body["error"]["message"] == "the decoding thread stopped"


def test_metrics_count_what_was_decoded(model, monkeypatch):
    """/metrics (Prometheus' text format): the prompts answered, their tokens as the responses' usage counts
    them, the tokens per forward of the batches' figures, a cancelled prompt."""
    steps = _slow_decoding(monkeypatch)
    with served(model) as server:
        _, body = post(server, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 6})
        sock = _sent_raw(server, {"prompt": PROMPTS[0], "max_tokens": 200})
        wait_until(lambda: steps[0] >= 3 * 6 + 3)
        sock.close()
        wait_until(lambda: server.batcher.counts.cancelled or server.batcher.counts.answered > 3, 10)
        with urllib.request.urlopen(server.url + "/metrics") as r:
            kind, text = r.headers["Content-Type"], r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    batch = body["mtp"]["batches"][0]
    assert kind.startswith("text/plain") and values["mtp_answered_total"] == 3 == values["mtp_batches_total"] * 3
    assert values["mtp_cancelled_total"] == 1 and values["mtp_failed_total"] == 0 and values["mtp_waiting"] == 0
    assert values["mtp_prompt_tokens_total"] == body["usage"]["prompt_tokens"]
    assert values["mtp_generated_tokens_total"] == body["usage"]["completion_tokens"]
    assert values["mtp_tokens_per_forward"] == pytest.approx(batch["tokens_per_forward"], abs=1e-3)
    assert "# TYPE mtp_answered_total counter" in text


def test_a_conversations_next_turn_starts_from_the_turn_before(model):
    """A chat's next turn (the conversation so far, its answer, a new message) starts from the keys and values
    the server kept of the turn before (its prompt and answer); its answer is the one it gets without them, and /metrics counts the
    tokens it did not feed."""
    turn = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is 7 + 5?"}]
    with served(model) as server:
        _, first = post(server, "/v1/chat/completions", {"messages": turn, "max_tokens": 6})
        turn += [first["choices"][0]["message"], {"role": "user", "content": "And times 2?"}]
        _, second = post(server, "/v1/chat/completions", {"messages": turn, "max_tokens": 6})
        with urllib.request.urlopen(server.url + "/metrics") as r:
            text = r.read().decode()
        reused = server.batcher.prompt_cache.reused_tokens
    with served(model, prompt_cache=False) as server:
        _, alone = post(server, "/v1/chat/completions", {"messages": turn, "max_tokens": 6})
    assert second["choices"][0]["message"] == alone["choices"][0]["message"]
    # (its prompt, and as much of its answer as the next turn's prompt tokenizes the same: a random model's text
    # may come back as other tokens)
    assert reused >= first["usage"]["prompt_tokens"] - 1 and f"mtp_prompt_cache_tokens_total {reused}" in text


def test_an_api_key_is_asked_of_every_v1_request(model):
    body = {"prompt": "hi", "max_tokens": 2}
    with served(model) as server:
        server.api_key = "sesame"
        missing = post(server, "/v1/completions", body)
        wrong = post(server, "/v1/completions", body, {"Authorization": "Bearer open"})
        right = post(server, "/v1/completions", body, {"Authorization": "Bearer sesame"})
        spelled = post(server, "/v1/completions", body, {"Authorization": " bearer  sesame "})
        models = _get(server, "/v1/models")
        health = [_get(server, path)[0] for path in ("/health", "/v1/health", "/metrics")[:2]]
    assert missing[0] == wrong[0] == models[0] == 401 and right[0] == spelled[0] == 200 and health == [200, 200]
    assert "invalid or missing API key" in missing[1]["error"]["message"]
    assert server.batcher.batch_sizes == [1, 1]


def test_a_chunked_body_is_read_and_the_connection_goes_on(model):
    """Transfer-Encoding: chunked (no Content-Length), then a second request on the same connection: both
    answered."""
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 3}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    with served(model) as server, socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
                     + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        answer = b""
        while answer.count(b'"object": "text_completion"') < 2 and (piece := sock.recv(65536)):
            answer += piece
    assert answer.count(b"HTTP/1.1 200 OK") == 2


def test_a_stalled_upload_times_out_and_is_not_waited_for(model, monkeypatch):
    """A body that stops arriving: 400 after the connection's timeout (short here); meanwhile it is not counted
    as a request being answered (a stopping server would wait for it)."""
    monkeypatch.setattr(serve_module.Handler, "timeout", 0.5)
    with served(model) as server, socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        time.sleep(0.1)
        assert server.requests == 0
        answer = sock.recv(65536)
        while b"stopped arriving" not in answer and (piece := sock.recv(65536)):
            answer += piece
    assert answer.startswith(b"HTTP/1.1 400") and b"the request body stopped arriving" in answer


def test_an_ipv6_address_is_served(model):
    try:
        server = Server("::1", 0)
    except MTPError:
        pytest.skip("this machine has no IPv6 loopback")
    try:
        threading.Thread(target=server.serve_forever, args=(POLL_S,), daemon=True).start()
        assert server.url.startswith("http://[::1]:")
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_without_a_chat_template_serves_completions_only(model):
    tok = tiny_tokenizer()
    tok.chat_template = None
    plain = tiny_mtp("llama", num_heads=2, vocab_size=len(tok))
    plain.tokenizer = tok
    with served(plain) as server:
        status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        ok, _ = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 400 and "no chat template: use /v1/completions" in body["error"]["message"] and ok == 200


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setattr("mtp.models.loading.load_mtp_model", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = run_cli(["serve", "--port", str(port)], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["serve", "--max-batch-size", "0"], capsys)
    assert code == 2 and "--max-batch-size must be >= 1" in err
    with pytest.raises(MTPError, match="port must be in"):
        serve_module.serve(port=70000)
    code, _, err = run_cli(["serve", "--temperature", "0.7"], capsys)
    assert code == 2 and "each request brings its own sampling settings" in err


def test_a_process_that_leaves_threads_ends_with_its_code_and_its_output(tmp_path):
    """`process.end_process`: once a command said it leaves daemon threads (`mtp serve`), the command-line process
    ends without finalizing (a daemon thread that wakes then can abort it), with its exit code and its output
    flushed; otherwise as sys.exit."""
    src = Path(__file__).resolve().parents[2] / "src"
    for leaves, code in ((True, 143), (False, 7)):
        script = ("import threading, time, sys; from mtp import process; "
                  "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
                  f"{'process.leaves_threads_running(); ' if leaves else ''}"
                  "print('said', end=''); print('logged', end='', file=sys.stderr); "
                  f"process.end_process({code})")
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
        assert (run.returncode, run.stdout, run.stderr) == (code, "said", "logged")


def test_the_command_line_called_with_words_raises_system_exit_even_after_a_server(monkeypatch, capsys):
    """`main(words)` (tests, a program that runs commands) never ends the process, even once a server in it said
    it leaves threads: only `main()`, the process's own command line, does."""
    import threading

    from mtp import process

    monkeypatch.setattr(process, "_THREADS_LEFT", threading.Event())
    process.leaves_threads_running()
    code, _, err = run_cli(["serve", "--max-batch-size", "0"], capsys)
    assert code == 2 and "--max-batch-size" in err


def test_the_command_serves_until_sigterm(tiny_mtp_folder):
    """`mtp serve --port 0 --batching static` end to end in its own process: the address it prints answers a
    request; SIGTERM stops it."""
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.Popen([sys.executable, "-m", "mtp", "serve", "--model", str(tiny_mtp_folder), "--port", "0",
                             "--no-access-log", "--batching", "static", "--prompt-cache-mb", "0"],
                            stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(tiny_mtp_folder),
                                 "PYTHONFAULTHANDLER": "1"})  # (a crash at exit prints every thread's stack)
    try:
        line = ""
        while " at http://" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before listening"
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        assert "tiny-mtp (speculative decoding on cpu, float32, static batching)" in line
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"prompt": "What is 7 + 5?", "max_tokens": 4}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            body = json.loads(r.read())
        assert body["model"] == "tiny-mtp" and body["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, "compile"], ids=["graphs", "compiled"])
def test_cuda_serving_replays_graphs_in_its_decoding_thread(graphs):
    """On a GPU the decoding thread (not the main one) captures and replays the steps, compiled or not: a batch
    of requests answered as eager fp32 greedy decoding answers each alone."""
    tok = tiny_tokenizer()
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tok), seed=3).to("cuda")
    m.tokenizer = tok
    with served(m, graphs=graphs) as server:
        _, body = post(server, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12})
        _, again = post(server, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12})
    for choice, p in zip(body["choices"], PROMPTS, strict=True):
        ids = torch.tensor([tok(p).input_ids], device="cuda")
        assert choice["text"] == generate(m, ids, max_new_tokens=12, graphs=False).texts[0]
    assert again["choices"] == body["choices"]


# ------------------------------------------------------------------------------------------------ logprobs
def test_completion_logprobs_are_greedys_scores(model):
    """`logprobs: k` on /v1/completions: each answer token's text, the model's log-probability of it and its k
    most likely alternatives (as `generate(logprobs=k)` scores greedy's answer decoded alone), with each token's
    offset in the text."""
    tok = model.tokenizer
    with served(model) as server:
        status, body = post(server, "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 10, "logprobs": 3})
    assert status == 200
    for prompt, choice in zip(PROMPTS[:2], body["choices"], strict=True):
        expected = greedy(model, tok(prompt).input_ids, 10, logprobs=3)
        lp = choice["logprobs"]
        assert lp["tokens"] == [tok.decode([t]) for t in expected.tokens[0]]
        assert lp["token_logprobs"] == pytest.approx([e.logprob for e in expected.logprobs[0]], abs=1e-6)
        for top, e in zip(lp["top_logprobs"], expected.logprobs[0], strict=True):
            # tokens that show as one text (pieces of characters) are one entry: the likelier one's
            assert top == pytest.approx({text: max(v for t, v in e.top if tok.decode([t]) == text)
                                         for text in {tok.decode([t]) for t, _ in e.top}}, abs=1e-6)
        assert all(len(top) <= 3 and max(top.values()) == chosen  # greedy: the most likely token's
                   for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True))
        assert_offsets_index_the_text(tok, lp, choice["text"])


def assert_offsets_index_the_text(tok, lp: dict, text: str) -> None:
    """A completion's text_offset: where each token's text is in the choice's text; a token that completes no
    character (a piece of one, a special token) has no width there."""
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    whole = [(o, t) for o, t in zip(offsets, lp["tokens"], strict=True)
             if "\ufffd" not in t and t not in tok.all_special_tokens]
    assert whole and all(text[o:o + len(t)] == t for o, t in whole), (text, lp)


def test_chat_logprobs_carry_each_tokens_bytes(model):
    """Chat's `logprobs: true` with `top_logprobs`: a content entry per token with its bytes, which add up to the
    answer's bytes even where a character is split over tokens (a piece decodes to U+FFFD)."""
    tok = model.tokenizer
    messages = [{"role": "user", "content": PROMPTS[0]}]
    with served(model) as server:
        status, body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 14,
                                                             "logprobs": True, "top_logprobs": 2})
    assert status == 200
    ids, _ = encode_prompts(tok, [messages], chat=True)
    expected = greedy(model, ids[0].tolist(), 14, logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([e.logprob for e in expected.logprobs[0]], abs=1e-6)
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)
    text = body["choices"][0]["message"]["content"]
    raw = b"".join(bytes(c["bytes"]) for c in content if c["token"] not in tok.all_special_tokens)
    assert raw.decode("utf-8", errors="replace") == text


def test_echo_scores_a_prompt_as_decoding_scored_its_answer(model):
    """`echo` with `logprobs` (how an evaluation harness scores a continuation): the text is the prompt's and the
    answer's, the first token has no score, and scoring greedy's answer as a prompt (max_tokens 0) gives the
    log-probabilities decoding gave it - what lm-eval's loglikelihood reads, is_greedy included."""
    tok = model.tokenizer
    prompt = tok(PROMPTS[1]).input_ids
    with served(model) as server:
        _, decoded = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "logprobs": 1})
        answer = tok(decoded["choices"][0]["text"], add_special_tokens=False).input_ids
        full = prompt + greedy(model, prompt, 8).tokens[0]
        status, scored = post(server, "/v1/completions", {"prompt": full, "max_tokens": 0, "echo": True,
                                                          "logprobs": 1})
        _, one_more = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 1, "echo": True,
                                                       "logprobs": 0})
    assert answer and status == 200
    lp = scored["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(full)
    assert lp["token_logprobs"][len(prompt):] == pytest.approx(
        decoded["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(prompt):],
                                                         lp["top_logprobs"][len(prompt):], strict=True))
    assert scored["choices"][0]["text"] == tok.decode(full) and scored["usage"]["completion_tokens"] == 0
    echoed = one_more["choices"][0]
    assert echoed["text"].startswith(PROMPTS[1]) and len(echoed["logprobs"]["tokens"]) == len(prompt) + 1
    assert [list(top.values()) for top in echoed["logprobs"]["top_logprobs"][1:]] == [  # logprobs 0: the token's own
        [lp] for lp in echoed["logprobs"]["token_logprobs"][1:]]


def test_echoed_offsets_index_text_with_split_characters_and_special_tokens(model):
    """Echo of a text whose characters a byte-level tokenizer splits (emoji, CJK) and of token ids that begin
    with a special token (a tokenizer that adds BOS): each token's offset is where its text is in the choice's
    text, a piece of a character or a special token taking no width; the whole answer's offsets as well."""
    tok = model.tokenizer
    text = "I love \U0001f355 and \u65e5\u672c, Janet"
    ids = [tok.bos_token_id] + tok(text).input_ids
    with served(model) as server:
        answers = [post(server, "/v1/completions", {"prompt": prompt, "max_tokens": n, "echo": True,
                                                     "logprobs": 2})[1]["choices"][0]
                   for prompt, n in ((text, 0), (ids, 0), (text, 12))]
    for answer in answers:
        assert answer["text"].startswith(text)
        assert_offsets_index_the_text(tok, answer["logprobs"], answer["text"])
    assert any("\ufffd" in t for t in answers[0]["logprobs"]["tokens"])  # (a split character was met)
    assert answers[1]["logprobs"]["tokens"][0] == tok.bos_token and answers[1]["text"] == text


def test_a_streamed_echo_begins_with_the_prompt_and_its_scores(model):
    """echo with stream: the prompt's text and scores come first (a chunk per choice), then the answer's pieces;
    together the whole answer's text and logprobs, offsets included, with and without logprobs and with n."""
    body = {"prompt": ["I love \U0001f355 and", PROMPTS[1]], "max_tokens": 8, "echo": True, "n": 2}
    with served(model) as server:
        for extra in ({"logprobs": 2}, {}):
            _, whole = post(server, "/v1/completions", body | extra)
            chunks = events(server, "/v1/completions", body | extra)
            for choice in whole["choices"]:
                pieces = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
                assert pieces[0]["text"] == body["prompt"][choice["index"] // 2]
                assert "".join(p["text"] for p in pieces) == choice["text"]
                streamed = [p["logprobs"] for p in pieces if p["logprobs"]]
                joined = {key: sum((s[key] for s in streamed), []) for key in choice["logprobs"] or {}}
                if extra:
                    assert joined["tokens"] == choice["logprobs"]["tokens"]
                    assert joined["text_offset"] == choice["logprobs"]["text_offset"]
                    for got, want in zip(joined["token_logprobs"], choice["logprobs"]["token_logprobs"], strict=True):
                        assert (got is want is None) or got == pytest.approx(want, abs=1e-6)
                    for got, want in zip(joined["top_logprobs"], choice["logprobs"]["top_logprobs"], strict=True):
                        assert (got is want is None) or got == pytest.approx(want, abs=1e-6)
                assert bool(streamed) == bool(extra)


def test_streamed_logprobs_add_up_to_the_whole_answers(model):
    body = {"prompt": PROMPTS[2], "max_tokens": 12, "logprobs": 2}
    with served(model) as server:
        _, whole = post(server, "/v1/completions", body)
        chunks = events(server, "/v1/completions", body)
        chat = events(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 12, "logprobs": True})
    pieces = [c["choices"][0] for c in chunks[:-1] if c["choices"]]
    streamed = [p["logprobs"] for p in pieces if p["logprobs"]]
    expected = whole["choices"][0]["logprobs"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((s[key] for s in streamed), []) == expected[key]
    assert "".join(p["text"] for p in pieces) == whole["choices"][0]["text"]
    entries = sum((c["choices"][0]["logprobs"]["content"] for c in chat[1:-1]
                   if c["choices"] and c["choices"][0]["logprobs"]), [])
    assert entries and all(e["top_logprobs"] == [] for e in entries)


def test_requests_asking_for_different_logprobs_share_a_batch_and_get_their_own(model):
    """Requests sent together asking for none, 0, 2 and 5 alternatives (and one echoing its prompt with 1) are
    one batch, and each answer's log-probabilities are those it gets alone (the first k of the batch's 5
    alternatives); a request that asks for more alternatives than a decoding batch scores does not join it."""
    bodies = [{"prompt": PROMPTS[1], "max_tokens": 8, **({} if k is None else {"logprobs": k})}
              for k in (None, 0, 2, 5)]
    bodies.append({"prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 1, "echo": True})
    with served(model, start=False) as server:
        together = posted_together(server, bodies)
    assert server.batcher.batch_sizes == [5]
    with served(model) as server:
        alone = [post(server, "/v1/completions", body) for body in bodies]
    for (status, body), (_, expected) in zip(together, alone, strict=True):
        assert status == 200
        got, want = body["choices"][0]["logprobs"], expected["choices"][0]["logprobs"]
        assert (got is None) == (want is None) and body["choices"][0]["text"] == expected["choices"][0]["text"]
        if want is not None:
            assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
            assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-6)
            assert [sorted(t or {}) for t in got["top_logprobs"]] == [sorted(t or {}) for t in want["top_logprobs"]]
    assert len({len(t) for _, b in together[1:4] for t in b["choices"][0]["logprobs"]["top_logprobs"]}) > 2
    results = {}
    with served(model) as server:
        held_until_waiting(server, 1)
        first = threading.Thread(target=lambda: results.__setitem__(0, post(server, "/v1/completions", {
            "prompt": PROMPTS[0], "max_tokens": 12, "logprobs": 1})))
        first.start()
        wait_until(lambda: server.batcher.decoding)
        results[1] = post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8, "logprobs": 5})
        first.join(60)
    assert server.batcher.batch_sizes == [1, 1] and results[1][1]["choices"][0]["logprobs"] == \
        alone[3][1]["choices"][0]["logprobs"]


def test_logprobs_are_refused_by_a_server_whose_strategy_does_not_verify(model):
    with served(model, strategy="confadapt") as server:
        status, body = post(server, "/v1/completions", {"prompt": "hi", "logprobs": 0})
        ok, _ = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "logprobs" and ok == 200
    assert body["error"]["message"].startswith("log-probabilities are the model's scores of the tokens it verified; "
                                               "this server decodes with confadapt")


def test_lm_evals_completions_client_scores_continuations_through_the_server(model, tmp_path):
    """lm-evaluation-harness's OpenAI completions client (`local-completions`; the `lm-eval` extra) against the
    server: its loglikelihood requests (echo, logprobs 1, max_tokens 1) give each continuation the log-likelihood
    and is_greedy of a forward over context and continuation."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok = model.tokenizer
    tok.save_pretrained(tmp_path / "tokenizer")
    pairs = [(PROMPTS[0], " The answer is 12."), (PROMPTS[1], " She has"), ("Q:", " 7")]
    with served(model) as server:
        lm = LocalCompletionsAPI(model="tiny", base_url=server.url + "/v1/completions",
                                 tokenizer_backend="huggingface", tokenizer=str(tmp_path / "tokenizer"),
                                 tokenized_requests=True, max_length=200)
        results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                   disable_tqdm=True)
    for (context, continuation), (loglikelihood, is_greedy) in zip(pairs, results, strict=True):
        whole, start = tok(context + continuation).input_ids, len(tok(context).input_ids)
        with torch.no_grad():
            logp = model(torch.tensor([whole]))[0, :, 0].log_softmax(-1)  # (T, V)
        rows = logp[start - 1:-1]
        target = torch.tensor(whole[start:])
        assert loglikelihood == pytest.approx(float(rows.gather(1, target[:, None]).sum()), abs=1e-4)
        assert is_greedy == bool((rows.argmax(-1) == target).all())


def test_a_prompt_is_scored_up_to_the_whole_context_by_any_strategy(model):
    """max_tokens 0 with echo scores a prompt in one forward: up to the model's whole context (no drafts'
    room), under any strategy (nothing is decoded), with the scoring's figures; refused past the context, and
    under int8 weights (their activations' scale is the forward's: a token's score would depend on the others)."""
    longest = list(range(3, 3 + 256))  # the tiny model's context: 256
    body = {"prompt": longest, "max_tokens": 0, "echo": True, "logprobs": 1}
    with served(model, strategy="confadapt") as server:
        status, scored = post(server, "/v1/completions", body)
        too_long, refused = post(server, "/v1/completions", body | {"prompt": longest + [5]})
        decoding, _ = post(server, "/v1/completions", body | {"max_tokens": 2})
        server.quantize = "int8"
        int8, said = post(server, "/v1/completions", body)
    assert status == 200 and len(scored["choices"][0]["logprobs"]["token_logprobs"]) == 256
    assert scored["mtp"]["batches"][0]["scored_tokens"] == 256 and scored["usage"]["completion_tokens"] == 0
    expected = [e.logprob for e in prompt_logprobs(model, longest)[1:]]
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-6)
    assert too_long == 400 and refused["error"]["message"] == "this model's context is 256 tokens; the prompt has 257"
    assert decoding == 400  # confadapt's own tokens have no scores
    assert int8 == 400 and said["error"]["param"] == "echo" and "int8" in said["error"]["message"]


def test_log_probabilities_in_json_are_numbers():
    """JSON has no -Infinity: a token the model rules out (a mask token's logit, cast down) is -9999."""
    from mtp.decoding import openai_api as api
    from mtp.decoding.logprobs import TokenLogprob

    entries = [None, TokenLogprob(7, float("-inf"), ((3, -0.5), (7, float("-inf"))))]
    field = api.logprobs_field(api.COMPLETIONS, entries, [1, 7], lambda t: (f"t{t}", b""), [0, 2])
    assert field["token_logprobs"] == [None, -9999.0] and field["top_logprobs"][1] == {"t3": -0.5, "t7": -9999.0}
    json.dumps(field, allow_nan=False)
    chat = api.logprobs_field(api.CHAT, entries[1:], [7], lambda t: (f"t{t}", b"x"), None)
    assert chat["content"][0]["logprob"] == -9999.0 and chat["content"][0]["top_logprobs"][1]["logprob"] == -9999.0


def test_a_completion_keeps_its_first_words_space_after_the_prompt():
    """A SentencePiece tokenizer drops the first "▁" of a text it decodes: the answer decoded alone lost the space
    between the prompt and its first word ("The answer isis is", echoed). As vLLM does, the answer is decoded
    after the prompt's last tokens: streamed or not, echoed or not, the prompt's text and the answer's are the
    text of prompt and answer together."""
    from conftest import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tok))
    m.tokenizer = tok
    word = tok.convert_tokens_to_ids("▁is")
    body = {"prompt": "The answer", "max_tokens": 4, "logit_bias": {str(word): 100}}
    ids = tok("The answer").input_ids
    whole = tok.decode(ids + [word] * 4, skip_special_tokens=True)
    assert whole == "The answer is is is is"
    with served(m) as server:
        _, plain = post(server, "/v1/completions", body)
        _, echoed = post(server, "/v1/completions", body | {"echo": True})
        _, scored = post(server, "/v1/completions", body | {"logprobs": 0})
        streamed = events(server, "/v1/completions", body)
    assert plain["choices"][0]["text"] == " is is is is"
    assert echoed["choices"][0]["text"] == whole
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == " is is is is"
    assert_offsets_index_the_text(tok, scored["choices"][0]["logprobs"], scored["choices"][0]["text"])
    assert "".join(scored["choices"][0]["logprobs"]["tokens"]) == " is is is is"  # ("is" alone lost the space)


def test_a_stop_string_that_begins_at_the_first_words_space_is_a_stop():
    """The answer's text is decoded after the prompt (" is", where "▁is" alone reads "is"): a stop string that
    the text holds only so, in the last of max_tokens tokens, ends the answer with "stop", not "length" (the
    finish reason was read from the answer decoded alone), streamed or not."""
    from conftest import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    m = tiny_mtp("llama", num_heads=3, vocab_size=len(tok))
    m.tokenizer = tok
    word = tok.convert_tokens_to_ids("▁is")
    body = {"prompt": "The answer", "max_tokens": 1, "logit_bias": {str(word): 100}, "stop": [" is"]}
    with served(m) as server:
        _, plain = post(server, "/v1/completions", body)
        streamed = events(server, "/v1/completions", body)
    assert plain["choices"][0]["text"] == "" and plain["choices"][0]["finish_reason"] == "stop"
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"
