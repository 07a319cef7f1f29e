"""Self-distilled targets (`--targets self`): the base model answers each training prompt itself.

The training row becomes prompt + the model's own greedy answer (as token ids, exactly as generated, with the
stop token when it was hit), and the loss covers the answer. Heads trained on these rows learn to predict what
the model they serve will say, which is what speculative decoding accepts (Medusa-2; Kirchenbauer et al. 2026).

Answers are produced in batches (prompts sorted by length, left-padded) with `mtp.decoding.generate` and appended
to a JSONL cache, one line per example as each batch finishes:

    {"id": 17, "key": "3f2a...", "tokens": [2681, 314, ...]}

`key` hashes the model's next-token path, the prompt's token ids and the generation budget, so a line is only
reused for the same model, prompt and budget. An interrupted run resumes where it stopped (a line cut off by the
crash is ignored); the file is append-only, so it is never rewritten in place.

Under torchrun each rank answers its share of the missing prompts (every world_size-th of them in length
order, so the shares cost alike) into `self_targets.rank{r}.jsonl`; once all are done, rank 0 appends the
shares to the cache and removes them. The lines do not depend on who wrote them, so a later run of any world
size (one process too) reuses the cache, and shares left by a killed run are read as part of it.

A frozen-trunk run also keeps what the trunk computed while answering (`features`): each batch's trunk outputs
are copied into one buffer as generation goes and appended to the run's feature store on disk
(`mtp.training.features`) before the batch's answer lines, so a cached answer finds its features there.
Prompts and answers are held as `TokenLists` (int32 arrays), and the cache is read line by line.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from mtp.errors import MTPError
from mtp.io import open_append
from mtp.progress import progress_bar
from mtp.training.data import Example, Rows, TokenizedData, _example_tokens, _start_tokens, check_tokenizer
from mtp.training.features import FeatureRecorder, FeatureStore

CACHE_NAME = "self_targets.jsonl"


def prompt_token_ids(tokenizer, prompt: str, template: Literal["chat", "plain"],
                     context: Sequence[dict] = ()) -> list[int]:
    """The prompt tokens exactly as `tokenize_examples` lays them out (and as the model sees them when asked);
    `context`: a conversation's messages before the prompt (`Example.context`)."""
    return prompts_token_ids(tokenizer, [Example(prompt, "", tuple(context))], template)[0]


def prompts_token_ids(tokenizer, examples: Iterable[Example], template: Literal["chat", "plain"]) -> TokenLists:
    """`prompt_token_ids` of each example's prompt (and context), as compact `TokenLists`. One tokenizer call a
    prompt: a batched call would hold every chunk's encodings at once (more memory at dataset scale, for
    ~0.1 ms a prompt)."""
    eos_id, start = check_tokenizer(tokenizer, template), _start_tokens(tokenizer)
    out = TokenLists()
    for ex in examples:
        out.append(_example_tokens(tokenizer, Example(ex.prompt, "", tuple(ex.context)), template, eos_id, start)[0])
    return out


@torch.no_grad()
def model_fingerprint(model, with_heads: bool = False) -> str:
    """A hash of the next-token path's weights (everything but the extra heads): who wrote the answers. Weights
    only, so the same model loaded from a checkpoint folder (whose config gained an `mtp` section) matches.
    `with_heads`: of every weight, the extra heads' too."""
    h = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, p in (model if with_heads else model.base).named_parameters():
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1).double()
        h.update(f"{float(flat.sum()):.10e}/{float(flat.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _line_key(model_key: str, prompt_ids: Sequence[int], budget: int) -> str:
    h = hashlib.sha256(f"{model_key}|{budget}|".encode())
    h.update(json.dumps(list(prompt_ids)).encode())
    return h.hexdigest()[:16]


def share_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` writes its share of the answers before they join the cache at `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _share_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


class TokenLists:
    """Lists of token ids kept compactly: their tokens back to back in one int32 array, and each list's start and
    length (a list never set reads as None). What prompts and answers take at dataset scale, where a Python list
    of ints costs ~36 bytes a token."""

    def __init__(self, n: int = 0):
        self.tokens = array("i")
        self.starts, self.lengths = array("q", [-1]) * n, array("q", [0]) * n

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> list[int] | None:
        start = self.starts[i]
        return None if start < 0 else self.tokens[start:start + self.lengths[i]].tolist()

    def __iter__(self) -> Iterator[list[int] | None]:
        return (self[i] for i in range(len(self)))

    def __setitem__(self, i: int, tokens: Sequence[int]) -> None:
        self.starts[i], self.lengths[i] = len(self.tokens), len(tokens)
        self.tokens.extend(tokens)

    def append(self, tokens: Sequence[int]) -> None:
        self.starts.append(-1)
        self.lengths.append(0)
        self[len(self) - 1] = tokens

    def take(self, rows: Iterable[int]) -> TokenLists:
        """These lists, in this order (their tokens shared, not copied)."""
        out = TokenLists()
        out.tokens = self.tokens
        for i in rows:
            out.starts.append(self.starts[i])
            out.lengths.append(self.lengths[i])
        return out

    def tolist(self) -> list[list[int] | None]:
        return list(self)


def cache_records(path: str | os.PathLike) -> Iterator[tuple[int, str, list[int]]]:
    """(id, key, tokens) of every complete line of the cache and of any rank's share not merged into it yet, in
    file order (a later line for the same id and key wins), read line by line."""
    path = Path(path)
    for file in [path, *_share_files(path)]:
        if not file.is_file():
            continue
        with file.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    yield int(record["id"]), str(record["key"]), [int(t) for t in record["tokens"]]
                except (ValueError, KeyError, TypeError):  # a line cut off by an interruption, or foreign
                    continue


def read_cache(path: str | os.PathLike) -> dict[tuple[int, str], list[int]]:
    """(id, key) -> tokens of the cache (`cache_records`)."""
    return {(i, key): tokens for i, key, tokens in cache_records(path)}


def _read_answers(path: str | os.PathLike, cache_ids: Sequence[int], keys: Sequence[str], answers: TokenLists,
                  rows: Iterable[int] | None = None) -> None:
    """Set answers[i] from the cache for each of `rows` (default: all) whose (id, key) has a line there."""
    wanted = {(cache_ids[i], keys[i]): i for i in (rows if rows is not None else range(len(keys)))}
    for record_id, key, tokens in cache_records(path):
        i = wanted.get((record_id, key))
        if i is not None:
            answers[i] = tokens


def merge_shares(path: str | os.PathLike) -> None:
    """Append every rank's share file to the cache, then remove it (a repeat after a crash only repeats lines,
    which read the same)."""
    path = Path(path)
    for file in _share_files(path):
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        with path.open("a", encoding="utf-8") as f:
            if f.tell() > 0 and not path.read_bytes().endswith(b"\n"):
                f.write("\n")
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        file.unlink()


def self_distilled_answers(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]] | TokenLists,
    *,
    max_new_tokens: int,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    budgets: Sequence[int] | None = None,
    model_key: str | None = None,
    stop_token_ids: list[int] | None = None,
    generate_missing: bool = True,
    progress: bool = True,
    features: FeatureStore | None = None,
    share: tuple[int, int] = (0, 1),
    ids: Sequence[int] | None = None,
    desc: str = "self-distilled targets",
) -> TokenLists:
    """The model's greedy answer (new token ids) to each prompt (token ids), from the cache or generated.

    `budgets[i]` caps row i's answer length (default `max_new_tokens`; a row gets at most its budget even when
    it shares a batch with longer budgets). With `generate_missing=False` a prompt missing from the cache is an
    error (e.g. the model has been fine-tuned since, so it can no longer produce the original answers).
    `features`, when given, receives the trunk output at every position of prompt + answer that generation
    computed, for each prompt answered now (not from the cache): what a frozen-trunk training run needs, without
    a second pass over the rows. `ids`: each prompt's id in the cache (default: its position); `desc`: the
    progress bar's label. `share` (rank, world size): under torchrun every rank calls this and answers its share
    (module docstring); all ranks return every answer.
    """
    if max_new_tokens < 1:
        raise MTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise MTPError(f"generation batch size must be >= 1, got {batch_size}")
    n = len(prompts)
    budgets = [max_new_tokens] * n if budgets is None else [min(b, max_new_tokens) for b in budgets]
    model_key = model_key or model_fingerprint(model)
    keys = [_line_key(model_key, prompts[i], budgets[i]) for i in range(n)]
    cache_ids = list(range(n)) if ids is None else list(ids)
    answers = TokenLists(n)
    if cache_path is not None and (Path(cache_path).is_file() or _share_files(Path(cache_path))):
        _read_answers(cache_path, cache_ids, keys, answers)
    rank, world = share
    if world > 1:  # every rank has read the cache before any writes its share: they agree on what is missing
        from mtp.training.distributed import barrier

        barrier()
    lengths = [len(prompts[i]) for i in range(n)]
    cached = sum(1 for i in range(n) if answers.starts[i] >= 0)  # (answered by an earlier run)
    no_room = [i for i in range(n) if answers[i] is None and (budgets[i] <= 0 or not lengths[i])]
    for i in no_room:
        answers[i] = []  # no room for an answer within seq_len, or an empty prompt: nothing to generate
    todo = [i for i in range(n) if answers.starts[i] < 0]
    if todo and not generate_missing:
        raise MTPError(f"{len(todo)} self-distilled answers are missing from {cache_path}, and the model has "
                       "changed since they were generated; start a new run (new --output)")
    if not todo:
        return answers
    if world > 1 and cache_path is None:
        raise MTPError("answering in parallel needs a cache file to merge the ranks' answers in")
    todo.sort(key=lambda i: (-lengths[i], i))  # similar lengths share a batch: little padding
    mine = todo[rank::world]
    bar = None
    if rank == 0:
        label = desc + (f" (rank 0's share of {world})" if world > 1 else "")
        total, initial = (len(mine), 0) if world > 1 else (n, n - len(todo))
        bar = progress_bar(progress, total, label, "answer", initial)
    if rank == 0 and cache_path is not None and cached:  # (a re-run of an interrupted one goes on from it)
        print(f"answers: {cached} of {n} read from {cache_path} (answered before); answering the other "
              f"{len(todo)}", file=sys.stderr, flush=True)
    try:
        _generate_answers(model, tokenizer, prompts, mine, answers, (cache_ids, keys), budgets,
                          share_path(cache_path, rank) if world > 1 else cache_path, batch_size, stop_token_ids,
                          features, bar)
    except KeyboardInterrupt:
        if world == 1 and cache_path is not None:
            kept = sum(1 for i in range(n) if answers.starts[i] >= 0) - len(no_room)  # (those are not in the file)
            print(f"answers: interrupted; {kept} of {n} are kept in {cache_path}: the same command goes on from "
                  "them", file=sys.stderr, flush=True)
        raise
    if world > 1:  # every share is written: rank 0 merges them, then every rank reads them all
        _merge_and_read(cache_path, rank, cache_ids, keys, answers, todo)
    return answers


def _generate_answers(model, tokenizer, prompts, rows: list[int], answers: TokenLists,
                      lines: tuple[Sequence[int], Sequence[str]], budgets: list[int], write_path, batch_size: int,
                      stop_token_ids, features: FeatureStore | None, bar) -> None:
    """Answer `rows` of the prompts in batches: answers[i] set, each batch's cache lines (`lines`: every prompt's
    id and key) appended to `write_path` and its trunk features to `features` as it finishes."""
    from mtp.decoding.generate import generate, left_pad
    from mtp.decoding.inputs import common_prefix
    from mtp.models.quantize import fp16_decoding

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sink = open_append(write_path) if write_path is not None else None
    was_training = model.training
    model.eval()
    new_tokens = 0
    seconds = 0.0
    gc.collect()
    gc.freeze()
    try:
        # Packed fp16 weights answer ~1.3x faster on a CPU; the layers' fp32 weights (trained next) are untouched.
        with fp16_decoding(model):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                asked = [prompts[i] for i in chunk]
                ids, mask = left_pad(asked, pad)
                longest = max(len(p) + budgets[i] for p, i in zip(asked, chunk, strict=True))
                recorder = FeatureRecorder(features, len(chunk), longest) if features is not None else None
                # what the prompts start with (a chat template's system turn) is fed once, where no trunk features
                # are kept (they are recorded for every prompt token)
                shared = common_prefix(asked) if recorder is None and len(chunk) > 1 else None
                res = generate(model, ids.to(model.device), mask.to(model.device),
                               max_new_tokens=[budgets[i] for i in chunk], strategy="greedy",  # (each row's own:
                               # a short prompt's budget after the batch's longest one ran past the context)
                               stop_token_ids=stop_token_ids, on_trunk=recorder, prefix=shared)
                done = [[int(t) for t in res.tokens[r][: budgets[i]]] for r, i in enumerate(chunk)]
                if recorder is not None:  # before the answers: a row whose answer is cached has its features
                    rows_tokens = [p + a for p, a in zip(asked, done, strict=True)]
                    recorder.write([features.key(t) for t in rows_tokens], [len(t) for t in rows_tokens])
                for i, answer in zip(chunk, done, strict=True):
                    answers[i] = answer
                if sink is not None:
                    sink.write("".join(json.dumps({"id": lines[0][i], "key": lines[1][i], "tokens": a}) + "\n"
                                       for i, a in zip(chunk, done, strict=True)))
                    sink.flush()
                    os.fsync(sink.fileno())
                new_tokens += sum(len(a) for a in done)
                seconds += res.stats.seconds
                # The decoding cache's objects refer to each other, so without a collection now the batch's KV
                # buffers (hundreds of MB for 48 rows of the default model) would wait for Python's cyclic
                # collector while the next batches allocate theirs: memory would grow with the batches answered.
                # What existed before the loop is frozen (`gc.freeze` above), so this walks only the objects
                # made since: ~1 ms instead of ~200 ms over the 360,000 objects torch and transformers hold.
                del res, recorder
                gc.collect()
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{new_tokens / max(seconds, 1e-9):.1f} tok/s", refresh=False)
    finally:
        gc.unfreeze()
        for f in (sink, features, bar):
            if f is not None:
                f.close()
        model.train(was_training)


def _merge_and_read(cache_path, rank: int, cache_ids, keys, answers: TokenLists, todo: list[int]) -> None:
    """Under torchrun, once every rank has written its share: rank 0 merges them into the cache file, and every
    rank reads the answers of `todo` back from it."""
    from mtp.training.distributed import barrier

    barrier()
    if rank == 0:
        merge_shares(cache_path)
    barrier()
    _read_answers(cache_path, cache_ids, keys, answers, todo)
    for i in todo:
        if answers.starts[i] < 0:
            raise MTPError(f"{cache_path}: answers of other ranks are missing after merging (is the output folder "
                           "on a file system every node shares?)")


def answers_within_minutes(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]] | TokenLists,
    minutes: float,
    *,
    max_new_tokens: int,
    budgets: Sequence[int] | None = None,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    model_key: str | None = None,
    stop_token_ids: list[int] | None = None,
    progress: bool = True,
    features: FeatureStore | None = None,
) -> int:
    """How many of `prompts`, taken in order, the model answers in about `minutes`: it answers the first batch
    (into the cache and `features` under ids = positions, so the run reuses them) and extrapolates from that
    batch's seconds per answer. The first batch is always answered. Batches an earlier, interrupted run already
    answered are skipped (no speed to measure there): the next one is measured instead.

    The measured batch comes in file order while the run answers its prompts sorted by length (less padding), so
    the count errs low (padding to the longest prompt of a batch costs more unsorted)."""
    if minutes <= 0:
        raise MTPError(f"the answering budget must be > 0 minutes, got {minutes:g}")
    budgets = [max_new_tokens] * len(prompts) if budgets is None else [min(b, max_new_tokens) for b in budgets]
    model_key = model_key or model_fingerprint(model)
    cached = {(i, key) for i, key, _ in cache_records(cache_path)} if cache_path is not None else set()
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        missing = [i for i in chunk
                   if budgets[i] > 0 and prompts[i] and (i, _line_key(model_key, prompts[i], budgets[i])) not in cached]
        if not missing:
            continue
        t = time.perf_counter()
        self_distilled_answers(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                               cache_path=cache_path, batch_size=batch_size, budgets=[budgets[i] for i in chunk],
                               model_key=model_key, stop_token_ids=stop_token_ids, progress=progress,
                               features=features, ids=chunk, desc="self-distilled targets (measuring speed)")
        per_answer = max(time.perf_counter() - t, 1e-9) / len(missing)
        return max(chunk[-1] + 1, min(len(prompts), int(minutes * 60 / per_answer)))
    return len(prompts)  # all answered already


def self_distilled_data(model, tokenizer, groups: Sequence[Sequence[Example]], *,
                        template: Literal["chat", "plain"] = "chat", **kw) -> list[TokenizedData | None]:
    """`self_distilled_rows` of groups of examples (their prompts; the answers are the model's)."""
    prompts = prompts_token_ids(tokenizer, (ex for group in groups for ex in group), template)
    starts = [sum(len(g) for g in groups[:j]) for j in range(len(groups))]
    return self_distilled_rows(model, tokenizer, prompts,
                               [range(s, s + len(g)) for s, g in zip(starts, groups, strict=True)], **kw)


CORPUS_TOKENS = 2_000_000  # a lookup corpus is built from the first answers up to this many tokens (its build
# holds ~50 bytes a token for a moment: ~0.1 GB here, where a dataset-scale run's answers could take gigabytes)


def _save_corpus(answers: TokenLists, path: str | os.PathLike) -> None:
    """A lookup corpus of the answers (`mtp.decoding.corpus`), saved at `path` for decoding with prompt lookup."""
    from mtp.decoding.corpus import LookupCorpus

    def first_answers():
        total = 0
        for a in answers:
            if a and total + len(a) <= CORPUS_TOKENS:
                total += len(a)
                yield a

    start = time.perf_counter()
    corpus = LookupCorpus.build(first_answers())
    corpus.save(path)
    print(f"lookup corpus: {len(corpus):,} token sequences of {corpus.answers:,} answers -> {path} "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


def self_distilled_rows(
    model,
    tokenizer,
    prompts: TokenLists,
    groups: Sequence[Sequence[int]],
    *,
    seq_len: int = 512,
    max_new_tokens: int = 256,
    loss_on: Literal["answer", "all"] = "answer",
    pack: bool = False,
    ids: Sequence[Sequence[int]] | None = None,
    features: FeatureStore | None = None,
    corpus_path: str | os.PathLike | None = None,
    **answering,
) -> list[TokenizedData | None]:
    """One TokenizedData per group of prompts (positions in `prompts`; e.g. [train, held-out]; None for an empty
    group): rows of prompt + the model's own greedy answer, loss on the answer (or on everything with
    loss_on="all").

    All groups are answered in one pass sharing one cache (`self_distilled_answers`, which takes `answering`'s
    keywords), ids running on across groups, or `ids`: each prompt's id, per group. An answer is generated only as
    long as it can fit in its row: min(max_new_tokens, seq_len - prompt length). `features` (not with `pack`)
    receives the trunk outputs generation computes (`mtp.training.features`). `corpus_path`: where to save a
    lookup corpus of the answers (`mtp.decoding.corpus`: decoding with prompt lookup drafts from it).
    """
    if seq_len < 2:
        raise MTPError(f"seq_len must be at least 2, got {seq_len}")
    if features is not None and pack:
        raise MTPError("trunk features of packed rows are not recorded (rows mix examples); use pack=False")
    if ids is None:
        starts = [sum(len(g) for g in groups[:j]) for j in range(len(groups))]
        ids = [range(start, start + len(g)) for start, g in zip(starts, groups, strict=True)]
    flat_ids = [i for group_ids in ids for i in group_ids]
    asked = prompts.take(i for group in groups for i in group)  # in the order of flat_ids
    if len(flat_ids) != len(asked) or len(set(flat_ids)) != len(flat_ids):
        raise MTPError("ids must give every example of the groups its own id")
    budgets = [max(0, seq_len - len(asked[k])) for k in range(len(asked))]
    answers = self_distilled_answers(model, tokenizer, asked, max_new_tokens=max_new_tokens, budgets=budgets,
                                     ids=flat_ids, features=features, **answering)
    if corpus_path is not None:
        _save_corpus(answers, corpus_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[TokenizedData | None] = []
    k = 0
    for group in groups:
        rows = Rows(seq_len, pad, pack)
        for _ in group:
            prompt, answer = asked[k], answers[k]
            rows.add(prompt + answer, [loss_on == "all"] * len(prompt) + [True] * len(answer))
            k += 1
        out.append(rows.finish() if len(group) else None)
    return out
