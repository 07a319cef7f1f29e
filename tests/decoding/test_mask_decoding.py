"""Decoding a mask-token model through the common loop: lossless speculative == greedy == the slow reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_base
from mtp.decoding.drafters import mask_block_layout
from mtp.decoding.generate import generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.errors import MTPError
from mtp.models.mask_tokens import MaskTokenModel


def mask_model(family: str, adapter: str, seed: int, vocab: int, dtype=torch.float64) -> MaskTokenModel:
    """A random mask-token model whose adapters and mask embedding are not neutral (they draft something)."""
    model = MaskTokenModel.from_base(tiny_base(family, seed=seed, dtype=dtype, vocab_size=vocab), adapter=adapter,
                                     rank=4, k=4).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model.lora is not None:
            for b in model.lora.B.values():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.5)
        model.base.get_input_embeddings().weight[model.mask_token_id].normal_(generator=gen)
    return model


def test_block_layout_by_hand():
    # chain of 3 (p, d1, d2), groups after slots 0, 1, 2 (first=0), 2 masks each
    lay = mask_block_layout(3, 0, 3, 2)
    assert lay.follows.tolist() == [0, 0, 1, 1, 2, 2] and lay.step.tolist() == [1, 2, 1, 2, 1, 2]
    w = lay.within.int().tolist()
    assert w[:3] == [[1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert w[3] == [1, 0, 0, 1, 0, 0, 0, 0, 0]  # group 0 mask 1: the slot it follows, itself
    assert w[4] == [1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert w[6] == [1, 1, 0, 0, 0, 1, 1, 0, 0]  # group 1 mask 2: chain up to d1, its group
    assert w[8] == [1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert lay.offsets.tolist() == [0, 1, 2, 1, 2, 2, 3, 3, 4]  # a mask: the slot it follows + its step


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mask_speculative_equals_greedy_equals_reference(data):
    family = data.draw(st.sampled_from(["llama", "gpt2"]))
    adapter = data.draw(st.sampled_from(["full", "gated-lora"]))
    vocab = data.draw(st.integers(8, 48))
    seed = data.draw(st.integers(0, 10_000))
    model = mask_model(family, adapter, seed, vocab)
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=9))
               for _ in range(data.draw(st.integers(1, 3)))]
    max_new = data.draw(st.integers(0, 20))
    stop = data.draw(st.lists(st.integers(0, vocab - 1), max_size=1))
    k = data.draw(st.integers(1, 6))
    ids, mask = left_pad(prompts)
    reference = [reference_greedy(model, p, max_new, stop) for p in prompts]
    greedy = generate(model, ids, mask, max_new_tokens=max_new, stop_token_ids=stop)
    spec = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", k=k, stop_token_ids=stop,
                    adaptive_draft=data.draw(st.booleans()))
    assert greedy.tokens == reference
    assert spec.tokens == reference
    assert all(model.mask_token_id not in row for row in spec.tokens)  # an input, never an output
    if adapter == "gated-lora":  # real tokens are the base model: its own greedy decoding (minus the mask token)
        base = model.base
        for p, ref in zip(prompts, reference, strict=True):
            # an explicit attention mask: transformers would otherwise mask prompt tokens equal to pad_token_id
            out = base.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=max_new, do_sample=False, eos_token_id=stop or None, pad_token_id=0,
                                suppress_tokens=[model.mask_token_id]) if max_new else torch.tensor([p])
            assert out[0, len(p):].tolist() == ref


def test_confadapt_and_static_emit_the_masks_predictions():
    model = mask_model("llama", "full", 3, 40)
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    static = generate(model, ids, mask, max_new_tokens=12, strategy="static", k=4, stop_token_ids=[])
    assert static.stats.forward_passes == 3 and static.stats.tokens_per_forward == 4.0  # 4 per forward, prefill too
    # tau = 0 emits every prediction, as static does; the first k tokens are the prefill's k predictions
    conf0 = generate(model, ids, mask, max_new_tokens=12, strategy="confadapt", tau=0.0, k=4, stop_token_ids=[])
    assert conf0.tokens == static.tokens
    # tau = 1: (almost) never confident, one token per forward: plain greedy
    conf1 = generate(model, ids, mask, max_new_tokens=12, strategy="confadapt", tau=1.0, k=4, stop_token_ids=[])
    assert conf1.tokens == generate(model, ids, mask, max_new_tokens=12, stop_token_ids=[]).tokens
    with torch.no_grad():  # the prefill's predictions: a forward of the prompt followed by 3 masks
        seq = torch.tensor([[1, 2, 3] + [model.mask_token_id] * 3])
        logits = model(seq)[0, :, 0]
    assert static.tokens[0][:4] == logits[2:].argmax(-1).tolist()


def test_speculative_sampling_runs_and_rejects_bad_k():
    model = mask_model("llama", "gated-lora", 1, 30)
    ids, mask = left_pad([[1, 2, 3], [4]])
    out = generate(model, ids, mask, max_new_tokens=10, strategy="speculative", k=3, do_sample=True, seed=0,
                   stop_token_ids=[])
    assert [len(t) for t in out.tokens] == [10, 10]
    with pytest.raises(MTPError, match="k must be"):
        generate(model, ids, mask, max_new_tokens=4, strategy="confadapt", k=0)
