"""One decoding step as a function of tensors of fixed shapes: what a CUDA graph replays.

A step feeds the pending tokens and the drafts, lets a verifier keep a prefix of the drafts plus the model's own
next token (greedy, speculative) or emits the drafts by confidence with no verification (confadapt, static),
keeps the fed tokens that stay in the sequence in the cache, applies end tokens and the token budget, and proposes
the next drafts - all on the device, reading nothing back to the host:

    state (DecodeState)  ->  drafter.forward  ->  verify / confident run  ->  cache.keep_path  ->  stop, budget
                         ->  drafter.propose (+ prompt lookup)  ->  new state, and one small tensor for the host

The host copies that tensor once per step (`StepResult.host`: emitted tokens, counts, finished flags, how many
drafts were accepted, how many lookup drafts each row found, whether its logits were finite). Shapes depend only
on the batch size and the block configuration (`mtp.decoding.blocks.Block`: drafts and lookup drafts fed, whether
the step drafts, how many left-out positions it catches up), so on CUDA a step is captured once per configuration
and replayed (`mtp.decoding.graphs`); on a CPU the same functions run eagerly. Finished rows stay in the batch,
masked: they emit nothing and their cache does not move. A plain step of a batch where verifying does not pay
(`drafting` False) is a greedy step that keeps what running the extra heads later needs (`DecodeState.deferred_*`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from mtp.decoding import logprobs
from mtp.decoding.corpus import LookupCorpus
from mtp.decoding.drafters import Drafter, DraftRequest, Drafts, StepOutput, block_rows, draft_tokens
from mtp.decoding.lookup import lookup_chain, lookup_drafts
from mtp.decoding.penalties import Penalties, count_emitted, on_block
from mtp.decoding.sampling import accept_drafts_sampling, row_probs
from mtp.decoding.stopping import stop_tokens
from mtp.decoding.tree import (
    Acceptance,
    DraftTree,
    DynamicTree,
    tree_layout,
    verify_tree,
    verify_tree_sampling,
)

Strategy = Literal["greedy", "speculative", "confadapt", "static"]
STRATEGIES: tuple[str, ...] = ("greedy", "speculative", "confadapt", "static")
# StepResult.host: count, finished, accepted drafts, lookup drafts found, non-finite logits; then the emitted tokens
# (and, asked for, their log-probabilities: `mtp.decoding.logprobs`)
HOST_COLUMNS = 5
COUNT, FINISHED, ACCEPTED, LOOKUP_FOUND, NON_FINITE = range(HOST_COLUMNS)


def emitted_width(columns: int, top: int | None) -> int:
    """The tokens a row may emit in a step whose host copy has `columns` columns (`top`: DecodeOptions.logprobs)."""
    return (columns - HOST_COLUMNS) // logprobs.columns_per_token(top)


@dataclass
class DecodeOptions:
    strategy: Strategy = "greedy"
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    tau: float = 0.9
    k: int | None = None
    num_draft: int | None = None  # heads used for drafting; default all extra heads
    adaptive_draft: bool = True  # as many drafts as recent acceptance pays for (DraftLength); none where a batch's
    # plain steps are faster (SpeculationGate)
    tree: DraftTree | DynamicTree | None = None  # speculative: verify a tree of candidates (None: a chain)
    lookup: int = 0  # speculative: also verify up to this many prompt-lookup drafts (`mtp.decoding.lookup`)
    lookup_corpus: LookupCorpus | None = None  # with lookup: drafts from earlier answers too (`mtp.decoding.corpus`)
    logprobs: int | None = None  # greedy, speculative: each emitted token's log-probability and this many
    # alternatives' (`mtp.decoding.logprobs`); None: none
    # greedy, speculative: biases and penalties on the tokens the sequence holds (`mtp.decoding.penalties`; their
    # values go into the state: a session's steps read whichever a call has)
    penalties: Penalties | None = None
    min_p: float = 0.0  # sampling: drop tokens less likely than this times the most likely one (0: none)

    def shape_key(self, **fields) -> tuple:
        """The options as a key of what shapes a step's work (decode sessions, the gate's timings), with `fields`
        replaced: a temperature, top-p, min-p or penalty value costs what another does, so only whether there is
        one counts; a lookup corpus by its fingerprint (astuple would copy its tensors, and a copy equals no
        other)."""
        corpus = self.lookup_corpus.fingerprint if self.lookup_corpus is not None else None
        return dataclasses.astuple(dataclasses.replace(
            self, max_new_tokens=0, temperature=1.0, top_p=self.top_p < 1.0, min_p=self.min_p > 0.0,
            penalties=self.penalties is not None, lookup_corpus=corpus, **fields))


@dataclass
class DecodeState:
    """Everything a step reads besides the cache, one row per batch row (shapes fixed after the prompt)."""

    rows: torch.Tensor  # (B,) original row index
    pending: torch.Tensor  # (B, W) tokens to feed first: the last one emitted (verifying), or the emitted run
    pending_valid: torch.Tensor  # (B, W) bool: a prompt is left-padded, an emitted run right-padded
    produced: torch.Tensor  # (B,) tokens emitted so far
    budget: torch.Tensor  # (B,) tokens the row may emit
    finished: torch.Tensor  # (B,) bool
    drafts: torch.Tensor  # (B, N) the drafter's drafts for the next block, as deep as it drafts
    draft_probs: torch.Tensor | None = None  # (B, D, V) sampled drafts' distributions at depths 1..D
    tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # a tree shaped this step: parents, depth, rank
    lookup: torch.Tensor | None = None  # (B, L) prompt-lookup drafts
    lookup_count: torch.Tensor | None = None  # (B,) how many of them each row found
    history: torch.Tensor | None = None  # (B, S) each row's tokens (prompt without padding, then emitted)
    history_len: torch.Tensor | None = None  # (B,)
    # Plain steps that leave the extra heads out keep what computing them later needs (`Drafter.catch_up`):
    deferred_trunk: torch.Tensor | None = None  # (B, C, H) the trunk output at each position left out
    deferred_next: torch.Tensor | None = None  # (B, C) the token emitted after it
    deferred_count: torch.Tensor | None = None  # (B,) positions left out since the last step that drafted
    # With penalties (`mtp.decoding.penalties`): their values, the logit biases, each token's count in the answer,
    # and whether the sequence holds it
    penalties: torch.Tensor | None = None  # (B, 4) float: repetition, presence, frequency, min_new_tokens
    logit_bias: torch.Tensor | None = None  # (B, V) float
    counts: torch.Tensor | None = None  # (B, V) float
    seen: torch.Tensor | None = None  # (B, V) bool
    # Sampling: each row's settings (`mtp.decoding.sampling.SAMPLING_COLUMNS`; temperature 0: a greedy row)
    sampling: torch.Tensor | None = None  # (B, 4) float

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out.extend(v if isinstance(v, tuple) else [] if v is None else [v])
        return out

    def copy_(self, other: DecodeState) -> None:
        """Write `other` into this state's tensors in place (their addresses are what a graph replays); a
        tensor a step passed on as it was (the rows, the budget) is already there."""
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            if dst is not src:
                dst.copy_(src)

    def clone(self) -> DecodeState:
        """A copy with tensors of its own (a captured graph's input buffers, which later inputs overwrite)."""
        def cloned(v):
            return tuple(t.clone() for t in v) if isinstance(v, tuple) else None if v is None else v.clone()

        return DecodeState(**{f.name: cloned(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def narrow_pending(self, width: int) -> DecodeState:
        """The state with its pending block cut to `width` columns (eager steps only: those past every row's
        emitted run are padding, which costs a CPU step its rows)."""
        return dataclasses.replace(self, pending=self.pending[:, :width], pending_valid=self.pending_valid[:, :width])

    def select(self, index: torch.Tensor) -> DecodeState:
        """The state of batch rows `index`."""
        def pick(name, v):
            if v is None or name == "tree":  # a tree is shared by every row
                return v
            return v[index]

        return DecodeState(**{f.name: pick(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def joined(states: list[DecodeState]) -> DecodeState:
        """One state of the rows of `states`, in order (a batch that prompts join): their shapes agree but for the
        rows; a tree is every row's (a fixed one: None here), so states that carry one cannot join."""
        if any(s.tree is not None for s in states):
            raise ValueError("states shaped by a dynamic tree cannot join: each batch has its own tree")

        def cat(values: list):
            return None if values[0] is None else torch.cat(values)

        return DecodeState(**{f.name: cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(DecodeState)})


@dataclass
class StepResult:
    host: torch.Tensor  # (B, HOST_COLUMNS + E) long: what the host reads, in one copy
    trunk: torch.Tensor | None = None  # (B, c, H) trunk output of the chain slots (parallel heads), for observers
    kept: torch.Tensor | None = None  # (B, c) bool: which of them stay in the row's sequence


class Decoder:
    """What a step needs besides tensors: the model's drafter, the options, the cache, the end tokens, the random
    generator. `step` reads a `DecodeState` and returns a new one; it never reads the device from the host."""

    def __init__(self, drafter: Drafter, opts: DecodeOptions, cache, stop_ids: torch.Tensor, generator,
                 observe: bool = False, defer_capacity: int = 0):
        self.drafter, self.opts, self.cache = drafter, opts, cache
        self.stop_ids, self.generator, self.observe = stop_ids, generator, observe
        self.defer_capacity = defer_capacity  # positions plain steps may leave the extra heads out of (0: they never do)
        self.verifying = opts.strategy in ("greedy", "speculative")
        self.tree = drafter.tree if self.verifying else None
        if opts.logprobs is not None and not self.verifying:
            raise ValueError("log-probabilities come with greedy and speculative decoding")

    # ---------------------------------------------------------------- the step
    def step(self, s: DecodeState, n: int, m: int, drafting: bool = True,
             catch_up: int = 0) -> tuple[DecodeState, StepResult]:
        """Feed the pending tokens and (verifying) the first n drafts and m lookup drafts; keep what stays.
        `drafting` False: a plain step (n = m = 0) that proposes nothing and leaves the extra heads out (the
        state keeps their inputs); `catch_up` > 0: first compute the extra heads for up to that many positions
        such steps left out (`mtp.decoding.blocks.SpeculationGate`)."""
        active = ~s.finished
        w = s.pending.shape[1]
        if self.verifying:
            if catch_up and s.deferred_count is not None:
                self.drafter.catch_up(self.cache, s.deferred_trunk, s.deferred_next, s.deferred_count, catch_up)
            drafts = self._block_drafts(s, n, m)
            out = self.drafter.forward(self.cache, s.pending, s.pending_valid, drafts, drafting)
            acc = verify(self._penalized(out, drafts, s), drafts, self.opts, self.generator, s.sampling)
            if drafts.tokens.shape[1]:  # the kept drafts, then the model's own token after them: (B, 1+depth)
                emitted = torch.cat([acc.path_tokens(drafts.tokens), acc.last[:, None]], 1)
                emitted.scatter_(1, acc.count[:, None], acc.last[:, None])
            else:  # nothing drafted (greedy): the model's token (two kernels fewer a step)
                emitted = acc.last[:, None]
            if out.left_out is not None:  # heads that read the emitted tokens, before the cache moves the kept path
                out = self.drafter.draft_after(out, tokens_after_slots(emitted, drafts))
            counts, accepted = acc.count + 1, acc.count
            if self.opts.logprobs is not None:
                scores = logprobs.pack(out.verify_logits, acc.scoring_slots(emitted.shape[1]), emitted,
                                       self.opts.logprobs)
            # keep the fed tokens and the accepted drafts (a tree's path moved right after the root), no more of
            # them than the row emits before its budget: a finished row stays in a replayed batch, masked, and its
            # later blocks are written after what it kept, inside the slots its budget sized the cache for
            kept = torch.minimum(acc.count, s.budget - s.produced - 1)
            self.cache.keep_path(w, kept, acc.path, active)
            request = proposal = None
            if self.drafter.proposer is not None and self.drafter.num_drafts:  # what a custom proposer reads
                request = DraftRequest(self.drafter.model, None, s.rows, s.produced + counts, self.opts,
                                       self.generator)
            if drafting:
                proposal = self.drafter.propose(out, acc.slot, self.generator, request, sampling=s.sampling)
            kept_drafts = acc.kept_nodes(drafts.tokens.shape[1]) if self.observe else None
        else:  # nothing drafted into the block; its drafting slots (masks) are forgotten
            out = self.drafter.forward(self.cache, s.pending, s.pending_valid, Drafts(s.pending[:, :0]))
            emitted, counts = confident_run(out, self.drafter, self.opts, self.generator)
            accepted, proposal = torch.zeros_like(counts), None
            root = block_rows(s.pending_valid, 0)[:, 0]
            self.cache.commit(torch.where(active, root + 1, 0))
            kept_drafts = s.pending_valid[:, :0] if self.observe else None

        counts = torch.where(active, torch.minimum(counts, s.budget - s.produced), 0)
        counts, hit = stop_tokens(emitted, counts, self.stop_ids)
        produced = s.produced + counts
        finished = s.finished | hit | (produced >= s.budget)
        new = self._next_state(s, emitted, counts, produced, finished, proposal, acc.last if self.verifying else None)
        if self.defer_capacity and self.verifying:
            self._defer(s, new, out, emitted, active, drafting)
        lookup_count = new.lookup_count if new.lookup_count is not None else torch.zeros_like(counts)
        broken = damaged_rows(out.verify_logits)  # (B,)
        host = [torch.stack([counts, finished.long(), accepted, lookup_count, broken.long()], 1), emitted]
        host = torch.cat(host if self.opts.logprobs is None else [*host, scores], 1)
        result = StepResult(host)
        if self.observe and out.trunk is not None:
            kept = torch.cat([s.pending_valid, kept_drafts], 1) & active[:, None]
            result = StepResult(host, out.trunk, kept)
        return new, result

    def _penalized(self, out: StepOutput, drafts: Drafts, s: DecodeState) -> StepOutput:
        """`out` with its verify logits penalized for the tokens each slot's sequence holds (the verifier reads
        these; log-probabilities are the model's own)."""
        if s.counts is None:
            return out
        logits = on_block(out.verify_logits, drafts.tokens, drafts.layout, s.penalties, s.logit_bias, s.counts, s.seen,
                          s.produced, self.stop_ids)
        return StepOutput(logits, out.draft_hidden, out.trunk)  # (the argmax: of these logits)

    def _block_drafts(self, s: DecodeState, n: int, m: int) -> Drafts:
        if n == 0:  # the prompt, or a step that verifies lookup drafts alone
            drafts = Drafts(s.drafts[:, :0])
        elif s.tree is not None:
            drafts = Drafts(s.drafts, s.draft_probs, layout=tree_layout(*s.tree, self.tree.depth))
        elif isinstance(self.tree, DraftTree):
            drafts = Drafts(s.drafts, s.draft_probs, tree=self.tree).truncate(n)
        else:
            drafts = Drafts(s.drafts, s.draft_probs).truncate(n)
        return lookup_chain(drafts, s.lookup[:, :m]) if m else drafts

    def _next_state(self, s, emitted, counts, produced, finished, proposal: Drafts | None,
                    last: torch.Tensor | None) -> DecodeState:
        if self.verifying:  # the model's own token comes next; the drafts after it were proposed this step
            # `last` (B,): the model's token after the kept drafts, the last one emitted (where an end token or
            # the budget cut a row's run short, the row is finished and its pending token is never fed)
            pending = last[:, None]  # (B, 1)
            # A one-token pending block is always valid (a prompt's last column is, being left-padded): after
            # the first step this is the same all-true tensor every step, and is not copied again.
            pending_valid = s.pending_valid if s.pending_valid.shape == pending.shape else \
                torch.ones_like(pending, dtype=torch.bool)
            if proposal is None:  # a plain step that drafted nothing: the last drafts stay (until a step drafts)
                drafts, probs, tree = s.drafts, s.draft_probs, s.tree
            else:
                drafts, probs, tree = proposal.tokens, proposal.probs, None
                if isinstance(self.tree, DynamicTree):
                    lay = proposal.layout
                    tree = (lay.parent_slot, lay.depth, lay.rank)
        else:  # the emitted run, right-padded
            pending = emitted
            pending_valid = torch.arange(emitted.shape[1], device=emitted.device)[None, :] < counts[:, None]
            drafts, probs, tree = s.drafts, None, None
        new = DecodeState(s.rows, pending, pending_valid, produced, s.budget, finished, drafts, probs, tree)
        new.sampling = s.sampling
        if s.counts is not None:
            new.penalties, new.logit_bias = s.penalties, s.logit_bias
            new.counts, new.seen = count_emitted(s.counts, s.seen, emitted, counts)
        if s.history is not None:
            at = s.history_len[:, None] + torch.arange(emitted.shape[1], device=emitted.device)
            new.history = s.history.scatter(1, at, emitted)  # slots past the count are overwritten later
            new.history_len = s.history_len + counts
            new.lookup, new.lookup_count = lookup_drafts(new.history, new.history_len, self.opts.lookup,
                                                             self.opts.lookup_corpus)
        return new


    def _defer(self, s: DecodeState, new: DecodeState, out: StepOutput, emitted: torch.Tensor,
               active: torch.Tensor, drafting: bool) -> None:
        """A plain step that left the extra heads out keeps its root's trunk output and the token emitted after
        it, at each active row's next deferred index; a step that drafts (after catching up) starts over."""
        if s.deferred_count is None:  # the prompt's step: the buffers (shapes fixed from here on)
            b, h = out.trunk.shape[0], out.trunk.shape[-1]
            new.deferred_trunk = out.trunk.new_zeros(b, self.defer_capacity, h)
            new.deferred_next = emitted.new_zeros(b, self.defer_capacity)
            new.deferred_count = emitted.new_zeros(b)
            return
        if drafting:
            new.deferred_trunk, new.deferred_next = s.deferred_trunk, s.deferred_next
            new.deferred_count = torch.zeros_like(s.deferred_count)
            return
        # Written in place (no step reads an earlier state's buffers; a copy would move all of them every step).
        at = s.deferred_count.clamp_max(self.defer_capacity - 1)[:, None]  # (B, 1) (the gate never fills it)
        new.deferred_trunk = s.deferred_trunk.scatter_(1, at[:, :, None].expand(-1, 1, out.trunk.shape[-1]),
                                                       out.trunk[:, :1])  # a plain step's root: its one token
        new.deferred_next = s.deferred_next.scatter_(1, at, emitted[:, :1])
        new.deferred_count = s.deferred_count + active.long()


def tokens_after_slots(emitted: torch.Tensor, drafts: Drafts) -> torch.Tensor:
    """(B, 1+N) the token a step emitted after each block slot on its kept path, from its emitted tokens (B, 1+D):
    the root's is the first, a node at depth k is followed by the k+1-th (a chain's draft i is slot i). A slot off
    the path gets the token of its depth on the path, which nothing reads."""
    if drafts.layout is None:
        return emitted
    return emitted[:, drafts.layout.slot_depth]


def damaged_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B,) whether a row has a NaN or +inf logit (damaged weights; -inf is a masked token).
    One reduction over the logits: the largest logit is NaN when any is (amax propagates NaN) or +inf."""
    return ~(logits.amax((1, 2)) < float("inf"))


# ------------------------------------------------------------------------------------------------ verifiers
def greedy_accept(target: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts equal to the model's own argmax, and the model's next token after it.

    target: (B, d+1) the model's argmax after each prefix of [last, d_1..d_d]; drafts: (B, d).
    """
    if drafts.shape[1] == 0:  # greedy: nothing to accept (three kernels fewer)
        return drafts.new_zeros(drafts.shape[0]), target[:, 0]
    a = (drafts == target[:, :-1]).long().cumprod(-1).sum(-1)  # (B,)
    return a, target.gather(1, a[:, None]).squeeze(1)


def verify(out: StepOutput, drafts: Drafts, opts: DecodeOptions, generator,
           sampling: torch.Tensor | None = None) -> Acceptance:
    """Greedy / speculative: which drafts are kept and the model's own next token after them. `sampling`
    (B, SAMPLING_COLUMNS): each row's settings where the batch samples (`opts.do_sample`); a row whose temperature
    is 0 is verified greedily."""
    if drafts.layout is not None:
        greedy = verify_tree(out.verify_logits, drafts.tokens, drafts.layout, out.verify_argmax)
    else:
        a, last = greedy_accept(out.argmax(), drafts.tokens)
        greedy = Acceptance(a, last, a, None)  # a chain: the kept slot is the number kept
    if not opts.do_sample:
        return greedy
    probs = row_probs(out.verify_logits, sampling, opts)  # (B, 1+d, V)
    if drafts.layout is not None:
        sampled = verify_tree_sampling(probs, drafts.tokens, drafts.layout, generator, drafts.probs)
    else:
        a, last = accept_drafts_sampling(probs, drafts.tokens, drafts.probs, generator)
        sampled = Acceptance(a, last, a, None)
    return sampled.where(sampling[:, 0] > 0, greedy)


def confident_run(out: StepOutput, drafter: Drafter, opts: DecodeOptions,
                  generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ConfAdapt / static (no verification): the next token and the drafts after it (B, 1+n), and how many to
    emit (B,): all (static) or the longest run with top-1 probability >= tau, at least one."""
    head = draft_tokens(out.verify_logits[:, :1], "confidence", opts, generator)  # the next token
    zero = torch.zeros_like(head.tokens[:, 0])
    rest = drafter.propose(out, zero, generator, mode="confidence")
    tokens = torch.cat([head.tokens, rest.tokens], 1)  # (B, 1+n)
    if opts.strategy == "static":
        return tokens, torch.full_like(zero, tokens.shape[1])
    confidence = torch.cat([head.confidence, rest.confidence], 1) if rest.tokens.shape[1] else head.confidence
    return tokens, (confidence >= opts.tau).long().cumprod(-1).sum(-1).clamp_min(1)
