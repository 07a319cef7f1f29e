"""Decoding in bf16 (and plain fp16) weights: speculative against the same model's own greedy decoding, batches
with padding against single rows.

In fp32 and fp64 these are exactly equal (tests/decoding/test_generate.py). In bf16 they cannot always be: the
verify block of n rows goes through other kernel paths than n 1-token steps (oneDNN's bf16 GEMM, sdpa), and
its logits differ in the last bf16 bits (up to ~0.1 on a 256-wide random model). What does hold, and is tested:
the outputs are identical up to their first difference, and there the two tokens are a near-tie: their logits,
computed in fp32 from the same bf16 weights, are within bf16 rounding of each other. A decoding bug (a wrong
draft kept, a stale cache entry) shows as a difference at a token the model does not nearly tie with.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_mtp
from mtp.decoding.generate import generate, left_pad

NEAR_TIE = 0.1  # logit units: bf16 rounding of these tiny models' logits stays well below, real gaps are larger


def random_batch(seed: int, vocab: int, rows: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(1, 12, (rows,), generator=gen)]


def assert_same_up_to_a_near_tie(next_logits, prompts: list[list[int]], got: list[list[int]],
                                 want: list[list[int]]) -> int:
    """Each row of `got` equals `want` up to the first difference, where the two tokens' fp32 logits
    (`next_logits(ids) -> (V,)`, after prompt + the common prefix) are within NEAR_TIE. Returns the rows that
    differ."""
    differ = 0
    for prompt, a, b in zip(prompts, got, want, strict=True):
        t = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if t is None:
            assert len(a) == len(b)  # no stop tokens here: both run to max_new_tokens
            continue
        differ += 1
        logits = next_logits(prompt + b[:t])
        gap = (logits[a[t]] - logits[b[t]]).abs().item()
        assert gap <= NEAR_TIE, f"token {t}: {a[t]} vs {b[t]}, fp32 logits {gap:.4f} apart (not a near-tie)"
    return differ


def heads_logits(model32):
    def next_logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model32(torch.tensor([ids]))[0, -1].reshape(-1)  # head 0, (V,)
    return next_logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", range(5))
def test_low_precision_speculative_matches_own_greedy_up_to_near_ties(family, seed, dtype):
    vocab = 211
    model = tiny_mtp(family, num_heads=2 + seed % 3, seed=seed, vocab_size=vocab, hidden=64).to(dtype)
    assert model.dtype == dtype
    next_logits = heads_logits(copy.deepcopy(model).float())  # the same weights, fp32 arithmetic
    prompts = random_batch(seed, vocab, rows=1 + seed % 4)
    ids, mask = left_pad(prompts)
    greedy = generate(model, ids, mask, max_new_tokens=32, stop_token_ids=[]).tokens
    differ = 0
    for kw in ({}, {"adaptive_draft": False}, {"num_draft": 1}):
        spec = generate(model, ids, mask, max_new_tokens=32, strategy="speculative", stop_token_ids=[], **kw)
        differ += assert_same_up_to_a_near_tie(next_logits, prompts, spec.tokens, greedy)
    single = [generate(model, torch.tensor([p]), max_new_tokens=32, stop_token_ids=[]).tokens[0] for p in prompts]
    differ += assert_same_up_to_a_near_tie(next_logits, prompts, single, greedy)  # padding and batch rows
    assert differ <= len(prompts)  # near-ties are rare: most rows are identical token for token


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", range(3))
def test_bf16_mask_token_speculative_matches_own_greedy_up_to_near_ties(family, adapter, seed):
    from test_mask_decoding import mask_model

    vocab = 97
    model = mask_model(family, adapter, seed, vocab, dtype=torch.bfloat16)
    reference = copy.deepcopy(model.base).float()

    def next_logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1].float()
        logits[model.mask_token_id] = float("-inf")  # never an output
        return logits

    prompts = random_batch(seed, vocab, rows=3)
    ids, mask = left_pad(prompts)
    greedy = generate(model, ids, mask, max_new_tokens=24, stop_token_ids=[]).tokens
    spec = generate(model, ids, mask, max_new_tokens=24, strategy="speculative", k=4, stop_token_ids=[])
    assert assert_same_up_to_a_near_tie(next_logits, prompts, spec.tokens, greedy) <= 1
