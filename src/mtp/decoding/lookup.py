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
lookup runs on the device, on each row's tokens (`lookup_drafts`), so a step replayed as a CUDA graph does it
too. Eagerly the chain is as long as the longest row's lookup this step and left out when no row finds one;
replayed, it always has `max_tokens` nodes. Rows with a shorter lookup are filled with their last lookup token,
or 0.
"""

from __future__ import annotations

import torch

from mtp.decoding.corpus import NGRAM_SIZES as CORPUS_SIZES
from mtp.decoding.corpus import LookupCorpus
from mtp.decoding.tree import LOOKUP_RANK, DraftTree, tree_layout

NGRAM_SIZES = (3, 2, 1)  # every size from 1 up: a longer match is a better predictor of what follows
# A copy after a 1-token match is rarely right for long, so it drafts fewer tokens. Measured on SmolLM2-135M-
# Instruct's greedy answers to GSM8K test problems 0-19 (128 tokens): the chance that lookup draft k is accepted
# (k = 1, 2, 3, 4, 6, 8) after a 1-token match 0.31 0.19 0.12 0.07 0.02 0.01, after 2 tokens 0.56 0.33 0.22 0.18
# 0.07 0.04, after 3 tokens 0.70 0.49 0.40 0.34 0.25 0.22; a verify row costs ~1/30 of a step on a CPU, so a
# draft pays while its chance stays above ~0.07.
MAX_TOKENS_AFTER = {1: 3, 2: 6}  # match length -> drafts at most (longer matches: `max_tokens`)
CORPUS_BELOW = 2  # a row's own match shorter than this gives way to a corpus's (`mtp.decoding.corpus`)


def lookup_drafts(history: torch.Tensor, length: torch.Tensor, max_tokens: int,
                  corpus: LookupCorpus | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's lookup drafts, on its device in fixed-shape ops (no host read): history (B, S) holds row b's
    tokens in its first length[b] slots; the last n of them (n = 3, 2, 1: the longest that occurred before) are
    looked up among its earlier tokens, and the tokens after their latest earlier occurrence are its drafts (fewer
    after a short match: `MAX_TOKENS_AFTER`). Returns the drafts (B, max_tokens) and how many each row found (B,);
    a row's slots past its count repeat its last draft (0 when it found none): filler the verifier may refuse.

    All n-gram sizes at once (a verify step on a GPU costs per kernel, and a loop per size cost ~90 of them): at
    each earlier slot j, how many tokens ending there equal those ending at the last slot, up to the longest size;
    the longest such match wins, the most recent among equals. ~26 kernels a step.

    With a `corpus` (`mtp.decoding.corpus`), a row whose own match is shorter than `CORPUS_BELOW` tokens takes
    the corpus's drafts where it has some."""
    b, s = history.shape
    longest = max(NGRAM_SIZES)  # and every size below it (`NGRAM_SIZES`)
    idx = torch.arange(max(s, longest, max_tokens, *CORPUS_SIZES), device=history.device)  # sliced below
    last = length - 1  # (B,) the suffix ends here
    padded = torch.nn.functional.pad(history, (longest - 1, 0), value=-1)  # (B, S + longest - 1): no token is -1
    width = longest if corpus is None else max(longest, *CORPUS_SIZES)  # (a corpus reads its longest too)
    back = last[:, None] - idx[:width]  # (B, width) slot k before last
    # suffix[b, k] = the token k before the last one (-2 before the row's start: equals no token, nor the pad)
    suffix = torch.where(back >= 0, history.gather(1, back.clamp_min(0)), -2)
    # equal[b, k, j] = the token k before slot j equals the token k before the last slot
    windows = padded.unfold(1, s, 1).flip(1)  # (B, longest, S): windows[:, k, j] = history[:, j - k] (-1 before 0)
    equal = windows == suffix[:, :longest, None]
    run = equal.long().cumprod(1).sum(1)  # (B, S) match length ending at slot j, up to `longest`
    run = torch.where(idx[None, :s] < last[:, None], run, 0)  # earlier slots only
    best, end = (run * s + idx[:s]).max(-1)  # (B,): the longest match, then the most recent; where it ends
    # the copy begins after the match; a match of n tokens drafts at most _max_after(n) (none when n is 0)
    start = end + 1
    count = torch.minimum(_max_after(max_tokens, longest, history.device)[best // s],
                          length - start).clamp_min(0)  # (B,) (no match: 0, wherever `end` points)
    if corpus is not None:  # rows whose own match is short take the corpus's drafts where it has some
        found, found_count = corpus.match(suffix, length, max_tokens)  # (B, <= max_tokens), (B,)
        use = (best // s < CORPUS_BELOW) & (found_count > 0)  # (B,)
        count = torch.where(use, found_count, count)
    offset = torch.minimum(idx[None, :max_tokens], (count - 1).clamp_min(0)[:, None])  # past the count: the last
    tokens = history.gather(1, (start[:, None] + offset).clamp(max=s - 1))  # (B, max_tokens)
    if corpus is not None:
        found = torch.nn.functional.pad(found, (0, max_tokens - found.shape[1]))  # (B, max_tokens)
        tokens = torch.where(use[:, None], found.gather(1, offset), tokens)
    return torch.where(count[:, None] > 0, tokens, 0), count


_MAX_AFTER: dict[tuple, torch.Tensor] = {}


def _max_after(max_tokens: int, longest: int, device: torch.device) -> torch.Tensor:
    """(longest + 1,) the most drafts after a match of n tokens (0 for none), built once per device and kept: a
    step replayed as a CUDA graph reads the table it was captured with (the first, eager, step built it)."""
    key = (max_tokens, longest, device)
    table = _MAX_AFTER.get(key)
    if table is None:
        caps = [0] + [min(max_tokens, MAX_TOKENS_AFTER.get(n, max_tokens)) for n in range(1, longest + 1)]
        table = _MAX_AFTER[key] = torch.tensor(caps, device=device)
    return table


def lookup_chain(drafts, lookup_tokens: torch.Tensor):
    """`drafts` (a drafter's `Drafts`: a chain, a tree, or nothing) with the lookup chain (B, m) as one more branch
    of its tree. A chain becomes the tree of width 1 (sampled drafts keep the distributions they were drawn from)."""
    m = lookup_tokens.shape[1]
    if m == 0:
        return drafts
    tokens = torch.cat([drafts.tokens, lookup_tokens.to(drafts.tokens.device)], 1)  # (B, N + m)
    if drafts.layout is not None and drafts.tree is None:  # a tree shaped this step: its layout grows on the device
        return type(drafts)(tokens, drafts.probs, layout=with_lookup_layout(drafts.layout, m))
    base = drafts.tree
    if base is None:
        d = drafts.tokens.shape[1]
        base = DraftTree.chain(d) if d else None
    return type(drafts)(tokens, drafts.probs, tree=DraftTree.with_lookup(base, m))


def with_lookup_layout(layout, m: int):
    """A tree layout (N nodes) with a chain of m lookup nodes from the root after its nodes, on its device."""
    n, device = layout.size, layout.depth.device
    steps = torch.arange(m, device=device)
    parent = torch.cat([layout.parent_slot, torch.where(steps == 0, 0, n + steps)])  # lookup i's parent: i - 1
    depth = torch.cat([layout.depth, steps + 1])
    rank = torch.cat([layout.rank, torch.full_like(steps, LOOKUP_RANK)])
    return tree_layout(parent, depth, rank, max(layout.max_depth, m))
