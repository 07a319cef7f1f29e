"""What the next decoding step feeds, chosen on the host from what earlier steps did: how many drafts
(`DraftLength`, from their acceptance) and whether to verify drafts at all (`SpeculationGate`, from the time
each kind of step takes). Neither changes what is decoded, only how fast."""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple


class Block(NamedTuple):
    """The next step: n drafts and m lookup drafts to verify; whether it proposes the drafts after it (False: a
    plain step that leaves the extra heads out, `DecodeState.deferred_count`); and for how many positions that
    such steps left out it first computes the extra heads (`Drafter.catch_up`)."""

    n: int
    m: int
    drafting: bool = True
    catch_up: int = 0


class DraftLength:
    """How many drafts to verify next step, from how often each draft position was accepted.

    A draft costs a row of the verify forward (cheap where weights stream once for all rows: fp16-packed or
    blocked fp32 weights on a CPU, any GPU); it pays only if it is likely to be reached and accepted. For each position i an exponential
    average c_i of "accepted when proposed" is kept; the next block proposes the longest prefix whose chance of
    being accepted in full, c_1 * ... * c_i, is at least `threshold` - at least one draft, so the estimates keep
    being refreshed. Positions left out drift back towards 1 and are tried again later. Any draft length keeps
    decoding lossless (greedy: the verify rule; sampling: speculative sampling is exact for any length chosen
    from the past), so this only moves speed.
    """

    def __init__(self, max_drafts: int, adaptive: bool, threshold: float = 0.2, rate: float = 0.2,
                 recovery: float = 0.02):
        self.max_drafts, self.adaptive = max_drafts, adaptive
        self.threshold, self.rate, self.recovery = threshold, rate, recovery
        self.accept_rate = [1.0] * max_drafts  # optimistic start: all drafts are tried first

    def next(self) -> int:
        if not self.adaptive or self.max_drafts == 0:
            return self.max_drafts
        length, chance = 0, 1.0
        for c in self.accept_rate:
            chance *= c
            if chance < self.threshold:
                break
            length += 1
        return max(1, length)

    def update(self, kept: list[int], rows: int) -> None:
        """kept[i]: rows that accepted draft position i, in a step where `rows` rows proposed len(kept) drafts."""
        if not self.adaptive:
            return
        reached = rows  # rows that got to position i: all for the first, then those that kept the one before
        for i in range(self.max_drafts):
            if i < len(kept):
                if reached:
                    self.accept_rate[i] += self.rate * (kept[i] / reached - self.accept_rate[i])
                reached = kept[i]
            else:
                self.accept_rate[i] += self.recovery * (1.0 - self.accept_rate[i])


def accepted_per_position(accepted: list[int], depth: int) -> list[int]:
    """accepted[r]: drafts row r accepted -> for each draft position < depth, how many rows accepted it."""
    return [sum(a > i for a in accepted) for i in range(depth)]


class SpeculationGate:
    """Whether the next step verifies drafts at all: speculative decoding only while it emits tokens faster than
    plain one-token steps would.

    A verify block costs its rows: B rows x (1 + drafts) where a plain step feeds B. Where rows are arithmetic
    (every CPU row, a GPU batch whose blocks hold a few dozen rows) a batch's blocks can cost more than their drafts
    save: on a 2-core CPU with fp16-packed weights, batch 16, 4 trained heads, the chain ran at 0.73x greedy's
    tokens/s and a 4-node tree with 6 lookup drafts at 0.45x. So both kinds of step are timed as they run (the
    wall time from one host read to the next, all rows' new tokens), exponential averages of each kind's step
    time and tokens a step are kept, and the faster kind is taken; the slower one is tried again after
    `probe_every` steps, twice as long after each time it loses again. (One prompt's gains come in stretches that
    such probes miss, so the loop does not gate one prompt on a CPU: `generate._block_rules`.) A step of a configuration new to this call (a graph captured, kernels
    chosen) and the step launched beside it are not timed. Speeds are kept per batch size rounded up to a power of
    two (a GPU's tokens/s falls with its rows; one row speculates best), in `records`, which a model keeps between
    calls with the same options (`gate_records`): a later call starts from what earlier ones measured.

    A plain step proposes nothing and leaves the extra heads out (a greedy step's work); before verifying again,
    one plain step that drafts first computes the extra heads for the positions left out (their keys and values,
    which later drafts attend over) in one block, from the trunk outputs the plain steps kept. At most `CAPACITY`
    positions are left out between two such steps. Every kind of step keeps decoding lossless.
    """

    clock = staticmethod(time.perf_counter)
    MAX_INTERVAL = 64
    CAPACITY = 80  # positions plain steps may leave the extra heads out of (> MAX_INTERVAL + the first steps)

    def __init__(self, enabled: bool, probe_every: int = 8, rate: float = 0.5, token_rate: float = 0.25,
                 records: dict | None = None, min_batch: int = 1):
        self.enabled, self.probe_every = enabled, probe_every
        self.min_batch = min_batch  # smaller batches always verify (one prompt on a CPU: a batch prompts join)
        # A step's time is steady, the tokens a verify step emits are not (a lookup draft hits or misses): their
        # averages move at their own rates, so one unlucky probe does not decide the next 64 steps.
        self.rate, self.token_rate = rate, token_rate
        self.records = {} if records is None else records  # batch-size bucket -> averages, probe interval
        self.record: dict = {}
        self.bucket = 0  # the batch-size bucket the record is of
        self.since_probe = 0
        self.deferred = 0  # plain steps since the last step that drafted
        self.verify_next = False  # the step after this one verifies (a drafting plain step came first)
        self.seen: set[tuple] = set()  # step configurations run in this call
        self.in_flight: deque[bool] = deque()  # per step launched and not yet read: timed?
        self.last_read: float | None = None
        self.untimed = False  # a configuration's first step was launched since the last read

    def block(self, n: int, m: int, batch: int) -> Block:
        """The next step for a batch of `batch` rows, given the drafts the draft length proposes."""
        if not self.enabled:
            return Block(n, m)
        bucket = 1 << max(batch - 1, 0).bit_length()
        if bucket != self.bucket:
            self.bucket, self.since_probe = bucket, 0
            self.record = self.records.setdefault(bucket, {"seconds": {True: None, False: None},
                                                           "tokens": {True: None, False: None},
                                                           "interval": self.probe_every})
        speculate = self.verify_next or batch < self.min_batch or self._faster_kind()
        self.verify_next = False
        if speculate and self.deferred:  # the drafts come from a plain step that drafts (and catches up)
            self.verify_next, caught = True, self.deferred
            self.deferred = 0
            return Block(0, 0, True, caught)
        if speculate:
            return Block(n, m)
        if self.deferred >= self.CAPACITY:  # the left-out positions fill their buffer: catch up, then go on
            caught, self.deferred = self.deferred, 0
            return Block(0, 0, True, caught)
        self.deferred += 1
        return Block(0, 0, False)

    @property
    def speed(self) -> dict[bool, float | None]:
        """Tokens/s of verifying steps (True) and plain ones (False) at this batch size (None: not yet timed): the
        average tokens a step over the average seconds a step."""
        seconds, tokens = self.record.get("seconds", {}), self.record.get("tokens", {})
        return {kind: None if seconds.get(kind) is None else tokens[kind] / seconds[kind] for kind in (True, False)}

    @property
    def interval(self) -> int:
        """Steps between two tries of the slower kind."""
        return self.record["interval"]

    def _faster_kind(self) -> bool:
        fast, slow = self.speed[True], self.speed[False]
        if fast is None or slow is None:  # each kind is timed once first (speculating first)
            return fast is None
        speculate = fast >= slow
        self.since_probe += 1
        if self.since_probe > self.interval:  # try the slower kind again
            speculate, self.since_probe = not speculate, 0
        return speculate

    def launched(self, config: tuple) -> None:
        """A step of `config` (batch size and its `Block`) was launched. The first of a configuration is not
        timed, nor is the interval it was launched in (replaying, its graph is captured then, and that first step
        computed); nor is a plain step that drafts (it catches up: the switch's cost, not a kind's)."""
        fresh = config not in self.seen
        self.seen.add(config)
        block = config[-1]
        self.in_flight.append(not fresh and (block.n or block.m or not block.drafting))
        self.untimed |= fresh

    def read(self, speculated: bool, tokens: int) -> None:
        """The host read the oldest step in flight (of drafts verified or not), which emitted `tokens` in all."""
        now = self.clock()
        timed = self.in_flight.popleft() if self.in_flight else False
        if self.enabled and timed and not self.untimed and self.last_read is not None and now > self.last_read:
            before = self.speed
            was_slower = None not in before.values() and before[speculated] < before[not speculated]
            for name, value, rate in (("seconds", now - self.last_read, self.rate),
                                      ("tokens", tokens, self.token_rate)):
                average = self.record[name]
                average[speculated] = value if average[speculated] is None else \
                    average[speculated] + rate * (value - average[speculated])
            other = self.speed[not speculated]
            if was_slower and other is not None:  # a probe of the slower kind: back off while it stays slower
                slower = self.speed[speculated] < other
                self.record["interval"] = min(2 * self.interval, self.MAX_INTERVAL) if slower else self.probe_every
        self.last_read, self.untimed = now, False


GATE_RECORDS_KEPT = 32  # decoding settings whose timings a model keeps (the most recently used)


def gate_records(model, opts, device_type: str) -> dict:
    """What the speculation gate measured in this model's earlier calls with these decoding options, on this
    device (by batch-size bucket). Kept on the model, keyed by its weights' addresses like its decode sessions:
    a model since moved, cast or packed starts over."""
    weights = hash(tuple(p.data_ptr() for p in model.parameters()))
    fields = opts.shape_key()  # (calls that differ only in a temperature share their records)
    store = model.__dict__.setdefault("_mtp_gate_records", {})
    for key in [k for k in store if k[0] != weights]:
        del store[key]
    key = (weights, device_type, fields)
    records = store.pop(key, {})
    store[key] = records  # most recently used last
    while len(store) > GATE_RECORDS_KEPT:
        del store[next(iter(store))]
    return records
