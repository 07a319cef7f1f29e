"""llama.cpp greedy decoding in a process of its own, for `mtp bench` (run as a script, never imported by mtp).

Why a process: in the bench's process torch's OpenMP threads spin for a while after each torch call and compete
with llama.cpp's threads for the same cores, and llama.cpp's own thread pool does the same to torch. Here the
bench process blocks on a pipe while llama.cpp decodes, and this process imports neither torch nor mtp.

Protocol: JSON lines. argv: GGUF path, context length, threads, then a JSON object {"stop_ids": [...],
"stop_strings": [...]}. The worker answers {"ready": true} once the model is loaded (or {"error": "..."}), then
for each request {"tokens": [prompt ids], "max_new_tokens": N} one reply {"tokens": [new ids], "seconds": s,
"first_token_seconds": f}, timed here around the whole call (prefill included) as the bench times every method.
End of input: the worker frees the model and exits.
"""

from __future__ import annotations

import json
import sys
import time


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def decode(llm, prompt: list[int], max_new_tokens: int, stop_ids: set[int], stop_strings: list[str]) -> dict:
    """Greedy decoding of `prompt` until an end token, a stop string in the new text, or the budget."""
    window = max((len(s) for s in stop_strings), default=0) + 8
    tokens: list[int] = []
    first = None
    llm.reset()  # forget the previous call: no reuse of a cached prompt prefix, every call pays its prefill
    start = time.perf_counter()
    if max_new_tokens > 0:
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) >= max_new_tokens or tokens[-1] in stop_ids:
                break
            if stop_strings:
                tail = llm.detokenize(tokens[-window:]).decode("utf-8", errors="ignore")
                if any(s in tail for s in stop_strings):
                    break
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "first_token_seconds": None if first is None else first - start}


def main(argv: list[str]) -> int:
    path, n_ctx, threads, options = argv[0], int(argv[1]), int(argv[2]), json.loads(argv[3])
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    except Exception as e:  # reported to the bench, which raises it as one line
        _reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    stop_ids, stop_strings = set(options.get("stop_ids", [])), list(options.get("stop_strings", []))
    _reply({"ready": True})
    try:
        for line in sys.stdin:
            if line.strip():
                request = json.loads(line)
                _reply(decode(llm, request["tokens"], request["max_new_tokens"], stop_ids, stop_strings))
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
