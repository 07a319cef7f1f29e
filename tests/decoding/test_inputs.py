"""The Python API checks what it is given: one MTPError saying what is wrong, never an IndexError from torch."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.errors import MTPError


@pytest.fixture(scope="module")
def model():
    return tiny_mtp("llama", num_heads=2, vocab_size=61)


BAD_INPUTS = [
    (torch.tensor([[1.0, 2.0]]), None, "input_ids must be integer token ids, got torch.float32"),
    (torch.tensor([[True, False]]), None, "input_ids must be integer token ids, got torch.bool"),
    (torch.ones(1, 2, 3, dtype=torch.long), None, r"\(batch, length\) token ids, got a tensor of shape \(1, 2, 3\)"),
    (torch.tensor([[1, 61]]), None, r"token id 61, outside the model's vocabulary \[0, 61\)"),
    (torch.tensor([[-1, 3]]), None, r"token id -1, outside the model's vocabulary"),
    (torch.tensor([[1, 2]], device="meta"), None, "input_ids is on meta, the model on cpu"),
    (torch.tensor([[1, 2]]), torch.ones(1, 3), r"attention_mask has shape \(1, 3\), input_ids \(1, 2\)"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), "attention_mask must hold only 0"),
    ([[1.5, 2]], None, "must be integer token ids"),
    ([], None, "empty prompt"),
    ([[]], None, "empty prompt"),
    ("hello", None, "input_ids must be a tensor or a list of token ids"),
    ([[1, 2], [3]], torch.ones(2, 2), "rows differ in length"),
]


@pytest.mark.parametrize("ids, mask, message", BAD_INPUTS)
def test_generate_and_forward_say_what_is_wrong(model, ids, mask, message):
    with pytest.raises(MTPError, match=message):
        generate(model, ids, mask, max_new_tokens=2)
    with pytest.raises(MTPError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(MTPError, match=message):
        model(ids, attention_mask=mask)


def test_generation_needs_left_padding_forward_does_not(model):
    ids = torch.tensor([[1, 2, 3]])
    right_padded = torch.tensor([[1, 1, 0]])
    with pytest.raises(MTPError, match="needs left padding"):
        generate(model, ids, right_padded, max_new_tokens=2)
    assert model(ids, attention_mask=right_padded).shape == (1, 3, 1, 61)
    with pytest.raises(MTPError, match="empty prompt in the batch"):
        generate(model, ids, torch.zeros(1, 3), max_new_tokens=2)


def test_lists_are_accepted_as_tokenizers_give_them(model):
    reference = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=6, stop_token_ids=[])
    assert generate(model, [5, 6, 7], max_new_tokens=6, stop_token_ids=[]).tokens == reference.tokens
    assert generate(model, [[5, 6, 7]], [[1, 1, 1]], max_new_tokens=6, stop_token_ids=[]).tokens == reference.tokens
    assert generate(model, torch.tensor([5, 6, 7], dtype=torch.int32), max_new_tokens=6,
                    stop_token_ids=[]).tokens == reference.tokens
    ragged = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=6, stop_token_ids=[])  # left-padded for us
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    assert ragged.tokens == generate(model, ids, mask, max_new_tokens=6, stop_token_ids=[]).tokens
    assert torch.equal(model([[5, 6, 7]]), model(torch.tensor([[5, 6, 7]])))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 when sampling \(do_sample\)"),
    ({"strategy": "confadapt", "tau": 1.5}, r"tau must be in \[0, 1\]"),
])
def test_generate_checks_its_numbers_with_the_cli_rules(model, kwargs, message):
    with pytest.raises(MTPError, match=message):
        generate(model, [[1, 2]], max_new_tokens=2, **kwargs)
