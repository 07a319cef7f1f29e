"""`mtp generate`: decode prompts with any strategy; text and speed on stdout, or JSON / JSONL."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json as jsonlib
import sys
import weakref
from collections import deque
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from mtp.arguments import check_values, spelled
from mtp.decoding.corpus import GrowingCorpus, finish_corpus
from mtp.decoding.generate import left_pad
from mtp.decoding.inputs import common_prefix
from mtp.decoding.logprobs import TokenLogprob
from mtp.decoding.openai_api import token_text
from mtp.decoding.options import DraftOptions, SamplingOptions, WeightOptions
from mtp.decoding.queue import decode_queue
from mtp.decoding.row_options import PER_ROW, RECORD_SETTINGS
from mtp.decoding.stopping import cut_at_stop
from mtp.errors import MTPError, first_line
from mtp.evaluation.prompts import has_chat_template, resolve_chat
from mtp.io import (
    append_records,
    atomic_write_lines,
    check_messages,
    disk_errors,
    input_file,
    is_json_name,
    open_append,
    parse_json_line,
    read_complete_records,
    read_json_records,
    read_text,
    text_lines,
    unused_path,
    utf8_text,
)
from mtp.options import with_flat_keywords
from mtp.progress import progress_bar
from mtp.runtime import CoreWait

# What a record may mean by a field it names otherwise (OpenAI's or transformers' spelling), or a setting that is the
# run's, not a prompt's: refused with the way to say it (other fields, an "id" or a reference "answer", are kept out)
RECORD_SPELLINGS = {"max_tokens": "'max_new_tokens'", "max_completion_tokens": "'max_new_tokens'",
                    "min_tokens": "'min_new_tokens'", "stop_strings": "'stop'", "stop_sequences": "'stop'",
                    "max_length": "'max_new_tokens' (new tokens, the prompt not counted)"}
RUN_SETTINGS = ("n", "num_return_sequences", "best_of", "num_beams", "logprobs", "top_logprobs", "echo",
                "logit_bias", "stop_token_ids", "strategy", "tree_size", "lookup", "k", "tau")


def _record_field_error(name: str, where: str) -> MTPError | None:
    """Why a record's field `name` that is not one of `RECORD_SETTINGS` is refused, or None for a field a record
    may hold beside its prompt (an id, a reference answer)."""
    if name in RECORD_SPELLINGS:
        return MTPError(f"{where}: {name!r} is not a record's field here: write it as {RECORD_SPELLINGS[name]}")
    if name in RUN_SETTINGS:
        return MTPError(f"{where}: {name!r} is the run's setting, not a record's (a record may set "
                        f"{', '.join(RECORD_SETTINGS)})")
    close = difflib.get_close_matches(name, RECORD_SETTINGS, n=1, cutoff=0.8)
    if close:
        return MTPError(f"{where}: unknown field {name!r}: did you mean {close[0]!r}?")
    return None


def read_prompt_records(path: str) -> list[tuple[str | list[dict], dict, str, object]]:
    """One prompt per line (a line starting with "{" is a JSON record), or, for a file named .jsonl or .json,
    JSON records with a "prompt" (or "question") field, or a conversation ("messages", as `mtp train` reads them:
    the conversation up to its last user turn; a last assistant message, a reference answer, is left out).
    "-" reads the lines from standard input. Each prompt comes with the settings its record gives
    (`RECORD_SETTINGS`), where it is ("file:line") and its record's "id" (None where it has none)."""
    if path == "-":
        try:
            file, text = Path("<stdin>"), utf8_text(sys.stdin.read(), "<stdin>")
        except UnicodeDecodeError as e:  # (a UTF-8 locale's strict stdin)
            raise MTPError(f"<stdin>: not UTF-8 text ({e.reason})") from None
    else:
        file = input_file(path, "prompts")
        text = read_text(file)
    if is_json_name(file):
        entries = read_json_records(file, text)
    else:
        entries = []
        for lineno, line in enumerate(text_lines(text), 1):
            if line.lstrip().startswith("{"):
                entries.append((lineno, parse_json_line(file, lineno, line)))
            elif line.strip():
                entries.append((lineno, line))
    prompts = []
    for lineno, entry in entries:
        where = f"{file}:{lineno}"
        settings = {k: v for k, v in entry.items() if k in RECORD_SETTINGS} if isinstance(entry, dict) else {}
        if isinstance(entry, dict) and "seed" in entry:  # (one generator draws for a batch: no seed per prompt)
            raise MTPError(f"{where}: a record cannot have a seed of its own; --seed seeds the run's draws")
        if isinstance(entry, dict):
            for name in entry.keys() - set(RECORD_SETTINGS):
                if (error := _record_field_error(name, where)) is not None:
                    raise error
        given_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and "messages" in entry and "prompt" not in entry:
            prompts.append((_conversation_prompt(entry["messages"], where), settings, where, given_id))
            continue
        text = entry.get("prompt", entry.get("question")) if isinstance(entry, dict) else entry
        if not isinstance(text, str):
            raise MTPError(f"{where}: expected a string field 'prompt' or 'question'")
        prompts.append((text, settings, where, given_id))
    if not prompts:
        raise MTPError(f"{file}: no prompts")
    return prompts


def prompt_settings(given: dict, defaults: dict, strategy: str, where: str) -> dict:
    """A prompt's `generate` arguments that may differ between rows (`mtp.decoding.row_options.PER_ROW` and
    max_new_tokens): the command's `defaults`, and what its record gives (`given`, checked: an MTPError naming
    `where`)."""
    settings = dict(defaults)
    for name, value in given.items():
        if name == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MTPError(f"{where}: 'stop' must be a string or a list of strings, got {value!r}")
            settings["stop_strings"] = value
            continue
        if name == "do_sample" and not isinstance(value, bool):
            raise MTPError(f"{where}: 'do_sample' must be true or false, got {value!r}")
        if name in ("max_new_tokens", "top_k", "min_new_tokens") and (isinstance(value, bool)
                                                                     or not isinstance(value, int)):
            raise MTPError(f"{where}: {name!r} must be a whole number, got {value!r}")
        settings[name] = value
    sampled = ("temperature", "top_k", "top_p", "min_p")
    try:
        check_values({**{k: v for k, v in settings.items() if k not in ("stop_strings", "logit_bias")},
                      "strategy": strategy}, flags=False)
        if settings["max_new_tokens"] < 0:
            raise MTPError(f"max_new_tokens must be >= 0, got {settings['max_new_tokens']}")
        if not settings["do_sample"] and (asked := [k for k in sampled if k in given]):
            raise MTPError(f"{asked[0]} shapes sampling; greedy decoding ignores it (add \"do_sample\": true, or "
                           f"--do-sample)")
    except MTPError as e:
        raise MTPError(f"{where}: {e}") from None
    return settings


def _chat_text(tokenizer, messages: list[dict]) -> str:
    """The conversation through the chat template; a template that refuses it (e.g. one without a system role
    given a system message: templates raise on what they do not take) is one MTPError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise MTPError(f"the model's chat template refused the conversation: {first_line(e)}") from None


def _conversation_prompt(messages, where: str) -> list[dict]:
    """A conversation to answer: its messages up to the last user turn (a reference answer after it dropped)."""
    check_messages(messages, where)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise MTPError(f"{where}: a conversation to answer ends with a user message (its roles: "
                       f"{', '.join(m['role'] for m in messages) or 'none'})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_prompts(tokenizer, prompts: list[str | list[dict]], chat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask) for a batch of prompts (with `chat`, a prompt may also be a conversation:
    a list of {"role", "content"} messages)."""
    return left_pad(prompt_rows(tokenizer, prompts, chat), tokenizer.pad_token_id or 0)


def prompt_rows(tokenizer, prompts: list[str | list[dict]], chat: bool) -> list[list[int]]:
    """Each prompt's token ids (`encode_prompts`)."""
    rows = []
    for p in prompts:
        if chat:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            text = _chat_text(tokenizer, messages)
            rows.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            rows.append(tokenizer(p).input_ids)
    if any(len(r) == 0 for r in rows):
        raise MTPError("empty prompt: give at least one token")
    return rows


def generate(model: str | None = None, prompt: str | None = None, prompts: str | None = None,
             output: str | None = None, chat: bool | None = None,
             strategy: Literal["greedy", "speculative", "confadapt", "static"] = "greedy",
             max_new_tokens: int = 128, num_heads: int | None = None, batch_size: int = 8, json: bool = False,
             stream: bool = False, truncate_prompt: bool = False, progress: bool = True,
             logprobs: int | None = None, drafts: DraftOptions | None = None,
             sampling: SamplingOptions | None = None, weights: WeightOptions | None = None, **flat: object) -> int:
    """Generate text with an MTP model: greedy, lossless speculative, ConfAdapt or static-k decoding.

    The options of `drafts`, `sampling` and `weights` may also be given by name in Python, as on the command
    line: `generate(prompt="hi", strategy="speculative", lookup=6, device="cpu")`.

    Args:
        model: the embedded default (omit), a local folder, a .gguf file, a Meta checkpoint or a hub id.
        prompt: the prompt text.
        prompts: a file with one prompt per line, or JSONL with a "prompt" (or "question") field, or with
            conversations ("messages": answered after their last user turn, through the chat template); "-":
            the lines of standard input. A record may set its own max_new_tokens, do_sample, temperature, top_k,
            top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, min_new_tokens and "stop" (a
            string or a list), over the flags of the same names: the prompts are still decoded together, each row
            with its own (--seed seeds the run's draws; a record has no seed of its own). Other fields (an id, a
            reference answer) are left alone, but not one that names a setting otherwise ("max_tokens") or a
            setting of the run's ("n", "logprobs").
        output: write results as JSONL here (one object per prompt, in the prompts' order). Each answer also goes
            to OUTPUT.partial as it ends: a run that stops (Ctrl-C, a kill) goes on from there when the same
            command runs again, decoding only the prompts not answered.
        chat: wrap each prompt in the tokenizer's chat template (default: on when it has one, as an instruct
            model expects; --no-chat feeds the text as it is).
        strategy: greedy | speculative (lossless) | confadapt (lossy, tau) | static (lossy, k).
        max_new_tokens: tokens to generate at most.
        num_heads: heads to give a plain model (default 4).
        batch_size: prompts decoded together (left padded), the next joining as a row ends (greedy and speculative
            decoding with a chain or a fixed tree).
        json: print one JSON object per prompt instead of text: index (its place among the prompts, from 0), id
            (its record's, where it has one), prompt, text, token_ids, new_tokens, and batch (the
            figures of the decoding it was part of when its answer ended: rows, new_tokens, forward_passes,
            seconds, ...).
        stream: print tokens as they are produced (single prompt).
        truncate_prompt: keep only the last tokens of a prompt too long for the context with --max-new-tokens.
        progress: a progress bar over the prompts (on stderr, when there are several).
        logprobs: add each new token's log-probability under the model and this many most likely alternatives'
            to the JSON records (--json, --output): "logprobs", a list of {token_id, token, logprob, top_logprobs}
            (greedy and speculative decoding; 0: the tokens' own).
    """
    drafts, sampling, weights = with_flat_keywords("generate", {
        "drafts": drafts or DraftOptions(), "sampling": sampling or SamplingOptions(),
        "weights": weights or WeightOptions()}, flat).values()
    records, settings, shared = _checked_inputs(prompt, prompts, strategy, max_new_tokens, stream, json, output,
                                                logprobs, drafts, sampling)
    texts = [text for text, _, _, _ in records]
    runtime, use_graphs = weights.runtime()
    m = weights.load(model, runtime, strategy, num_heads)
    tok = m.tokenizer
    if any(isinstance(t, list) for t in texts):  # conversations are laid out by the chat template
        if not has_chat_template(tok):
            raise MTPError(f"{prompts} holds conversations (\"messages\"), which need a chat template; this "
                           "model's tokenizer has none")
        chat = True
    chat = resolve_chat(tok, chat)
    options = dict(strategy=strategy, truncate_prompt=truncate_prompt, graphs=use_graphs, logprobs=logprobs,
                   **drafts.generate_kwargs(), **shared)
    journal = _Journal.of_run(output, m, {"prompts": texts, "settings": settings, "chat": chat, "options": options})
    seeded = sampling.seed is not None and any(s["do_sample"] for s in settings)  # (a record may sample)
    options["lookup_corpus"] = corpus = drafts.corpus(m, seeded=seeded)  # (drafts only: the same answers)
    done = journal.done if journal is not None else {}
    if isinstance(corpus, GrowingCorpus):  # a run that goes on drafts from the answers it had too
        for i in sorted(done):
            corpus.add(done[i].get("token_ids") or [])
    bar = progress_bar(progress, len(texts), f"generate ({strategy})", "prompt", initial=len(done)) \
        if len(texts) > 1 else tqdm(disable=True)  # (--no-progress: a plain line every few minutes)
    out = _Printed(texts, tok, json, stream, bar, rows=min(batch_size, len(texts)),
                   stops=[s["stop_strings"] for s in settings], ids=[r[3] for r in records], journal=journal)
    wait = CoreWait()
    todo = [i for i in range(len(texts)) if i not in done]
    try:
        out.resume(done)
        seconds, forwards = _decode_prompts(m, prompt_rows(tok, texts, chat), settings, batch_size, out, options,
                                            todo)
    except KeyboardInterrupt:  # print and keep what the interrupted prompts have produced, then stop
        bar.close()
        out.interrupted()
        if journal is not None:
            journal.interrupted(out.results, len(texts))
        raise
    finally:
        if journal is not None:
            journal.close()
        bar.close()
        finish_corpus(corpus)
    if journal is not None:
        journal.finish(out.results)
    if not json:
        fresh = set(todo)
        total_new = sum(len(r["token_ids"]) for r in out.results if r["index"] in fresh)
        print(f"[{strategy}] {total_new} new token{'s' if total_new != 1 else ''} in {seconds:.1f} s: "
              f"{total_new / max(seconds, 1e-9):.1f} tokens/s, {total_new / max(forwards, 1):.2f} tokens per "
              f"forward pass; {weights.describe(runtime)}", file=sys.stderr)
    if (note := wait.note()) is not None:
        print(note, file=sys.stderr)
    return 0


def _checked_inputs(prompt: str | None, prompts: str | None, strategy: str, max_new_tokens: int, stream: bool,
                    json: bool, output: str | None, logprobs: int | None, drafts: DraftOptions,
                    sampling: SamplingOptions) -> tuple[list[tuple], list[dict], dict]:
    """The prompts' records, each prompt's settings and the generate keywords all rows share, checked before the
    model loads (a bad flag or record is one line, exit 2, before any long work)."""
    if (prompt is None) == (prompts is None):
        raise MTPError("give exactly one of --prompt or --prompts")
    if prompts is not None and output is not None and Path(output).expanduser().resolve() == \
            Path(prompts).expanduser().resolve():
        raise MTPError(f"--output {output} is the --prompts file: the answers would replace the prompts; give "
                       "another file")
    records = [(utf8_text(prompt, "--prompt"), {}, "--prompt", None)] if prompt is not None else \
        read_prompt_records(prompts)
    texts = [text for text, _, _, _ in records]
    if prompt is not None and not prompt:
        raise MTPError("empty prompt: give at least one token")
    if stream and (len(texts) > 1 or json):
        raise MTPError("--stream prints one prompt's text as it is made: " + (
            "--json prints whole records" if json else f"{prompts} holds {len(texts)} prompts"))
    check_values({"logprobs": logprobs, "strategy": strategy})
    if logprobs is not None and not (json or output):
        raise MTPError("--logprobs go into the JSON records: add --output FILE" + ("" if stream else " or --json"))
    drafts.check()
    shared = sampling.generate_kwargs()  # (malformed --logit-bias pairs: before the model loads)
    defaults = {name: shared.pop(name) for name in PER_ROW if name in shared} | {
        "max_new_tokens": max_new_tokens, "stop_strings": []}
    settings = [prompt_settings(given, defaults, strategy, where) for _, given, where, _ in records]
    if not any(s["do_sample"] for s in settings):  # (the command line lets a prompts file's records sample)
        shapes = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None}
        if unused := [name for name, neutral in shapes.items() if getattr(sampling, name) != neutral]:
            raise MTPError(f"{spelled(unused[0], True)} shapes sampling; greedy decoding ignores it (add --do-sample "
                           f"or a record's \"do_sample\": true, or drop {spelled(unused[0], True)})")
    return records, settings, shared


def _decode_prompts(m, rows: list[list[int]], settings: list[dict], batch_size: int, out: _Printed,
                    options: dict, todo: list[int]) -> tuple[float, int]:
    """The prompts `todo` (indices into `rows`, token ids) decoded continuously, `batch_size` rows at a time, each
    with its `settings` (`prompt_settings`), each answer going to `out` as it ends; what they all start with (a
    chat template's system turn) fed once. (seconds, row forwards)."""
    waiting = deque(todo)
    shared = common_prefix([rows[i] for i in todo]) if len(todo) > 1 else None
    seconds = forwards = 0
    while waiting:  # (one batch, unless the strategy or a long prompt keeps some for the next)
        res = decode_queue(m, waiting, batch_size, out.end, ids_of=rows.__getitem__, settings_of=settings.__getitem__,
                           pad_id=m.tokenizer.pad_token_id or 0, streamer=out.collect, prefix=shared, **options)
        seconds += res.stats.seconds
        forwards += res.stats.row_forwards
    return seconds, forwards


class _Printed:
    """The records of `mtp generate`'s prompts, printed in the prompts' order as their answers end (with --stream,
    the one prompt's text as it comes); what Ctrl-C must not lose."""

    def __init__(self, texts: list, tok, json: bool, stream: bool, bar, rows: int, stops: list[list[str]],
                 ids: list | None = None, journal: _Journal | None = None):
        self.texts, self.tok, self.json, self.stream, self.bar = texts, tok, json, stream, bar
        self.stops = stops  # each prompt's stop strings (its text ends before the first)
        self.ids = ids or [None] * len(texts)  # each prompt's record's "id"
        self.journal = journal  # where each answer goes as it ends (--output)
        self.rows = rows  # the batch's rows at most
        self.results: list[dict] = []  # printed, in order
        self.ready: dict[int, dict] = {}  # ended, waiting for an earlier prompt's
        self.so_far: dict[int, list[int]] = {}  # tokens of the prompts that started
        # --stream: the one prompt's text as it comes, ending before its first stop string (as its record's text)
        self.text = StreamedText(tok, tuple(stops[0]) if stream else ())

    def collect(self, i: int, new: list[int]) -> None:
        self.so_far.setdefault(i, []).extend(new)
        if self.stream:
            print(self.text.add(new), end="", flush=True)

    def end(self, i: int, tokens: list[int], scores, stats) -> None:
        """Prompt i's answer ended (`stats`: the decoding's figures as they stood then)."""
        text = cut_at_stop(self.tok.decode(tokens, skip_special_tokens=True), self.stops[i])
        record = self._record(i, text, tokens, {"rows": self.rows, **stats.to_dict()})
        if scores is not None:
            show = token_text(self.tok)
            record["logprobs"] = [_scored(e, show) for e in scores]
        if self.journal is not None:
            self.journal.add(record)
        self.ready[i] = record
        self.bar.update(1)
        self._flush()

    def _record(self, i: int, text: str, tokens: list[int], batch: dict | None) -> dict:
        """Prompt i's record: its place in the prompts ("index", from 0) and its record's "id", then `_record`."""
        record = {"index": i} | ({"id": self.ids[i]} if self.ids[i] is not None else {})
        return record | _record(self.texts[i], text, tokens, batch)

    def resume(self, done: dict[int, dict]) -> None:
        """The records an earlier run of the same command answered (`_Journal`), printed in their place."""
        self.ready.update(done)
        self._flush()

    def interrupted(self) -> None:
        """Print the answers that ended and what the others had when Ctrl-C came, in order."""
        for i in sorted(set(self.so_far) - set(range(len(self.results)))):
            if i not in self.ready:
                tokens = self.so_far[i]
                self.ready[i] = self._record(i, self.tok.decode(tokens, skip_special_tokens=True), tokens,
                                             None) | {"interrupted": True}
        for i in sorted(self.ready):
            self._show(self.ready.pop(i))

    def _flush(self) -> None:
        while len(self.results) in self.ready:  # the prompts' order
            self._show(self.ready.pop(len(self.results)))

    def _show(self, record: dict) -> None:
        self.results.append(record)
        if self.stream:
            print(self.text.finish(), flush=True)
            return
        with tqdm.external_write_mode(file=sys.stdout):  # the bar (stderr) cleared while answers print
            print(jsonlib.dumps(record) if self.json else record["text"] + "\n")


class _Journal:
    """`--output`'s answers as each ends, appended (and forced to disk) to OUTPUT.partial beside it, after a header
    naming what makes them (the model's weights, the prompts, their settings): a run that stops (Ctrl-C, a kill, a
    full disk) loses only the answers it was decoding, and the same command goes on from the others. When every
    prompt is answered the records are written to OUTPUT (atomically) in the prompts' order, and the journal goes.
    A journal of another command (other prompts, settings or weights) is set aside (renamed OUTPUT.partial.earlier)
    and the run starts over."""

    FORMAT = "mtp-generate-journal"

    @classmethod
    def of_run(cls, output: str | None, model, run: dict) -> _Journal | None:
        """The journal of `--output` (None without one) for this model's weights (heads included: a lossy
        strategy's answers depend on them) and `run` (the prompts, their settings, the decoding options)."""
        if not output:
            return None
        from mtp.training.targets import model_fingerprint

        return cls(output, {"model": model_fingerprint(model, with_heads=True), **run})

    def __init__(self, output: str, identity: dict):
        self.output = Path(output).expanduser()
        self.path = self.output.with_name(self.output.name + ".partial")
        digest = hashlib.sha256(jsonlib.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()[:16]
        self.header = {"format": self.FORMAT, "identity": digest}
        records = read_complete_records(self.path)
        self.done: dict[int, dict] = {}
        if records and records[0] == self.header:
            self.done = {r["index"]: r for r in records[1:] if isinstance(r.get("index"), int)}
            print(f"mtp generate: going on from {self.path}: {len(self.done)} of {len(identity['prompts'])} prompts "
                  "answered before", file=sys.stderr)
        elif self.path.exists():  # set aside, not deleted: those answers may be all a user has of that run
            aside = unused_path(self.path.with_name(f"{self.path.name}.earlier"))
            self.path.rename(aside)
            print(f"mtp generate: {self.path} held the answers of other prompts, settings or weights: set aside as "
                  f"{aside.name}; starting over", file=sys.stderr)
        self._sink = None

    def add(self, record: dict) -> None:
        """One answer, on disk before this returns."""
        if self._sink is None:
            try:
                with disk_errors(self.path):
                    self._sink = open_append(self.path)
            except OSError as e:  # (a place no file can be made in, e.g. /proc; its folder removed meanwhile)
                raise MTPError(f"cannot write --output {self.output}: its journal {self.path.name} cannot be made "
                               f"beside it ({e.strerror or e})") from e
            if self._sink.tell() == 0:
                append_records(self._sink, [self.header])
        append_records(self._sink, [record])

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def finish(self, results: list[dict]) -> None:
        """Every prompt answered: OUTPUT written, the journal gone."""
        atomic_write_lines(self.output, (jsonlib.dumps(r) for r in results))
        self.path.unlink(missing_ok=True)

    def interrupted(self, results: list[dict], total: int) -> None:
        """Ctrl-C: OUTPUT gets what there is (the interrupted prompts' partial answers, marked so); the journal
        stays for the same command to go on from."""
        atomic_write_lines(self.output, (jsonlib.dumps(r) for r in results))
        whole = sum(not r.get("interrupted") for r in results)
        print(f"mtp generate: {whole} of {total} answers written to {self.output}; the same command goes on from "
              f"{self.path}", file=sys.stderr)


CONTEXT_TOKENS = 6  # a prompt's last tokens that `IncrementalText` decodes its first tokens with


def answer_text(tokenizer, tokens: list[int], context: list[int] | tuple[int, ...] = ()) -> str:
    """The text of `tokens` after `context` (a prompt's tokens): what `IncrementalText`'s pieces add up to."""
    text = IncrementalText(tokenizer, context)
    return text.add(list(tokens)) + text.rest()


class IncrementalText:
    """The text of a growing token sequence, piece by piece as it becomes final (vLLM's incremental detokenizing).
    Decoding each new token alone garbles a character whose bytes span tokens (a byte-level BPE splits an emoji or
    a CJK character into several) and can drop a word's leading space (SentencePiece): each piece is decoded
    after a few tokens of context, and text that ends in an incomplete character waits for the next tokens."""

    def __init__(self, tokenizer, context: list[int] | tuple[int, ...] = ()):
        """`context`: the tokens before the sequence (a prompt's), whose last few are decoded with its first ones
        and left out of the text, so that its first word keeps its space (a SentencePiece tokenizer drops the
        text's first "▁" as it decodes: "Paris", not " Paris", as a whole completion after "The capital is"),
        as vLLM decodes a completion after its prompt."""
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(context)[-CONTEXT_TOKENS:]
        # a context that ends inside a character (a token-id prompt cut mid-emoji) is decoded without that
        # character's bytes: their U+FFFD(s) become one character with the answer's first bytes, and the text
        # past the context's length would drop that many of the answer's own characters
        while self.tokens and self._decode(0).endswith("\ufffd"):
            self.tokens.pop()
        self.prefix = 0  # decoding starts here (context for the first new token)
        self.read = len(self.tokens)  # the text of tokens before this was returned

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def add(self, new: list[int]) -> str:
        """The text that `new` completes ("" while a character is still incomplete, or a byte group may go on)."""
        self.tokens.extend(new)
        if self.tokens and self.tokens[-1] in byte_tokens(self.tokenizer):
            # SentencePiece's byte fallback decodes a run of <0x..> tokens together, and all of a run that is not
            # UTF-8 as U+FFFDs: "X" (<0x58>) sent alone would become "\ufffd" once a stray <0xBC> follows it.
            return ""
        before, text = self._decode(self.prefix, self.read), self._decode(self.prefix)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]

    def rest(self) -> str:
        """What is left when the sequence ends (an incomplete character as the tokenizer decodes it)."""
        before, text = self._decode(self.prefix, self.read), self._decode(self.prefix)
        self.prefix = self.read = len(self.tokens)
        return text[len(before):]


_BYTE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its <0x..> token ids


def byte_tokens(tokenizer) -> frozenset[int]:
    """The ids of a tokenizer's byte-fallback tokens (SentencePiece's "<0x41>"; none in a byte-level BPE), read
    from its vocabulary once."""
    try:
        return _BYTE_TOKENS[tokenizer]
    except (KeyError, TypeError):  # (TypeError: a tokenizer that no weak reference can point to: read each time)
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    found = frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
    with contextlib.suppress(TypeError):
        _BYTE_TOKENS[tokenizer] = found
    return found


class StreamedText:
    """A row's answer as it is streamed: `IncrementalText`'s pieces, cut at the first stop string, with the text
    that could still begin one held back until the next tokens tell. The pieces add up to the answer `generate`
    returns (its text cut at the first stop string)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] | tuple[int, ...] = ()):
        self.text = IncrementalText(tokenizer, context)
        self.stop = stop
        self.pending = ""  # decoded, not yet sent
        self.stopped = False  # a stop string was found: nothing more is sent

    def add(self, tokens: list[int]) -> str:
        if self.stopped:
            return ""
        self.pending += self.text.add(tokens)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.text.rest()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.pending, self.stopped = self.pending[:cut], True
        keep = 0 if final or self.stopped else _stop_prefix(self.pending, self.stop)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out


def _stop_prefix(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string (0: none)."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _record(prompt: str, text: str, token_ids: list[int], batch: dict | None) -> dict:
    """A prompt's result; `batch`: the figures of the decoding it was part of (None: interrupted)."""
    return {"prompt": prompt, "text": text, "token_ids": token_ids, "new_tokens": len(token_ids), "batch": batch}


def _scored(entry: TokenLogprob, show) -> dict:
    """A token's log-probability as a JSON record holds it."""
    return {"token_id": entry.token, "token": show(entry.token)[0], "logprob": entry.logprob,
            "top_logprobs": [{"token_id": t, "token": show(t)[0], "logprob": lp} for t, lp in entry.top]}


