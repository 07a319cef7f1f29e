"""MTPCache bookkeeping: per-row lengths, forgotten slots overwritten, static and host-read modes, row selection."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.errors import MTPError
from mtp.models.cache import MTPCache, write_kv


def block_logits(model, cache, block: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Every head's logits for a block fed after what the cache holds; row b then keeps keep[b] of its slots."""
    trunk, ctx = model.trunk_forward(block, None, cache)
    logits = model.lm_head(torch.stack([model.head_forward(h, trunk, ctx) for h in range(model.num_heads)], 2))
    cache.commit(keep)
    return logits  # (B, T, n, V)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("static", [False, True])
def test_rows_keep_their_own_lengths_and_the_logits_stay_exact(family, static):
    model = tiny_mtp(family, num_heads=2, dtype=torch.float64)
    ids = torch.randint(0, 61, (2, 6))
    blocks = [torch.randint(0, 61, (2, 4)) for _ in range(3)]
    keeps = [torch.tensor([1, 3]), torch.tensor([3, 0]), torch.tensor([0, 2])]  # 0: the row stays as it was
    cache = model.new_cache(2, 6 + 3 * 4 + 4, static=static)
    with torch.no_grad():
        block_logits(model, cache, ids, None)
        for block, keep in zip(blocks, keeps, strict=True):
            block_logits(model, cache, block, keep)
        assert cache.length.tolist() == [10, 11] and cache.next_pos.tolist() == [10, 11]
        more = torch.randint(0, 61, (2, 3))
        out = block_logits(model, cache, more, None)
    for row in range(2):
        seq = torch.cat([ids[row]] + [b[row, : int(k[row])] for b, k in zip(blocks, keeps, strict=True)]
                        + [more[row]])[None]
        full = model(seq, return_all_heads=True)[0]  # (T, n, V)
        assert (out[row] - full[-3:]).abs().max() < 1e-9


def test_left_padding_leaves_holes_that_are_never_attended():
    model = tiny_mtp("llama", num_heads=1, dtype=torch.float64)
    ids = torch.tensor([[0, 0, 7, 8], [1, 2, 3, 4]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        trunk, ctx = model.trunk_forward(ids, valid, cache)
        model.head_forward(0, trunk, ctx)
        cache.commit()
        step = block_logits(model, cache, torch.tensor([[9], [9]]), None)
        alone = model(torch.tensor([[7, 8, 9]]))[0, -1, 0]
    assert cache.next_pos.tolist() == [3, 5] and cache.length.tolist() == [5, 5]
    assert (step[0, -1, 0] - alone).abs().max() < 1e-9


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_a_block_attends_to_what_its_layout_allows(static, per_row):
    """The mask of a block laid out by `within` (a tree's, mask tokens'), against its definition: a query sees the
    valid slots before its block, the block's slots its layout allows (a subset of causal order), and itself
    (a padding query too), whatever each row's length."""
    gen = torch.Generator().manual_seed(0)
    b, t, max_len = 3, 5, 24
    cache = MTPCache(b, max_len, num_stacks=1, static=static)
    for width in (6, 3):  # a left-padded prompt, then a block each row keeps part of
        valid = torch.rand(b, width, generator=gen) < 0.8
        cache.prepare_block(valid, torch.float32)
        cache.commit(torch.randint(0, width + 1, (b,), generator=gen))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    within = causal & (torch.rand(b if per_row else 1, t, t, generator=gen) < 0.5)
    within = within if per_row else within[0]
    block_valid = torch.rand(b, t, generator=gen) < 0.8
    mask, _ = cache.prepare_block(block_valid, torch.float32, within=within)  # (B, 1, T, W)
    layout = within.expand(b, t, t)
    for row in range(b):
        start = int(cache.length[row])
        for q in range(t):
            seen = [k for k in range(cache.window) if k == start + q or (bool(cache.valid[row, k]) and (
                k < start or (start <= k < start + t and bool(layout[row, q, k - start]))))]
            assert (mask[row, 0, q] == 0).nonzero().flatten().tolist() == seen, (row, q)


def test_select_rows_drops_finished_rows():
    model = tiny_mtp("gpt2", num_heads=2, dtype=torch.float64)
    ids = torch.randint(0, 61, (3, 5))
    cache = model.new_cache(3, 10)
    with torch.no_grad():
        model(ids, cache=cache)
        cache.select_rows(torch.tensor([2]))
        step = model(torch.tensor([[7]]), cache=cache, return_all_heads=True)
        full = model(torch.cat([ids[2], torch.tensor([7])])[None], return_all_heads=True)
    assert (step[0, -1] - full[0, -1]).abs().max() < 1e-9


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("split_heads", [False, True], ids=["heads", "layers-by-heads"])
def test_a_compiled_block_write_writes_what_the_eager_one_does(backend, split_heads):
    """`write_kv` writes each row's keys and values at its own slots into one layer's row of a stack's buffer;
    compiled (an index_put into the whole buffer, which inductor writes in place) it writes the same as eagerly
    (a scatter into the layer's row), and nothing else. The heads may come as (layers, heads): the extra heads'
    stack writes m layers' heads at once."""
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(0)
    layers, b, heads, t, d, length = 3, 3, 4, 4, 8, 32
    stack = torch.randn(layers, 2, b, heads, length, d, generator=g)
    kv = torch.randn(2, b, heads, t, d, generator=g)
    slots = torch.stack([torch.randperm(length, generator=g)[:t] for _ in range(b)])  # (B, T)
    expected = stack.clone()
    for row in range(b):
        for j in range(t):
            expected[1, :, row, :, slots[row, j]] = kv[:, row, :, j]
    block = kv.view(2, b, 2, heads // 2, t, d) if split_heads else kv
    eager = stack.clone()
    write_kv(eager, 1, slots, block)
    assert torch.equal(eager, expected)
    torch._dynamo.reset()
    torch.compile(write_kv, backend=backend, fullgraph=True, dynamic=False)(stack, 1, slots, block)
    assert torch.equal(stack, expected)


def test_a_stack_refuses_a_layer_of_another_width():
    """A cache stack's buffer is shaped by its first write: a later write with another number of key/value heads
    (the extra heads run as one wide layer, then one by one) is refused rather than written into part of it."""
    cache = MTPCache(1, 16, num_stacks=1, stack_layers=[1])
    stack = cache.stack(0)
    buffer, row = stack.buffer_row(0, torch.empty(1, 9, 0, 8))
    assert buffer.shape == (1, 2, 1, 9, 16, 8) and row == 0
    with pytest.raises(MTPError, match="holds 9 key/value heads a layer, a layer wrote 3"):
        stack.buffer_row(0, torch.empty(1, 3, 0, 8))


def test_a_cache_that_is_not_static_holds_what_its_rows_do(monkeypatch):
    """Eagerly (not static) a cache's buffers hold a few slots a row, doubled as its rows grow, rather than all
    `max_len` (a batch that rows join or leave copies what its buffers hold); a static one holds them all from the
    start. Decoding through buffers that start at 2 slots gives what decoding through the usual ones gives."""
    cache = MTPCache(1, 1000, num_stacks=1, stack_layers=[1])
    cache.prepare_block(torch.ones(1, 300, dtype=torch.bool), torch.float32)
    assert cache.stack(0).buffer_row(0, torch.empty(1, 3, 0, 8))[0].shape[4] == 512
    cache.commit()
    cache.prepare_block(torch.ones(1, 300, dtype=torch.bool), torch.float32)
    assert cache.capacity == 1000 and cache.stack(0).kv.shape[4] == 1000  # (600 > 512: doubled, at most max_len)
    static = MTPCache(1, 1000, num_stacks=1, stack_layers=[1], static=True)
    static.prepare_block(torch.ones(1, 3, dtype=torch.bool), torch.float32)
    assert static.stack(0).buffer_row(0, torch.empty(1, 3, 0, 8))[0].shape[4] == 1000

    model = tiny_mtp("llama", num_heads=3, seed=1, dtype=torch.float64, vocab_size=40)
    ids, mask = left_pad([[1, 2, 3], [4, 5], [6]])
    kw = dict(max_new_tokens=[20, 7, 30], strategy="speculative", lookup=2, stop_token_ids=[])
    usual = generate(model, ids, mask, **kw)
    monkeypatch.setattr(MTPCache, "FIRST_CAPACITY", 2)
    assert generate(model, ids, mask, **kw).tokens == usual.tokens
