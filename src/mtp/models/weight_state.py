"""What a copy made from a model's weights was made from (fused projections, stacked heads, blocked weights, the
draft vocabulary's rows, a captured CUDA graph): each weight's address and version; and such copies kept."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch

Copy = TypeVar("Copy")


def weights_state(tensors: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(address, version) of each tensor: a replaced tensor has another address, an in-place change (an
    optimizer's step, `load_state_dict`) a higher version. A tensor made in inference mode has no version counter
    (reading it raises) and cannot be changed in place outside inference mode: 0."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)


def kept_copy(store: dict, name: Hashable, sources: Iterable[torch.Tensor], build: Callable[[], Copy],
              extra: tuple = ()) -> Copy:
    """`build()`, a copy made from the tensors `sources` (weights joined, stacked, their rows picked), kept in
    `store[name]` and made again when any of them changes (`weights_state`) or `extra` does.

    Inside a compiled step it is the copy kept by then, unchecked: dynamo cannot read an address (torch 2.11's
    fails on `data_ptr`), and it needs not: a compiled step runs in a decode session, whose eager prompt step
    kept the copy and whose weights stay put (a session is keyed by their state, `mtp.decoding.graphs`). With
    none kept, the compiled step builds it itself."""
    cached = store.get(name)
    if torch.compiler.is_compiling():
        return cached[1] if cached is not None else build()
    sources = tuple(sources)
    key = (*extra, *weights_state(sources))
    if cached is None or cached[0] != key:
        store.pop(name, None)  # the old copy goes before the new one is made
        cached = store[name] = (key, build(), held(sources))
    return cached[1]


def held(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Views of `tensors` kept beside a copy made from them: their storage stays allocated while the copy is kept,
    so no new tensor can take a replaced one's address (and then, with the same version, pass for it - a tensor
    replaced twice between two checks could otherwise come back at the first one's freed address)."""
    return tuple(t.detach() for t in tensors)
