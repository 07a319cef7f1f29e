"""Prompt-lookup drafts: the n-gram lookup against a brute-force search, lossless with any drafter, exact sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_first_two_tokens_follow_the_model, tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.lookup import MAX_TOKENS_AFTER, NGRAM_SIZES, PromptLookup, RowHistory, add_lookup
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


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 4), max_size=30), cuts=st.lists(st.integers(1, 5), max_size=6),
       max_tokens=st.integers(1, 6))
def test_lookup_matches_a_brute_force_search_as_the_sequence_grows(seq, cuts, max_tokens):
    history = RowHistory(seq[:3])
    assert history.lookup(max_tokens) == brute_force_lookup(seq[:3], max_tokens)
    end = 3
    for cut in cuts:  # tokens arrive a few at a time, as accepted drafts do
        history.extend(seq[end:end + cut])
        end += cut
        assert history.lookup(max_tokens) == brute_force_lookup(seq[:end], max_tokens)


def test_batch_lookup_skips_padding_and_fills_short_rows():
    ids, mask = left_pad([[5, 6, 7, 5, 6], [1, 2]])
    lookup = PromptLookup(ids, mask, max_tokens=3)
    assert lookup.drafts([0, 1]).tolist() == [[7, 5, 6], [0, 0, 0]]  # row 1 finds nothing: filler
    assert PromptLookup(ids, mask, max_tokens=8).drafts([0]).tolist() == [[7, 5, 6]]  # the copy ends there
    lookup.extend(1, [1])
    assert lookup.drafts([1]).tolist() == [[2, 1]]  # the copy may run into the suffix itself
    assert lookup.drafts([]).shape == (0, 0)


def test_add_lookup_hangs_a_chain_from_the_root():
    from mtp.decoding.drafters import Drafts

    chain = Drafts(torch.tensor([[4, 5]]))
    out = add_lookup(chain, torch.tensor([[7, 8, 9]]))
    assert out.tokens.tolist() == [[4, 5, 7, 8, 9]]
    t = out.tree.tensors
    assert t.parent_slot.tolist() == [0, 1, 0, 3, 4]  # chain (0,), (0,0); lookup root -> 3 -> 4
    assert out.tree.depth == 3 and out.tree.widths() == [1, 1]
    assert add_lookup(chain, torch.zeros(1, 0, dtype=torch.long)) is chain
    assert DraftTree.with_lookup(None, 2) is DraftTree.with_lookup(None, 2)  # cached: layouts are reused


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
    # A tiny random model falls into loops, which lookup then drafts: more than one token per forward.
    assert generate(model, ids, mask, max_new_tokens=40, strategy="speculative", stop_token_ids=[],
                    lookup=4).stats.tokens_per_forward > 1.3


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
    assert RowHistory(seq).lookup(8) == [9]
    long = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]  # a 3-token match: up to max_tokens
    assert RowHistory(long).lookup(8) == [4, 5, 6, 7, 8, 9, 10, 1]
    one = [7, 1, 2, 3, 4, 5, 6, 8, 7]  # only (7,) matches: at most MAX_TOKENS_AFTER[1]
    assert RowHistory(one).lookup(8) == [1, 2, 3][:MAX_TOKENS_AFTER[1]]
