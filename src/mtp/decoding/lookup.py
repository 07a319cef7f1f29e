"""Prompt lookup: drafts copied from earlier in the sequence, added to any drafter's drafts as one more branch.

Answers repeat what came before - the numbers and phrases of a math question, the code being edited - and a
model that has just written the last few tokens of such a passage usually goes on as it did the first time
(prompt lookup decoding, Saxena 2023; vLLM's "ngram" drafter). Each step, for every row, the last n tokens of
its sequence (n = 3, then 2, then 1) are looked up among its earlier tokens; the tokens that followed their most
recent earlier occurrence are the lookup drafts, up to `max_tokens` of them.

They join the drafter's own drafts as a chain hanging from the root of the draft tree (`DraftTree.with_lookup`):

    root ─┬─ the drafter's tree (heads' or masks' top candidates, or its chain)
          └─ l_1 ─ l_2 ─ ... ─ l_m   (lookup)

so one verify forward judges both, and the verifier keeps the deepest accepted path, whichever branch it is on.
Greedy output stays identical to greedy decoding (a draft is kept only when it is the model's own argmax, so a
filler or a duplicate costs a row, never a token) and tree sampling stays exact (any candidate set is). The
chain is as long as the longest row's lookup this step (rows with a shorter one are filled with their last
lookup token, or 0), and left out when no row finds one.
"""

from __future__ import annotations

import torch

from mtp.decoding.tree import DraftTree

NGRAM_SIZES = (3, 2, 1)  # longest first: a longer match is a better predictor of what follows
# A copy after a 1-token match is rarely right for long, so it drafts fewer tokens. Measured on SmolLM2-135M-
# Instruct's greedy answers to GSM8K test problems 0-19 (128 tokens): the chance that lookup draft k is accepted
# (k = 1, 2, 3, 4, 6, 8) after a 1-token match 0.31 0.19 0.12 0.07 0.02 0.01, after 2 tokens 0.56 0.33 0.22 0.18
# 0.07 0.04, after 3 tokens 0.70 0.49 0.40 0.34 0.25 0.22; a verify row costs ~1/30 of a step on a CPU, so a
# draft pays while its chance stays above ~0.07.
MAX_TOKENS_AFTER = {1: 3, 2: 6}  # match length -> drafts at most (longer matches: `max_tokens`)


class RowHistory:
    """One row's tokens and, per n-gram size, where each n-gram was last followed by a token."""

    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)
        self.follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.indexed = 0  # n-grams ending before this index are in `follow`

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def lookup(self, max_tokens: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest matching suffix n-gram (fewer after
        a short match: `MAX_TOKENS_AFTER`)."""
        seq = self.tokens
        last = len(seq) - 1  # the suffix ends here; index n-grams ending before it (they have a follower)
        for end in range(self.indexed, last):
            for n in NGRAM_SIZES:
                if end - n + 1 >= 0:
                    self.follow[tuple(seq[end - n + 1:end + 1])] = end + 1
        self.indexed = max(self.indexed, last)
        for n in NGRAM_SIZES:
            if last - n + 1 < 0:
                continue
            start = self.follow.get(tuple(seq[last - n + 1:]))
            if start is not None:
                return seq[start:start + min(max_tokens, MAX_TOKENS_AFTER.get(n, max_tokens))]
        return []


class PromptLookup:
    """Lookup drafts for the rows of a batch (original row indices), as the decoding loop feeds them."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int):
        self.max_tokens = max_tokens
        ids, mask = input_ids.tolist(), attention_mask.bool().tolist()
        self.histories = [RowHistory([t for t, m in zip(r, v, strict=True) if m])
                          for r, v in zip(ids, mask, strict=True)]  # per original row

    def extend(self, row: int, tokens: list[int]) -> None:
        self.histories[row].extend(tokens)

    def drafts(self, rows: list[int]) -> torch.Tensor:
        """(B, m) lookup drafts of `rows`, m the longest found (0: none found)."""
        found = [self.histories[r].lookup(self.max_tokens) for r in rows]
        m = max((len(f) for f in found), default=0)
        out = [f + [f[-1] if f else 0] * (m - len(f)) for f in found]
        return torch.tensor(out, dtype=torch.long).reshape(len(rows), m)


def add_lookup(drafts, lookup_tokens: torch.Tensor):
    """`drafts` (a drafter's `Drafts`: a chain, a tree, or nothing) with the lookup chain (B, m) as one more branch
    of its tree. A chain becomes the tree of width 1; sampled chain drafts are verified as candidates (exact)."""
    m = lookup_tokens.shape[1]
    if m == 0:
        return drafts
    base = drafts.tree
    if base is None:
        d = drafts.tokens.shape[1]
        base = DraftTree.chain(d) if d else None
    tree = DraftTree.with_lookup(base, m)
    tokens = torch.cat([drafts.tokens, lookup_tokens.to(drafts.tokens.device)], 1)  # (B, N + m)
    return type(drafts)(tokens, None, None, tree)
