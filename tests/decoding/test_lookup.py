"""Prompt-lookup drafts: the n-gram lookup against a brute-force search, lossless with any drafter, exact sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_first_two_tokens_follow_the_model, tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.lookup import MAX_TOKENS_AFTER, NGRAM_SIZES, lookup_chain, lookup_drafts
from mtp.decoding.reference import reference_greedy
from mtp.decoding.tree import DraftTree
from mtp.errors import MTPError


def brute_force_lookup(seq: list[int], max_tokens: int) -> list[int]:
    """The longest suffix n-gram's latest earlier occurrence, searched from scratch."""
    for n in NGRAM_SIZES:
        if len(seq) < n:
            continue
        suffix = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):  # occurrences that end before the suffix does
            if seq[start:start + n] == suffix:
                return seq[start + n:start + n + min(max_tokens, MAX_TOKENS_AFTER.get(n, max_tokens))]
    return []


def device_lookup(rows: list[list[int]], max_tokens: int) -> list[list[int]]:
    """`lookup_drafts` on a batch of rows of different lengths, each row's drafts cut to its count."""
    width = max(len(r) for r in rows) + 3
    history = torch.tensor([r + [99] * (width - len(r)) for r in rows])  # 99: garbage past each row's length
    tokens, count = lookup_drafts(history, torch.tensor([len(r) for r in rows]), max_tokens)
    assert tokens.shape == (len(rows), max_tokens)
    return [t[:c] for t, c in zip(tokens.tolist(), count.tolist(), strict=True)]


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 4), max_size=30), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 5), max_size=6), max_tokens=st.integers(1, 6))
def test_lookup_matches_a_brute_force_search_as_the_sequence_grows(seqs, cuts, max_tokens):
    """A batch of rows of their own lengths, tokens arriving a few at a time, as accepted drafts do."""
    ends = [min(3, len(s)) for s in seqs]
    for cut in [0] + cuts:
        ends = [min(e + cut, len(s)) for e, s in zip(ends, seqs, strict=True)]
        rows = [s[:e] for s, e in zip(seqs, ends, strict=True)]
        expected = [brute_force_lookup(r, max_tokens) for r in rows]
        assert device_lookup([r or [0] for r in rows], max_tokens) == [
            e if r else brute_force_lookup([0], max_tokens) for e, r in zip(expected, rows, strict=True)]


def test_short_rows_are_filled_with_their_last_draft():
    history = torch.tensor([[5, 6, 7, 5, 6, 0], [1, 2, 0, 0, 0, 0], [1, 2, 1, 0, 0, 0]])
    tokens, count = lookup_drafts(history, torch.tensor([5, 2, 3]), 3)
    assert count.tolist() == [3, 0, 2]  # (1,) follows itself: its copy runs into the suffix
    assert tokens.tolist() == [[7, 5, 6], [0, 0, 0], [2, 1, 1]]  # short rows: the last draft repeated, or 0
    tokens, count = lookup_drafts(history[:1], torch.tensor([5]), 8)
    assert count.tolist() == [3]  # the copy ends where the row does


def test_lookup_chain_hangs_a_chain_from_the_root():
    from mtp.decoding.drafters import Drafts

    chain = Drafts(torch.tensor([[4, 5]]))
    out = lookup_chain(chain, torch.tensor([[7, 8, 9]]))
    assert out.tokens.tolist() == [[4, 5, 7, 8, 9]]
    assert out.layout.parent_slot.tolist() == [0, 1, 0, 3, 4]  # chain (0,), (0,0); lookup root -> 3 -> 4
    assert out.tree.depth == 3 and out.tree.widths() == [1, 1]
    assert lookup_chain(chain, torch.zeros(1, 0, dtype=torch.long)) is chain
    assert DraftTree.with_lookup(None, 2) is DraftTree.with_lookup(None, 2)  # cached: layouts are reused
    shaped = Drafts(torch.tensor([[4, 5]]), layout=DraftTree.from_paths([(0,), (1,)]).layout)  # shaped this step
    grown = lookup_chain(shaped, torch.tensor([[7, 8]]))
    assert grown.tree is None and grown.layout.parent_slot.tolist() == [0, 0, 0, 3]
    assert grown.layout.rank.tolist() == [0, 1, -1, -1] and grown.layout.max_depth == 2


def repeating_prompts(vocab: int) -> list[list[int]]:
    return [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5 % vocab, 6 % vocab, 5 % vocab], [7 % vocab]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("num_heads", [1, 3])
def test_lookup_alone_or_with_heads_equals_greedy(family, num_heads):
    """A plain model (one head) decodes by lookup alone; with heads the lookup branch joins their drafts."""
    model = tiny_mtp(family, num_heads=num_heads, dtype=torch.float64, vocab_size=16, seed=5)
    prompts = repeating_prompts(16)
    reference = [reference_greedy(model, p, 40) for p in prompts]
    ids, mask = left_pad(prompts)
    for kw in ({"lookup": 4}, {"lookup": 4, "tree": "auto", "tree_size": 4} if num_heads > 1 else {"lookup": 1}):
        out = generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[], **kw)
        assert out.tokens == reference
    # A tiny random model falls into loops, which lookup then drafts: more than one token per forward (the
    # speculation gate off: it would take plain steps wherever this batch's timing says they are faster)
    assert generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                    lookup=4, adaptive_draft=False).stats.tokens_per_forward > 1.3


def test_lookup_sampling_matches_the_model_distribution():
    """With the lookup branch in the tree, sampled tokens still follow the model (first two tokens' joint law)."""
    model = tiny_mtp("llama", num_heads=2, vocab_size=5, seed=3)
    prompt, n = [1, 2, 3, 1, 2, 3, 1, 2], 3000
    out = generate(model, torch.tensor([prompt] * n), max_new_tokens=2, strategy="speculative", do_sample=True,
                   seed=0, stop_token_ids=[], lookup=3)
    assert_first_two_tokens_follow_the_model(model, prompt, out.tokens)


def test_lookup_needs_the_speculative_strategy():
    model = tiny_mtp("llama", num_heads=2)
    with pytest.raises(MTPError, match="speculative"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, strategy="greedy", lookup=3)
    with pytest.raises(MTPError, match=">= 0"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, strategy="speculative", lookup=-1)


def test_short_matches_draft_fewer_tokens():
    seq = [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]  # suffix (9, 9) unseen, (9,) seen at 0 and 9: the latest is 9
    long = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]  # a 3-token match: up to max_tokens
    one = [7, 1, 2, 3, 4, 5, 6, 8, 7]  # only (7,) matches: at most MAX_TOKENS_AFTER[1]
    assert device_lookup([seq, long, one], 8) == [[9], [4, 5, 6, 7, 8, 9, 10, 1], [1, 2, 3][:MAX_TOKENS_AFTER[1]]]
