"""Extra heads that read the next token (`MTPModel.add_next_token_input`): decoding feeds them the token head 0
verified, training the row's own, and both must be the same function of the sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reading_next_token, tiny_mtp
from mtp import MTPModel
from mtp.decoding.generate import DraftRequest, generate, left_pad
from mtp.decoding.reference import reference_greedy
from mtp.decoding.tree import DraftTree, DynamicTree
from mtp.errors import MTPError
from mtp.models import fast_llama
from mtp.models.loading import quantize_model
from mtp.models.parallel_heads import next_token_ids


def recording_proposer(log: list):
    """Drafts each head's argmax at the kept slot (what the heads propose anyway; a tree's: their ranked
    candidates), recording the argmax per row."""
    def propose(req: DraftRequest):
        logits = req.model.draft_logits(req.hidden_at)  # (B, d, V)
        drafts = logits.argmax(-1)  # (B, d)
        for row, produced, tokens in zip(req.rows.tolist(), req.produced.tolist(), drafts.tolist(), strict=True):
            log.append((row, produced, tokens))
        if req.opts.tree is None:
            return drafts, None
        return logits.topk(min(4, logits.shape[-1]), -1).indices, None  # (B, d, 4): ranks 0-3

    return propose


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoding_drafts_are_the_heads_of_the_whole_sequence(data):
    """Every draft a speculative step proposes is what the heads give, run without a cache on the whole sequence
    with each position's next token: so the heads' cache, the next tokens fed at the prompt (its own) and after
    it (head 0's; where the step emits another, sampled or penalized, that one), and the stacked heads of a GPU
    step all agree with training's teacher forcing."""
    family = data.draw(st.sampled_from(["llama", "gpt2"]))
    num_heads = data.draw(st.integers(2, 5))
    emits = data.draw(st.sampled_from(["greedy", "sampled", "penalized"]))
    kw = {"greedy": {}, "sampled": dict(do_sample=True, temperature=data.draw(st.sampled_from([0.8, 2.0])), seed=0),
          "penalized": dict(repetition_penalty=3.0, presence_penalty=2.0)}[emits]
    if num_heads > 2 and data.draw(st.booleans()):  # the kept path of a tree of head 1's two best, then head 2's
        kw["tree"] = DraftTree.from_paths([[0], [1], [0, 0], [1, 0]])
    seed = data.draw(st.integers(0, 10_000))
    model = tiny_mtp(family, num_heads=num_heads, seed=seed, dtype=torch.float64, vocab_size=29,
                     num_trunk_layers=data.draw(st.sampled_from([None, 1])))
    reading_next_token(model, seed)
    prompts = [data.draw(st.lists(st.integers(0, 28), min_size=1, max_size=8)) for _ in range(data.draw(
        st.integers(1, 3)))]
    max_new = data.draw(st.integers(2, 16))
    fused = family == "llama" and data.draw(st.booleans())  # the extra heads as one stack, as on a GPU
    with pytest.MonkeyPatch.context() as mp:
        if fused:
            mp.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
        log: list = []
        ids, mask = left_pad(prompts)
        out = generate(model, ids, mask, max_new_tokens=max_new, strategy="speculative", stop_token_ids=[],
                       proposer=recording_proposer(log), **kw)
    if emits == "greedy":
        assert out.tokens == [reference_greedy(model, p, max_new) for p in prompts]
    seen = set()
    with torch.no_grad():
        full = [model(torch.tensor([p + t]), return_all_heads=True)[0] for p, t in zip(prompts, out.tokens,
                                                                                       strict=True)]
    for row, produced, drafts in log:
        if (row, produced) in seen or produced > max_new:  # a finished row's later entries are masked slots
            continue
        seen.add((row, produced))
        at = len(prompts[row]) + produced - 2  # the kept slot: the token before the one emitted last
        expected = [int(full[row][at, j].argmax()) for j in range(1, len(drafts) + 1)]
        assert drafts == expected, (row, produced)
    assert seen


def test_a_zero_projection_changes_nothing():
    """Added heads start at zero: a model that gains the input computes exactly what it did."""
    model = tiny_mtp("llama", num_heads=3, seed=1, dtype=torch.float64)
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    before = model(ids, mask, return_all_heads=True)
    model.add_next_token_input()
    assert model.reads_next_token and not model.next_token_in.weight.any()
    torch.testing.assert_close(model(ids, mask, return_all_heads=True), before, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_trees_and_lookup_stay_exact(seed, monkeypatch):
    """Trees (the next token of every node is head 0's there) and lookup drafts, on the GPU's fused path."""
    monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
    model = reading_next_token(tiny_mtp("llama", num_heads=4, seed=seed, vocab_size=53), seed)
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(0, 53, (n,), generator=gen).tolist() for n in (7, 2, 5)])
    greedy = generate(model, ids, mask, max_new_tokens=18, stop_token_ids=[])
    for tree in (None, DynamicTree(5, 3)):
        spec = generate(model, ids, mask, max_new_tokens=18, strategy="speculative", tree=tree, lookup=3,
                        stop_token_ids=[])
        assert spec.tokens == greedy.tokens
    confident = generate(model, ids, mask, max_new_tokens=18, strategy="static", stop_token_ids=[])
    assert all(len(t) == 18 for t in confident.tokens)


def test_saved_and_loaded_with_its_projection(tmp_path):
    model = reading_next_token(tiny_mtp("llama", num_heads=3, seed=2))
    model.save_pretrained(tmp_path / "m")
    loaded = MTPModel.from_pretrained(tmp_path / "m")
    assert loaded.reads_next_token and loaded.mtp_config()["next_token_input"] is True
    torch.testing.assert_close(loaded.next_token_in.weight, model.next_token_in.weight, rtol=0, atol=0)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(loaded(ids, return_all_heads=True), model(ids, return_all_heads=True))
    plain = tiny_mtp("llama", num_heads=3, seed=2)
    plain.save_pretrained(tmp_path / "plain")
    assert not MTPModel.from_pretrained(tmp_path / "plain").reads_next_token


def test_heads_without_the_next_token_are_a_clear_error():
    model = reading_next_token(tiny_mtp("llama", num_heads=3))
    trunk, ctx = model.trunk_forward(torch.tensor([[1, 2, 3]]))
    with pytest.raises(MTPError, match="next_ids"):
        model.head_forward(1, trunk, ctx)
    assert model.head_forward(0, trunk, ctx).shape == (1, 3, 32)  # head 0 reads the trunk alone
    assert next_token_ids(torch.tensor([[1, 2, 3]]), torch.tensor([9])).tolist() == [[2, 3, 9]]
    assert next_token_ids(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, 0]]


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="packing needs fbgemm (x86)")
@pytest.mark.parametrize("fmt", ["fp16", "int8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_and_quantised_models_read_the_next_token(fmt, family):
    """`--quantize fp16|int8` (the bench's CPU rows) decode such heads too: int8 turns the projection into a
    quantised module too, whose weight is a method; fp16 packs every Linear of a model without the lean layers
    (GPT-2), the projection's too, which then has no weight (that crashed)."""
    model = quantize_model(reading_next_token(tiny_mtp(family, num_heads=3, seed=5, vocab_size=41)), fmt)
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    greedy = generate(model, prompt, max_new_tokens=12, stop_token_ids=[])
    assert generate(model, prompt, max_new_tokens=12, strategy="speculative", stop_token_ids=[]).tokens == \
        greedy.tokens
