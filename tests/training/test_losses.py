"""k-ahead targets, the two loss orders (equal gradients), head weights, held-out evaluation."""

import pytest
import torch
from training_helpers import random_batch, tiny_gpt2, tiny_llama

from mtp.errors import MTPError
from mtp.training.data import TokenizedData
from mtp.training.losses import (
    TARGET_POSITIONS,
    evaluate_heads,
    forward_context,
    head_picks,
    head_weights,
    mtp_loss_memory_efficient,
    mtp_loss_naive,
    shift_targets,
    target_counts,
    target_positions,
)


def test_shift_targets_docstring_table() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14]])  # a b c d e
    every = torch.ones_like(ids, dtype=torch.bool)
    expected = {0: [11, 12, 13, 14], 1: [12, 13, 14], 2: [13, 14], 3: [14]}
    for head, tokens in expected.items():
        targets, mask = shift_targets(ids, every, head)
        assert mask[0].tolist() == [True] * len(tokens) + [False] * (5 - len(tokens))
        assert targets[0][mask[0]].tolist() == tokens
    targets, mask = shift_targets(ids, every, 7)  # beyond the row: nothing to predict
    assert not mask.any()


def test_shift_targets_prompt_and_padding() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 0]])
    loss_mask = torch.tensor([[False, False, True, True, True, False]])  # prompt a b, answer c d e, one pad
    _, m0 = shift_targets(ids, loss_mask, 0)
    _, m1 = shift_targets(ids, loss_mask, 1)
    assert m0[0].tolist() == [False, True, True, True, False, False]
    assert m1[0].tolist() == [True, True, True, False, False, False]
    assert target_counts({"input_ids": ids, "loss_mask": loss_mask}, 3) == [3, 3, 2]
    with pytest.raises(MTPError):
        shift_targets(ids, loss_mask, -1)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_memory_efficient_gradients_equal_naive(make) -> None:
    model = make(num_heads=3)
    model.train()
    batch = random_batch()
    weights = [1.0, 0.5, 0.25]
    naive = mtp_loss_naive(model, batch, weights)
    g_naive = _grads(model)
    model.zero_grad(set_to_none=True)
    efficient = mtp_loss_memory_efficient(model, batch, weights)
    g_eff = _grads(model)
    assert set(g_naive) == set(g_eff)
    # Every part got a gradient: embeddings and trunk (through the final trunk backward) and each extra head.
    assert any("embed" in n or "wte" in n for n in g_eff)
    assert any(n.startswith("extra_heads.1.") for n in g_eff)
    for name in g_naive:
        torch.testing.assert_close(g_eff[name], g_naive[name], rtol=1e-5, atol=1e-7, msg=name)
    assert efficient.head_losses == pytest.approx(naive.head_losses, rel=1e-6)
    assert efficient.loss == pytest.approx(naive.loss, rel=1e-6)
    assert efficient.head_tokens == naive.head_tokens


@pytest.mark.parametrize("seed", range(4))
def test_losses_equal_a_reference_over_every_logit(seed) -> None:
    """The loss picks positions by index (no host sync) where a reference picks them with `shift_targets`' masks:
    every head's loss, hits and target count equal the reference's over the model's full logits, also for
    targets in a row's first columns (which no column of a later head predicts), and whether the target positions
    come with the batch (as the Trainer gives them) or not; odd seeds: heads that read the next token, which
    training and held-out evaluation take from the row as the model's own forward does."""
    import torch.nn.functional as F

    model = tiny_llama(num_heads=4, seed=seed)
    if seed % 2:
        model.add_next_token_input()
        with torch.no_grad():
            model.next_token_in.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    b = random_batch(batch=4, length=11, seed=seed)
    b["loss_mask"][:, :2] = b["attention_mask"][:, :2].bool()  # targets from column 0 on
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"], return_all_heads=True)  # (B, T, n, V)
        out = mtp_loss_naive(model, b, [1.0] * 4, backward=False)
        given = mtp_loss_memory_efficient(model, {**b, TARGET_POSITIONS: b["loss_mask"].nonzero()}, [1.0] * 4,
                                          backward=False)
    for j in range(4):
        targets, mask = shift_targets(b["input_ids"], b["loss_mask"], j)
        picked, goal = logits[:, :, j][mask], targets[mask]
        assert out.head_losses[j] == pytest.approx(float(F.cross_entropy(picked, goal)), rel=1e-5)
        assert out.head_correct[j] == int((picked.argmax(-1) == goal).sum())
        assert out.head_tokens[j] == int(mask.sum())
    assert given.head_losses == pytest.approx(out.head_losses, rel=1e-6)
    assert (given.head_correct, given.head_tokens) == (out.head_correct, out.head_tokens)
    held = evaluate_heads(model, TokenizedData.from_dense(b["input_ids"], b["loss_mask"], b["attention_mask"]))
    assert held.head_loss == pytest.approx(out.head_losses, rel=1e-5)
    assert held.head_accuracy == pytest.approx([c / t for c, t in zip(out.head_correct, out.head_tokens,
                                                                      strict=True)])


def test_head_picks_pick_what_shift_targets_masks() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = random_batch(batch=int(torch.randint(1, 5, (1,), generator=g)),
                         length=int(torch.randint(2, 14, (1,), generator=g)), seed=int(torch.randint(99, (1,))))
        b["loss_mask"] &= torch.rand(b["loss_mask"].shape, generator=g) < 0.8
        for j in range(5):
            targets, mask = shift_targets(b["input_ids"], b["loss_mask"], j)
            rows, cols, goal = head_picks(b, j, target_positions(b))
            seen = goal >= 0
            assert torch.equal(torch.stack([rows[seen], cols[seen]], -1), mask.nonzero())  # same places, same order
            assert torch.equal(goal[seen], targets[mask])
        assert target_counts(b, 5) == [int(shift_targets(b["input_ids"], b["loss_mask"], j)[1].sum()) for j in range(5)]


def test_zero_weight_head_is_skipped() -> None:
    model = tiny_llama(num_heads=3)
    out = mtp_loss_memory_efficient(model, random_batch(), [0.0, 1.0, 1.0])
    assert out.head_losses[0] is None and out.head_losses[1] is not None
    assert all(p.grad is None for p in model.head_layers(0).parameters()) or all(
        float(p.grad.abs().sum()) == 0 for p in model.head_layers(0).parameters())


def test_frozen_trunk_input_gives_head_gradients_only() -> None:
    model = tiny_llama(num_heads=3)
    model.requires_grad_(False)
    model.extra_heads.requires_grad_(True)
    batch = random_batch()
    with torch.no_grad():
        trunk = model.trunk_forward(batch["input_ids"], batch["attention_mask"])
    mtp_loss_memory_efficient(model, batch, [0.0, 1.0, 1.0], trunk=trunk)
    g_eff = _grads(model)
    model.zero_grad(set_to_none=True)
    mtp_loss_naive(model, batch, [0.0, 1.0, 1.0], trunk=trunk)
    g_naive = _grads(model)
    assert g_eff and all(n.startswith("extra_heads.") for n in g_eff)
    for name in g_naive:
        torch.testing.assert_close(g_eff[name], g_naive[name])


def test_forward_context_matches_trunk_forward() -> None:
    model = tiny_llama(num_heads=2)
    batch = random_batch()
    with torch.no_grad():
        hidden, ctx = model.trunk_forward(batch["input_ids"], batch["attention_mask"])
        rebuilt = forward_context(model, batch["input_ids"], batch["attention_mask"], hidden)
        for j in range(2):
            torch.testing.assert_close(model.head_forward(j, hidden, rebuilt), model.head_forward(j, hidden, ctx),
                                       rtol=0, atol=0)


def test_normalizers_make_accumulation_equal_one_big_batch() -> None:
    model = tiny_llama(num_heads=3)
    model.train()
    big = random_batch(batch=4, seed=5)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    w = [1.0, 1.0, 0.5]
    mtp_loss_memory_efficient(model, big, w)
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    norms = [a + b for a, b in zip(target_counts(halves[0], 3), target_counts(halves[1], 3), strict=True)]
    for half in halves:
        mtp_loss_memory_efficient(model, half, w, normalizers=norms)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, g_big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nonfinite_head_is_reported_without_backward() -> None:
    model = tiny_llama(num_heads=3)
    with torch.no_grad():
        next(model.extra_heads[1].parameters()).fill_(float("nan"))
    out = mtp_loss_memory_efficient(model, random_batch(), [1.0, 1.0, 1.0])
    assert out.nonfinite_head == 2
    out = mtp_loss_naive(model, random_batch(), [1.0, 1.0, 1.0])
    assert out.nonfinite_head == 2


def test_head_weights() -> None:
    assert head_weights("equal", 3) == [1.0, 1.0, 1.0]
    assert head_weights("medusa", 4) == pytest.approx([1.0, 0.2, 0.16, 0.128])
    assert head_weights("1, 0.5,0.25", 3) == [1.0, 0.5, 0.25]
    for bad, n in [("1,2", 3), ("a,b", 2), ("0,0", 2), ("-1,1", 2), ("nan,1", 2)]:
        with pytest.raises(MTPError):
            head_weights(bad, n)


def test_a_batch_is_padded_to_its_longest_row_only() -> None:
    b = random_batch(length=12)  # rows of 12, 9 and 6 real tokens
    data = TokenizedData.from_dense(b["input_ids"], b["loss_mask"], b["attention_mask"], pad_id=0)
    assert data.batch(torch.tensor([0, 1]))["input_ids"].shape[1] == 12
    short = data.batch(torch.tensor([2, 1]))
    real = b["attention_mask"][[2, 1], :9].bool()
    assert torch.equal(short["attention_mask"].bool(), real)
    assert torch.equal(short["input_ids"], b["input_ids"][[2, 1], :9].masked_fill(~real, 0))
    assert torch.equal(short["loss_mask"], b["loss_mask"][[2, 1], :9])


def test_evaluate_heads_counts_and_accuracy() -> None:
    model = tiny_llama(num_heads=3)
    b = random_batch()
    data = TokenizedData.from_dense(b["input_ids"], b["loss_mask"], b["attention_mask"])
    ev = evaluate_heads(model, data, batch_size=2)
    assert ev.head_tokens == target_counts(b, 3)
    assert all(0.0 <= a <= 1.0 for a in ev.head_accuracy)
    assert 1.0 <= ev.tokens_per_forward <= 3.0
    # A second token that is head 0's own argmax after the first: head 0 is right on it.
    ids = b["input_ids"][:, :2].clone()
    with torch.no_grad():
        ids[:, 1] = model(ids[:, :1])[:, 0, 0].argmax(-1)
    data = TokenizedData.from_dense(ids, torch.tensor([[False, True]] * 3), torch.ones(3, 2, dtype=torch.long))
    assert evaluate_heads(model, data).head_accuracy[0] == 1.0


def test_evaluate_heads_measures_accuracy_per_candidate_rank() -> None:
    """What `--tree auto` builds trees from: rank 0 is top-1 accuracy; ranks are disjoint events."""
    from mtp.decoding.tree import TREE_STATS_KEY

    model = tiny_llama(num_heads=3)
    b = random_batch()
    data = TokenizedData.from_dense(b["input_ids"], b["loss_mask"], b["attention_mask"])
    ev = evaluate_heads(model, data, batch_size=2)
    ranks = ev.extra[TREE_STATS_KEY]
    assert len(ranks) == 2 and all(len(r) == 8 for r in ranks)
    for j, per_rank in enumerate(ranks, start=1):
        assert per_rank[0] == pytest.approx(ev.head_accuracy[j], abs=1e-6)
        assert 0.0 <= sum(per_rank) <= 1.0 + 1e-9 and min(per_rank) >= 0.0
    assert sum(ranks[0]) > ranks[0][0]  # the random heads' targets are not all at rank 0


def test_draft_vocabulary_loss_is_the_full_loss_over_those_tokens() -> None:
    """Restricted to a draft vocabulary, an extra head's loss is the cross-entropy of its full logits with
    every other token masked out; targets outside the vocabulary add no loss and count as misses."""
    import torch.nn.functional as F

    model = tiny_llama(num_heads=3)
    b = random_batch()
    targets, mask = shift_targets(b["input_ids"], b["loss_mask"], 1)
    goal = targets[mask]
    vocab = goal.unique()[::2]  # about half of the targets fall outside
    model.set_draft_vocab(vocab)
    with torch.no_grad():
        out = mtp_loss_naive(model, b, [0.0, 1.0, 0.0], backward=False)
        hidden, ctx = model.trunk_forward(b["input_ids"], b["attention_mask"])
        logits = model.restrict_to_draft_vocab(model.lm_head(model.head_forward(1, hidden, ctx)[mask]))
    inside = torch.isin(goal, vocab)
    expected = F.cross_entropy(logits[inside], goal[inside], reduction="sum") / mask.sum()
    assert out.head_losses[1] == pytest.approx(float(expected), rel=1e-5)
    assert out.head_correct[1] == int((logits.argmax(-1) == goal)[inside].sum())
    ev = evaluate_heads(model, TokenizedData.from_dense(b["input_ids"], b["loss_mask"], b["attention_mask"]))
    assert ev.head_tokens[1] == int(mask.sum())
    assert ev.head_accuracy[1] == pytest.approx(out.head_correct[1] / int(mask.sum()))
