"""Slow reference decoders, kept on purpose: no cache, no batching tricks, easy to trust.

The fast engine in `generate.py` is tested against these token for token.
"""

from __future__ import annotations

import torch

from mtp.decoding.penalties import Penalties


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop_token_ids=(),
                     penalties: Penalties | None = None) -> list[int]:
    """Recompute the whole sequence every step and take head 0's argmax (of the logits `penalties` biased and
    penalized for the tokens the sequence holds: the answer's counted one by one)."""
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=model.device))[0, -1, 0]  # (V,)
        if penalties is not None:
            counts = torch.zeros(logits.shape[-1], device=logits.device)
            for t in new:
                counts[t] += 1
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen[ids] = True
            logits = penalties.apply(logits, counts, seen, stop_token_ids, len(new))
        tok = int(logits.argmax())
        new.append(tok)
        ids.append(tok)
        if tok in stop_token_ids:
            break
    return new


@torch.inference_mode()
def reference_next_token_probs(model, prompt: list[int], temperature: float = 1.0) -> torch.Tensor:
    logits = model(torch.tensor([prompt], device=model.device))[0, -1, 0].float()
    return torch.softmax(logits / temperature, -1)
