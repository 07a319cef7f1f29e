"""The embedded default model (SmolLM2-135M-Instruct): speculative decoding returns exactly the greedy answer."""

from __future__ import annotations

import pytest
import torch

from mtp.decoding.generate import generate
from mtp.models.loading import load_mtp_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def default_model():
    return load_mtp_model(None, num_heads=4)


def test_speculative_equals_greedy_on_the_default_model(default_model):
    tok = default_model.tokenizer
    questions = ["What is 7 + 5? Answer with just the number.",
                 "Tom has 3 apples and buys 4 more. How many apples does he have?"]
    rows = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    greedy = generate(default_model, ids, mask, max_new_tokens=40)
    spec = generate(default_model, ids, mask, max_new_tokens=40, strategy="speculative")
    assert spec.tokens == greedy.tokens
    assert "12" in greedy.texts[0]
    # the plain Hugging Face greedy decode of the first prompt agrees token for token
    hf = default_model.base.generate(torch.tensor([rows[0]]), max_new_tokens=40, do_sample=False)
    assert hf[0, len(rows[0]):].tolist()[: len(greedy.tokens[0])] == greedy.tokens[0]
