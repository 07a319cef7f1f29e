"""`mtp chat`: a conversation with a model in the terminal, each answer streamed as it is decoded.

Each line typed is a user turn; the conversation so far goes through the tokenizer's chat template, and the answer
is decoded with any strategy (lossless speculative decoding by default: the answers greedy decoding gives, sooner)
and printed as its text becomes final (`IncrementalText`), then its speed on stderr. Each turn starts from the keys
and values of the turn before it and its answer (`mtp.decoding.prefixes.PromptCache`): only what is new is fed. `/reset` starts a
new conversation, `/save FILE` adds it to a JSONL of conversations (what `mtp train --data` reads), `/set NAME
VALUE` changes a decoding setting for the turns after (`/set` alone lists them: sampling, penalties, stop strings,
max_new_tokens), `/quit` or Ctrl-D ends; Ctrl-C stops the answer being written (the turn is dropped) and the chat goes on. A conversation
longer than the context keeps its last tokens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from mtp.arguments import check_output, check_values
from mtp.decoding.commands import StreamedText, encode_prompts
from mtp.decoding.corpus import finish_corpus
from mtp.decoding.generate import generate as generate_tokens
from mtp.decoding.options import DraftOptions, SamplingOptions, WeightOptions
from mtp.decoding.prefixes import PromptCache
from mtp.errors import MTPError, first_line
from mtp.evaluation.prompts import has_chat_template
from mtp.io import atomic_write_lines, read_text, text_lines, utf8_text
from mtp.options import with_flat_keywords
from mtp.process import Terminated
from mtp.runtime import CoreWait

QUIT, RESET, SAVE, SET = ("/quit", "/exit"), "/reset", "/save", "/set"
# what /set changes, and how its value is read
SETTINGS: dict[str, type] = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                             "seed": int, "repetition_penalty": float, "presence_penalty": float,
                             "frequency_penalty": float, "min_new_tokens": int, "max_new_tokens": int, "stop": str}


def chat(model: str | None = None, system: str | None = None,
         strategy: Literal["greedy", "speculative", "confadapt", "static"] = "speculative",
         max_new_tokens: int = 256, drafts: DraftOptions | None = None, sampling: SamplingOptions | None = None,
         weights: WeightOptions | None = None, **flat: object) -> int:
    """Chat with a model in the terminal: each answer streamed as it is decoded, its speed after it.

    Type a message and Enter; /reset starts a new conversation, /save FILE adds it to a JSONL file, /set NAME VALUE
    changes a setting (/set lists them: /set temperature 0.7, /set do_sample true, /set stop "\n\n"), /quit or
    Ctrl-D ends, Ctrl-C stops an answer.

    Args:
        model: the embedded default (omit), a local folder, a .gguf file, a Meta checkpoint or a hub id.
        system: a system message that opens every conversation.
        strategy: greedy | speculative (lossless: greedy's answers) | confadapt (lossy, tau) | static (lossy, k).
        max_new_tokens: tokens an answer has at most.
    """
    drafts, sampling, weights = with_flat_keywords("chat", {
        "drafts": drafts or DraftOptions(), "sampling": sampling or SamplingOptions(),
        "weights": weights or WeightOptions()}, flat).values()
    if max_new_tokens < 1:
        raise MTPError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    drafts.check()
    sampling.bias()  # (malformed pairs: before the model loads)
    runtime, use_graphs = weights.runtime()
    m = weights.load(model, runtime, strategy)
    tok = m.tokenizer
    if not has_chat_template(tok):
        raise MTPError("mtp chat needs a tokenizer with a chat template (chat_template.jinja, or one in "
                       "tokenizer_config.json); `mtp generate --no-chat` decodes plain prompts")
    # each turn's prompt starts with the one before it: its keys and values are kept, and only the rest is fed
    options = dict(max_new_tokens=max_new_tokens, strategy=strategy, truncate_prompt=True, graphs=use_graphs,
                   prompt_cache=PromptCache(256 << 20), lookup_corpus=drafts.corpus(m, seeded=sampling.seeded),
                   **drafts.generate_kwargs(), **sampling.generate_kwargs())
    opening = [{"role": "system", "content": system}] if system else []
    print(f"mtp chat: {strategy} decoding on {weights.describe(runtime)}; /reset starts over, /save FILE keeps the "
          "conversation, /set NAME VALUE changes a setting, /quit or Ctrl-D ends", file=sys.stderr, flush=True)
    try:
        _converse(m, tok, options, strategy, opening)
    finally:
        finish_corpus(options["lookup_corpus"])
    return 0


def _converse(m, tok, options: dict, strategy: str, opening: list[dict]) -> None:
    """The conversation: a turn for each line typed, until /quit or the end of the input."""
    messages = list(opening)
    wait_noted = [False]  # (other processes slowing an answer is said once)
    for line in _typed_lines():
        text = line.strip()
        if not text:
            continue
        try:
            utf8_text(text, "the line")
        except MTPError as e:  # (bytes of another encoding: the conversation goes on)
            print(f"(not sent: {e})", file=sys.stderr, flush=True)
            continue
        if text in QUIT:
            break
        if text == RESET:
            messages = list(opening)
            options["prompt_cache"].clear()
            print("(a new conversation)", file=sys.stderr, flush=True)
            continue
        if text == SAVE or text.startswith(SAVE + " "):
            _save(messages, text[len(SAVE):].strip())
            continue
        if text == SET or text.startswith(SET + " "):
            _set(options, text[len(SET):].strip(), strategy)
            continue
        if text.startswith("/") and not text.startswith("//"):  # (a mistyped command is not a message)
            print(f"(unknown command {text.split()[0]}: /reset, /save FILE, /set NAME VALUE, /quit; a message that "
                  "begins with / is sent as //...)", file=sys.stderr, flush=True)
            continue
        text = text[1:] if text.startswith("//") else text
        answer = _answer(m, tok, [*messages, {"role": "user", "content": text}], options, strategy, wait_noted)
        if answer is not None:
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def _set(options: dict, assignment: str, strategy: str) -> None:
    """`/set NAME VALUE`: the setting changed in `options` (`generate`'s arguments) for the turns after, checked as
    the command line checks it (a bad one: a line saying why, nothing changed); `/set` alone lists them."""
    shown = {name: options.get("stop_strings" if name == "stop" else name) for name in SETTINGS}
    name, _, value = assignment.partition(" ")
    if not name:
        print("(" + ", ".join(f"{k} {json.dumps(v)}" for k, v in shown.items()) + ")", file=sys.stderr, flush=True)
        return
    try:
        if name not in SETTINGS:
            raise MTPError(f"{name!r} is not a setting; /set takes {', '.join(SETTINGS)}")
        value = _setting(name, value.strip())
        changed = {**options, ("stop_strings" if name == "stop" else name): value}
        check_values({k: changed[k] for k in SETTINGS if k in changed and k != "stop"} | {"strategy": strategy},
                     flags=False)
        if changed["max_new_tokens"] < 1:
            raise MTPError(f"max_new_tokens must be >= 1, got {changed['max_new_tokens']}")
    except MTPError as e:
        print(f"(not set: {first_line(e)})", file=sys.stderr, flush=True)
        return
    options.update(changed)
    idle = name in ("temperature", "top_k", "top_p", "min_p", "seed") and not options["do_sample"]
    print(f"({name} {json.dumps(value)}" + ("; greedy decoding ignores it until /set do_sample true" if idle else "")
          + ")", file=sys.stderr, flush=True)


def _setting(name: str, text: str):
    """A /set value as its setting reads it: true/false, a number, or (stop) a JSON string or list of strings, or
    the text itself; "none" clears stop strings and the seed."""
    kind = SETTINGS[name]
    if text.lower() in ("none", "") and name in ("stop", "seed"):
        return [] if name == "stop" else None
    if kind is bool:
        if text.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise MTPError(f"{name} is true or false, got {text!r}")
        return text.lower() in ("true", "on", "1")
    if kind is str:  # stop strings
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise MTPError(f"stop is a string or a JSON list of strings, got {text!r}")
        return value
    try:
        return kind(text)
    except ValueError:
        raise MTPError(f"{name} is {'a whole number' if kind is int else 'a number'}, got {text!r}") from None


def _save(messages: list[dict], path: str) -> None:
    """Add the conversation to a JSONL file as a {"messages": [...]} record (what `mtp train --data` and `mtp
    generate --prompts` read); the file is rewritten whole under a temporary name, never left half-written."""
    if not path:
        print("(/save FILE: add this conversation to FILE, a JSONL of {\"messages\": [...]} records)",
              file=sys.stderr, flush=True)
        return
    if not any(m["role"] == "user" for m in messages):  # (a record of a system message alone trains nothing)
        print("(nothing to save yet: no turn in this conversation)", file=sys.stderr, flush=True)
        return
    file = Path(path).expanduser()
    try:
        check_output(file, "file", "/save")  # (a folder in the way, a file where a folder should be, no permission)
        kept = text_lines(read_text(file)) if file.is_file() else []
        atomic_write_lines(file, [*(line for line in kept if line.strip()), json.dumps({"messages": messages})])
    except (MTPError, OSError) as e:  # a folder in the way, a file that is not text, a full disk: the chat goes on
        print(f"(not saved: {first_line(e)})", file=sys.stderr, flush=True)
        return
    turns = sum(m["role"] == "user" for m in messages)
    print(f"(saved: {turns} turn{'s' * (turns != 1)} added to {file})", file=sys.stderr, flush=True)


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


def _answer(m, tok, messages: list[dict], options: dict, strategy: str, wait_noted: list[bool]) -> str | None:
    """The model's answer to `messages`, printed as it is decoded (None: stopped with Ctrl-C); the first answer
    that other processes slowed (`CoreWait`) says so, once (`wait_noted`)."""
    wait = CoreWait()
    ids, _ = encode_prompts(tok, [messages], chat=True)
    text = StreamedText(tok, tuple(options.get("stop_strings") or ()))  # (the answer's text up to a stop string)
    try:
        res = generate_tokens(m, ids.to(m.device), streamer=lambda row, new: print(text.add(new), end="",
                                                                                  flush=True), **options)
    except Terminated:
        raise
    except KeyboardInterrupt:  # the answer stops, the chat goes on
        print(text.finish(), flush=True)
        print("(stopped; this turn is left out of the conversation)", file=sys.stderr, flush=True)
        return None
    print(text.finish(), flush=True)
    s = res.stats
    print(f"[{strategy}] {s.new_tokens} tokens in {s.seconds:.1f} s: {s.new_tokens / max(s.seconds, 1e-9):.1f} "
          f"tokens/s, {s.tokens_per_forward:.2f} tokens per forward", file=sys.stderr, flush=True)
    if not wait_noted[0] and (note := wait.note()) is not None:
        print(note, file=sys.stderr, flush=True)
        wait_noted[0] = True
    return res.texts[0]
