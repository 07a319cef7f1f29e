"""Many prompts through continuously batched decoding: taken from a queue into one batch of at most `batch_size`
rows, the next prompt joining as soon as a row ends (`generate(admit=...)`), each answer handed over as it ends.
`mtp eval` and `mtp generate --prompts` decode this way."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

from mtp.decoding.generate import (
    PROMPT_BUCKET,
    Admission,
    GenerationResult,
    GenerationStats,
    generate,
    left_pad,
)
from mtp.decoding.row_options import PER_ROW, row_options

Item = TypeVar("Item")


def decode_queue(model, waiting: deque[Item], batch_size: int,
                 on_end: Callable[[Item, list[int], list | None, GenerationStats], None], *,
                 ids_of: Callable[[Item], list[int]], pad_id: int, max_new_tokens: int | None = None,
                 settings_of: Callable[[Item], dict] | None = None,
                 streamer: Callable[[Item, list[int]], None] | None = None, **options) -> GenerationResult:
    """Decode the prompts `waiting` holds, taken from its left: one left-padded batch of at most `batch_size`
    rows, the next prompt joining as a row ends where the strategy takes joiners (greedy and speculative decoding
    with a chain or a fixed tree; a prompt that does not fit the batch's cache, or asks for what the batch's steps
    do not compute, waits for the next call). `on_end(item, tokens, their TokenLogprobs or None, the statistics so
    far)` gets each prompt's answer as soon as it ended; `streamer(item, new_tokens)` its tokens as they come;
    `ids_of(item)` is its prompt's token ids; `settings_of(item)` its own `generate` arguments of
    `mtp.decoding.row_options.PER_ROW` and its max_new_tokens (None: every prompt's are `max_new_tokens` and
    `options`'). Returns the call's result (its rows: the prompts it took, in order); the prompts it did not take
    stay in `waiting`. `options`: `generate`'s."""
    def settings(item: Item) -> dict:
        return settings_of(item) if settings_of is not None else {"max_new_tokens": max_new_tokens}

    rows = [waiting.popleft() for _ in range(min(batch_size, len(waiting)))]
    ids, mask = left_pad([ids_of(item) for item in rows], pad_id)
    first = [settings(item) for item in rows]
    per_row = {name: [s[name] for s in first] for name in first[0]}  # (max_new_tokens and each PER_ROW argument)

    def row(item: Item) -> tuple:  # a joiner: its ids, budget and RowOptions
        given = settings(item)
        if settings_of is None:
            return ids_of(item), given["max_new_tokens"]
        values = {name: given[name] for name in PER_ROW}
        return ids_of(item), given["max_new_tokens"], row_options(1, model.config.vocab_size, values, {})[0]

    def take(active: int, fits: Callable[..., bool]) -> list[tuple]:
        joining = []
        while waiting and active + len(joining) < batch_size:
            ids_budget_options = row(waiting[0])
            if not fits(len(ids_budget_options[0]), *ids_budget_options[1:]):
                break
            joining.append((waiting.popleft(), ids_budget_options))
        rows.extend(item for item, _ in joining)
        return [r for _, r in joining]

    def stream(row: int, new: list[int], logprobs=None) -> None:
        streamer(rows[row], new)

    # the cache keeps room for the longest prompt that may join (on a CPU it grows only as rows do; on a GPU the
    # rest of a prompt after a prefix is padded to a prompt width, and `fits` allows for one more)
    room = max((len(ids_of(item)) for item in waiting), default=0) - ids.shape[1] + 2 * PROMPT_BUCKET
    most = max((settings(item)["max_new_tokens"] for item in waiting), default=0)  # (a joiner's budget, the cache's)
    room += max(most - max(per_row["max_new_tokens"]), 0)
    return generate(model, ids.to(model.device), mask.to(model.device), **per_row,
                    streamer=stream if streamer is not None else None,
                    on_end=lambda row, tokens, scores, stats: on_end(rows[row], tokens, scores, stats),
                    admit=Admission(take, max_rows=batch_size, room=max(room, 0)) if waiting else None, **options)
