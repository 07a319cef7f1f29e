"""`mtp chat`: a conversation with a model in the terminal, each answer streamed as it is decoded.

Each line typed is a user turn; the conversation so far goes through the tokenizer's chat template, and the answer
is decoded with any strategy (lossless speculative decoding by default: the answers greedy decoding gives, sooner)
and printed as its text becomes final (`IncrementalText`), then its speed on stderr. `/reset` starts a new
conversation, `/quit` or Ctrl-D ends; Ctrl-C stops the answer being written (the turn is dropped) and the chat goes
on. A conversation longer than the context keeps its last tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Literal

from mtp.decoding.commands import IncrementalText, check_tree_spec, encode_prompts
from mtp.decoding.generate import generate as generate_tokens
from mtp.errors import MTPError
from mtp.evaluation.prompts import has_chat_template
from mtp.models.loading import load_mtp_model
from mtp.process import Terminated
from mtp.runtime import DType, Graphs, graphs_option, resolve_runtime, set_threads

QUIT, RESET = ("/quit", "/exit"), "/reset"


def chat(model: str | None = None, system: str | None = None,
         strategy: Literal["greedy", "speculative", "confadapt", "static"] = "speculative",
         max_new_tokens: int = 256, tau: float = 0.9, k: int | None = None, do_sample: bool = False,
         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
         tree: str | None = None, tree_size: int | None = None, lookup: int = 0, dtype: DType = "auto",
         quantize: Literal["none", "fp16", "int8"] = "none", device: str = "auto", threads: int | None = None,
         mask_token_id: int | None = None, mask_token: str | None = None, graphs: Graphs = "auto") -> int:
    """Chat with a model in the terminal: each answer streamed as it is decoded, its speed after it.

    Type a message and Enter; /reset starts a new conversation, /quit or Ctrl-D ends, Ctrl-C stops an answer.

    Args:
        model: the embedded default (omit), a local folder, a .gguf file, a Meta checkpoint or a hub id.
        system: a system message that opens every conversation.
        strategy: greedy | speculative (lossless: greedy's answers) | confadapt (lossy, tau) | static (lossy, k).
        max_new_tokens: tokens an answer has at most.
        tau: ConfAdapt confidence threshold.
        k: tokens a step reads ahead: the heads used (a mask-token model: k - 1 masks); static emits k,
            ConfAdapt at most k, speculative verifies k - 1 drafts (default: all heads; the model's k).
        do_sample: sample instead of greedy (exact speculative sampling with --strategy speculative).
        temperature: with --do-sample: divides the logits (below 1: closer to greedy; above: more varied).
        top_p: with --do-sample: draw from the smallest set of tokens whose probabilities add up to this (1: all).
        top_k: with --do-sample: draw from the k most likely tokens only (0: all).
        seed: with --do-sample: the random seed (default: a new one each run).
        tree: speculative: verify a tree of the heads' top candidates per step ("auto", "dynamic", a .json file or
            JSON list of paths of ranks, or "chain"), as `mtp generate --tree`.
        tree_size: nodes of the "auto" or "dynamic" tree (default 16; alone it implies --tree auto).
        lookup: speculative: also verify up to this many tokens copied from earlier in the conversation (prompt
            lookup); 0: none.
        dtype: the weights' dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16
        quantize: CPU weight format for decoding (none: fp32, exact): fp16 (packed: half the memory, faster;
            speculative stays exactly equal to greedy) or int8 (dynamic quantisation; speculative may differ).
        device: auto (CUDA when available), cpu, cuda or cuda:N
        threads: torch CPU threads (default: torch's choice).
        mask_token_id: decode a plain model that has a mask token with it
        mask_token: the same, naming the token (e.g. "<|mtp_special_token_0|>")
        graphs: replay the decoding steps as CUDA graphs: auto (on CUDA), on, off, compile (as `mtp generate`).
    """
    if max_new_tokens < 1:
        raise MTPError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    check_tree_spec(tree)
    set_threads(threads)
    runtime = resolve_runtime(device, dtype, quantize)
    use_graphs = graphs_option(graphs, runtime.device)
    m = load_mtp_model(model, device=runtime.device, dtype=runtime.dtype, quantize=quantize,
                       mask_token_id=mask_token_id, mask_token=mask_token, decode_only=True)
    tok = m.tokenizer
    if tok is None or not has_chat_template(tok):
        raise MTPError("mtp chat needs a tokenizer with a chat template (chat_template.jinja, or one in "
                       "tokenizer_config.json); `mtp generate --no-chat` decodes plain prompts")
    options = dict(max_new_tokens=max_new_tokens, strategy=strategy, tau=tau, k=k, do_sample=do_sample,
                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, truncate_prompt=True,
                   tree=None if tree in (None, "chain") else tree, tree_size=tree_size, lookup=lookup,
                   graphs=use_graphs)
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    print(f"mtp chat: {strategy} decoding on {runtime.describe()}; /reset starts over, /quit or Ctrl-D ends",
          file=sys.stderr, flush=True)
    for line in _typed_lines():
        text = line.strip()
        if not text:
            continue
        if text in QUIT:
            break
        if text == RESET:
            messages = list(opening)
            print("(a new conversation)", file=sys.stderr, flush=True)
            continue
        answer = _answer(m, tok, [*messages, {"role": "user", "content": text}], options, strategy)
        if answer is not None:
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return 0


def _typed_lines() -> Iterator[str]:
    """Lines from stdin until its end; a "> " prompt where a person types them."""
    prompt = "> " if sys.stdin.isatty() else ""
    if prompt:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            if prompt:
                print()
            return


def _answer(m, tok, messages: list[dict], options: dict, strategy: str) -> str | None:
    """The model's answer to `messages`, printed as it is decoded (None: stopped with Ctrl-C)."""
    ids, _ = encode_prompts(tok, [messages], chat=True)
    text = IncrementalText(tok)
    try:
        res = generate_tokens(m, ids.to(m.device), streamer=lambda row, new: print(text.add(new), end="",
                                                                                  flush=True), **options)
    except Terminated:
        raise
    except KeyboardInterrupt:  # the answer stops, the chat goes on
        print(text.rest(), flush=True)
        print("(stopped; this turn is left out of the conversation)", file=sys.stderr, flush=True)
        return None
    print(text.rest(), flush=True)
    s = res.stats
    print(f"[{strategy}] {s.new_tokens} tokens in {s.seconds:.1f} s: {s.new_tokens / max(s.seconds, 1e-9):.1f} "
          f"tokens/s, {s.tokens_per_forward:.2f} tokens per forward", file=sys.stderr, flush=True)
    return res.texts[0]
