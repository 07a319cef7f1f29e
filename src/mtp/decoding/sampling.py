"""Turning logits into tokens: temperature / top-k / top-p, and the speculative-sampling acceptance rule.

Speculative sampling keeps the target distribution exactly (Leviathan et al. 2023; Chen et al. 2023): a draft
token x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection the token is drawn from
normalize(max(p - q, 0)). With a greedy (deterministic) draft, q is one-hot.
"""

from __future__ import annotations

import torch

# `DecodeState.sampling`'s columns, one row per batch row: each row's temperature (0: the row decodes greedily, in a
# batch whose other rows sample), top-k (0: none), top-p (1: none), min-p (0: none)
SAMPLING_COLUMNS = 4


def process_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                   top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                   most_k: int = 0) -> torch.Tensor:
    """Probabilities after temperature, top-k, nucleus and min-p filtering, in transformers' order. `logits`:
    (..., V) -> (..., V). Each setting is one number, or a tensor of one per row that broadcasts against
    `logits[..., :1]` (a batch whose rows ask for different ones: `row_probs`); a row's neutral value (top-k 0,
    top-p 1, min-p 0) leaves its distribution as it is. `most_k`: the largest top-k a row's tensor holds (0: the
    vocabulary's size; a whole sort of the vocabulary costs a CPU ~30 times a top 50's)."""
    if isinstance(temperature, torch.Tensor):
        logits = logits.float() / temperature.clamp_min(1e-6)
    else:
        logits = logits.float() / max(temperature, 1e-6)
    vocab = logits.shape[-1]
    if isinstance(top_k, torch.Tensor):  # each row's k-th largest logit (k 0: none, which drops nothing)
        most = min(most_k or vocab, vocab)
        k = top_k.long().clamp(0, most)
        top = torch.topk(logits, most, dim=-1).values  # (..., most)
        kth = top.gather(-1, (k - 1).clamp_min(0).expand(*logits.shape[:-1], 1))  # (..., 1)
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    elif top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        probs = _renormalized(probs, _outside_nucleus(probs, top_p),
                              top_p < 1.0 if isinstance(top_p, torch.Tensor) else None)
    if isinstance(min_p, torch.Tensor) or min_p > 0.0:  # drop tokens less likely than min_p times the most likely
        drop = probs < min_p * probs.amax(-1, keepdim=True)
        probs = _renormalized(probs, drop, min_p > 0.0 if isinstance(min_p, torch.Tensor) else None)
    return probs


# On a CPU the nucleus is first looked for among this many most likely tokens (a whole sort of a 49k vocabulary
# costs ~4 ms a row there, its top 256 ~0.2 ms)
NUCLEUS_HEAD = 256


def _outside_nucleus(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """(..., V) bool: the tokens top-p drops, each whose mass strictly before it (most likely first) already
    reaches top_p (the top token always stays). On a CPU, eagerly, a row whose most likely NUCLEUS_HEAD tokens hold
    top_p sorts only them (`topk`): the mass before every token after them is at least theirs, and their running
    sums are the same numbers a whole sort's begin with, so the same tokens are dropped; the other rows sort the
    whole vocabulary, as every row does on a GPU (where a step reads nothing back, and a sort is cheap)."""
    vocab = probs.shape[-1]
    if probs.device.type != "cpu" or vocab <= NUCLEUS_HEAD or torch.compiler.is_compiling():
        return _sorted_outside_nucleus(probs, top_p)
    rows = probs.reshape(-1, vocab)  # (N, V)
    limit = (top_p if isinstance(top_p, torch.Tensor) else torch.tensor(top_p)).expand(*probs.shape[:-1], 1)
    limit = limit.reshape(-1, 1)  # (N, 1)
    head, order = rows.topk(NUCLEUS_HEAD, dim=-1)  # (N, H), most likely first
    running = head.cumsum(-1)
    drop = torch.ones_like(rows, dtype=torch.bool).scatter(-1, order, (running - head) >= limit)
    wide = (running[:, -1:] < limit).squeeze(-1).nonzero().squeeze(-1)  # rows whose nucleus goes past the head
    if len(wide):
        drop[wide] = _sorted_outside_nucleus(rows[wide], limit[wide])
    return drop.view(probs.shape)


def _sorted_outside_nucleus(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    return drop_sorted.scatter(-1, order, drop_sorted)


def _renormalized(probs: torch.Tensor, drop: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`probs` without the dropped tokens, summing to 1 again; `rows`: only those rows' (the others as they were,
    not divided by a sum that rounds near 1)."""
    kept = probs.masked_fill(drop, 0.0)
    kept = kept / kept.sum(-1, keepdim=True)
    return kept if rows is None else torch.where(rows, kept, probs)


def row_probs(logits: torch.Tensor, settings: torch.Tensor, opts) -> torch.Tensor:
    """`process_logits` of (B, ..., V) logits with each row's settings (B, SAMPLING_COLUMNS); a filter runs where
    `opts` (the batch's `DecodeOptions`) says some row asks for it: its top_k > 0 (the largest k of the rows),
    top_p < 1, min_p > 0."""
    column = settings.view(settings.shape[0], *[1] * (logits.dim() - 1), SAMPLING_COLUMNS).unbind(-1)
    return process_logits(logits, column[0], column[1] if opts.top_k else 0, column[2] if opts.top_p < 1 else 1.0,
                          column[3] if opts.min_p > 0 else 0.0, most_k=opts.top_k)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (..., V) -> (...), with no host read (a CUDA graph can replay it): the index
    of the largest p_i / E_i over independent E_i ~ Exponential(1) is i with probability p_i (the exponential race,
    gpt-fast's `multinomial_sample_one_no_sync`)."""
    return race(probs, generator).argmax(-1)


def race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """p_i / E_i (..., V) for independent E_i ~ Exponential(1): its argmax is a draw of `probs` (`sample`), and its
    largest outside any fixed set of tokens a draw of `probs` restricted to the rest."""
    return probs.float() / torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)


def accept_drafts_sampling(target_probs: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over a block. Returns (accepted count a (B,), next token (B,)).

    target_probs: (B, d+1, V) the model's distribution after each prefix of the block;
    drafts: (B, d) proposed tokens; draft_probs: (B, d, V) the distributions they were drawn from (None: each
    draft one-hot, a custom proposer's: q is 1 at the draft).
    """
    b, d = drafts.shape
    if d == 0:
        return drafts.new_zeros(b), sample(target_probs[:, 0], generator)
    p_x = target_probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)  # (B, d)
    q_x = draft_probs.gather(-1, drafts[..., None]).squeeze(-1) if draft_probs is not None else torch.ones_like(p_x)
    u = torch.rand(p_x.shape, generator=generator, device=p_x.device)
    accepted = u * q_x < p_x  # u < p/q without dividing by a zero q
    a = accepted.long().cumprod(-1).sum(-1)  # (B,)
    rows = torch.arange(b, device=drafts.device)
    p_next = target_probs[rows, a]  # (B, V)
    if draft_probs is None:  # the refused draft's one-hot (zeros if all kept)
        refused = torch.cat([drafts, drafts[:, :1]], 1)[rows, a]  # (B,)
        q_next = torch.zeros_like(p_next).scatter_(1, refused[:, None], (a < d).to(p_next.dtype)[:, None])
    else:
        q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, a]  # (B, V); zeros if all kept
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass; rejection then had probability 0 in exact arithmetic, so p is the answer.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return a, sample(residual, generator)
