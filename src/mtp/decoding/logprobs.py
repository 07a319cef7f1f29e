"""Log-probabilities of the tokens a decoding emits (OpenAI's `logprobs`) and of a prompt's tokens (`echo`).

A verifying step (greedy, speculative) already holds the model's own next-token logits at every slot of its
block; an emitted token's log-probability is read from the logits of the slot before it on the kept path (the
root for the first token, then each kept draft). The step computes them on the device and packs them into its
one host copy (`StepResult.host`) as the bits of float32 numbers, after the emitted tokens:

    [counts ... | E emitted tokens | E log-probabilities | E x k alternatives' ids | E x k their log-probabilities]

and the host unpacks a row's with `unpack`. The numbers are the model's raw distribution (before temperature,
top-k and top-p), so speculative decoding reports what greedy decoding does for the same tokens. ConfAdapt and
static k have none: they emit the heads' tokens, which the model never scored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from mtp.errors import MTPError

MOST_ALTERNATIVES = 20  # what OpenAI's chat API allows (`top_logprobs`)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # log p(token | the tokens before it), the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at that position and theirs, most likely first


def columns_per_token(top: int | None) -> int:
    """Host columns an emitted token takes: itself, and with log-probabilities its own and k alternatives'."""
    return 1 if top is None else 2 + 2 * top


def pack(logits: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """logits (B, T, V) at a block's slots; slots (B, E) the slot whose logits scored each emitted token; tokens
    (B, E) -> (B, E * (1 + 2 top)) long: each token's log-probability, the `top` most likely tokens' ids and
    theirs (float32 bits, so that they travel in the step's one long host copy)."""
    at = logits[torch.arange(slots.shape[0], device=slots.device)[:, None], slots]  # (B, E, V)
    logp = at.float().log_softmax(-1)
    chosen = logp.gather(2, tokens[:, :, None])[:, :, 0]  # (B, E)
    if not top:
        return _bits(chosen)
    values, ids = logp.topk(top, -1)  # (B, E, k)
    return torch.cat([_bits(chosen), ids.flatten(1), _bits(values.flatten(1))], 1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).long()


def unpack(values: list[int], tokens: list[int], width: int, top: int) -> list[TokenLogprob]:
    """One row's packed columns (those after its `width` emitted tokens) -> a TokenLogprob per token of `tokens`
    (its first emitted tokens)."""
    n = len(tokens)
    chosen = _floats(values[:n])
    if not top:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
    ids = values[width: width + width * top]
    logps = _floats(values[width + width * top: width + 2 * width * top])
    return [TokenLogprob(t, lp, tuple(zip(ids[i * top:(i + 1) * top], logps[i * top:(i + 1) * top], strict=True)))
            for i, (t, lp) in enumerate(zip(tokens, chosen, strict=True))]


def _floats(bits: list[int]) -> list[float]:
    return list(struct.unpack(f"{len(bits)}f", struct.pack(f"{len(bits)}i", *bits)))


SCORED_TOKENS = 16384  # tokens a scoring forward takes at most (rows x width; a longer row goes alone)
UNEMBEDDED_ROWS = 1024  # positions unembedded at once: (rows, V) fp32 logits, 200 MB for a 49k vocabulary


@dataclass
class RowScores:
    """Scores of a row's tokens from some index on, each given the tokens before it (next-token head)."""

    logprobs: torch.Tensor  # (n,) float32: each token's log-probability
    greedy: torch.Tensor  # (n,) bool: whether it is the most likely token there
    top_ids: torch.Tensor  # (n, k) the k most likely tokens there (k 0: none asked for)
    top_logprobs: torch.Tensor  # (n, k) theirs


@torch.inference_mode()
def score_rows(model, rows: list[list[int]], starts: list[int], top: int = 0,
               max_tokens: int = SCORED_TOKENS) -> list[RowScores]:
    """Each row's tokens from index starts[i] >= 1 on, scored by the next-token head given the tokens before them:
    lm-eval's loglikelihood (a continuation after its context) and OpenAI's echo (a prompt's tokens from the
    second). Rows are right-padded into forwards of at most `max_tokens` tokens (the real positions never see the
    padding: attention is causal), and only the positions that score a token are unembedded, a slice at a time: a
    batch of long rows never holds (B, T, V) logits. Scores are on the CPU."""
    if any(not 1 <= s <= len(r) for r, s in zip(rows, starts, strict=True)):
        raise ValueError("a row's scored tokens start at index 1 or later, and at most at its length")
    out: list[RowScores | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # (similar lengths together: less padding)
    while order:
        width = len(rows[order[0]]) - 1  # (the last token is scored, never read)
        take = max(1, min(len(order), max_tokens // max(width, 1)))
        group, order = order[:take], order[take:]
        if all(len(rows[i]) == starts[i] for i in group):  # (rows with nothing to score)
            for i in group:
                out[i] = RowScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool),
                                   torch.zeros(0, top, dtype=torch.long), torch.zeros(0, top))
            continue
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(group):
            ids[j, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1], dtype=torch.long)
            mask[j, :len(rows[i]) - 1] = 1
        hidden = model.next_token_hidden(ids.to(model.device), mask.to(model.device))  # (b, width, H)
        # position p scores token p + 1: a row's starts[i] - 1 .. len - 2
        row_of = torch.cat([torch.full((len(rows[i]) - starts[i],), j) for j, i in enumerate(group)])
        pos_of = torch.cat([torch.arange(starts[i] - 1, len(rows[i]) - 1) for i in group])
        target = torch.cat([torch.tensor(rows[i][starts[i]:], dtype=torch.long) for i in group])
        pieces = [_score_positions(model, hidden[row_of[a:a + UNEMBEDDED_ROWS].to(hidden.device),
                                                 pos_of[a:a + UNEMBEDDED_ROWS].to(hidden.device)],
                                   target[a:a + UNEMBEDDED_ROWS].to(hidden.device), top)
                  for a in range(0, len(target), UNEMBEDDED_ROWS)]
        chosen, greedy, top_ids, top_values = (torch.cat(parts) for parts in zip(*pieces, strict=True))
        a = 0
        for i in group:
            n = len(rows[i]) - starts[i]
            out[i] = RowScores(chosen[a:a + n], greedy[a:a + n], top_ids[a:a + n], top_values[a:a + n])
            a += n
    return out  # type: ignore[return-value]


def _score_positions(model, hidden: torch.Tensor, target: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """hidden (N, H) at the positions before the tokens `target` (N,) -> their log-probabilities, whether each is
    the argmax, and the `top` most likely tokens with theirs, on the CPU."""
    logits = model.lm_head(hidden).float()  # (N, V)
    if not bool(logits.amax() < float("inf")):  # NaN or +inf (`mtp.decoding.step.damaged_rows`' test)
        raise MTPError("the model computed NaN or infinite logits (damaged weights, or a dtype that overflows for "
                       "this model)")
    logp = logits.log_softmax(-1)
    chosen = logp.gather(1, target[:, None])[:, 0]
    greedy = logits.argmax(-1) == target
    values, ids = logp.topk(top, -1) if top else (logp[:, :0], target[:, None][:, :0])
    return chosen.cpu(), greedy.cpu(), ids.cpu(), values.cpu()


def prompts_logprobs(model, prompts: list[list[int]], top: int = 0) -> list[list[TokenLogprob | None]]:
    """Each prompt token's log-probability given the tokens before it, from the next-token head (None for the
    first, which nothing scores), with the `top` most likely tokens at each position: what OpenAI's `echo` with
    `logprobs` returns. The prompts are scored together (`score_rows`)."""
    scored = [p for p in prompts if len(p) >= 2]
    rows = iter(score_rows(model, scored, [1] * len(scored), top))
    return [[None] * len(p) if len(p) < 2 else _token_logprobs(p, next(rows)) for p in prompts]


def _token_logprobs(prompt: list[int], scores: RowScores) -> list[TokenLogprob | None]:
    alternatives = [()] * len(prompt[1:])
    if scores.top_ids.shape[1]:
        alternatives = [tuple(zip(i, v, strict=True))
                        for i, v in zip(scores.top_ids.tolist(), scores.top_logprobs.tolist(), strict=True)]
    return [None] + [TokenLogprob(t, lp, alt) for t, lp, alt in zip(prompt[1:], scores.logprobs.tolist(),
                                                                    alternatives, strict=True)]


def prompt_logprobs(model, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
    """`prompts_logprobs` of one prompt."""
    return prompts_logprobs(model, [ids], top)[0]
