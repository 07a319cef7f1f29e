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


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it, from the next-token head (None for the
    first, which nothing scores): what OpenAI's `echo` with `logprobs` returns, and what scoring a continuation
    (lm-eval's loglikelihood) reads."""
    if len(ids) < 2:
        return [None] * len(ids)
    tokens = torch.tensor([ids], device=model.device)
    logits = model(tokens)[0, :-1, 0]  # (P - 1, V): position i scores token i + 1
    if not bool(logits.amax() < float("inf")):  # NaN or +inf (`mtp.decoding.step.damaged_rows`' test)
        raise MTPError("the model computed NaN or infinite logits (damaged weights, or a dtype that overflows for "
                       "this model)")
    logp = logits.float().log_softmax(-1)
    target = tokens[0, 1:]
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    alternatives = [()] * len(chosen)
    if top:
        values, index = logp.topk(top, -1)
        alternatives = [tuple(zip(i, v, strict=True)) for i, v in zip(index.tolist(), values.tolist(), strict=True)]
    return [None] + [TokenLogprob(t, lp, alt) for t, lp, alt in zip(ids[1:], chosen, alternatives, strict=True)]
