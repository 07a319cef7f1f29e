"""Load on a running `mtp serve`: the first N GSM8K test questions as chat requests, sent one at a time, then all
at once; the tokens/s of each way and whether the answers are the same (a batch's rows answer as they do alone).

    mtp serve --model runs/heads --quantize fp16 --port 8000 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --questions 8 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "mtp" / "data" / "gsm8k" / "test.jsonl"


def ask(url: str, question: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.loads(r.read())


def run(url: str, questions: list[str], max_tokens: int, concurrent: bool) -> tuple[list[dict], float]:
    answers: list[dict] = [{} for _ in questions]
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=lambda i=i, q=q: answers.__setitem__(i, ask(url, q, max_tokens)))
                   for i, q in enumerate(questions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        answers = [ask(url, q, max_tokens) for q in questions]
    return answers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data", default=str(DATA), help="a JSONL of GSM8K-style records ('question')")
    args = parser.parse_args()
    lines = Path(args.data).read_text().splitlines()[:args.questions]
    questions = [json.loads(line)["question"] for line in lines]
    texts = {}
    for concurrent in (False, True):
        answers, seconds = run(args.url, questions, args.max_tokens, concurrent)
        tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        texts[concurrent] = [a["choices"][0]["message"]["content"] for a in answers]
        batches = sorted({json.dumps(b) for a in answers for b in a["mtp"]["batches"]})
        way = "all at once" if concurrent else "one at a time"
        print(f"{way}: {len(questions)} requests, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} "
              f"tokens/s ({len(batches)} batch{'es' * (len(batches) > 1)})")
    print("the same answers both ways:", texts[False] == texts[True])


if __name__ == "__main__":
    main()
