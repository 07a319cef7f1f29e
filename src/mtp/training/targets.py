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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from mtp.errors import MTPError
from mtp.training.data import Example, TokenizedData, _example_tokens, rows_to_data

CACHE_NAME = "self_targets.jsonl"


def prompt_token_ids(tokenizer, prompt: str, template: Literal["chat", "plain"]) -> list[int]:
    """The prompt tokens exactly as `tokenize_examples` lays them out (and as the model sees them when asked)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MTPError("the tokenizer has no eos token")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MTPError("the tokenizer has no chat template; use --template plain")
    return list(_example_tokens(tokenizer, Example(prompt, ""), template, eos)[0])


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


def read_cache(path: str | os.PathLike) -> dict[tuple[int, str], list[int]]:
    """(id, key) -> tokens of every complete line of the cache and of any rank's share not merged into it yet
    (a later line for the same id and key wins)."""
    found: dict[tuple[int, str], list[int]] = {}
    path = Path(path)
    for file in [path, *_share_files(path)]:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                found[(int(record["id"]), str(record["key"]))] = [int(t) for t in record["tokens"]]
            except (ValueError, KeyError, TypeError):  # a line cut off by an interruption, or foreign
                continue
    return found


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
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    budgets: Sequence[int] | None = None,
    model_key: str | None = None,
    stop_token_ids: list[int] | None = None,
    generate_missing: bool = True,
    progress: bool = True,
    trunk_sink: dict[int, torch.Tensor] | None = None,
    share: tuple[int, int] = (0, 1),
    ids: Sequence[int] | None = None,
    desc: str = "self-distilled targets",
) -> list[list[int]]:
    """The model's greedy answer (new token ids) to each prompt (token ids), from the cache or generated.

    `budgets[i]` caps row i's answer length (default `max_new_tokens`; a row gets at most its budget even when
    it shares a batch with longer budgets). With `generate_missing=False` a prompt missing from the cache is an
    error (e.g. the model has been fine-tuned since, so it can no longer produce the original answers).
    `trunk_sink`, when given, receives for each prompt answered now (not from the cache) the trunk output at
    every position of prompt + answer that generation computed, `(P + A - 1 or P + A, H)` on the CPU: what a
    frozen-trunk training run needs, without a second pass over the rows. `ids`: each prompt's id in the cache
    and in `trunk_sink` (default: its position); `desc`: the progress bar's label.
    `share` (rank, world size): under torchrun every rank calls this and answers its share (module docstring);
    all ranks return every answer.
    """
    from mtp.decoding.generate import generate, left_pad
    from mtp.models.quantize import fp16_decoding

    if max_new_tokens < 1:
        raise MTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise MTPError(f"generation batch size must be >= 1, got {batch_size}")
    budgets = [max_new_tokens] * len(prompts) if budgets is None else [min(b, max_new_tokens) for b in budgets]
    model_key = model_key or model_fingerprint(model)
    keys = [_line_key(model_key, p, b) for p, b in zip(prompts, budgets, strict=True)]
    cache_ids = list(range(len(prompts))) if ids is None else list(ids)
    cached = read_cache(cache_path) if cache_path is not None else {}
    rank, world = share
    if world > 1:  # every rank has read the cache before any writes its share: they agree on what is missing
        from mtp.training.distributed import barrier

        barrier()
    answers: list[list[int] | None] = [cached.get((cache_ids[i], k)) for i, k in enumerate(keys)]
    for i, b in enumerate(budgets):
        if answers[i] is None and (b <= 0 or not prompts[i]):
            answers[i] = []  # no room for an answer within seq_len, or an empty prompt: nothing to generate
    todo = [i for i, a in enumerate(answers) if a is None]
    if todo and not generate_missing:
        raise MTPError(f"{len(todo)} self-distilled answers are missing from {cache_path}, and the model has "
                       "changed since they were generated; start a new run (new --output)")
    if not todo:
        return [list(a) for a in answers]
    if world > 1 and cache_path is None:
        raise MTPError("answering in parallel needs a cache file to merge the ranks' answers in")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    todo.sort(key=lambda i: (-len(prompts[i]), i))  # similar lengths share a batch: little padding
    mine = todo[rank::world]
    write_path = share_path(cache_path, rank) if world > 1 else cache_path
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        label = desc + (f" (rank 0's share of {world})" if world > 1 else "")
        total, initial = (len(mine), 0) if world > 1 else (len(prompts), len(prompts) - len(todo))
        bar = tqdm(total=total, initial=initial, desc=label, unit="answer", dynamic_ncols=True)
    sink = _open_for_append(write_path) if write_path is not None else None
    was_training = model.training
    model.eval()
    new_tokens = 0
    seconds = 0.0
    try:
        # Packed fp16 weights answer ~1.3x faster on a CPU; the layers' fp32 weights (trained next) are untouched.
        with fp16_decoding(model):
            for start in range(0, len(mine), batch_size):
                chunk = mine[start:start + batch_size]
                ids, mask = left_pad([prompts[i] for i in chunk], pad)
                recorder = _TrunkRecorder(len(chunk)) if trunk_sink is not None else None
                res = generate(model, ids.to(model.device), mask.to(model.device),
                               max_new_tokens=max(budgets[i] for i in chunk), strategy="greedy",
                               stop_token_ids=stop_token_ids, on_trunk=recorder)
                lines = []
                for r, i in enumerate(chunk):
                    answers[i] = [int(t) for t in res.tokens[r][: budgets[i]]]
                    lines.append(json.dumps({"id": cache_ids[i], "key": keys[i], "tokens": answers[i]}) + "\n")
                    if recorder is not None:
                        trunk_sink[cache_ids[i]] = recorder.row(r, len(prompts[i]) + len(answers[i]))
                if sink is not None:
                    sink.write("".join(lines))
                    sink.flush()
                    os.fsync(sink.fileno())
                new_tokens += sum(len(answers[i]) for i in chunk)
                seconds += res.stats.seconds
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{new_tokens / max(seconds, 1e-9):.1f} tok/s", refresh=False)
    finally:
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world > 1:  # every share is written: rank 0 merges them, then every rank reads them all
        merged = _merged_shares(cache_path, rank)
        for i in todo:
            answers[i] = merged.get((cache_ids[i], keys[i]))
        if any(answers[i] is None for i in todo):
            raise MTPError(f"{cache_path}: answers of other ranks are missing after merging (is the output folder "
                           "on a file system every node shares?)")
    return [list(a) for a in answers]


def _open_for_append(path: str | os.PathLike):
    """The answers file opened to append lines; a last line cut off by an interruption is ended first, so it
    stays on its own (and is skipped when read) instead of swallowing the next answer."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sink = Path(path).open("a", encoding="utf-8")
    if sink.tell() > 0:
        with Path(path).open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                sink.write("\n")
    return sink


def _merged_shares(cache_path, rank: int) -> dict:
    """Under torchrun, once every rank has written its share: rank 0 merges them into the cache file, and every
    rank reads the whole cache back."""
    from mtp.training.distributed import barrier

    barrier()
    if rank == 0:
        merge_shares(cache_path)
    barrier()
    return read_cache(cache_path)


class _TrunkRecorder:
    """A `TrunkObserver` for one generate() batch: each row's trunk outputs along its sequence, on the CPU."""

    def __init__(self, batch_size: int):
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]

    def __call__(self, rows: torch.Tensor, trunk: torch.Tensor, kept: torch.Tensor) -> None:
        trunk, kept = trunk.detach().cpu(), kept.bool().cpu()  # (B, T, H), (B, T)
        for r, row in enumerate(rows.tolist()):
            self.parts[row].append(trunk[r][kept[r]])

    def row(self, r: int, length: int) -> torch.Tensor:
        """The first `length` positions of row r (the last token of an answer was never fed: one fewer)."""
        return torch.cat(self.parts[r])[:length]  # (<= length, H)


def answers_within_minutes(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    minutes: float,
    *,
    max_new_tokens: int,
    budgets: Sequence[int] | None = None,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    model_key: str | None = None,
    stop_token_ids: list[int] | None = None,
    progress: bool = True,
    trunk_sink: dict[int, torch.Tensor] | None = None,
) -> int:
    """How many of `prompts`, taken in order, the model answers in about `minutes`: it answers the first batch
    (into the cache and `trunk_sink` under ids = positions, so the run reuses them) and extrapolates from that
    batch's seconds per answer. The first batch is always answered. Batches an earlier, interrupted run already
    answered are skipped (no speed to measure there): the next one is measured instead.

    The measured batch comes in file order while the run answers its prompts sorted by length (less padding), so
    the count errs low (padding to the longest prompt of a batch costs more unsorted)."""
    if minutes <= 0:
        raise MTPError(f"the answering budget must be > 0 minutes, got {minutes:g}")
    budgets = [max_new_tokens] * len(prompts) if budgets is None else [min(b, max_new_tokens) for b in budgets]
    model_key = model_key or model_fingerprint(model)
    cached = read_cache(cache_path) if cache_path is not None else {}
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
                               trunk_sink=trunk_sink, ids=chunk, desc="self-distilled targets (measuring speed)")
        per_answer = max(time.perf_counter() - t, 1e-9) / len(missing)
        return max(chunk[-1] + 1, min(len(prompts), int(minutes * 60 / per_answer)))
    return len(prompts)  # all answered already


def self_distilled_data(
    model,
    tokenizer,
    groups: Sequence[Sequence[Example]],
    *,
    template: Literal["chat", "plain"] = "chat",
    seq_len: int = 512,
    max_new_tokens: int = 256,
    loss_on: Literal["answer", "all"] = "answer",
    pack: bool = False,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    model_key: str | None = None,
    generate_missing: bool = True,
    progress: bool = True,
    trunk_features: bool = False,
    share: tuple[int, int] = (0, 1),
    ids: Sequence[Sequence[int]] | None = None,
    trunk_sink: dict[int, torch.Tensor] | None = None,
    desc: str = "self-distilled targets",
) -> list[TokenizedData | None]:
    """One TokenizedData per group of examples (e.g. [train, held-out]; None for an empty group): rows of
    prompt + the model's own greedy answer, loss on the answer (or on everything with loss_on="all").

    All groups are answered in one pass sharing one cache (ids run on across groups, or `ids`: each example's
    id, per group). An answer is generated only as long as it can fit in its row: min(max_new_tokens, seq_len -
    prompt length). With `trunk_features` (not with `pack`), each TokenizedData also carries its rows' trunk
    outputs (`trunk_features`): kept from generation (also from an earlier call's `trunk_sink`, by id), computed
    for rows whose answer came from the cache.
    """
    if seq_len < 2:
        raise MTPError(f"seq_len must be at least 2, got {seq_len}")
    flat = [ex for group in groups for ex in group]
    prompts = [prompt_token_ids(tokenizer, ex.prompt, template) for ex in flat]
    budgets = [max(0, seq_len - len(p)) for p in prompts]
    if trunk_features and pack:
        raise MTPError("trunk features of packed rows are not recorded (rows mix examples); use pack=False")
    sink: dict[int, torch.Tensor] | None = (trunk_sink if trunk_sink is not None else {}) if trunk_features else None
    if ids is None:
        starts = [sum(len(g) for g in groups[:j]) for j in range(len(groups))]
        ids = [list(range(start, start + len(g))) for start, g in zip(starts, groups, strict=True)]
    flat_ids = [i for group_ids in ids for i in group_ids]
    if len(flat_ids) != len(flat) or len(set(flat_ids)) != len(flat_ids):
        raise MTPError("ids must give every example of the groups its own id")
    answers = dict(zip(flat_ids, self_distilled_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, cache_path=cache_path, batch_size=batch_size,
        budgets=budgets, model_key=model_key, generate_missing=generate_missing, progress=progress,
        trunk_sink=sink, share=share, ids=flat_ids, desc=desc), strict=True))
    prompts = dict(zip(flat_ids, prompts, strict=True))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[TokenizedData | None] = []
    for group_ids in ids:
        rows = [(prompts[i] + answers[i], [loss_on == "all"] * len(prompts[i]) + [True] * len(answers[i]))
                for i in group_ids]
        data = rows_to_data(rows, seq_len, pad, pack) if rows else None
        if data is not None and sink is not None:  # the features of the rows rows_to_data kept
            recorded = [sink.pop(group_ids[k], None) for k in data.source_rows.tolist()]
            data.trunk_features = _row_features(model, data, recorded, progress)
        out.append(data)
    return out


def _row_features(model, data: TokenizedData, recorded: list[torch.Tensor | None], progress: bool) -> torch.Tensor:
    """(N, L, H) trunk outputs of the rows of `data`: the recorded ones, the rest (None) computed now."""
    from mtp.training.loop import compute_trunk_features

    lengths = data.lengths.tolist()
    missing = [k for k, f in enumerate(recorded) if f is None]
    computed = None
    if missing:
        index = torch.tensor(missing)
        subset = TokenizedData.from_dense(data.input_ids[index], data.loss_mask[index], data.attention_mask[index])
        with torch.no_grad():
            computed = compute_trunk_features(model, subset, progress=progress, desc="trunk cache (cached answers)")
    hidden_size = model.config.hidden_size
    sample = next((f for f in recorded if f is not None), computed)
    features = torch.zeros(len(data), max(lengths), hidden_size, dtype=sample.dtype)  # (N, L, H)
    for k, f in enumerate(recorded):
        if f is not None:
            f = f[: lengths[k]]
            features[k, : f.shape[0]] = f
    if computed is not None:
        features[torch.tensor(missing), : computed.shape[1]] = computed.to(features.dtype)
    return features
