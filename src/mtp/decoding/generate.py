"""Decoding with an MTP model: greedy, lossless self-speculative, exact speculative sampling, ConfAdapt, static k.

The loop on the host is small; each step is one call of `mtp.decoding.step.Decoder.step` (gpt-fast style: a few
small functions over explicit state, a static cache written at tensor positions):
    prefill   the prompt is the first block (eager: its width is the prompt's)
    step      one forward over [last token, drafts], verification, cache update, the next drafts - on the device
    host      one copy of what the step emitted: tokens to yield, stop strings, statistics, the next block width
Every row of a batch accepts its own number of tokens. On CUDA the steps are replayed as CUDA graphs
(`mtp.decoding.graphs`), and finished rows stay in the batch, masked, until it fits a batch half its size; on a
CPU the same step runs eagerly and finished rows are dropped at once.

    greedy       emits 1 token per forward: the reference every other strategy is tested against
    speculative  lossless: output identical to greedy (or, sampling, distributed exactly as the model samples)
    confadapt    emits the longest run of head predictions with top-1 probability >= tau (lossy, no verification)
    static       emits k head predictions per forward (lossy)
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mtp.arguments import check_values
from mtp.decoding.blocks import (  # noqa: F401  (DraftLength, accepted_per_position: re-exported)
    Block,
    DraftLength,
    SpeculationGate,
    accepted_per_position,
    gate_records,
)
from mtp.decoding.corpus import GrowingCorpus, LookupCorpus, check_corpus_tokens
from mtp.decoding.drafters import Drafter, DraftRequest, Proposer, drafter_for  # noqa: F401  (DraftRequest: re-exported)
from mtp.decoding.inputs import common_prefix, left_pad, token_batch  # noqa: F401  (common_prefix, left_pad: re-exported)
from mtp.decoding.logprobs import TokenLogprob, unpack
from mtp.decoding.penalties import prompt_state
from mtp.decoding.prefixes import PromptCache, Start, Starts
from mtp.decoding.row_options import PER_ROW, RowOptions, batch_options, row_options
from mtp.decoding.step import (  # noqa: F401  (Strategy: re-exported)
    ACCEPTED,
    COUNT,
    FINISHED,
    HOST_COLUMNS,
    LOOKUP_FOUND,
    NON_FINITE,
    STRATEGIES,
    DecodeOptions,
    Decoder,
    DecodeState,
    StepResult,
    Strategy,
    emitted_width,
)
from mtp.decoding.stopping import StopChecker
from mtp.decoding.tree import DraftTree, DynamicTree, resolve_tree
from mtp.errors import MTPError, NonFiniteLogitsError
from mtp.models.cache import MTPCache


@dataclass
class GenerationStats:
    """How a `generate` call went: tokens, forwards, seconds, drafts proposed and accepted (`to_dict` for JSON)."""

    new_tokens: int = 0
    forward_passes: int = 0  # model forwards (prefill included)
    row_forwards: int = 0  # sum over rows of the forwards each row took part in
    seconds: float = 0.0
    draft_positions: list[int] = field(default_factory=list)  # per draft position: times proposed
    draft_accepted: list[int] = field(default_factory=list)  # per draft position: times accepted
    plain_steps: int = 0  # speculative: steps that verified no drafts, being faster (`SpeculationGate`)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Fraction of verify steps in which the draft at position i+1 (head i+1's token) was accepted."""
        return [a / p if p else 0.0 for a, p in zip(self.draft_accepted, self.draft_positions, strict=True)]

    def to_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.forward_passes,
                "tokens_per_forward": round(self.tokens_per_forward, 4), "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "acceptance_per_head": [round(a, 4) for a in self.acceptance], "plain_steps": self.plain_steps}


@dataclass
class GenerationResult:
    """What `generate` returns: each row's new tokens, the call's statistics, and the texts and log-probabilities
    where asked for."""

    tokens: list[list[int]]  # new tokens per row (a stop token, when hit, is the last one)
    stats: GenerationStats
    texts: list[str] | None = None  # the new tokens decoded (with a tokenizer)
    logprobs: list[list[TokenLogprob]] | None = None  # asked for: one per new token (`mtp.decoding.logprobs`)


# Called after every forward with (rows, trunk output (B, T, H), kept (B, T) bool): `rows` are the original row
# indices, `kept` marks the positions that hold a token of the row's sequence (not left padding, not a rejected
# draft, not a finished row). A row's kept positions, in call order, run along its sequence: the prompt, then the
# emitted tokens as they are fed back (the tokens emitted by the last forward never are; after a stop token a few
# more may follow). The tensors may be reused by the next step: copy what you keep. An observer whose calls only
# queue device work, no host read (an attribute `queues_only = True`), is called before the next step is launched:
# replayed steps then still run ahead of the host.
TrunkObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class Admission:
    """Continuous batching: prompts that join a running batch between its steps (a server's requests that came
    while it decodes), instead of waiting for the whole batch to end.

    `take(active, fits)` is asked before each step is read: `active` rows still decode, `fits(prompt tokens, new
    tokens, options)` says whether a prompt fits the batch's cache and the model's context, and whether its
    `RowOptions` (None: the call's first row's) ask for no more than the batch's steps compute (`RowOptions.fits`);
    it returns the prompts that join now, as (ids, new tokens at most) or (ids, new tokens at most, RowOptions)
    tuples, [] for none (a prompt without options decodes with the first row's). Joined rows take the next row
    indices, in order, and decode as if alone (their prompt step, eagerly one for those that join together, then
    one batch). Greedy and speculative decoding with a chain or a fixed
    tree take joiners (a dynamic tree is shaped per batch: none join it)."""

    take: Callable[[int, Callable[..., bool]], list[tuple]]
    max_rows: int = 8  # rows the batch may grow to (the speculation gate plans for them from the start)
    room: int = 512  # cache slots kept past the first prompts' needs, for the prompts that join


# ------------------------------------------------------------------------------------------------ the loop
# Replaying graphs, launch each step before the host reads the one before it (False: read, then launch; for A/B
# timings, `scripts/decode_speed.py --launch-ahead on off`). The next step's result is copied out first, and the
# device runs it while the host yields tokens and checks stop strings. It is launched with the widths the
# statistics so far pick, and is skipped where the step being read may end every row by its budget; a row an end
# token or a stop string ends gets one step more, whose tokens are not read. A batch that shrinks, or that prompts
# join, first reads the step in flight. An observer reads the trunk output a step leaves on the device, which the
# next step would overwrite: it is called before the next step is launched; one that only queues device work
# (`queues_only`, e.g. `FeatureRecorder`: the device runs its copies first) lets steps run ahead, any other not.
LAUNCH_AHEAD = True
GPU_FREE_ROWS = 32  # verify-block rows (batch x block width) a GPU step of a small model takes at about no cost
def iter_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  opts: DecodeOptions, stop: StopChecker, generator: torch.Generator | None = None,
                  stats: GenerationStats | None = None, drafter: Drafter | None = None,
                  on_trunk: TrunkObserver | None = None, graphs: bool | str = False,
                  budgets: list[int] | None = None, admit: Admission | None = None,
                  on_end: Callable[[int], None] | None = None,
                  prefix: Sequence[int] | None = None, prompt_cache: PromptCache | None = None,
                  rows: list[RowOptions] | None = None,
                  sessions=None) -> Iterator[tuple[int, list[int], list[TokenLogprob] | None]]:
    """Yield (row index, newly emitted tokens, their log-probabilities if `opts.logprobs` asks for them) as
    decoding proceeds. See `generate` for the arguments; `budgets`: each row's new tokens at most (default:
    `opts.max_new_tokens`, which must be their largest); `admit`: prompts that join (`Admission`); `on_end(row)`:
    called once for every row, when it ended (after its last tokens were yielded), while the others decode on;
    `prefix`, `prompt_cache`: keys and values prompts start from (`generate`); `rows`: each row's settings
    (`RowOptions`; default: `opts`'s), which `opts` must cover (`batch_options`); `sessions`: where replayed steps
    keep their sessions (`mtp.decoding.graphs.leased_sessions`; default: the model's).

    One loop for every method and strategy: the drafter (`drafter_for(model, opts)` by default; see
    `mtp.decoding.drafters`) and the step (`mtp.decoding.step`) do the method's work on the device; here the
    host reads each step's result once, yields it, and picks the next block's width and batch.
    `on_trunk` sees the trunk output of every forward (see `TrunkObserver`; parallel heads only).
    """
    stats = stats if stats is not None else GenerationStats()
    drafter = drafter if drafter is not None else drafter_for(model, opts)
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    static = bool(graphs) or device.type != "cpu"
    if (prefix is not None or prompt_cache is not None) and on_trunk is not None:
        raise MTPError("prefix, prompt_cache: an observer of the trunk (on_trunk) would not see the positions a "
                       "prompt loads")
    starts = Starts(model, drafter, prefix, prompt_cache, static, device, stats)
    fed_ids, fed_mask, row_starts, prompts = _fed_prompts(input_ids, attention_mask, starts, static)
    loaded = max((s.slots for s in row_starts if s is not None), default=0)
    b, prompt_len = input_ids.shape[0], loaded + fed_ids.shape[1]  # (the slots the prompt step fills, at most)
    verifying = opts.strategy in ("greedy", "speculative")
    lookup = opts.lookup if verifying else 0
    stats.draft_positions = [0] * max(drafter.num_drafts, lookup)
    stats.draft_accepted = [0] * max(drafter.num_drafts, lookup)
    if opts.max_new_tokens <= 0:  # (no step: every row ends at once)
        _ended(list(range(b)), on_end)
        return
    joinable = admit is not None and verifying and not isinstance(drafter.tree, DynamicTree) and on_trunk is None
    need = prompt_len + opts.max_new_tokens + drafter.extra_slots + 2 + (admit.room if joinable else 0)
    draft_length, gate = _block_rules(model, drafter, opts, b, lookup, device, admit.max_rows if joinable else 0)
    steps = _steps_for(model, drafter, opts, b, need, stop, generator, on_trunk is not None, graphs, gate, device,
                       sessions)
    budgets = budgets if budgets is not None else [opts.max_new_tokens] * b
    rows = rows if rows is not None else [RowOptions.of(opts)] * b
    state = _prompt_state(input_ids, attention_mask, budgets, steps.cache_len if lookup else 0, fed_ids, fed_mask,
                          opts, rows, model.config.vocab_size)
    if loaded:  # rows that start from keys and values computed before load them
        steps.cache.start_rows(row_starts)
    batch = _HostRows(list(range(b)), [True] * b, list(budgets))
    pipelined = LAUNCH_AHEAD and graphs and (on_trunk is None or getattr(on_trunk, "queues_only", False))
    ahead, draining = None, False  # (result, block) of the step launched ahead; whether a shrink waits for it
    block = Block(0, 0)  # the prompt is fed alone
    gate.launched(("prompt", block))
    state, result = steps.prefill(state)
    for row, ids in enumerate(prompts):  # (what a prompt cache keeps of them)
        starts.keep(ids, row_starts[row], steps.cache, row, row, rows[row].own_tokens)
    fits, next_row = _fitting(model, drafter, steps.cache_len, static, starts, opts), b  # (joined rows' indices)
    while True:
        if on_trunk is not None and result.trunk is not None:  # (before any next step writes over its outputs)
            on_trunk(state.rows, result.trunk, result.kept)
        most = emitted_width(result.host.shape[1], opts.logprobs)  # tokens a row may emit in the step being read
        joining = admit.take(sum(batch.active), fits) if joinable else []  # (joined after this step is read)
        if pipelined and not draining and not joining and batch.may_emit_more_than(most):
            read = _to_host(result.host)
            next_block = gate.block(draft_length.next(), lookup, len(batch.rows)) if verifying else block
            gate.launched((len(batch.rows), next_block))
            ahead = (steps.run(state, next_block)[1], next_block)
            host = read()
        else:
            host = result.host.tolist()  # the one device-to-host copy of a step
        fed = sum(batch.active)
        emitted, accepted, ended = _read_rows(host, batch, stop, state.finished, opts.logprobs)
        _count_step(stats, gate, block, fed, emitted, accepted, draft_length if verifying else None)
        yield from emitted
        starts.read(emitted, ended, batch.rows, steps.cache, state.deferred_count)  # (answers a prompt cache keeps)
        _ended(ended, on_end)
        if not any(batch.active) and not joining:  # every row ended: prompts may still join (then, it ends)
            joining = admit.take(0, fits) if joinable and ahead is None else []
            if not joining:
                break
        found = batch.most(host, LOOKUP_FOUND, default=0)  # lookup drafts next
        run = batch.most(host, COUNT, default=1)  # the longest emitted run
        keep = _rows_to_keep(batch.active, graphs)
        if ahead is not None:  # read the step in flight next; a smaller batch waits until it is read
            (result, block), ahead, draining = ahead, None, keep is not None
            continue
        draining = False
        if joining:  # each prompt's own step first, then one batch with the rows that go on
            joined = yield from _join_prompts(steps, joining, next_row, static, lookup, stop, stats, opts,
                                              on_end, starts, rows[0], model.config.vocab_size)
            next_row, gate.untimed = next_row + len(joining), True  # (this read's interval held their steps)
            keep = None if joined else keep
            batch, state = steps.join(state, batch, joined) if joined else (batch, state)
        if not any(batch.active):  # (the prompts that came ended at their first tokens)
            break
        if keep is not None:
            batch = batch.take(keep)
            state = steps.take(state, torch.tensor(keep, device=device))
        if verifying:
            block = gate.block(draft_length.next(), lookup if static else found, len(batch.rows))
        elif not static:  # a confident run feeds what it emitted: eagerly, only as wide as the longest
            state = state.narrow_pending(max(run, 1))
        gate.launched((len(batch.rows), block))
        state, result = steps.run(state, block)


def _steps_for(model, drafter: Drafter, opts: DecodeOptions, batch: int, need: int, stop: StopChecker,
               generator: torch.Generator | None, observe: bool, graphs: bool | str, gate: SpeculationGate,
               device: torch.device, sessions=None) -> _EagerSteps | _ReplayedSteps:
    """The call's steps over a cache of `need` slots a row: replayed as CUDA graphs, or eager."""
    static = bool(graphs) or device.type != "cpu"
    if static:  # attention masks as wide as the cache, rows aligned for fused GPU kernels
        need = -(-need // CACHE_ALIGN) * CACHE_ALIGN
    # plain steps leave the extra heads out, caught up later
    defer_capacity = SpeculationGate.CAPACITY if gate.enabled and drafter.catches_up else 0
    common = (drafter, opts, batch, need, stop.stop_ids, generator, observe, defer_capacity)
    if graphs:
        return _ReplayedSteps(model, *common, compiled=graphs == "compile", sessions=sessions)
    return _EagerSteps(*common, static_cache=static)  # off a CPU no step reads the device from the host


class _EagerSteps:
    """Steps run as they come (the reference; a CPU's way): the state goes through `Decoder.step`, and a batch
    that shrinks drops rows from it and from the cache."""

    def __init__(self, drafter: Drafter, opts: DecodeOptions, batch: int, need: int, stop_ids: torch.Tensor,
                 generator: torch.Generator | None, observe: bool, defer_capacity: int, static_cache: bool):
        cache = drafter.new_cache(batch, need, static=static_cache)
        self.decoder = Decoder(drafter, opts, cache, stop_ids, generator, observe, defer_capacity)
        self.cache_len = cache.max_len
        self.device = stop_ids.device

    @property
    def cache(self) -> MTPCache:
        return self.decoder.cache

    joins_together = True  # prompts that join at one read take one step together

    def prefill_joining(self, prompt: DecodeState,
                        starts: list[Start | None]) -> tuple[DecodeState, StepResult, MTPCache]:
        """Prompts that join the batch: their step, in a cache of their own as long as the batch's (each row
        loading its start first, if any), drawing from the batch's generator (the state after it, the step's
        result, that cache)."""
        d = self.decoder
        cache = d.drafter.new_cache(len(starts), self.cache_len, static=d.cache.static)
        cache.start_rows(starts)
        alone = Decoder(d.drafter, d.opts, cache, d.stop_ids, d.generator, False, d.defer_capacity)
        return *alone.step(prompt, 0, 0), cache

    def join(self, state: DecodeState, batch: _HostRows, joined: list[_Joined]) -> tuple[_HostRows, DecodeState]:
        """The batch's active rows, then the prompts that joined it, as one batch."""
        keep = [i for i, a in enumerate(batch.active) if a]
        index = torch.tensor(keep, dtype=torch.long, device=state.budget.device)
        self.decoder.cache.load_rows([(self.decoder.cache, index), *((j.cache, j.index) for j in joined)])
        merged = DecodeState.joined([state.select(index), *(j.state.select(j.index) for j in joined)])
        return batch.take(keep).extend(joined), merged

    def prefill(self, state: DecodeState) -> tuple[DecodeState, StepResult]:
        return self.decoder.step(state, 0, 0)

    def run(self, state: DecodeState, block: Block) -> tuple[DecodeState, StepResult]:
        return self.decoder.step(state, *block)

    def take(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        self.decoder.cache.select_rows(index)
        return state.select(index)


class _ReplayedSteps:
    """Steps replayed as CUDA graphs (`mtp.decoding.graphs`): a batch size's session holds the state's buffers,
    which each step updates in place, its cache and its graphs; a batch that shrinks moves into a smaller one's."""

    def __init__(self, model, drafter: Drafter, opts: DecodeOptions, batch: int, need: int, stop_ids: torch.Tensor,
                 generator: torch.Generator | None, observe: bool, defer_capacity: int, compiled: bool,
                 sessions=None):
        from mtp.decoding.graphs import session_for

        self.session_for = functools.partial(session_for, model, drafter, opts, need=need, stop_ids=stop_ids,
                                             generator=generator, observe=observe, compiled=compiled,
                                             defer_capacity=defer_capacity, sessions=sessions)
        self.defer_capacity = defer_capacity
        self.session = self.session_for(batch_size=batch)
        self.session.cache.reset()
        self.cache_len = self.session.cache.max_len
        self.device = stop_ids.device

    @property
    def cache(self) -> MTPCache:
        return self.session.cache

    def prefill(self, state: DecodeState) -> tuple[DecodeState, StepResult]:
        return self.session.prefill(state)

    def run(self, state: DecodeState, block: Block) -> tuple[DecodeState, StepResult]:
        if block.catch_up:  # a catch-up block is always as wide as the buffer: one graph
            block = block._replace(catch_up=self.defer_capacity)
        return state, self.session.run(state, *block)

    def take(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        smaller = self.session_for(batch_size=len(index))
        state, self.session = smaller.take_rows(self.session, index), smaller.continue_draws(self.session)
        return state

    joins_together = False  # one by one: a one-row session's prompt graphs replay each

    def prefill_joining(self, prompt: DecodeState,
                        starts: list[Start | None]) -> tuple[DecodeState, StepResult, MTPCache]:
        """A prompt that joins the batch: its step replayed in a one-row session of its own (the batch's holds
        the batch; its cache loading its start first, if any) from the prompt graph of its width, its draws going
        on from the batch's; its state and cache copied out (the next prompt's step overwrites the session's)."""
        alone = self.session_for(batch_size=1, joining=True).continue_draws(self.session)
        alone.cache.start_rows(starts)
        state, result = alone.prefill(prompt)
        self.session.continue_draws(alone)
        cache = alone.decoder.drafter.new_cache(1, self.cache_len, static=True)
        cache.load_rows([(alone.cache, torch.zeros(1, dtype=torch.long, device=self.device))])
        return state.clone(), result, cache

    def join(self, state: DecodeState, batch: _HostRows, joined: list[_Joined]) -> tuple[_HostRows, DecodeState]:
        """The batch's active rows and the prompts that joined it, in the session of the next power of two that
        holds them, filled up with finished rows (copies of a kept row where too few finished)."""
        keep, coming = [i for i, a in enumerate(batch.active) if a], sum(len(j.rows) for j in joined)
        size = 1 << (len(keep) + coming - 1).bit_length()
        done = [i for i, a in enumerate(batch.active) if not a]
        fill = (done + keep[:1] * size)[: size - len(keep) - coming]
        device = state.budget.device
        index = torch.tensor(keep + fill, dtype=torch.long, device=device)
        rows = batch.take(keep + fill)
        rows.active[len(keep):] = [False] * len(fill)
        merged = DecodeState.joined([state.select(index), *(j.state.select(j.index) for j in joined)])
        merged.finished[len(keep):len(keep) + len(fill)] = True
        session = self.session_for(batch_size=size)
        session.cache.load_rows([(self.session.cache, index), *((j.cache, j.index) for j in joined)])
        state, self.session = session.adopt(merged), session.continue_draws(self.session)
        return rows.extend(joined), state


@dataclass
class _HostRows:
    """What the host keeps of each batch row: its row in the caller's batch, whether it still decodes, and how
    many tokens it may still emit."""

    rows: list[int]
    active: list[bool]
    left: list[int]

    def may_emit_more_than(self, count: int) -> bool:
        return any(left > count for left, active in zip(self.left, self.active, strict=True) if active)

    def most(self, host: list[list[int]], column: int, default: int) -> int:
        """The largest value in `column` of a step's host copy over the active rows."""
        return max((h[column] for h, active in zip(host, self.active, strict=True) if active), default=default)

    def take(self, keep: list[int]) -> _HostRows:
        return _HostRows([self.rows[i] for i in keep], [self.active[i] for i in keep], [self.left[i] for i in keep])

    def extend(self, joined: list[_Joined]) -> _HostRows:
        """These rows, then those of prompts that joined."""
        rows = [r for j in joined for r in j.rows]
        return _HostRows(self.rows + rows, self.active + [True] * len(rows), self.left + [n for j in joined for n in j.left])


@dataclass
class _Joined:
    """Prompts that join a running batch after their step: their rows, the tokens each may still emit, the state
    and cache of that step (rows `index` of them: those that go on)."""

    rows: list[int]
    left: list[int]
    state: DecodeState
    cache: MTPCache
    index: torch.Tensor


def _fed_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: Starts,
                 static: bool) -> tuple[torch.Tensor, torch.Tensor, list[Start | None], list[list[int]]]:
    """(the left-padded tokens the prompt step feeds (B, W), their mask, where each row starts, each row's
    prompt): a row that starts from a cache feeds the tokens after the ones it loads, the others their whole
    prompt. With static shapes W is a multiple of PROMPT_BUCKET, so that the prompt's step replays too."""
    if not starts.possible:
        fed_ids, fed_mask, row_starts, prompts = input_ids, attention_mask, [None] * input_ids.shape[0], []
    else:
        prompts = [row[mask].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        split = [starts.split(ids) for ids in prompts]
        fed_ids, fed_mask = left_pad([fed for _, fed in split], 0)
        fed_ids, fed_mask = fed_ids.to(input_ids.device), fed_mask.to(input_ids.device, torch.bool)
        row_starts = [start for start, _ in split]
    if static:
        fed_ids, fed_mask = _pad_to_bucket(fed_ids, fed_mask, PROMPT_BUCKET)
    return fed_ids, fed_mask, row_starts, prompts


def _fitting(model, drafter: Drafter, cache_len: int, static: bool, starts: Starts,
             opts: DecodeOptions) -> Callable[..., bool]:
    """Whether a prompt of p tokens with up to m new ones fits a batch's cache of `cache_len` slots (its prompt
    padded as the batch's were, after the slots it may load: `Starts`) and the model's context, and its
    `RowOptions` (None: the call's) ask for no more than the batch's steps (`opts`) compute."""
    limit = context_limit(model)

    def fits(p: int, m: int, options: RowOptions | None = None) -> bool:
        if options is not None and not options.fits(opts):
            return False
        width = -(-p // PROMPT_BUCKET) * PROMPT_BUCKET if static else p
        if static and starts.possible:  # loaded slots, then the rest padded to a prompt width
            width += PROMPT_BUCKET
        return (p > 0 and m > 0 and width + m + drafter.extra_slots + 2 <= cache_len
                and (limit is None or p + m + drafter.lookahead <= limit))

    return fits


def _join_prompts(steps: _EagerSteps | _ReplayedSteps, prompts: list[tuple], first: int,
                  static: bool, lookup: int, stop: StopChecker, stats: GenerationStats, opts: DecodeOptions,
                  on_end: Callable[[int], None] | None, starts: Starts, default: RowOptions, vocab: int):
    """The prompts' step (rows first, first + 1, ...; from keys and values computed before where `starts` has
    them): one step for them all where steps run eagerly, one each where they replay (a one-row session's prompt
    graphs). `prompts`: (ids, new tokens at most[, RowOptions; `default` where none]) tuples (`Admission`).
    Yields their first tokens as `iter_generate` does, and returns those that go on (`_Joined`)."""
    prompts = [(p[0], p[1], p[2] if len(p) > 2 else default) for p in prompts]
    stop.add_rows([options.stop_strings for _, _, options in prompts])
    joined, device, top = [], steps.device, opts.logprobs
    numbered = list(enumerate(prompts, first))
    for group in [numbered] if steps.joins_together else [[p] for p in numbered]:
        rows, ids, budgets = [r for r, _ in group], [p[0] for _, p in group], [p[1] for _, p in group]
        full_ids, full_mask = left_pad(ids, 0)
        full_ids, full_mask = full_ids.to(device), full_mask.to(device, torch.bool)
        fed_ids, fed_mask, row_starts, _ = _fed_prompts(full_ids, full_mask, starts, static)
        prompt = _prompt_state(full_ids, full_mask, budgets, steps.cache_len if lookup else 0, fed_ids, fed_mask,
                               opts, [p[2] for _, p in group], vocab)
        prompt.rows = torch.tensor(rows, device=device)
        state, result, cache = steps.prefill_joining(prompt, row_starts)
        for j, p in enumerate(ids):
            starts.keep(p, row_starts[j], cache, j, rows[j], group[j][1][2].own_tokens)
        host = _HostRows(rows, [True] * len(rows), list(budgets))
        emitted, _, ended = _read_rows(result.host.tolist(), host, stop, state.finished, top)
        stats.forward_passes += 1
        stats.row_forwards += len(rows)
        stats.new_tokens += sum(len(new) for _, new, _ in emitted)
        yield from emitted
        starts.read(emitted, ended)  # (a row that ends at its first token adds nothing to its prompt)
        _ended(ended, on_end)
        going = [j for j, active in enumerate(host.active) if active]
        if going:
            joined.append(_Joined([rows[j] for j in going], [host.left[j] for j in going], state, cache,
                                  torch.tensor(going, dtype=torch.long, device=device)))
    return joined


def _count_step(stats: GenerationStats, gate: SpeculationGate, block: Block, fed: int,
                emitted: list[tuple[int, list[int], object]], accepted: list[int],
                draft_length: DraftLength | None) -> None:
    """One step read into the statistics, the speculation gate and (verifying) the draft length."""
    n, m = block.n, block.m
    new_tokens = sum(len(new) for _, new, _ in emitted)
    gate.read(max(n, m) > 0, new_tokens)
    stats.plain_steps += gate.enabled and stats.forward_passes > 0 and not max(n, m)  # (not the prompt's)
    stats.forward_passes += 1
    stats.row_forwards += fed
    stats.new_tokens += new_tokens
    if draft_length is not None and max(n, m):
        draft_length.update(_count_acceptance(stats, accepted, max(n, m), fed)[:n], fed)


def _block_rules(model, drafter: Drafter, opts: DecodeOptions, batch: int, lookup: int, device: torch.device,
                 joining: int = 0) -> tuple[DraftLength, SpeculationGate]:
    """How the loop picks each step's block (`mtp.decoding.blocks`): the draft length and the speculation gate
    (`joining`: the rows a batch that prompts join may grow to; 0: it does not grow)."""
    lone = batch == 1 and not joining
    batch = max(batch, joining)
    # A draft costs a row of the verify block. On a GPU a small model's step is bound by its kernels, not by rows,
    # until the blocks of a batch hold a few dozen rows: only then do fewer drafts pay (replaying, each width the
    # rule picks gets a graph of its own).
    verify_rows = batch * (1 + drafter.extra_slots)  # a block's rows: the token, drafts or tree nodes, lookup, masks
    rows_cost = device.type == "cpu" or verify_rows > GPU_FREE_ROWS
    draft_length = DraftLength(drafter.num_drafts, opts.adaptive_draft and rows_cost)
    # A batch's verify blocks may cost more than their drafts save: plain steps where they are faster (one prompt
    # on a CPU is left to the draft length alone: its blocks' rows cost little against the weights' reads).
    speculating = opts.strategy == "speculative" and max(drafter.num_drafts, lookup) > 0
    # (A batch that prompts join is gated from the start, while one row at a time on a CPU verifies as a lone one.)
    gated = speculating and opts.adaptive_draft and rows_cost and (not lone or device.type != "cpu")
    return draft_length, SpeculationGate(gated, records=gate_records(model, opts, device.type) if gated else None,
                                         min_batch=2 if joining and device.type == "cpu" else 1)


def _read_rows(host: list[list[int]], batch: _HostRows, stop: StopChecker, finished: torch.Tensor,
               top: int | None) -> tuple[list[tuple[int, list[int], list[TokenLogprob] | None]], list[int], list[int]]:
    """One step's host copy (`StepResult.host`), row by row: each active row's new tokens (cut where they complete
    a stop string, which ends the row, marked in the device's `finished` too) with their log-probabilities where
    `top` asks for them, the drafts each accepted, and the rows that ended. Updates the batch's `active` and
    `left` (tokens a row may still emit) in place."""
    width = emitted_width(len(host[0]), top) if host else 0
    if any(h[NON_FINITE] for h, a in zip(host, batch.active, strict=True) if a):
        raise NonFiniteLogitsError("the model computed NaN or infinite logits (damaged weights, or a dtype that overflows "
                       "for this model)")
    emitted, accepted, ended = [], [], []
    for i, row in enumerate(batch.rows):
        if not batch.active[i]:
            continue
        count, done = host[i][COUNT], bool(host[i][FINISHED])
        accepted.append(host[i][ACCEPTED])
        new = host[i][HOST_COLUMNS:HOST_COLUMNS + count]
        cut = stop.cut(row, new) if new else None
        if cut is not None:
            new, done = new[:cut], True
            finished[i] = True
        batch.active[i] = not done
        batch.left[i] -= count
        if new:
            scores = None if top is None else unpack(host[i][HOST_COLUMNS + width:], new, width, top)
            emitted.append((row, new, scores))
        if done:
            ended.append(row)
    return emitted, accepted, ended


def _ended(rows: list[int], on_end: Callable[[int], None] | None) -> None:
    for row in rows if on_end is not None else ():
        on_end(row)


def _to_host(tensor: torch.Tensor) -> Callable[[], list]:
    """Start copying a step's small result to the host; the function returned waits for it and reads it. On CUDA
    the copy goes to pinned memory without blocking, so the device can go on to the next step meanwhile."""
    if tensor.device.type != "cuda":
        return tensor.clone().tolist  # (the next step may overwrite `tensor`, as a replayed graph does)
    held = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    held.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))  # (the stream that copies: the tensor's GPU's)

    def read() -> list:
        done.synchronize()
        return held.tolist()

    return read


def _count_acceptance(stats: GenerationStats, accepted: list[int], depth: int, rows: int) -> list[int]:
    """One step's drafts into the statistics: `rows` rows proposed `depth` positions, row r accepted accepted[r].
    Returns, per position, the rows that accepted it."""
    kept = accepted_per_position(accepted, depth)
    for i, k in enumerate(kept):
        stats.draft_positions[i] += rows
        stats.draft_accepted[i] += k
    return kept


def _rows_to_keep(active: list[bool], graphs: bool) -> list[int] | None:
    """The batch rows to go on with, or None to keep the batch as it is. Eagerly every finished row is dropped;
    replaying graphs the batch shrinks to the next power of two that holds the active rows once they fit in
    half of it (finished rows fill it up), so few batch sizes are ever captured."""
    live = [i for i, a in enumerate(active) if a]
    if not graphs:
        return live if len(live) < len(active) else None
    size = 1 << (len(live) - 1).bit_length()
    if size * 2 > len(active):
        return None
    done = [i for i, a in enumerate(active) if not a]
    return sorted(live + done[: size - len(live)])


# Prompts are left-padded to a multiple of this many tokens where steps have static shapes (on a GPU): the
# prompt's step is then captured once per multiple (`DecodeSession.prefill`), and eager and replayed decoding feed
# the same shapes (the same kernels, so the same rounding).
PROMPT_BUCKET = 64
# Static caches hold a multiple of this many slots: sdpa's memory-efficient GPU kernel reads an attention mask
# whose rows are 16-element aligned, and pads (copies) any other mask in every layer of every step.
CACHE_ALIGN = 16


def _pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompts -> (B, P') with P' the next multiple of `bucket`, padded on the left."""
    extra = -input_ids.shape[1] % bucket
    if not extra:
        return input_ids, attention_mask
    pad = torch.nn.functional.pad
    return pad(input_ids, (extra, 0)), pad(attention_mask, (extra, 0), value=False)


def _prompt_state(input_ids: torch.Tensor, attention_mask: torch.Tensor, budgets: list[int], history: int,
                  fed_ids: torch.Tensor | None = None, fed_mask: torch.Tensor | None = None,
                  opts: DecodeOptions | None = None, rows: list[RowOptions] | None = None,
                  vocab: int = 0) -> DecodeState:
    """The state before the first step: the (left-padded) prompts are the first block (or `fed_ids`, what of
    them the cache does not hold yet: a prefix's), `budgets` each row's new tokens at most. `history`: slots for
    each row's tokens, for prompt lookup (0: none). Where `opts` samples or penalizes: each row's settings from
    `rows` (default: `opts`'s), for logits `vocab` wide."""
    b, device = input_ids.shape[0], input_ids.device
    zeros = torch.zeros(b, dtype=torch.long, device=device)
    budget = torch.tensor(budgets, dtype=torch.long, device=device)
    pending, pending_valid = (input_ids, attention_mask) if fed_ids is None else (fed_ids, fed_mask)
    state = DecodeState(torch.arange(b, device=device), pending, pending_valid, zeros, budget, zeros.bool(),
                        input_ids[:, :0])
    if history:  # each row's tokens without its padding
        order = torch.sort(attention_mask.to(torch.int8), dim=1, descending=True, stable=True).indices
        state.history = torch.zeros(b, history, dtype=torch.long, device=device)
        state.history[:, : input_ids.shape[1]] = input_ids.gather(1, order).masked_fill(
            ~attention_mask.gather(1, order), 0)
        state.history_len = attention_mask.sum(-1)
    rows = rows if rows is not None or opts is None else [RowOptions.of(opts)] * b
    if opts is not None and opts.penalties is not None:
        state.penalties, state.logit_bias, state.counts, state.seen = prompt_state(
            [r.penalties for r in rows], input_ids, attention_mask, vocab)
    if opts is not None and opts.do_sample:
        state.sampling = torch.tensor([r.settings() for r in rows], dtype=torch.float32, device=device)
    return state


# ------------------------------------------------------------------------------------------------ public API
@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | list, attention_mask: torch.Tensor | list | None = None, *,
             max_new_tokens: int | Sequence[int] = 128, strategy: Strategy | None = None,
             use_speculative: bool | None = None,
             do_sample: bool | Sequence[bool] = False, temperature: float | Sequence[float] = 1.0,
             top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
             tau: float = 0.9, k: int | None = None, num_draft: int | None = None, adaptive_draft: bool = True,
             stop_token_ids: list[int] | None = None, stop_strings: Sequence[str] | Sequence[Sequence[str]] | None = None,
             tokenizer=None,
             seed: int | None = None, streamer: Callable[[int, list[int]], None] | None = None,
             truncate_prompt: bool = False, proposer: Proposer | None = None,
             on_trunk: TrunkObserver | None = None, tree: str | DraftTree | None = None,
             tree_size: int | None = None, lookup: int = 0, lookup_corpus: LookupCorpus | None = None,
             graphs: bool | None = None,
             logprobs: int | None = None, halt: Callable[[int], bool] | None = None,
             admit: Admission | None = None,
             on_end: Callable[[int, list[int], list[TokenLogprob] | None, GenerationStats], None] | None = None,
             prefix: Sequence[int] | torch.Tensor | None = None,
             prompt_cache: PromptCache | None = None, repetition_penalty: float | Sequence[float] = 1.0,
             presence_penalty: float | Sequence[float] = 0.0, frequency_penalty: float | Sequence[float] = 0.0,
             logit_bias: Mapping[int, float] | Sequence[Mapping[int, float] | None] | None = None,
             min_p: float | Sequence[float] = 0.0, min_new_tokens: int | Sequence[int] = 0,
             stop_in_prompt: bool = False) -> GenerationResult:
    """Generate continuations of a left-padded batch of prompts.

    Args:
        input_ids: (B, P) prompt tokens, left-padded when rows differ in length (or lists of ids: see
            `mtp.decoding.inputs.token_batch`; anything malformed is an MTPError saying what).
        attention_mask: (B, P), 0 on padding.
        max_new_tokens: new tokens a row may have: one number, or one per row.
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
            logit_bias, min_new_tokens, stop_strings: one value for every row, or a list of one per row (for
            stop_strings a list of lists): requests that ask for different ones decoded as one batch
            (`mtp.decoding.row_options`). In a batch where some rows sample, the others are still greedy's.
        strategy: greedy (the default) | speculative | confadapt | static. `use_speculative=True/False` selects
            speculative / greedy (the spelling published MTP checkpoints' code uses); given with a strategy, the
            two must agree.
        stop_token_ids: end tokens (default: the tokenizer's / generation config's end tokens).
        stop_strings: stop when the decoded new text contains one (needs `tokenizer`); `stop_in_prompt`: one may
            begin in the prompt and end in the new text (transformers' rule, which `model.generate` follows).
        seed: the sampled draws' seed (default: one drawn from torch's global generator, which
            `torch.manual_seed` sets).
        streamer: called as streamer(row, new_tokens) after each step (with `logprobs`: streamer(row, new_tokens,
            logprobs=their TokenLogprobs)).
        truncate_prompt: keep only the last tokens of a prompt that does not fit the context with
            max_new_tokens; otherwise such a prompt is an error.
        proposer: the speculative strategy's draft source for a parallel-heads model (default: its heads).
        num_draft: drafts per verify step at most (default: every extra head).
        adaptive_draft: verify fewer drafts while recent ones were rarely accepted (`DraftLength`), and in a
            batch whose verify blocks cost their rows (every batch on a CPU, a few dozen rows on a GPU) none while
            plain steps emit tokens faster (`SpeculationGate`, timed as it runs); False: always `num_draft`.
            Either way greedy's output is the same, only the speed differs. Sampling keeps its distribution,
            but its draws follow the steps taken: where the gate times a batch's steps, a seed does not
            reproduce them token for token (adaptive_draft=False does).
        on_trunk: called with the trunk output of every forward (`TrunkObserver`), e.g. to keep the frozen-trunk
            features of self-distilled training rows instead of recomputing them; one with `queues_only = True`
            (device work only, no host read: `mtp.training.features.FeatureRecorder`) keeps replayed steps
            running ahead of the host.
        tree: speculative with parallel heads: verify a tree of the heads' top candidates in one forward
            (`mtp.decoding.tree`): "auto" (built for `tree_size` nodes from the accuracy per candidate rank
            `mtp train` measured, in the model folder's eval.json), "dynamic" (`tree_size` nodes shaped every
            step from the drafts' probabilities, EAGLE-2), "chain" (the default), a DraftTree, a JSON list of
            paths or a .json file of one. Greedy output stays identical; sampling stays exact.
        lookup: speculative: also verify up to this many tokens copied from earlier in each row's sequence
            (prompt lookup, `mtp.decoding.lookup`), as one more branch of the draft tree; 0: none.
        lookup_corpus: with `lookup`: a `mtp.decoding.corpus.LookupCorpus` (e.g. of the model's answers to
            training questions: `mtp train --targets self` saves one in its folder, `folder_corpus` reads it);
            a row whose own last tokens matched only one earlier token takes the corpus's drafts instead. A
            `GrowingCorpus` also takes in each row's answer as it ends: later rows and calls draft from it.
        graphs: replay each decoding step as a CUDA graph (`mtp.decoding.graphs`); None: on CUDA, unless a
            `proposer` (read on the host) drafts. Off, the same steps run eagerly (the reference). "compile":
            graphs of the step as torch.compile made it, gpt-fast's way (each layer's and the step's small ops
            fused into a few kernels: about a third fewer; tens of seconds to compile each of a run's first
            few step shapes; then faster, equal to the eager step up to rounding).
        logprobs: greedy and speculative: each new token's log-probability under the model (its raw distribution,
            before temperature, top-k and top-p) and the `logprobs` most likely tokens' at its position, in the
            result's `logprobs` (`mtp.decoding.logprobs.TokenLogprob`); 0: the new tokens' alone; None: none.
        halt: asked as halt(row) after each step that row emits tokens in; True ends the row there (that step's
            tokens are dropped) while the others go on: a server's client that left.
        admit: continuous batching (`Admission`): prompts that join the batch between its steps, each decoded as
            if alone; the result's rows are the prompts given, then those that joined, in order.
        on_end: called as on_end(row, its tokens, their TokenLogprobs or None, the statistics so far) once for
            every row, when it ended (after the streamer got its last tokens), while the others decode on: a
            server answers it then.
        prefix: token ids that prompts start with (a few-shot prompt's examples, a system prompt; e.g.
            `common_prefix` of them): their keys and values are computed once, and each prompt (or prompt that
            joins) that starts with them feeds only what follows, instead of every prompt feeding it again. The
            output is the one without it, up to rounding (the prefix's keys come from a forward of their own).
            Not with `on_trunk`.
        prompt_cache: a `mtp.decoding.prefixes.PromptCache` kept between calls: each prompt starts from the keys
            and values of the prompt before it that shares the most first tokens with it (a conversation's
            earlier turns, a system prompt), and is kept in it for the calls after. Same output, as `prefix`.
        repetition_penalty: greedy and speculative: transformers' (CTRL's): the logit of each token the prompt or
            the answer holds is divided by it (multiplied where negative); 1: none.
        presence_penalty, frequency_penalty: greedy and speculative: OpenAI's: subtracted from the logit of each
            token the answer holds, once (presence) or once per time it holds it (frequency); 0: none.
            Penalties apply before temperature, top-k and top-p, at every verified draft for the sequence it
            continues (`mtp.decoding.penalties`): speculative decoding still emits what penalized greedy decoding
            emits. Log-probabilities stay the model's own.
        logit_bias: greedy and speculative: {token id: added to its logit}, OpenAI's (-100 to 100; -100 bans the
            token, 100 all but forces it), before the penalties; lossless as they are.
        min_p: sampling: draw only from tokens at least `min_p` times as likely as the most likely one (after
            temperature, top-k and top-p, as transformers orders them); 0: all.
        min_new_tokens: greedy and speculative: the end tokens (`stop_token_ids`) are banned until a row has this
            many new tokens (transformers' `min_new_tokens`); stop strings still end it.
    """
    strategy = _strategy(strategy, use_speculative)
    input_ids, attention_mask = token_batch(model, input_ids, attention_mask, left_padded=True)
    if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        warnings.warn("the model is in training mode: its dropout makes every forward random, so decoding is too "
                      "(speculative decoding no longer equals greedy); call model.eval() before decoding",
                      stacklevel=2)
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise MTPError(f"prompt_cache must be a mtp.decoding.prefixes.PromptCache, not {type(prompt_cache).__name__}")
    if lookup_corpus is not None and not isinstance(lookup_corpus, LookupCorpus):
        raise MTPError(f"lookup_corpus must be a mtp.LookupCorpus (LookupCorpus.load(path) reads a saved one), not "
                       f"{type(lookup_corpus).__name__}")
    if prefix is not None and len(prefix):  # (checked as prompts are)
        prefix = token_batch(model, prefix if isinstance(prefix, torch.Tensor) else list(prefix))[0][0].tolist()
    budgets = _budgets(max_new_tokens, input_ids.shape[0])
    max_new_tokens = max(budgets)
    shared = {"tau": tau, "k": k, "num_draft": num_draft, "strategy": strategy, "tree": tree, "tree_size": tree_size,
              "lookup": lookup, "seed": seed, "logprobs": logprobs}
    check_values(shared, flags=False)
    per_row = (do_sample, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
               logit_bias, min_new_tokens, stop_strings)
    rows = row_options(input_ids.shape[0], model.config.vocab_size, dict(zip(PER_ROW, per_row, strict=True)), shared)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    opts = batch_options(DecodeOptions(strategy, max_new_tokens, tau=tau, k=k, num_draft=num_draft,
                                       adaptive_draft=adaptive_draft, lookup=lookup, logprobs=logprobs,
                                       lookup_corpus=lookup_corpus if lookup else None,
                                       tree=model_tree(model, tree, tree_size, num_draft, k)), rows)
    drafter = drafter_for(model, opts, proposer)
    graphs = _use_graphs(graphs, input_ids.device, proposer)
    input_ids, attention_mask = _fit_context(model, input_ids, attention_mask, opts, drafter.lookahead,
                                             truncate_prompt, budgets)
    stop_token_ids = _end_tokens(model, tokenizer, stop_token_ids)
    if opts.lookup_corpus is not None:
        check_corpus_tokens(opts.lookup_corpus, model.config.vocab_size)
    stop = StopChecker(input_ids.shape[0], stop_token_ids, None, tokenizer, device=input_ids.device, halt=halt,
                       row_strings=[r.stop_strings for r in rows],
                       prompt_tails=_prompt_tails(input_ids, attention_mask, rows) if stop_in_prompt else None)
    generator = _seeded_generator(seed, input_ids.device) if opts.do_sample else None
    stats = GenerationStats()
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    scores = None if logprobs is None else [[] for _ in tokens]
    if admit is not None:
        admit = dataclasses.replace(admit, take=_joining_rows(admit, tokens, scores))
    start = time.perf_counter()

    end = _row_end(on_end, opts.lookup_corpus, tokens, scores, stats, start)
    from mtp.decoding.graphs import leased_sessions

    with leased_sessions(model) as sessions:  # (a second call at once, e.g. from `streamer`, decodes in its own)
        for row, new, row_scores in iter_generate(model, input_ids, attention_mask, opts=opts, stop=stop,
                                                  generator=generator, stats=stats, drafter=drafter,
                                                  on_trunk=on_trunk, graphs=graphs, budgets=budgets, admit=admit,
                                                  on_end=end, prefix=prefix,
                                                  prompt_cache=prompt_cache, rows=rows, sessions=sessions):
            tokens[row].extend(new)
            if scores is not None:
                scores[row].extend(row_scores)
            if streamer is not None:
                streamer(row, new) if row_scores is None else streamer(row, new, logprobs=row_scores)
    stats.seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens] if tokenizer is not None else None
    if texts is not None:
        texts = [stop.truncate_text(row, t) for row, t in enumerate(texts)]
    return GenerationResult(tokens, stats, texts, scores)


def _row_end(on_end: Callable | None, corpus: LookupCorpus | None, tokens: list[list[int]], scores: list | None,
             stats: GenerationStats, start: float) -> Callable[[int], None] | None:
    """What `iter_generate` calls as a row ends: a growing corpus takes in its answer (later rows and calls draft
    from it), then `on_end` sees it with the statistics as they stand (seconds so far, lists copied)."""
    growing = corpus if isinstance(corpus, GrowingCorpus) else None
    if growing is not None:
        growing.refresh()  # (a rebuild that finished since the last call)
    if on_end is None and growing is None:
        return None

    def end(row: int) -> None:
        if growing is not None:
            growing.add(tokens[row])
        if on_end is not None:
            on_end(row, tokens[row], None if scores is None else scores[row],
                   dataclasses.replace(stats, seconds=time.perf_counter() - start,
                                       draft_positions=list(stats.draft_positions),
                                       draft_accepted=list(stats.draft_accepted)))

    return end


def _strategy(strategy: Strategy | None, use_speculative: bool | None) -> Strategy:
    """The strategy asked for, by name or by published checkpoints' `use_speculative` (the two must agree)."""
    if use_speculative is not None:
        spelled = "speculative" if use_speculative else "greedy"
        if strategy not in (None, spelled):
            raise MTPError(f"use_speculative={use_speculative} asks for {spelled}, strategy={strategy!r} for "
                           "another: give one of them")
        strategy = spelled
    strategy = strategy or "greedy"
    if strategy not in STRATEGIES:
        raise MTPError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    # no seed: one drawn from torch's global generator, so `torch.manual_seed` reproduces a call, as in
    # transformers (torch.seed() would reseed the global generator from the OS: the caller's later draws too)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def _joining_rows(admit: Admission, tokens: list[list[int]], scores: list | None):
    """`Admission.take` that checks what it gives and adds the joined rows to the result's lists."""
    def joining(active: int, fits: Callable[..., bool]) -> list[tuple]:
        prompts = admit.take(active, fits)
        if prompts and active + len(prompts) > admit.max_rows:
            raise MTPError(f"{len(prompts)} prompts joining {active} rows exceed the batch's max_rows "
                           f"{admit.max_rows}")
        for ids, budget, *options in prompts:
            if not fits(len(ids), budget, *options):
                raise MTPError(f"a prompt of {len(ids)} tokens with {budget} new tokens (and its options) does not "
                               "fit the batch it joins (give only prompts that `fits`)")
        tokens.extend([] for _ in prompts)
        if scores is not None:
            scores.extend([] for _ in prompts)
        return prompts

    return joining


def _prompt_tails(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  rows: list[RowOptions]) -> list[list[int]] | None:
    """Each prompt's last tokens, enough to hold the start of its longest stop string (None: no stop strings)."""
    if not any(r.stop_strings for r in rows):
        return None
    reach = max(len(s) for r in rows for s in r.stop_strings) + 8
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    return [ids[m.bool()].tolist()[-reach:] for ids, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]


def _budgets(max_new_tokens: int | Sequence[int], rows: int) -> list[int]:
    """Each row's new tokens at most: one number for every row, or one per row (a server's requests, each with
    its own max_tokens, decoded as one batch)."""
    given = max_new_tokens.tolist() if isinstance(max_new_tokens, np.ndarray | torch.Tensor) else max_new_tokens
    budgets = list(given) if isinstance(given, Sequence) else [given] * rows
    # (numpy's integers count; a bool does not)
    budgets = [int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool | np.bool_) else n
               for n in budgets]
    if len(budgets) != rows or not all(isinstance(n, int) and not isinstance(n, bool) for n in budgets):
        raise MTPError(f"max_new_tokens must be an int or one int per row ({rows}), got {max_new_tokens!r}")
    if any(n < 0 for n in budgets):
        raise MTPError("max_new_tokens must be >= 0")
    return budgets


def _use_graphs(graphs: bool | str | None, device: torch.device, proposer) -> bool | str:
    if graphs not in (None, True, False, "compile"):
        raise MTPError(f"graphs must be None, True, False or 'compile', not {graphs!r}")
    if graphs is None:
        return device.type == "cuda" and proposer is None
    if graphs and device.type != "cuda":
        raise MTPError(f"CUDA graphs need a CUDA device; the model is on {device.type} (graphs off runs the same "
                       "steps eagerly)")
    if graphs and proposer is not None:
        raise MTPError("a custom proposer drafts on the host: decode it with graphs off")
    return graphs


def model_tree(model, tree, tree_size: int | None, num_draft: int | None,
               k: int | None = None) -> DraftTree | DynamicTree | None:
    """The draft tree `generate(tree=..., tree_size=...)` asks for, for this model (None: a chain). That a tree
    comes with the speculative strategy is a rule of `mtp.arguments.RELATIONS`, checked by `generate`."""
    if tree is None and tree_size is None:
        return None
    depth = model.draft_depth(k)
    depth = depth if num_draft is None else min(depth, num_draft)
    folder = getattr(getattr(model, "source", None), "location", None)
    ranked = model.draft_vocab.numel() if getattr(model, "draft_vocab", None) is not None else model.config.vocab_size
    resolved = resolve_tree("auto" if tree is None else tree, tree_size, depth, folder, ranks=ranked)
    if isinstance(resolved, DraftTree) and max(resolved.widths()) > ranked:
        raise MTPError(f"tree rank {max(resolved.widths()) - 1}: the heads rank {ranked} tokens (ranks 0 to "
                       f"{ranked - 1})")
    return resolved


def _fit_context(model, input_ids, attention_mask, opts: DecodeOptions, lookahead: int, truncate_prompt: bool,
                 budgets: list[int] | None = None):
    """The prompts, each row's own tokens and its own budget (`budgets`; default `opts.max_new_tokens` each)
    within the model's positions: a row's positions start at its first token, whatever the left padding (a short
    prompt batched with long ones may take a longer budget). Else an MTPError, or, with `truncate_prompt`, the
    prompts' oldest columns cut."""
    limit = context_limit(model)
    if limit is None:
        return input_ids, attention_mask
    lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(input_ids)
    budgets = budgets if budgets is not None else [opts.max_new_tokens] * len(lengths)
    longest, budget = max(zip(lengths, budgets, strict=True), key=sum)
    if longest + budget + lookahead <= limit:
        return input_ids, attention_mask
    need = input_ids.shape[1] + opts.max_new_tokens + lookahead
    if not truncate_prompt:
        raise MTPError(f"prompt of {longest} tokens + max_new_tokens {budget} exceeds "
                       f"{_context_words(model, limit)} (shorten it, or keep its last tokens: "
                       "truncate_prompt=True, --truncate-prompt)")
    keep = limit - (need - input_ids.shape[1])
    if keep <= 0:
        raise MTPError(f"max_new_tokens {opts.max_new_tokens} does not fit {_context_words(model, limit)}")
    mask = attention_mask[:, -keep:] if attention_mask is not None else None
    return input_ids[:, -keep:], mask


def context_room(model, strategy: Strategy = "greedy", k: int | None = None, num_draft: int | None = None,
                 tree=None, tree_size: int | None = None, lookup: int = 0, **_: object) -> int | None:
    """Tokens a prompt and its new tokens may have together when decoded with these options: the model's context
    less the positions a step uses past them (drafts, lookup, masks); None: no limit known. (Extra keywords, a
    command's other decoding options, are ignored.)"""
    limit = context_limit(model)
    if limit is None:
        return None
    opts = DecodeOptions(strategy=strategy, k=k, num_draft=num_draft, lookup=lookup,
                         tree=model_tree(model, tree, tree_size, num_draft, k))
    return limit - drafter_for(model, opts).lookahead


def context_limit(model) -> int | None:
    """The tokens a sequence may have: the model's positions, or its sliding attention window where narrower
    (past the window mtp's causal masks are not the model's attention: `backbones.check_within_window`)."""
    cfg = model.config
    limit = next((v for name in ("max_position_embeddings", "n_positions")
                  if isinstance(v := getattr(cfg, name, None), int) and v > 0), None)
    window = attention_window_of(model)
    return window if window is not None and (limit is None or window < limit) else limit


def attention_window_of(model) -> int | None:
    """The model's sliding attention window (`Backbone.window`; None: it has none, or it is a plain Hugging Face
    model, e.g. the base `mtp bench-train` checks)."""
    backbone = getattr(model, "backbone", None)
    return backbone.window if backbone is not None else None


def _context_words(model, limit: int) -> str:
    """How an error names the model's context (a sliding window that limits it says so)."""
    return f"the model's context of {limit} tokens" + (
        " (its sliding attention window)" if attention_window_of(model) == limit else "")


def _end_tokens(model, tokenizer, given: Sequence[int] | None) -> list[int]:
    """`generate`'s stop_token_ids: the given ones, which must be in the vocabulary (an index error later
    otherwise), or the model's and tokenizer's end tokens, less any the model cannot emit."""
    vocab = model.config.vocab_size
    if given is None:
        return [t for t in default_stop_token_ids(model, tokenizer) if 0 <= t < vocab]
    if any(not 0 <= int(t) < vocab for t in given):
        raise MTPError(f"stop_token_ids must be token ids of this model's vocabulary (0 to {vocab - 1}), got "
                       f"{list(given)}")
    return list(given)


def default_stop_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    gen = getattr(getattr(model, "base", None), "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    return sorted(ids)
