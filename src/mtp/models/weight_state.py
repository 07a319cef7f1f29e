"""What a copy made from a model's weights was made from (fused projections, stacked heads, blocked weights, the
draft vocabulary's rows, a captured CUDA graph): each weight's address and version; and such copies kept."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

Copy = TypeVar("Copy")


def weights_state(tensors: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(address, version) of each tensor: a replaced tensor has another address, an in-place change (an
    optimizer's step, `load_state_dict`) a higher version. A tensor made in inference mode has no version counter
    (reading it raises) and cannot be changed in place outside inference mode: 0."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)


def kept_copy(store: dict, name: Hashable, sources: Iterable[torch.Tensor], build: Callable[[], Copy],
              extra: tuple = ()) -> Copy:
    """`build()`, a copy made from the tensors `sources` (weights joined, stacked, their rows picked), kept in
    `store[name]` and made again when any of them changes (`weights_state`, `storage_refs`) or `extra` does. A
    build that returns None (no memory to spare for the copy) keeps nothing: the next call tries again.

    Inside a compiled step it is the copy kept by then, unchecked: dynamo cannot read an address (torch 2.11's
    fails on `data_ptr`), and it needs not: a compiled step runs in a decode session, whose eager prompt step
    kept the copy and whose weights stay put (a session is keyed by their state, `mtp.decoding.graphs`). With
    none kept, the compiled step builds it itself."""
    cached = store.get(name)
    if torch.compiler.is_compiling():
        return cached[1] if cached is not None else build()
    sources = tuple(sources)
    key = (extra, weights_state(sources))
    if cached is None or cached[0] != key or any(ref.expired() for ref in cached[2]):  # (`outlived`, inline: hot)
        store.pop(name, None)  # the old copy goes before the new one is made
        copy = build()
        if copy is None:
            return None
        cached = store[name] = (key, copy, storage_refs(sources))
    return cached[1]


def storage_refs(tensors: Iterable[torch.Tensor]) -> tuple[StorageWeakRef, ...]:
    """Weak references to the tensors' storage, kept beside a copy made from them. A tensor replaced twice between
    two checks could come back at the first one's freed address with its parameter's version unchanged
    (`p.data = ...` keeps the counter) and pass for it by `weights_state`; its first storage is freed by then,
    which these see (`outlived`). Weak: a copy keeps no weight alive (a model quantised after decoding frees its
    fp32 weights)."""
    return tuple(StorageWeakRef(t.untyped_storage()) for t in tensors)


def outlived(refs: Iterable[StorageWeakRef]) -> bool:
    """Whether any storage a copy was made from has been freed since (`storage_refs`)."""
    return any(ref.expired() for ref in refs)
