"""MTPCache bookkeeping: rollback per row, holes, compaction, row selection."""

from __future__ import annotations

import torch

from conftest import tiny_mtp


def test_rollback_and_compaction_keep_logits_exact():
    model = tiny_mtp("llama", num_heads=2, dtype=torch.float64)
    ids = torch.randint(0, 61, (2, 6))
    blocks = [torch.randint(0, 61, (2, 4)) for _ in range(2)]
    keeps = [torch.tensor([1, 3]), torch.tensor([3, 1])]
    cache = model.new_cache(2, 14)
    with torch.no_grad():
        model(ids, cache=cache, return_all_heads=True)
        for block, keep in zip(blocks, keeps, strict=True):
            model(block, cache=cache, return_all_heads=True)
            cache.rollback(4, keep)
        assert cache.length == 12 and cache.next_pos.tolist() == [10, 10]
        assert cache.valid[:, :12].sum(-1).tolist() == [10, 10]  # each row has 2 holes, in different places
        more = torch.randint(0, 61, (2, 3))
        out = model(more, cache=cache, return_all_heads=True)  # 12 + 3 > 14 slots: the holes are squeezed out
    assert cache.length == 13
    for row in range(2):
        seq = torch.cat([ids[row]] + [b[row, : int(k[row])] for b, k in zip(blocks, keeps, strict=True)]
                        + [more[row]])[None]
        full = model(seq, return_all_heads=True)[0]  # (T, n, V)
        assert (out[row] - full[-3:]).abs().max() < 1e-9


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
