"""The embedded default model (SmolLM2-135M-Instruct): speculative decoding returns exactly the greedy answer."""

from __future__ import annotations

import pytest
import torch

from mtp.decoding.generate import generate
from mtp.evaluation.prompts import pad_id
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
    ids = torch.tensor([[pad_id(tok)] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    # (28 tokens: the second answer ends on its own at 25, the first goes on past "7 + 5 = 12")
    greedy = generate(default_model, ids, mask, max_new_tokens=28)
    spec = generate(default_model, ids, mask, max_new_tokens=28, strategy="speculative")
    assert spec.tokens == greedy.tokens
    assert "12" in greedy.texts[0]
    # the plain Hugging Face greedy decode of the first prompt agrees token for token
    hf = default_model.base.generate(torch.tensor([rows[0]]), max_new_tokens=28, do_sample=False)
    assert hf[0, len(rows[0]):].tolist()[: len(greedy.tokens[0])] == greedy.tokens[0]


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="fp16 packing needs fbgemm")
def test_fp16_packed_speculative_equals_fp16_greedy_on_the_default_model(default_model):
    import copy

    from mtp.decoding.generate import left_pad
    from mtp.evaluation.prompts import gsm8k_prompts
    from mtp.models.quantize import quantize_for_decoding

    packed = quantize_for_decoding(copy.deepcopy(default_model), "fp16")
    prompts = gsm8k_prompts(packed.tokenizer, limit=3, shots=0, chat=True)
    ids, mask = left_pad([p.token_ids for p in prompts], pad_id(packed.tokenizer))
    greedy = generate(packed, ids, mask, max_new_tokens=32)
    spec = generate(packed, ids, mask, max_new_tokens=32, strategy="speculative")
    assert spec.tokens == greedy.tokens
    fp32 = generate(default_model, ids, mask, max_new_tokens=32)
    same = sum(a == b for a, b in zip(greedy.tokens, fp32.tokens, strict=True))
    assert same >= 2  # fp16 storage of 4-bit-origin weights: the answers stay the fp32 model's (in practice all)
