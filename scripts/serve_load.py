"""Load on a running `mtp serve`: the first N GSM8K test questions as chat requests, sent one at a time, then all
at once; the tokens/s of each way and whether the answers are the same (a batch's rows answer as they do alone).
`--arrivals SECONDS`: instead, streamed requests that come one by one, Poisson-spaced that many seconds apart on
average, each with its own max_tokens (a fixed random draw between a quarter of --max-tokens and all of it): the
time to each request's first token and to its last, and the tokens/s of the whole (how continuous batching
serves a stream of requests; compare servers started with --batching continuous and static). `--conversation`:
instead, one client's conversation, a question a turn, each answer kept in it and the whole conversation sent
again the next turn: the time to each turn's first token (compare servers started with --prompt-cache-mb 1024
and 0). `--mixed`: the two ways with requests that ask for different settings, as clients do (greedy, sampled
with top-p or top-k, penalties, a stop string, in turn; the answers compared are the greedy ones).

    mtp serve --model runs/heads --quantize fp16 --port 8000 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --questions 8 --max-tokens 128
    python scripts/serve_load.py --url http://127.0.0.1:8000 --questions 12 --max-tokens 128 --arrivals 0.4
    python scripts/serve_load.py --url http://127.0.0.1:8000 --questions 8 --max-tokens 96 --conversation
    python scripts/serve_load.py --url http://127.0.0.1:8000 --questions 12 --max-tokens 128 --mixed
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "mtp" / "data" / "gsm8k" / "test.jsonl"
# --mixed: request i asks for MIXED[i % 6] (the greedy ones' answers are compared)
MIXED = [{}, {"temperature": 0.7, "top_p": 0.95}, {"presence_penalty": 0.5, "frequency_penalty": 0.3},
         {"stop": ["\n\n"]}, {"temperature": 1.0, "top_k": 40}, {"repetition_penalty": 1.1}]


def ask(url: str, question: str, max_tokens: int, settings: dict | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **(settings or {})}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.loads(r.read())


def run(url: str, questions: list[str], max_tokens: int, concurrent: bool,
        settings: list[dict]) -> tuple[list[dict], float]:
    answers: list[dict] = [{} for _ in questions]
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=lambda i=i, q=q: answers.__setitem__(i, ask(url, q, max_tokens,
                                                                                        settings[i])))
                   for i, q in enumerate(questions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        answers = [ask(url, q, max_tokens, settings[i]) for i, q in enumerate(questions)]
    return answers, time.perf_counter() - start


def ask_streamed(url: str, question: str | list[dict], max_tokens: int) -> tuple[float, float, int, str, int]:
    """A streamed chat request (a question, or a conversation's messages): (seconds to its first piece of text,
    seconds to its end, its tokens, its text, its prompt's tokens)."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, first, tokens, text, prompt = time.perf_counter(), None, 0, [], 0
    with urllib.request.urlopen(request, timeout=3600) as r:
        for line in r:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            piece = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            prompt = (chunk.get("usage") or {}).get("prompt_tokens", prompt)
    end = time.perf_counter() - start
    return (first if first is not None else end), end, tokens, "".join(text), prompt


def conversation(url: str, questions: list[str], max_tokens: int) -> None:
    """One client's conversation: a question a turn, the answers kept, the whole conversation sent each turn."""
    messages: list[dict] = [{"role": "system", "content": "You are a careful math tutor. Answer step by step."}]
    for turn, q in enumerate(questions, 1):
        messages.append({"role": "user", "content": q})
        first, end, tokens, text, prompt = ask_streamed(url, messages, max_tokens)
        messages.append({"role": "assistant", "content": text})
        print(f"turn {turn}: prompt {prompt} tokens, first token after {first:.3f} s, {tokens} tokens after "
              f"{end:.2f} s", flush=True)


def arrivals(url: str, questions: list[str], max_tokens: int, gap: float) -> None:
    """Streamed requests sent one by one, Poisson-spaced `gap` seconds apart on average (a fixed draw)."""
    draw = random.Random(0)
    budgets = [draw.randint(max(1, max_tokens // 4), max_tokens) for _ in questions]
    waits = [draw.expovariate(1 / gap) for _ in questions]
    results: list[tuple] = [() for _ in questions]
    threads = []
    start = time.perf_counter()
    for i, (q, n) in enumerate(zip(questions, budgets, strict=True)):
        threads.append(threading.Thread(target=lambda i=i, q=q, n=n: results.__setitem__(i, ask_streamed(url, q, n))))
        threads[-1].start()
        time.sleep(waits[i])
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    first, end, tokens = ([r[k] for r in results] for k in range(3))
    print(f"{len(questions)} streamed requests ~{gap} s apart (Poisson), max_tokens {min(budgets)}-{max(budgets)}: "
          f"{sum(tokens)} tokens in {seconds:.1f} s = {sum(tokens) / seconds:.1f} tokens/s; first token after "
          f"{statistics.mean(first):.2f} s on average (at most {max(first):.2f}), the last after "
          f"{statistics.mean(end):.2f} s on average (at most {max(end):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data", default=str(DATA), help="a JSONL of GSM8K-style records ('question')")
    parser.add_argument("--arrivals", type=float, default=None, metavar="SECONDS",
                        help="streamed requests this many seconds apart on average, instead of the two ways")
    parser.add_argument("--conversation", action="store_true",
                        help="one client's conversation, a question a turn, instead of the two ways")
    parser.add_argument("--mixed", action="store_true",
                        help="the two ways, each request with settings of its own (greedy, sampled, penalties, stop)")
    args = parser.parse_args()
    lines = Path(args.data).read_text().splitlines()[:args.questions]
    questions = [json.loads(line)["question"] for line in lines]
    if args.conversation:
        conversation(args.url, questions, args.max_tokens)
        return
    if args.arrivals is not None:
        arrivals(args.url, questions, args.max_tokens, args.arrivals)
        return
    texts = {}
    settings = [MIXED[i % len(MIXED)] if args.mixed else {} for i in range(len(questions))]
    compared = [i for i, s in enumerate(settings) if "temperature" not in s]
    for concurrent in (False, True):
        answers, seconds = run(args.url, questions, args.max_tokens, concurrent, settings)
        tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        texts[concurrent] = [answers[i]["choices"][0]["message"]["content"] for i in compared]
        batches = sorted({json.dumps(b) for a in answers for b in a["mtp"]["batches"]})
        way = "all at once" if concurrent else "one at a time"
        print(f"{way}: {len(questions)} requests, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} "
              f"tokens/s ({len(batches)} batch{'es' * (len(batches) > 1)})")
    print(f"the same answers both ways ({len(compared)} greedy):", texts[False] == texts[True])


if __name__ == "__main__":
    main()
