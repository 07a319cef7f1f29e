"""Decoding with an MTP model: greedy, lossless self-speculative, exact speculative sampling, ConfAdapt, static k.

The loop is a few small functions over explicit state (gpt-fast style):
    prefill        -> run the prompt, get every head's hidden state at the last position
    propose        -> heads 1..d turn that hidden state into draft tokens
    verify_block   -> one forward over [last token, drafts]; head 0 judges every draft at once
    accept         -> longest agreeing prefix (greedy) or the speculative-sampling rule, plus the model's own token
    rollback       -> the cache forgets rejected slots (per row; no tensor is copied)
Every row of a batch accepts its own number of tokens; rows that finish are dropped from the batch.

    greedy       emits 1 token per forward: the reference every other strategy is tested against
    speculative  lossless: output identical to greedy (or, sampling, distributed exactly as the model samples)
    confadapt    emits the longest run of head predictions with top-1 probability >= tau (lossy, no verification)
    static       emits k head predictions per forward (lossy)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from mtp.arguments import check_values
from mtp.decoding.drafters import DraftRequest, Drafts, HeadsDrafter, Proposer, StepOutput, draft_tokens  # noqa: F401
from mtp.decoding.inputs import left_pad, token_batch  # noqa: F401  (left_pad: re-exported)
from mtp.decoding.lookup import PromptLookup, add_lookup
from mtp.decoding.sampling import accept_drafts_sampling, process_logits
from mtp.decoding.stopping import StopChecker
from mtp.decoding.tree import Acceptance, DraftTree, DynamicTree, resolve_tree, verify_tree
from mtp.errors import MTPError

Strategy = Literal["greedy", "speculative", "confadapt", "static"]
STRATEGIES: tuple[str, ...] = ("greedy", "speculative", "confadapt", "static")


@dataclass
class GenerationStats:
    new_tokens: int = 0
    forward_passes: int = 0  # model forwards (prefill included)
    row_forwards: int = 0  # sum over rows of the forwards each row took part in
    seconds: float = 0.0
    draft_positions: list[int] = field(default_factory=list)  # per draft position: times proposed
    draft_accepted: list[int] = field(default_factory=list)  # per draft position: times accepted

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
                "acceptance_per_head": [round(a, 4) for a in self.acceptance]}


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (a stop token, when hit, is the last one)
    stats: GenerationStats
    texts: list[str] | None = None

    @property
    def sequences(self) -> list[list[int]]:
        return self.tokens


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
    adaptive_draft: bool = True  # propose only as many drafts as recent acceptance pays for (see DraftLength)
    tree: DraftTree | DynamicTree | None = None  # speculative: verify a tree of candidates (None: a chain)
    lookup: int = 0  # speculative: also verify up to this many prompt-lookup drafts (`mtp.decoding.lookup`)


# Called after every forward with (rows, trunk output (B, T, H), kept (B, T) bool): `rows` are the original row
# indices, `kept` marks the positions that hold a token of the row's sequence (not left padding, not a rejected
# draft). A row's kept positions, in call order, run along its sequence: the prompt, then the emitted tokens as
# they are fed back (the tokens emitted by the last forward never are; after a stop token a few more may follow).
TrunkObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


# ------------------------------------------------------------------------------------------------ verifiers
def greedy_accept(logits0: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts equal to the model's own argmax, and the model's next token after it.

    logits0: (B, d+1, V) next-token logits after each prefix of [last, d_1..d_d]; drafts: (B, d).
    """
    target = logits0.argmax(-1)  # (B, d+1)
    a = (drafts == target[:, :-1]).long().cumprod(-1).sum(-1)  # (B,)
    return a, target.gather(1, a[:, None]).squeeze(1)


def verify(out: StepOutput, drafts: Drafts, opts: DecodeOptions, generator) -> Acceptance:
    """Greedy / speculative: which drafts are kept and the model's own next token after them."""
    if drafts.tree is not None:
        return verify_tree(out.verify_logits, drafts.tokens, drafts.tree, opts, generator)
    if opts.do_sample:
        probs = process_logits(out.verify_logits, opts.temperature, opts.top_k, opts.top_p)  # (B, 1+d, V)
        a, last = accept_drafts_sampling(probs, drafts.tokens, drafts.probs, generator)
    else:
        a, last = greedy_accept(out.verify_logits, drafts.tokens)
    return Acceptance(a, last, a, None)  # a chain: the kept slot is the number kept


def confident_run(out: StepOutput, n: int, opts: DecodeOptions, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ConfAdapt / static (no verification): the next token and n drafts after it (B, 1+n), and how many to
    emit (B,): all (static) or the longest run with top-1 probability >= tau, at least one."""
    head = draft_tokens(out.verify_logits[:, :1], "confidence", opts, generator)  # the next token
    rest = out.propose(torch.zeros_like(head.tokens[:, 0]), n)
    tokens = torch.cat([head.tokens, rest.tokens], 1)  # (B, 1+n)
    if opts.strategy == "static":
        return tokens, torch.full_like(tokens[:, 0], tokens.shape[1])
    confidence = torch.cat([head.confidence, rest.confidence], 1) if rest.tokens.shape[1] else head.confidence
    return tokens, (confidence >= opts.tau).long().cumprod(-1).sum(-1).clamp_min(1)


def propose(model, hidden_at: torch.Tensor, opts: DecodeOptions, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft tokens from heads 1..d. hidden_at: (B, d, H) -> drafts (B, d) and their distributions if sampling."""
    drafts = HeadsDrafter(model, opts).heads_drafts(hidden_at, generator)
    return drafts.tokens, drafts.probs


class DraftLength:
    """How many drafts to verify next step, from how often each draft position was accepted.

    A draft costs a row of the verify forward (cheap with fp16-packed weights, up to ~half a step each with MKL's
    fp32 kernels); it pays only if it is likely to be reached and accepted. For each position i an exponential
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


def accepted_per_position(a: torch.Tensor, num_draft: int) -> list[int]:
    """a: (B,) drafts accepted per row -> for each draft position, how many rows accepted it (one transfer)."""
    return (torch.arange(num_draft, device=a.device)[None, :] < a[:, None]).sum(0).tolist()


# ------------------------------------------------------------------------------------------------ the loop
def iter_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  opts: DecodeOptions, stop: StopChecker, generator: torch.Generator | None = None,
                  stats: GenerationStats | None = None, drafter=None,
                  on_trunk: TrunkObserver | None = None) -> Iterator[tuple[int, list[int]]]:
    """Yield (row index, newly emitted tokens) as decoding proceeds. See `generate` for the arguments.

    One loop for every method and strategy: each step the drafter (`model.drafter(opts)` by default; see
    `mtp.decoding.drafters`) feeds the pending tokens and the drafts, a verifier keeps a prefix of the drafts
    plus the model's own next token (greedy, speculative) or the drafts are emitted by confidence with no
    verification (confadapt, static), and the cache keeps only the fed tokens that stay in the sequence.
    `on_trunk` sees the trunk output of every forward (see `TrunkObserver`; parallel heads only).
    """
    stats = stats if stats is not None else GenerationStats()
    drafter = drafter if drafter is not None else model.drafter(opts)
    b, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    verifying = opts.strategy in ("greedy", "speculative")
    n_draft = drafter.num_drafts if verifying else 0
    lookup = PromptLookup(input_ids, attention_mask, opts.lookup) if opts.lookup and verifying else None
    positions = max(n_draft, opts.lookup) if lookup is not None else n_draft  # draft depths a step may reach
    stats.draft_positions = [0] * positions
    stats.draft_accepted = [0] * positions
    if opts.max_new_tokens <= 0:
        return
    cache = drafter.new_cache(b, prompt_len + opts.max_new_tokens + drafter.extra_slots + 2)
    rows = torch.arange(b, device=device)  # original row index of each active row
    produced = torch.zeros(b, dtype=torch.long, device=device)
    budget = opts.max_new_tokens
    draft_length = DraftLength(n_draft, opts.adaptive_draft)
    # The first block is the prompt; after it, what the last step emitted (its tokens are not in the cache yet).
    pending, pending_valid = input_ids, attention_mask.to(device=device, dtype=torch.bool)
    drafts = Drafts(torch.zeros(b, 0, dtype=torch.long, device=device))

    while True:
        out = drafter.forward(cache, pending, pending_valid, drafts, generator)  # one model forward
        stats.forward_passes += 1
        stats.row_forwards += rows.numel()
        w, d = pending.shape[1], drafts.tokens.shape[1]
        if verifying:
            acc = verify(out, drafts, opts, generator)
            a = acc.count
            # Emitted this step: the accepted drafts (a chain's first a, a tree's kept path), then the model's own
            # next token.
            emitted = torch.cat([acc.path_tokens(drafts.tokens), torch.zeros_like(acc.last[:, None])], 1)
            emitted.scatter_(1, a[:, None], acc.last[:, None])  # (B, 1+depth)
            counts = a + 1
            if drafts.depth:
                kept = accepted_per_position(a, drafts.depth)
                _count_acceptance(stats, kept, a.numel())
                draft_length.update(kept, a.numel())
            # Keep the fed tokens and the accepted drafts (a tree's path moved right after the root), nothing after.
            cache.keep_path(out.block_len, w, a, acc.path)
            # (B, d) fed drafts that stay in the sequence; only an observer needs them (not the hot path)
            kept_drafts = acc.kept_nodes(d) if on_trunk is not None else None
            drafter.rows, drafter.produced = rows, produced + counts
            drafts = out.propose(acc.slot, draft_length.next())
        else:  # nothing was drafted into this block (d == 0); its drafting slots (masks) are forgotten
            emitted, counts = confident_run(out, drafter.num_proposals, opts, generator)
            cache.rollback(out.block_len, torch.full_like(produced, w))
            kept_drafts = pending_valid[:, :0] if on_trunk is not None else None
        if on_trunk is not None and out.trunk is not None:
            on_trunk(rows, out.trunk, torch.cat([pending_valid, kept_drafts], 1))

        counts = torch.minimum(counts, budget - produced)
        counts, finished = stop.apply(rows, emitted, counts, produced)
        produced += counts
        finished |= produced >= budget
        stats.new_tokens += int(counts.sum())
        emitted_cpu, counts_cpu = emitted.tolist(), counts.tolist()  # one transfer per step, not per token
        for i, row in enumerate(rows.tolist()):
            if counts_cpu[i]:
                if lookup is not None:
                    lookup.extend(row, emitted_cpu[i][: counts_cpu[i]])
                yield row, emitted_cpu[i][: counts_cpu[i]]
        if bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            rows, produced = rows[keep], produced[keep]
            cache.select_rows(keep)
            emitted, counts = emitted[keep], counts[keep]
            drafts = drafts.select(keep)
        if verifying:
            pending = emitted.gather(1, (counts - 1)[:, None])  # (B, 1) the model's own token
            pending_valid = torch.ones_like(pending, dtype=torch.bool)
        else:  # the emitted run, right-aligned (shorter rows padded on the left)
            width = int(counts.max())
            offsets = torch.arange(width, device=device)
            pad = width - counts  # (B,)
            pending_valid = offsets[None, :] >= pad[:, None]  # (B, width)
            src = (offsets[None, :] - pad[:, None]).clamp_min(0)
            pending = emitted.gather(1, src).masked_fill(~pending_valid, 0)  # (B, width)
        if lookup is not None:  # one more branch of drafts, copied from earlier in each row's sequence
            drafts = add_lookup(drafts, lookup.drafts(rows.tolist()))


def _count_acceptance(stats: GenerationStats, kept: list[int], rows: int) -> None:
    """Per draft position proposed this step: one more proposal per row, and the rows that accepted it."""
    for i, k in enumerate(kept):
        stats.draft_positions[i] += rows
        stats.draft_accepted[i] += k


# ------------------------------------------------------------------------------------------------ public API
@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | list, attention_mask: torch.Tensor | list | None = None, *,
             max_new_tokens: int = 128, strategy: Strategy = "greedy", use_speculative: bool | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             tau: float = 0.9, k: int | None = None, num_draft: int | None = None, adaptive_draft: bool = True,
             stop_token_ids: list[int] | None = None, stop_strings: list[str] | None = None, tokenizer=None,
             seed: int | None = None, streamer: Callable[[int, list[int]], None] | None = None,
             truncate_prompt: bool = False, proposer: Proposer | None = None,
             on_trunk: TrunkObserver | None = None, tree: str | DraftTree | None = None,
             tree_size: int | None = None, lookup: int = 0) -> GenerationResult:
    """Generate continuations of a left-padded batch of prompts.

    Args:
        input_ids: (B, P) prompt tokens, left-padded when rows differ in length (or lists of ids: see
            `mtp.decoding.inputs.token_batch`; anything malformed is an MTPError saying what).
        attention_mask: (B, P), 0 on padding.
        strategy: greedy | speculative | confadapt | static. `use_speculative=True/False` (seed 000's spelling)
            selects speculative / greedy.
        stop_token_ids: end tokens (default: the tokenizer's / generation config's end tokens).
        stop_strings: stop when the decoded new text contains one (needs `tokenizer`).
        streamer: called as streamer(row, new_tokens) after each step.
        truncate_prompt: keep only the last tokens of a prompt that does not fit the context with
            max_new_tokens; otherwise such a prompt is an error.
        proposer: the speculative strategy's draft source for a parallel-heads model (default: its heads).
        num_draft: drafts per verify step at most (default: every extra head).
        adaptive_draft: verify fewer drafts while recent ones were rarely accepted (`DraftLength`); False: always
            `num_draft`. Either way the output is the same, only the speed differs.
        on_trunk: called with the trunk output of every forward (`TrunkObserver`), e.g. to keep the frozen-trunk
            features of self-distilled training rows instead of recomputing them.
        tree: speculative with parallel heads: verify a tree of the heads' top candidates in one forward
            (`mtp.decoding.tree`): "auto" (built for `tree_size` nodes from the accuracy per candidate rank
            `mtp train` measured, in the model folder's eval.json), "dynamic" (`tree_size` nodes shaped every
            step from the drafts' probabilities, EAGLE-2), "chain" (the default), a DraftTree, a JSON list of
            paths or a .json file of one. Greedy output stays identical; sampling stays exact.
        lookup: speculative: also verify up to this many tokens copied from earlier in each row's sequence
            (prompt lookup, `mtp.decoding.lookup`), as one more branch of the draft tree; 0: none.
    """
    if strategy not in STRATEGIES:
        raise MTPError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if use_speculative is not None:
        strategy = "speculative" if use_speculative else "greedy"
    input_ids, attention_mask = token_batch(model, input_ids, attention_mask, left_padded=True)
    if max_new_tokens < 0:
        raise MTPError("max_new_tokens must be >= 0")
    check_values({"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "tau": tau,
                  "k": k, "num_draft": num_draft, "strategy": strategy, "tree": tree, "tree_size": tree_size,
                  "lookup": lookup}, flags=False)
    if do_sample and strategy not in ("greedy", "speculative"):
        raise MTPError("sampling (do_sample) is available with the greedy and speculative strategies")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    opts = DecodeOptions(strategy, max_new_tokens, do_sample, temperature, top_k, top_p, tau, k, num_draft,
                         adaptive_draft, model_tree(model, tree, tree_size, num_draft, k), lookup)
    drafter = model.drafter(opts, proposer=proposer) if proposer is not None else model.drafter(opts)
    input_ids, attention_mask = _fit_context(model, input_ids, attention_mask, opts, drafter.lookahead,
                                             truncate_prompt)
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(model, tokenizer)
    stop = StopChecker(input_ids.shape[0], stop_token_ids, stop_strings, tokenizer, device=input_ids.device)
    generator = None
    if do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stats = GenerationStats()
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    start = time.perf_counter()
    for row, new in iter_generate(model, input_ids, attention_mask, opts=opts, stop=stop, generator=generator,
                                  stats=stats, drafter=drafter, on_trunk=on_trunk):
        tokens[row].extend(new)
        if streamer is not None:
            streamer(row, new)
    stats.seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens] if tokenizer is not None else None
    if texts is not None and stop_strings:
        texts = [stop.truncate_text(t) for t in texts]
    return GenerationResult(tokens, stats, texts)


def model_tree(model, tree, tree_size: int | None, num_draft: int | None,
               k: int | None = None) -> DraftTree | DynamicTree | None:
    """The draft tree `generate(tree=..., tree_size=...)` asks for, for this model (None: a chain). That a tree
    comes with the speculative strategy is a rule of `mtp.arguments.RELATIONS`, checked by `generate`."""
    if tree is None and tree_size is None:
        return None
    if getattr(model, "mask_token_id", None) is not None:  # k-1 masks draft k-1 tokens ahead
        depth = (k if k is not None else model.default_k) - 1
    else:
        depth = model.num_heads - 1
    depth = depth if num_draft is None else min(depth, num_draft)
    folder = getattr(getattr(model, "source", None), "location", None)
    return resolve_tree("auto" if tree is None else tree, tree_size, depth, folder)


def _fit_context(model, input_ids, attention_mask, opts: DecodeOptions, lookahead: int, truncate_prompt: bool):
    limit = context_limit(model)
    if limit is None:
        return input_ids, attention_mask
    need = input_ids.shape[1] + opts.max_new_tokens + lookahead
    if need <= limit:
        return input_ids, attention_mask
    if not truncate_prompt:
        raise MTPError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {opts.max_new_tokens} exceeds the "
                       f"model's context of {limit} tokens (shorten it, or keep its last tokens: "
                       "truncate_prompt=True, --truncate-prompt)")
    keep = limit - (need - input_ids.shape[1])
    if keep <= 0:
        raise MTPError(f"max_new_tokens {opts.max_new_tokens} does not fit the model's context of {limit}")
    mask = attention_mask[:, -keep:] if attention_mask is not None else None
    return input_ids[:, -keep:], mask


def context_limit(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
