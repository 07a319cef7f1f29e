"""`weights_state` and `kept_copy`: copies made from weights are remade exactly when the weights change."""

import gc

import torch

from mtp.models.weight_state import kept_copy, weights_state


def test_a_kept_copy_is_remade_when_a_weight_changes_and_only_then():
    weight = torch.randn(4, 3)
    store, builds = {}, []

    def doubled():
        builds.append(1)
        return weight * 2

    first = kept_copy(store, "w", [weight], doubled)
    assert kept_copy(store, "w", [weight], doubled) is first and len(builds) == 1
    weight.add_(1)  # in place: same address, higher version
    again = kept_copy(store, "w", [weight], doubled)
    assert len(builds) == 2 and torch.equal(again, weight * 2)
    assert kept_copy(store, "w", [weight], doubled, extra=("swapped",)) is not again  # `extra` is part of the key
    assert len(builds) == 3
    weight = torch.randn(4, 3)  # replaced
    assert torch.equal(kept_copy(store, "w", [weight], doubled), weight * 2) and len(builds) == 4


def test_weights_made_in_inference_mode_have_a_state():
    with torch.inference_mode():
        weight = torch.randn(2, 2)
    assert weights_state([weight]) == ((weight.data_ptr(), 0),)


def test_under_compile_the_kept_copy_is_read_unchecked_or_built_in_the_graph():
    """A compiled step reads no address (dynamo 2.11 cannot trace `data_ptr`): it returns the copy kept by the
    eager step before it, or, with none kept, builds one in the graph."""
    weight = torch.randn(4, 3)
    x = torch.randn(2, 3)
    kept = {}
    kept_copy(kept, "w", [weight], lambda: weight * 2)
    weight.mul_(0)  # a change the compiled step does not check (a session's weights stay put)

    @torch.compile(backend="eager", fullgraph=True)
    def step(store, x):
        return x @ kept_copy(store, "w", [weight], lambda: weight * 3).t()

    torch._dynamo.reset()
    assert torch.equal(step(kept, x), x @ kept["w"][1].t())  # the kept copy, unchecked
    empty = {}
    assert torch.equal(step(empty, x), torch.zeros(2, 4))  # none kept: built in the graph (weight is 0 now)
    assert empty == {}


def test_copies_made_from_weights_keep_none_of_them_alive():
    """The copies decoding keeps refer to their weights' storage weakly (`storage_refs`): a model quantised for
    decoding after it decoded in fp32 frees the fp32 weights it no longer has (the point of decode-only)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from conftest import tiny_mtp
    from mtp.decoding.generate import generate
    from mtp.models.loading import quantize_model

    model = tiny_mtp("llama", num_heads=3, vocab_size=40)
    model.set_draft_vocab(list(range(0, 40, 2)))
    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, strategy="speculative")  # blocked copies, rows
    weights = {n: StorageWeakRef(p.untyped_storage()) for n, p in model.named_parameters() if p.dim() == 2}
    quantize_model(model, "fp16", decode_only=True)
    gc.collect()
    left = {n for n, _ in model.named_parameters()}
    assert not [n for n, ref in weights.items() if n not in left and not ref.expired()]
