"""Prompts that start from keys and values computed before and feed only the rest: a prefix the caller names
(`generate(prefix=...)`: a few-shot prompt's examples, computed once per call) or prompts decoded before
(`PromptCache`, kept between calls: a conversation's earlier turns and answers, a server's system prompt; what
vLLM's automatic prefix caching and SGLang's radix cache do, in small).

A prompt whose first n tokens a one-row cache holds loads the keys and values of the first n - 1 and feeds the
rest, from the n-th token on: a head that reads the token after a position then reads the prompt's own at every
loaded position (at the cache's last one it read the model's guess, or the prefix's next token).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtp.decoding.inputs import shared_length
from mtp.models.cache import MTPCache
from mtp.models.weight_state import outlived, storage_refs, weights_state


@dataclass
class Start:
    """Where a prompt's step starts: the first `slots` slots of a one-row cache (slot i: the prompt's token i)."""

    cache: MTPCache
    slots: int


class PromptCache:
    """Keys and values of prompts decoded before, kept between `generate` calls: a prompt that starts like one of
    them (a conversation's next turn, a request with the same system prompt) starts from them and feeds only the
    rest. One entry per prompt after its step, one compact row each (no padding), extended by the row's answer when
    it ends (its tokens but the last, which was never fed; not where heads that read the next token sampled it); an
    entry that another one extends is dropped (a conversation keeps its latest turn and answer); the least
    recently used go first past `max_bytes`. Entries hold the stacks one way of decoding writes (greedy leaves the
    extra heads out) of one model's weights as they were: a prompt finds only entries of its own kind.

    Pass it to every call that should share it: `generate(..., prompt_cache=cache)`; `mtp serve` and `mtp chat`
    keep one."""

    def __init__(self, max_bytes: int = 1 << 30, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # prompts that would add fewer tokens than this are not kept
        self.entries: OrderedDict[tuple, tuple[tuple[int, ...], MTPCache, tuple]] = OrderedDict()
        self.hits = self.reused_tokens = 0  # prompts that started from an entry, and the tokens they did not feed

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for _, cache, _ in self.entries.values())

    def find(self, ids: Sequence[int], kind: tuple) -> tuple[MTPCache | None, int]:
        """The entry of this kind whose prompt shares the most first tokens with `ids`, and how many it shares."""
        best, most = None, 0
        for key, (tokens, _, refs) in list(self.entries.items()):
            if outlived(refs):  # the weights it was computed from are gone
                del self.entries[key]
                continue
            if key[0] != kind:
                continue
            n = shared_length(tokens, ids)
            if n > most:
                best, most = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best][1], most

    def add(self, ids: Sequence[int], kind: tuple, cache: MTPCache, refs: tuple) -> None:
        """Keep `cache` (one compact row) as the keys and values of the prompt `ids`."""
        ids = tuple(ids)
        for key, (tokens, _, _) in list(self.entries.items()):
            if key[0] == kind and ids[: len(tokens)] == tokens:  # (this one holds all it held; the same prompt too)
                del self.entries[key]
        self.entries[(kind, ids)] = (ids, cache, refs)
        while len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


class Starts:
    """Where the prompts of one call start (`split`): the named prefix's cache (computed at its first use, a
    forward the statistics count) or the `PromptCache` entry that holds more of them; and what the call adds to
    that cache: each prompt after its step (`keep`), and each row's prompt and answer when it ends (`read`: a
    conversation's next turn then starts after the answer, not after the prompt)."""

    def __init__(self, model, drafter, prefix: Sequence[int] | None, prompt_cache: PromptCache | None,
                 static: bool, device: torch.device, stats):
        self.drafter, self.static, self.device, self.stats = drafter, static, device, stats
        # Each row's tokens so far and how many of them the prompt cache holds, for the answers it keeps: all but
        # those of rows that may emit another token than the model's own (sampling, penalties) where the drafter's
        # keys read the model's own next token (`keep`)
        self.rows: dict[int, tuple[list[int], int]] | None = {} if prompt_cache is not None else None
        self.prefix = list(prefix) if prefix is not None and len(prefix) > 1 else []  # (one token: nothing to load)
        self.prefix_cache: MTPCache | None = None
        self.prompt_cache = prompt_cache
        if prompt_cache is not None:
            tensors = [*model.parameters(), *model.buffers()]
            # what an entry's keys and values depend on: the weights, the layers that compute with them (fp32 or
            # fp16-packed copies: `fast_decoding`), and which stacks the drafter writes
            self.kind = (hash(weights_state(tensors)), getattr(model, "fast_decoding", None), type(drafter).__name__,
                         getattr(drafter, "num_heads", 0), str(next(iter(tensors)).dtype) if tensors else "")
            self.refs = storage_refs(tensors)

    @property
    def possible(self) -> bool:
        """Whether any prompt may start from a cache."""
        return bool(self.prefix) or self.prompt_cache is not None

    def split(self, ids: list[int]) -> tuple[Start | None, list[int]]:
        """(where the prompt `ids` starts, None: from nothing; the tokens its own step feeds)."""
        start = None
        if self.prefix and ids[: len(self.prefix)] == self.prefix:
            start = Start(self._prefix_cache(), len(self.prefix) - 1)
        if self.prompt_cache is not None:
            cache, shared = self.prompt_cache.find(ids, self.kind)
            if cache is not None and shared - 1 > (start.slots if start is not None else 0):
                start = Start(cache, shared - 1)
        if start is None or start.slots < 1:
            return None, ids
        if self.prompt_cache is not None and cache is start.cache:
            self.prompt_cache.hits += 1
            self.prompt_cache.reused_tokens += start.slots
        return start, ids[start.slots:]

    def keep(self, ids: list[int], start: Start | None, cache: MTPCache, index: int, row: int,
             own_tokens: bool = True) -> None:
        """After a prompt's step: keep batch row `index` of `cache` (the prompt `ids` of the caller's row `row`, fed
        from `start`) in the prompt cache, where it holds at least `min_tokens` tokens more than the entry it
        started from; and its answer when it ends (`read`), unless it may emit other tokens than the model's own
        (`own_tokens` False: sampled or penalized) and the drafter's keys read the model's own next token (heads
        that read the next token, in steps that do not read the emitted one: `Drafter.reads_emitted`)."""
        if self.prompt_cache is None:
            return
        held = start.slots if start is not None else 0
        if len(ids) - held >= self.prompt_cache.min_tokens:
            held = len(ids)
            if (self.kind, tuple(ids)) not in self.prompt_cache.entries:  # (the same prompt: a request's n choices)
                self.prompt_cache.add(ids, self.kind, cache.compact_row(index), self.refs)
        if self.rows is not None and (own_tokens or not self.drafter.reads_next_token or self.drafter.reads_emitted):
            self.rows[row] = (list(ids), held)

    def read(self, emitted: list[tuple[int, list[int], object]], ended: list[int], rows: list[int] | None = None,
             cache: MTPCache | None = None, deferred: torch.Tensor | None = None) -> None:
        """A step's emitted tokens (`iter_generate`'s (row, tokens, scores)); rows that `ended` keep their prompt
        and answer in the prompt cache, from the batch row of `cache` that holds them (`rows`: the caller's row of
        each batch row; None: not kept), all but their last token (never fed) and the last `deferred[b]` ones
        (whose extra heads' keys plain steps left out) at most, where they add `min_tokens` tokens at least."""
        if self.rows is None:
            return
        for row, new, _ in emitted:
            if row in self.rows:
                self.rows[row][0].extend(new)
        for row in ended:
            if row not in self.rows:  # (an answer not kept)
                continue
            tokens, held = self.rows.pop(row)
            if cache is None or len(tokens) - 1 - held < self.prompt_cache.min_tokens:
                continue
            index = rows.index(row)
            entry = cache.compact_row(index, most=len(tokens) - 1,
                                      drop=int(deferred[index]) if deferred is not None else 0)
            n = int(entry.length[0])
            if n - held >= self.prompt_cache.min_tokens:
                self.prompt_cache.add(tokens[:n], self.kind, entry, self.refs)

    def _prefix_cache(self) -> MTPCache:
        if self.prefix_cache is None:
            # (its block: the prefix, then whatever the drafter lays out after it: mask tokens)
            self.prefix_cache = self.drafter.new_cache(1, len(self.prefix) + self.drafter.extra_slots + 1,
                                                       static=self.static)
            self.drafter.fill(self.prefix_cache, torch.tensor([self.prefix], dtype=torch.long, device=self.device))
            self.stats.forward_passes += 1
        return self.prefix_cache
