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
from mtp.decoding.inputs import token_batch
from mtp.decoding.sampling import accept_drafts_sampling, process_logits, sample
from mtp.decoding.stopping import StopChecker
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


# ------------------------------------------------------------------------------------------------ model steps
def forward_block(model, block: torch.Tensor, block_valid: torch.Tensor | None, cache, num_heads: int):
    """Feed `block` (B, T) through trunk and heads 0..num_heads-1. Returns the heads' normed hidden states
    (B, T, heads, H) and the trunk output (B, T, H)."""
    trunk, ctx = model.trunk_forward(block, block_valid, cache)
    hidden = torch.stack([model.head_forward(j, trunk, ctx) for j in range(num_heads)], dim=2)
    model.finish_block(ctx)
    return hidden, trunk  # (B, T, heads, H), (B, T, H)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden).float()


def greedy_accept(logits0: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts equal to the model's own argmax, and the model's next token after it.

    logits0: (B, d+1, V) head-0 logits after each prefix of [last, d_1..d_d]; drafts: (B, d).
    """
    target = logits0.argmax(-1)  # (B, d+1)
    a = (drafts == target[:, :-1]).long().cumprod(-1).sum(-1)  # (B,)
    return a, target.gather(1, a[:, None]).squeeze(1)


@dataclass
class DraftRequest:
    """What a proposer may look at: heads' hidden states at the last accepted position, and where rows stand."""

    model: object
    hidden_at: torch.Tensor  # (B, d, H) heads 1..d at the position of the last accepted token
    rows: torch.Tensor  # (B,) original row index of each active row
    produced: torch.Tensor  # (B,) tokens emitted so far (the last one is not yet fed to the model)
    opts: DecodeOptions
    generator: torch.Generator | None


Proposer = Callable[[DraftRequest], tuple[torch.Tensor, "torch.Tensor | None"]]
# Called after every forward with (rows, trunk output (B, T, H), kept (B, T) bool): `rows` are the original row
# indices, `kept` marks the positions that hold a token of the row's sequence (not left padding, not a rejected
# draft). A row's kept positions, in call order, run along its sequence: the prompt, then the emitted tokens as
# they are fed back (the tokens emitted by the last forward never are; after a stop token a few more may follow).
TrunkObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def heads_proposer(req: DraftRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    return propose(req.model, req.hidden_at, req.opts, req.generator)


def propose(model, hidden_at: torch.Tensor, opts: DecodeOptions, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft tokens from heads 1..d. hidden_at: (B, d, H) -> drafts (B, d) and their distributions if sampling."""
    if hidden_at.shape[1] == 0:
        return hidden_at.new_zeros(hidden_at.shape[:2], dtype=torch.long), None
    if not opts.do_sample and model.draft_vocab is not None:  # score only the K draft tokens
        return model.draft_vocab[model.draft_logits(hidden_at).argmax(-1)], None  # (B, d)
    logits = model.restrict_to_draft_vocab(head_logits(model, hidden_at))  # (B, d, V)
    if not opts.do_sample:
        return logits.argmax(-1), None
    probs = process_logits(logits, opts.temperature, opts.top_k, opts.top_p)
    return sample(probs, generator), probs


class DraftLength:
    """How many of the heads' drafts to verify next step, from how often each draft position was accepted.

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
                  stats: GenerationStats | None = None, proposer: Proposer = heads_proposer,
                  on_trunk: TrunkObserver | None = None) -> Iterator[tuple[int, list[int]]]:
    """Yield (row index, newly emitted tokens) as decoding proceeds. See `generate` for the arguments.

    `proposer` makes the drafts of the speculative strategy (default: the model's own heads); any draft source
    keeps the output lossless, only the acceptance changes. `on_trunk` sees the trunk output of every forward
    (see `TrunkObserver`).
    """
    stats = stats if stats is not None else GenerationStats()
    b, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    n_heads, n_draft, block_cap = _plan(model, opts)
    stats.draft_positions = [0] * n_draft
    stats.draft_accepted = [0] * n_draft
    if opts.max_new_tokens <= 0:
        return
    max_len = prompt_len + opts.max_new_tokens + block_cap + 1
    cache = model.new_cache(b, max_len)
    rows = torch.arange(b, device=device)  # original row index of each active row
    produced = torch.zeros(b, dtype=torch.long, device=device)
    budget = opts.max_new_tokens
    draft_length = DraftLength(n_draft, opts.adaptive_draft)

    # prefill: the prompt through trunk and every head used; hidden states at the last position.
    hidden, trunk = forward_block(model, input_ids, attention_mask, cache, n_heads)
    if on_trunk is not None:
        on_trunk(rows, trunk, attention_mask)
    hidden = hidden[:, -1]  # (B, heads, H)
    stats.forward_passes += 1
    stats.row_forwards += b

    if opts.strategy in ("greedy", "speculative"):
        logits0 = head_logits(model, hidden[:, 0])  # (B, V)
        if opts.do_sample:
            last = sample(process_logits(logits0, opts.temperature, opts.top_k, opts.top_p), generator)
        else:
            last = logits0.argmax(-1)  # (B,)
        drafts, draft_probs = proposer(DraftRequest(model, hidden[:, 1:], rows, produced + 1, opts, generator))
        emitted = last[:, None]  # (B, 1)
        counts = torch.ones(b, dtype=torch.long, device=device)
    else:
        emitted, counts = _confident_run(model, hidden, opts)

    while True:
        counts = torch.minimum(counts, budget - produced)
        counts, finished = stop.apply(rows, emitted, counts, produced)
        produced += counts
        finished |= produced >= budget
        stats.new_tokens += int(counts.sum())
        emitted_cpu, counts_cpu = emitted.tolist(), counts.tolist()  # one transfer per step, not per token
        for i, row in enumerate(rows.tolist()):
            if counts_cpu[i]:
                yield row, emitted_cpu[i][: counts_cpu[i]]
        if bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            rows, produced = rows[keep], produced[keep]
            cache.select_rows(keep)
            emitted, counts = emitted[keep], counts[keep]
            if opts.strategy in ("greedy", "speculative"):
                last, drafts = last[keep], drafts[keep]
                draft_probs = draft_probs[keep] if draft_probs is not None else None

        stats.forward_passes += 1
        stats.row_forwards += rows.numel()
        if opts.strategy in ("greedy", "speculative"):
            d = draft_length.next()
            drafts = drafts[:, :d]
            draft_probs = draft_probs[:, :d] if draft_probs is not None else None
            block = torch.cat([last[:, None], drafts], 1)  # (B, 1+d)
            hidden, trunk = forward_block(model, block, None, cache, n_heads)  # (B, 1+d, heads, H)
            logits0 = head_logits(model, hidden[:, :, 0])  # (B, 1+d, V)
            if opts.do_sample:
                probs = process_logits(logits0, opts.temperature, opts.top_k, opts.top_p)
                a, last = accept_drafts_sampling(probs, drafts, draft_probs, generator)
            else:
                a, last = greedy_accept(logits0, drafts)
            if d:
                cache.rollback(1 + d, a + 1)
                kept = accepted_per_position(a, d)
                _count_acceptance(stats, kept, a.numel())
                draft_length.update(kept, a.numel())
            # Emitted this step: the accepted drafts, then the model's own next token.
            emitted = torch.cat([drafts, torch.zeros_like(last[:, None])], 1)  # (B, 1+d)
            emitted.scatter_(1, a[:, None], last[:, None])
            counts = a + 1
            if on_trunk is not None:  # the last token and the accepted drafts were fed; rejected ones were not
                on_trunk(rows, trunk, torch.arange(1 + d, device=device)[None, :] < counts[:, None])
            hidden_at = hidden[torch.arange(rows.numel(), device=device), a, 1:]  # (B, d, H)
            drafts, draft_probs = proposer(DraftRequest(model, hidden_at, rows, produced + counts, opts, generator))
        else:
            # Feed what the heads emitted last step (right-aligned; shorter rows padded on the left).
            width = int(counts.max())
            offsets = torch.arange(width, device=device)
            pad = width - counts  # (B,)
            valid = offsets[None, :] >= pad[:, None]  # (B, width)
            src = (offsets[None, :] - pad[:, None]).clamp_min(0)
            block = emitted.gather(1, src).masked_fill(~valid, 0)  # (B, width)
            hidden, trunk = forward_block(model, block, valid, cache, n_heads)
            if on_trunk is not None:
                on_trunk(rows, trunk, valid)
            hidden = hidden[:, -1]  # (B, heads, H)
            emitted, counts = _confident_run(model, hidden, opts)


def _plan(model, opts: DecodeOptions) -> tuple[int, int, int]:
    """(heads to run, draft tokens per verify step, widest block fed)."""
    n = model.num_heads
    if opts.strategy == "greedy":
        return 1, 0, 1
    if opts.strategy == "speculative":
        d = n - 1 if opts.num_draft is None else opts.num_draft
        if not 0 <= d <= n - 1:
            raise MTPError(f"num_draft must be in [0, {n - 1}] for a {n}-head model, got {d}")
        return 1 + d, d, 1 + d
    if opts.strategy == "confadapt":
        return n, 0, n
    if opts.strategy == "static":
        k = n if opts.k is None else opts.k
        if not 1 <= k <= n:
            raise MTPError(f"static k must be in [1, {n}] for a {n}-head model, got {k}")
        return k, 0, k
    raise MTPError(f"unknown strategy {opts.strategy!r}; choose from {', '.join(STRATEGIES)}")


def _confident_run(model, hidden: torch.Tensor, opts: DecodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """ConfAdapt / static: tokens (B, heads) of every head at the last position and how many to emit (B,)."""
    logits = head_logits(model, hidden)  # (B, heads, V)
    if model.draft_vocab is not None:  # head 0 keeps the whole vocabulary
        logits = torch.cat([logits[:, :1], model.restrict_to_draft_vocab(logits[:, 1:])], 1)
    probs = torch.softmax(logits, -1)
    top_p, top_tok = probs.max(-1)  # (B, heads)
    if opts.strategy == "static":
        counts = torch.full_like(top_tok[:, 0], top_tok.shape[1])
    else:
        counts = (top_p >= opts.tau).long().cumprod(-1).sum(-1).clamp_min(1)  # at least one token
    return top_tok, counts


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
             on_trunk: TrunkObserver | None = None) -> GenerationResult:
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
        proposer: the speculative strategy's draft source (default: the model's heads).
        num_draft: drafts per verify step at most (default: every extra head).
        adaptive_draft: verify fewer drafts while recent ones were rarely accepted (`DraftLength`); False: always
            `num_draft`. Either way the output is the same, only the speed differs.
        on_trunk: called with the trunk output of every forward (`TrunkObserver`), e.g. to keep the frozen-trunk
            features of self-distilled training rows instead of recomputing them.
    """
    if use_speculative is not None:
        strategy = "speculative" if use_speculative else "greedy"
    input_ids, attention_mask = token_batch(model, input_ids, attention_mask, left_padded=True)
    if max_new_tokens < 0:
        raise MTPError("max_new_tokens must be >= 0")
    check_values({"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "tau": tau,
                  "k": k, "num_draft": num_draft}, flags=False)
    if do_sample and strategy not in ("greedy", "speculative"):
        raise MTPError("sampling (do_sample) is available with the greedy and speculative strategies")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    opts = DecodeOptions(strategy, max_new_tokens, do_sample, temperature, top_k, top_p, tau, k, num_draft,
                         adaptive_draft)
    input_ids, attention_mask = _fit_context(model, input_ids, attention_mask, opts, truncate_prompt)
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
                                  stats=stats, proposer=proposer or heads_proposer, on_trunk=on_trunk):
        tokens[row].extend(new)
        if streamer is not None:
            streamer(row, new)
    stats.seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens] if tokenizer is not None else None
    if texts is not None and stop_strings:
        texts = [stop.truncate_text(t) for t in texts]
    return GenerationResult(tokens, stats, texts)


def _fit_context(model, input_ids, attention_mask, opts: DecodeOptions, truncate_prompt: bool):
    limit = context_limit(model)
    if limit is None:
        return input_ids, attention_mask
    need = input_ids.shape[1] + opts.max_new_tokens + (_plan(model, opts)[2] - 1)
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


def left_pad(rows, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch of token lists, as `generate` takes them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


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
