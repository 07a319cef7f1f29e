"""What a copy made from a model's weights was made from (fused projections, stacked heads, blocked weights, the
draft vocabulary's rows, a captured CUDA graph): each weight's address and version."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def weights_state(tensors: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(address, version) of each tensor: a replaced tensor has another address, an in-place change (an
    optimizer's step, `load_state_dict`) a higher version. A tensor made in inference mode has no version counter
    (reading it raises) and cannot be changed in place outside inference mode: 0."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
