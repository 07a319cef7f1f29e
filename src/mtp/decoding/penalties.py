"""Penalties on the tokens a sequence already has, and biases of given tokens, as transformers, OpenAI's API and
vLLM apply them to the logits before temperature, top-k and top-p:

- `bias` (OpenAI's `logit_bias`): added to the given tokens' logits first (-100 bans a token, 100 all but forces it);
- `repetition` (transformers' `repetition_penalty`, CTRL's): the logit of every token the prompt or the answer so
  far holds is divided by it where positive, multiplied where negative (1: none; above 1: less repetition);
- `presence` (OpenAI's `presence_penalty`): subtracted from the logit of every token the answer holds;
- `frequency` (OpenAI's `frequency_penalty`): subtracted once for every time the answer holds the token;
- `min_new_tokens` (transformers' `min_new_tokens`, vLLM's `min_tokens`): the end tokens are banned until the answer
  has that many tokens.

Speculative decoding keeps them exact: the logits at a verify block's slot are penalized for the sequence that
slot continues, the answer so far plus the drafts on its path (a chain's earlier drafts, a tree node's
ancestors), so greedy verification emits what penalized greedy decoding emits and sampling keeps the penalized
distribution. Everything lives in the decoding state, one row per batch row (`DecodeState.penalties`,
`.logit_bias`, `.counts`, `.seen`): the values, the biases, each token's count in the answer and whether the
sequence holds it, updated by every step on the device.
Nothing is read on the host, and the values are tensors, not constants of a captured step: a CUDA graph captured
for one request's penalties replays for another's.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mtp.errors import MTPError


@dataclass(frozen=True)
class Penalties:
    """The values a call decodes with (host side: checked, then turned into state tensors by `prompt_state`)."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit), by token
    min_new_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0 or bool(self.bias) or \
            self.min_new_tokens > 0

    def apply(self, logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, stop_ids=(),
              produced: int = 0) -> torch.Tensor:
        """`logits` (V,) biased and penalized, given the answer's count of each token (V,), whether the sequence
        holds it (V,) bool, the end tokens and the answer's length: the slow reference's way
        (`mtp.decoding.reference`)."""
        values = torch.tensor([self.repetition, self.presence, self.frequency], device=logits.device)
        logits = penalize(logits.float() + self.bias_vector(logits.shape[-1], logits.device), counts, seen, values)
        if produced < self.min_new_tokens and len(stop_ids):
            logits = logits.index_fill(-1, torch.tensor(list(stop_ids), device=logits.device), float("-inf"))
        return logits

    def bias_vector(self, vocab: int, device) -> torch.Tensor:
        vector = torch.zeros(vocab, dtype=torch.float32)
        for token, value in self.bias:
            vector[token] = value
        return vector.to(device)

    def row(self) -> list[float]:
        """The row of `DecodeState.penalties`: repetition, presence, frequency, min_new_tokens."""
        return [self.repetition, self.presence, self.frequency, float(self.min_new_tokens)]


def prompt_state(rows: list[Penalties], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoding state's tensors before the first step of left-padded prompts (B, P), each row with its own
    penalties `rows[b]` (`DecodeState.penalties`, `.logit_bias`, `.counts`, `.seen`): the values (B, 4:
    repetition, presence, frequency, min_new_tokens), the biases (B, V), nothing counted in the answer (B, V), each
    prompt's tokens held (B, V) bool (padding left out)."""
    b, device = input_ids.shape[0], input_ids.device
    held = torch.zeros(b, vocab, dtype=torch.int32, device=device)
    held.scatter_add_(1, input_ids, attention_mask.to(torch.int32))
    values = torch.tensor([p.row() for p in rows], dtype=torch.float32, device=device)
    bias = torch.stack([p.bias_vector(vocab, "cpu") for p in rows]).to(device)
    return values, bias, torch.zeros(b, vocab, device=device), held > 0


def penalize(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`logits` (..., V) penalized, given the answer's count of each token (..., V), whether the sequence holds
    it (..., V) bool, and the (..., 3+) repetition, presence and frequency penalties (all broadcast)."""
    repetition, presence, frequency = (values[..., i : i + 1] for i in range(3))
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def block_paths(layout, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a verify block of the root and N drafts laid out as `layout` (a `TreeLayout`; None: a chain): which
    drafts are on each slot's path, (1+N, N) bool ([j, i]: draft i), and how many (1+N,) long."""
    if layout is None:  # a chain: draft i is on the path of slots i+1 .. N
        slots = torch.arange(n + 1, device=device)
        return slots[:, None] > slots[None, :n], slots
    ancestors = layout.ancestors  # (N, N): a node and its ancestors; the root's slot has none
    return torch.cat([ancestors.new_zeros(1, n), ancestors]), layout.slot_depth


def on_block(logits: torch.Tensor, drafts: torch.Tensor, layout, values: torch.Tensor, bias: torch.Tensor,
             counts: torch.Tensor, seen: torch.Tensor, produced: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """A verify block's logits (B, 1+N, V) at the root and at each of N drafts (B, N), laid out as `layout` (a
    `TreeLayout`, None: a chain), biased (B, V) and penalized (`values` (B, 4)) for the sequence each slot
    continues: the answer so far (`counts`, `seen`: (B, V)) plus the drafts on its path (`block_paths`); the end
    tokens `stop_ids` (S,) banned at the slots whose token would come before min_new_tokens: the answer's
    `produced` (B,) plus the slot's drafts before it.

    Slot j differs from the answer's counts only at the tokens of its path's drafts: the whole block is penalized
    with the answer's counts, then those tokens' logits again with their counts at each slot (a draft's token
    written at every slot, with that slot's count of it: equal tokens write equal values)."""
    b, n = drafts.shape
    on_path, depth = block_paths(layout, n, drafts.device)
    logits = logits + bias[:, None, :]
    values = values[:, None, :]  # (B, 1, 4)
    penalized = penalize(logits, counts[:, None, :], seen[:, None, :], values)  # (B, 1+N, V)
    if stop_ids.numel():  # (the ban last: no penalty lifts it)
        short = (produced[:, None] + depth[None, :]) < values[:, :, 3]  # (B, 1+N)
        ends = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill(0, stop_ids, True)
        banned = short[:, :, None] & ends  # (B, 1+N, V)
    if n == 0:
        return penalized.masked_fill(banned, float("-inf")) if stop_ids.numel() else penalized
    same = (drafts[:, :, None] == drafts[:, None, :]).to(logits.dtype)  # (B, N, N) [i, k]: equal tokens
    extra = torch.einsum("jk,bik->bji", on_path.to(logits.dtype), same)  # (B, 1+N, N) draft i's token on j's path
    at = drafts[:, None, :].expand(b, n + 1, n)  # (B, 1+N, N)
    count = counts.gather(1, drafts)[:, None, :] + extra
    held = seen.gather(1, drafts)[:, None, :] | (extra > 0)
    penalized = penalized.scatter(2, at, penalize(logits.gather(2, at), count, held, values))
    return penalized.masked_fill(banned, float("-inf")) if stop_ids.numel() else penalized


def count_emitted(counts: torch.Tensor, seen: torch.Tensor, emitted: torch.Tensor,
                  number: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts after a step whose row b emitted its first number[b] tokens of `emitted` (B, E)."""
    kept = (torch.arange(emitted.shape[1], device=emitted.device)[None, :] < number[:, None]).to(counts.dtype)
    counts = counts.scatter_add(1, emitted, kept)
    return counts, seen | (counts > 0)


def checked_bias(bias: Mapping[int, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` ({token id: bias}) as `Penalties.bias`, or an MTPError saying what is wrong with it."""
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise MTPError(f"logit_bias must be a mapping of token ids to numbers, got {type(bias).__name__}")
    out = []
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab:
            raise MTPError(f"logit_bias: {token!r} is not a token id of this model (0 to {vocab - 1})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -100 <= value <= 100:
            raise MTPError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}")
        out.append((int(token), float(value)))
    return tuple(sorted(out))
