"""The draft vocabulary of the extra heads: the tokens they may propose (see `MTPModel.set_draft_vocab`).

With SmolLM2's 49,152 tokens, the unembedding is ~2/3 of the arithmetic of a frozen-trunk training step, yet
the model's own GSM8K answers use ~4,000 distinct tokens. Heads that score only the K most frequent tokens of
the training rows train ~3.5x faster at the same held-out accuracy (docs/training.md), and a draft outside
them is at worst one rejected draft: head 0 still verifies against the whole vocabulary.
"""

from __future__ import annotations

import torch

from mtp.errors import MTPError
from mtp.training.data import TokenizedData


def frequent_tokens(data: TokenizedData, vocab_size: int, size: int) -> torch.Tensor | None:
    """The `size` most frequent token ids of the rows of `data` (prompts too: answers copy names and numbers
    from them), topped up with the lowest unused ids (BPE numbers its merges in the order it learned them, so
    low ids are frequent in the tokenizer's corpus). Sorted; None when `size` is 0 or covers the vocabulary."""
    if size < 0:
        raise MTPError(f"draft vocabulary size must be >= 0, got {size}")
    if size == 0 or size >= vocab_size:
        return None
    counts = data.token_counts(vocab_size)  # (V,)
    by_count = torch.argsort(-counts, stable=True)  # most frequent first; equal counts: lower id first
    seen = by_count[: min(size, int((counts > 0).sum()))]
    unused = torch.ones(vocab_size, dtype=torch.bool)
    unused[seen] = False
    filler = unused.nonzero().squeeze(1)[: size - seen.numel()]  # lowest ids not yet in
    return torch.cat([seen, filler]).sort().values  # (size,)
