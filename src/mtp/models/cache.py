"""Explicit key/value cache for MTP decoding: one preallocated buffer set per layer stack (trunk, each head).

All stacks see the same token slots, so one `MTPCache` owns the bookkeeping shared by them: how many slots are
filled, which slots are valid for each row (left padding and rejected speculative tokens leave holes), and the
next position id of each row. Rolling back after a rejected speculation is a change of these counters and flags;
no tensor is copied. The per-stack `StackCache.update` has the signature transformers' attention modules call
(`past_key_values.update(k, v, layer_idx)`), so Hugging Face layers write straight into our buffers.
"""

from __future__ import annotations

import torch

from mtp.errors import MTPError


class StackCache:
    """Keys and values of one stack of layers in one buffer each, `(layers, B, kv_heads, max_len, head_dim)`,
    allocated at the first write (so moving or dropping slots is one op per buffer, not one per layer). Layers
    take buffer rows in the order they first write; a stack told its number of layers allocates them at once."""

    def __init__(self, owner: MTPCache, num_layers: int | None = None):
        self.owner = owner
        self.num_layers = num_layers
        self.row: dict[int, int] = {}  # layer_idx -> its row in the buffers
        self.k: torch.Tensor | None = None  # (layers, B, kv_heads, max_len, head_dim)
        self.v: torch.Tensor | None = None

    @property
    def keys(self) -> dict[int, torch.Tensor]:
        return {layer: self.k[row] for layer, row in self.row.items()}

    @property
    def values(self) -> dict[int, torch.Tensor]:
        return {layer: self.v[row] for layer, row in self.row.items()}

    def buffers(self) -> list[torch.Tensor]:
        return [x for x in (self.k, self.v) if x is not None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        start = self.owner.length
        end = start + key_states.shape[2]
        row = self.row.get(layer_idx)
        if row is None:
            row = self.row[layer_idx] = len(self.row)
            if self.k is None or row >= self.k.shape[0]:
                self._grow(max(self.num_layers or 0, row + 1), key_states, value_states)
        k, v = self.k[row], self.v[row]
        k[:, :, start:end] = key_states
        v[:, :, start:end] = value_states
        return k[:, :, :end], v[:, :, :end]  # (B, kv_heads, end, head_dim)

    def _grow(self, layers: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_zeros((layers, b, h, self.owner.max_len, d))
        v = value_states.new_zeros((layers, b, value_states.shape[1], self.owner.max_len, value_states.shape[-1]))
        if self.k is not None:  # a stack that did not say how many layers it has: rare, and only while filling
            k[: self.k.shape[0]], v[: self.v.shape[0]] = self.k, self.v
        self.k, self.v = k, v

    def select_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, index], self.v[:, index]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.owner.length

    @property
    def is_compileable(self) -> bool:
        return False


class MTPCache:
    """Shared slot bookkeeping plus one `StackCache` per stack (index 0: trunk, 1 + j: head j)."""

    def __init__(self, batch_size: int, max_len: int, num_stacks: int, device: torch.device | str = "cpu",
                 stack_layers: list[int] | None = None):
        """`stack_layers`: the number of layers of each stack, when known (their buffers are then allocated once)."""
        self.max_len = max_len
        self.length = 0  # slots written so far (the same for every stack)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        layers = stack_layers if stack_layers is not None else [None] * num_stacks
        if len(layers) != num_stacks:
            raise MTPError(f"stack_layers has {len(layers)} entries for {num_stacks} stacks")
        self.stacks = [StackCache(self, n) for n in layers]
        self._slots = torch.arange(max_len, device=device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def stack(self, index: int) -> StackCache:
        return self.stacks[index]

    def prepare_block(self, block_valid: torch.Tensor, dtype: torch.dtype, offsets: torch.Tensor | None = None,
                      within: torch.Tensor | None = None):
        """Mark the next T slots and return (additive mask (B,1,T,end) or None, position ids (B,T)).

        A query attends to valid earlier-or-equal slots of its row, and always to its own slot (a padding query
        then has a harmless row instead of an all-masked one, which would give NaN). A drafter that lays out
        more than a chain (mask tokens, a tree of candidates) gives `within` (T, T) bool, which block slots
        each block slot may see (a subset of causal order), and `offsets` (B, T), each slot's position id
        relative to the row's next position (default: consecutive over the valid slots).
        """
        b, t = block_valid.shape
        if self.length + t > self.max_len:
            self.compact()
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise MTPError(f"sequence of {end} tokens exceeds the cache of {self.max_len} slots")
        self.valid[:, start:end] = block_valid
        if offsets is None:
            offsets = block_valid.long().cumsum(-1) - 1
        position_ids = (self.next_pos[:, None] + offsets).clamp_min(0)  # (B, T)
        if t == 1 and bool(self.valid[:, :end].all()):
            return None, position_ids
        keys = self._slots[:end]  # (end,)
        queries = self._slots[start:end]  # (T,)
        allowed = self.valid[:, None, :end] & (keys[None, None, :] <= queries[None, :, None])  # (B, T, end)
        if within is not None:
            allowed[:, :, start:end] &= within
        allowed |= keys[None, None, :] == queries[None, :, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None], position_ids  # (B, 1, T, end), (B, T)

    def commit_block(self, block_valid: torch.Tensor) -> None:
        self.length += block_valid.shape[1]
        self.next_pos += block_valid.long().sum(-1)

    def rollback(self, block_len: int, keep: torch.Tensor) -> None:
        """Forget the tail of the last block of `block_len` slots: row b keeps its first `keep[b]` of them."""
        start = self.length - block_len
        offsets = torch.arange(block_len, device=keep.device)
        block = self.valid[:, start:self.length]
        dropped = block & (offsets[None, :] >= keep[:, None])  # (B, block_len)
        self.next_pos -= dropped.long().sum(-1)
        block &= ~dropped
        # Slots no row keeps are reused by the next block; earlier holes stay masked.
        self.length = start + int(keep.max())

    def keep_path(self, block_len: int, prefix: int, count: torch.Tensor, path: torch.Tensor | None) -> None:
        """After verifying a block of `prefix` fed slots then drafts: row b keeps the prefix and `count[b]`
        drafts. A chain's drafts are kept in place (`path` None); a tree's kept path (B, D) of node indices, in
        depth order, is first moved to the slots right after the prefix (a node's ancestors are always in
        earlier slots, so every move goes to a slot no later than its source)."""
        depth = int(count.max()) if path is not None else 0  # nodes to move: none when no row kept a draft
        if depth:
            start = self.length - block_len + prefix  # the prefix stays where it is
            order = start + path[:, :depth]  # (B, depth) source slots of the kept nodes, in depth order
            span = slice(start, start + depth)
            self.valid[:, span] = self.valid.gather(1, order)
            for stack in self.stacks:
                for buf in stack.buffers():  # (layers, B, heads, max_len, D)
                    idx = order[None, :, None, :, None].expand(buf.shape[0], -1, buf.shape[2], -1, buf.shape[4])
                    buf[:, :, :, span] = buf.gather(3, idx)
        self.rollback(block_len, prefix + count)

    def compact(self) -> None:
        """Squeeze out the holes rejected tokens left in a batch: each row's valid slots move, in order, to the
        end of a shorter filled region (as if left-padded). Rare: only when the buffers run out of slots."""
        order = torch.sort(self.valid[:, : self.length].to(torch.int8), dim=1, stable=True).indices  # (B, L)
        new_len = int(self.valid[:, : self.length].sum(-1).max())
        order = order[:, self.length - new_len:]  # (B, new_len): last new_len slots, valid ones last
        valid = self.valid[:, : self.length].gather(1, order)
        for stack in self.stacks:
            for buf in stack.buffers():  # (layers, B, heads, max_len, D)
                idx = order[None, :, None, :, None].expand(buf.shape[0], -1, buf.shape[2], -1, buf.shape[4])
                buf[:, :, :, :new_len] = buf[:, :, :, : self.length].gather(3, idx)
        self.valid.zero_()
        self.valid[:, :new_len] = valid
        self.length = new_len

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
        self.next_pos.zero_()

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing work)."""
        self.valid = self.valid[index]
        self.next_pos = self.next_pos[index]
        for stack in self.stacks:
            stack.select_rows(index)
