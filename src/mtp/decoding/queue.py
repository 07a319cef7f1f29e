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

Item = TypeVar("Item")


def decode_queue(model, waiting: deque[Item], batch_size: int,
                 on_end: Callable[[Item, list[int], list | None, GenerationStats], None], *,
                 ids_of: Callable[[Item], list[int]], pad_id: int, max_new_tokens: int,
                 streamer: Callable[[Item, list[int]], None] | None = None, **options) -> GenerationResult:
    """Decode the prompts `waiting` holds, taken from its left: one left-padded batch of at most `batch_size`
    rows, the next prompt joining as a row ends where the strategy takes joiners (greedy and speculative decoding
    with a chain or a fixed tree; a prompt that does not fit the batch's cache waits for the next call).
    `on_end(item, tokens, their TokenLogprobs or None, the statistics so far)` gets each prompt's answer as soon as
    it ended; `streamer(item, new_tokens)` its tokens as they come; `ids_of(item)` is its prompt's token ids.
    Returns the call's result (its rows: the prompts it took, in order); the prompts it did not take stay in
    `waiting`. `options`: `generate`'s."""
    rows = [waiting.popleft() for _ in range(min(batch_size, len(waiting)))]
    ids, mask = left_pad([ids_of(item) for item in rows], pad_id)

    def take(active: int, fits: Callable[[int, int], bool]) -> list[tuple[list[int], int]]:
        joining = []
        while waiting and active + len(joining) < batch_size and fits(len(ids_of(waiting[0])), max_new_tokens):
            joining.append(waiting.popleft())
        rows.extend(joining)
        return [(ids_of(item), max_new_tokens) for item in joining]

    def stream(row: int, new: list[int], logprobs=None) -> None:
        streamer(rows[row], new)

    # the cache keeps room for the longest prompt that may join (on a CPU it grows only as rows do; on a GPU the
    # rest of a prompt after a prefix is padded to a prompt width, and `fits` allows for one more)
    room = max((len(ids_of(item)) for item in waiting), default=0) - ids.shape[1] + 2 * PROMPT_BUCKET
    return generate(model, ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens,
                    streamer=stream if streamer is not None else None,
                    on_end=lambda row, tokens, scores, stats: on_end(rows[row], tokens, scores, stats),
                    admit=Admission(take, max_rows=batch_size, room=max(room, 0)) if waiting else None, **options)
