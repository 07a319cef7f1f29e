"""Decoding keeps copies made from the weights (fused projections, stacked heads, draft rows, oneDNN's blocked
fp32 weights, decode sessions): whatever happens to the weights between two decodes, a decode must equal the
same decode of a model that went through the same changes without decoding in between (fp32: the same kernels,
so the same tokens exactly). Checked to fail where the copies are not remade (fused or blocked weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtp.decoding.generate as generate_module
from conftest import tiny_mtp
from mtp.decoding.generate import generate
from mtp.models import fast_llama

CHANGES = ("in_place", "replace_data", "load_state_dict", "assign", "dtype_round_trip", "draft_vocab")
DECODES = ({}, {"strategy": "speculative"},
           {"strategy": "speculative", "tree": "auto", "tree_size": 3, "lookup": 2})


def change(model, kind: str, gen: torch.Generator) -> None:
    """One change of the weights, as a user's code might make it."""
    params = list(model.parameters())
    picked = [p for p in params if torch.rand((), generator=gen) < 0.5] or params[:1]
    with torch.no_grad():
        if kind == "in_place":  # an optimizer's step
            for p in picked:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        elif kind == "replace_data":  # new tensors, the parameters' version counters unchanged
            for p in picked:
                p.data = p.data + torch.randn(p.shape, generator=gen) * 0.05
        elif kind in ("load_state_dict", "assign"):
            moved: dict[int, torch.Tensor] = {}  # by storage: tied weights (embeddings, unembedding) stay tied
            state = {k: moved.setdefault(v.data_ptr(), v + torch.randn(v.shape, generator=gen) * 0.05)
                     if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.load_state_dict(state, assign=kind == "assign")
        elif kind == "dtype_round_trip":  # fp32 -> bf16 -> fp32: new tensors with rounded values
            model.to(torch.bfloat16)
            model.to(torch.float32)
        else:
            vocab = model.config.vocab_size
            model.set_draft_vocab(None if torch.rand((), generator=gen) < 0.3 else
                                  torch.randperm(vocab, generator=gen)[: vocab // 2].tolist())


@pytest.mark.parametrize("path", ["cpu", "gpu"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_decode_after_a_change_of_the_weights_uses_the_new_weights(data, monkeypatch, path):
    if path == "gpu":  # the GPU's fused layers and replayed sessions (the CPU's stand-in)
        monkeypatch.setattr(fast_llama, "FUSED_DEVICES", {"cpu"})
        monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: graphs)
    model = tiny_mtp("llama", num_heads=3, seed=data.draw(st.integers(0, 100)), vocab_size=40)
    pristine = copy.deepcopy(model)  # never decodes: no copies made from its weights
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    history: list[tuple[str, torch.Tensor]] = []
    ids = torch.tensor([[1, 2, 3, 1, 2, 3]])
    for kinds in data.draw(st.lists(st.lists(st.sampled_from(CHANGES), max_size=3), min_size=1, max_size=4)):
        for kind in kinds:  # zero to three changes between two decodes
            history.append((kind, gen.get_state()))
            change(model, kind, gen)
        # the reference: the same changes made to a model that has never decoded
        fresh = copy.deepcopy(pristine)
        for kind, state in history:
            change(fresh, kind, torch.Generator().set_state(state))
        kw = dict(max_new_tokens=8, stop_token_ids=[], graphs=path == "gpu", **data.draw(st.sampled_from(DECODES)))
        assert generate(model, ids, **kw).tokens == generate(fresh, ids, **kw).tokens, kinds
