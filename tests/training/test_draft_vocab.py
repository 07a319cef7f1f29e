"""The draft vocabulary chosen from the training rows."""

import pytest
import torch

from mtp.errors import MTPError
from mtp.training.data import TokenizedData
from mtp.training.draft_vocab import frequent_tokens


def test_most_frequent_tokens_then_lowest_ids() -> None:
    ids = torch.tensor([[7, 7, 7, 5, 5, 9, 0], [7, 5, 9, 3, 8, 8, 8]])
    attention = torch.ones_like(ids)
    attention[1, 3:] = 0  # 3 and 8 are padding: not counted
    data = TokenizedData.from_dense(ids, torch.ones_like(ids, dtype=torch.bool), attention)
    # counts: 7 x4, 5 x3, 9 x2, 0 x1
    assert frequent_tokens(data, 20, 2).tolist() == [5, 7]
    assert frequent_tokens(data, 20, 4).tolist() == [0, 5, 7, 9]
    assert frequent_tokens(data, 20, 6).tolist() == [0, 1, 2, 5, 7, 9]  # topped up with the lowest unused ids
    assert frequent_tokens(data, 20, 0) is None and frequent_tokens(data, 20, 20) is None
    with pytest.raises(MTPError):
        frequent_tokens(data, 20, -1)
