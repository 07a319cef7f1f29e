"""Turning logits into tokens: temperature / top-k / top-p, and the speculative-sampling acceptance rule.

Speculative sampling keeps the target distribution exactly (Leviathan et al. 2023; Chen et al. 2023): a draft
token x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection the token is drawn from
normalize(max(p - q, 0)). With a greedy (deterministic) draft, q is one-hot.
"""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> torch.Tensor:
    """Probabilities after temperature, top-k, nucleus and min-p filtering, in transformers' order. `logits`:
    (..., V) -> (..., V)."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0.0:  # drop tokens less likely than min_p times the most likely one
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (..., V) -> (...), with no host read (a CUDA graph can replay it): the index
    of the largest p_i / E_i over independent E_i ~ Exponential(1) is i with probability p_i (the exponential race,
    gpt-fast's `multinomial_sample_one_no_sync`)."""
    race = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    return (probs.float() / race).argmax(-1)


def accept_drafts_sampling(target_probs: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over a block. Returns (accepted count a (B,), next token (B,)).

    target_probs: (B, d+1, V) the model's distribution after each prefix of the block;
    drafts: (B, d) proposed tokens; draft_probs: (B, d, V) the distributions they were drawn from.
    """
    b, d = drafts.shape
    if d == 0:
        return drafts.new_zeros(b), sample(target_probs[:, 0], generator)
    p_x = target_probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)  # (B, d)
    q_x = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)  # (B, d)
    u = torch.rand(p_x.shape, generator=generator, device=p_x.device)
    accepted = u * q_x < p_x  # u < p/q without dividing by a zero q
    a = accepted.long().cumprod(-1).sum(-1)  # (B,)
    rows = torch.arange(b, device=drafts.device)
    p_next = target_probs[rows, a]  # (B, V)
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, a]  # (B, V); zeros if all kept
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass; rejection then had probability 0 in exact arithmetic, so p is the answer.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return a, sample(residual, generator)
