"""A static key/value cache for MTP decoding: preallocated buffers per layer stack, per-row lengths on the device.

All stacks (trunk, each head) see the same token slots, so one `MTPCache` owns the bookkeeping they share, as
device tensors (gpt-fast's `input_pos`, nanochat's per-row lengths):

    length   (B,)    slots row b holds; its next block is written at slots length[b] .. length[b] + T - 1
    next_pos (B,)    the position id of row b's next token
    valid    (B, L)  which slots hold a token (left padding of a prompt leaves invalid slots)

A block is written at each row's own offset, and a query attends to the valid slots up to its own (and, inside
its block, to what the block's layout allows): slots past a row's length are never read, so a rejected draft is
not freed by any bookkeeping - the row's length just does not move past it, and the next block overwrites it.
Every operation has shapes that depend only on (B, T, L), so a decoding step over this cache can be captured
once and replayed as a CUDA graph. With `static` off (the default on CPUs) the cache may read its lengths on the
host to attend over fewer keys and skip work, and its buffers hold the slots its rows reach (doubled as they
grow), not all `max_len`; with it on it never reads the device and its buffers never move.

`StackCache.update` has the signature transformers' attention modules call (`cache.update(k, v, layer_idx)`),
so Hugging Face layers write straight into these buffers.
"""

from __future__ import annotations

import torch

from mtp.errors import MTPError


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, S) bool -> (B, 1, T, S) additive float mask (0 where allowed, the dtype's lowest value elsewhere), the
    4-D form transformers' attention interface and sdpa take."""
    # two kernels, each value a kernel argument (a CPU scalar tensor in a CUDA op would be copied to the device,
    # which a graph capture cannot record)
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(allowed, 0)[:, None]


def write_kv(stack: torch.Tensor, row: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write a block kv (N, B, *heads, T, D) into row `row` of a stack's buffer (layers, N, B, H, max_len, D) at each
    batch row's block slots (B, T): N = 2 writes keys and values at once, one kernel instead of two; `heads`
    (one or more dimensions) spans the H key/value heads."""
    n, b, t, d = kv.shape[0], kv.shape[1], kv.shape[-2], kv.shape[-1]
    if torch.compiler.is_compiling():
        # torch.compile writes an index_put into a graph input in place; a scatter, or any write into a view of
        # one (a layer's row of the stack), became a copy of the whole buffer, written and copied back, in every
        # layer of every step. So the layer's row is an index too.
        layer = torch.full((1, 1, 1), row, device=slots.device)
        parts = torch.arange(n, device=slots.device)[:, None, None]  # (N, 1, 1)
        rows = torch.arange(b, device=slots.device)[None, :, None]  # (1, B, 1)
        stack[layer, parts, rows, :, slots[None]] = kv.flatten(2, -3).transpose(2, 3)  # (N, B, T, H, D)
        return
    buf = stack[row].view(n, b, *kv.shape[2:-2], stack.shape[-2], d)  # eagerly a scatter costs the host less
    heads = [1] * (kv.dim() - 4)
    buf.scatter_(-2, slots.view(1, b, *heads, t, 1).expand(kv.shape), kv)


class StackCache:
    """Keys and values of one stack of layers in one buffer, `(layers, 2, B, kv_heads, max_len, head_dim)`,
    allocated at the first write (so moving or dropping slots is one op per stack, not one per layer). Layers
    take buffer rows in the order they first write; a stack told its number of layers allocates them at once."""

    def __init__(self, owner: MTPCache, num_layers: int | None = None):
        self.owner = owner
        self.num_layers = num_layers
        self.row: dict[int, int] = {}  # layer_idx -> its row in the buffer
        # Keys and values in one buffer, so a block's keys and values are written in one kernel and moving or
        # dropping slots is one op per stack: on a GPU a step costs per kernel.
        self.kv: torch.Tensor | None = None  # (layers, 2, B, kv_heads, max_len, head_dim): keys [:, 0], values [:, 1]

    @property
    def keys(self) -> dict[int, torch.Tensor]:
        return {layer: self.kv[row, 0] for layer, row in self.row.items()}

    @property
    def values(self) -> dict[int, torch.Tensor]:
        return {layer: self.kv[row, 1] for layer, row in self.row.items()}

    def buffers(self) -> list[torch.Tensor]:
        """The stack's buffer as (layers * 2, B, kv_heads, max_len, head_dim), or nothing before its first write."""
        return [] if self.kv is None else [self.kv.flatten(0, 1)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write a block's keys and values (B, kv_heads, T, D) at each row's block slots; return the keys and
        values the block attends over (B, kv_heads, window, D)."""
        if key_states.shape != value_states.shape:
            raise MTPError(f"keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} differ in shape: "
                           "this cache keeps them in one buffer")
        stack, row = self.buffer_row(layer_idx, key_states)
        write_kv(stack, row, self.owner.block_slots, torch.stack((key_states, value_states)))
        end = self.owner.window
        return stack[row, 0, :, :, :end], stack[row, 1, :, :, :end]

    def buffer_row(self, layer_idx: int, key_like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The stack's buffer (layers, 2, B, kv_heads, max_len, D), allocated at the first write (shaped as
        `key_like`, (B, kv_heads, *, D)), and the layer's row of it; a step that writes the layer's keys and values
        itself (`mtp.models.fast_llama`) writes at `owner.block_slots` (`write_kv`) and attends over the first
        `owner.window` slots."""
        row = self.row.get(layer_idx)
        if row is None:
            row = self.row[layer_idx] = len(self.row)
            if self.kv is None or row >= self.kv.shape[0]:
                self._grow(max(self.num_layers or 0, row + 1), key_like)
        if self.kv.shape[3] != key_like.shape[1]:  # (a stack of heads run as one layer, then one by one)
            raise MTPError(f"this cache stack holds {self.kv.shape[3]} key/value heads a layer, a layer wrote "
                           f"{key_like.shape[1]}: decode with a new cache")
        return self.kv, row

    def _grow(self, layers: int, key_like: torch.Tensor) -> None:
        b, h, _, d = key_like.shape
        kv = key_like.new_zeros((layers, 2, b, h, self.owner.capacity, d))
        if self.kv is not None:  # a stack that did not say how many layers it has: rare, and only while filling
            kv[: self.kv.shape[0]] = self.kv
        self.kv = kv

    def reserve(self, slots: int) -> None:
        """Hold `slots` slots a row (a cache that is not static grows as its rows do)."""
        if self.kv is not None and self.kv.shape[4] < slots:
            kv = self.kv.new_zeros(self.kv.shape[:4] + (slots,) + self.kv.shape[5:])
            kv[:, :, :, :, : self.kv.shape[4]] = self.kv
            self.kv = kv

    def select_rows(self, index: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv = self.kv[:, :, index]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.owner.window

    @property
    def is_compileable(self) -> bool:
        return False


class MTPCache:
    """Shared slot bookkeeping plus one `StackCache` per stack (index 0: trunk, 1 + j: head j)."""

    FIRST_CAPACITY = 256

    def __init__(self, batch_size: int, max_len: int, num_stacks: int, device: torch.device | str = "cpu",
                 stack_layers: list[int] | None = None, static: bool = False):
        """`stack_layers`: the number of layers of each stack, when known (their buffers are then allocated once).
        `static`: never read the device on the host (every block attends over all `max_len` slots)."""
        self.max_len = max_len
        self.static = static
        # Slots a row's key/value buffers hold: all of them when static; otherwise a few, doubled as rows grow (a
        # batch that rows join or leave copies its buffers: what they hold, not what they might)
        self.capacity = max_len if static else min(max_len, self.FIRST_CAPACITY)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.longest = 0  # host-side bound on length.max() (not static): blocks attend over this many slots + T
        layers = stack_layers if stack_layers is not None else [None] * num_stacks
        if len(layers) != num_stacks:
            raise MTPError(f"stack_layers has {len(layers)} entries for {num_stacks} stacks")
        self.stacks = [StackCache(self, n) for n in layers]
        self._slots = torch.arange(max_len, device=device)
        self.block_slots: torch.Tensor | None = None  # (B, T) where the current block is written
        self.block_valid: torch.Tensor | None = None  # (B, T)
        self.block_all_valid = False  # every slot of the current block is valid
        self.window = max_len  # keys the current block attends over: slots [0, window)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def stack(self, index: int) -> StackCache:
        return self.stacks[index]

    def prepare_block(self, block_valid: torch.Tensor, dtype: torch.dtype, offsets: torch.Tensor | None = None,
                      within: torch.Tensor | None = None,
                      all_valid: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Place the next block of T slots at each row's length; return (additive mask (B, 1, T, window) or None,
        position ids (B, T)).

        A query attends to the valid slots up to its own, and always to its own slot (a padding query then has
        a harmless row instead of an all-masked one, which would give NaN). A drafter that lays out more than a
        chain (mask tokens, a tree of candidates) gives `within`, (T, T) or (B, T, T) bool: which block slots
        each block slot may see (a subset of causal order), and `offsets` (B, T), or (T,) for every row, each
        slot's position id relative to the row's next position (default: consecutive over the valid slots).
        `all_valid`: every slot of `block_valid` is True (every verifying step after the prompt), so positions
        and the kept count need no counting (kernels a GPU step saves).
        """
        t = block_valid.shape[1]
        if not self.static and self.longest + t > self.max_len:
            raise MTPError(f"sequence of {self.longest + t} tokens exceeds the cache of {self.max_len} slots")
        self._reserve(self.longest + t)
        slots = self.length[:, None] + self._slots[:t]  # (B, T); a view of the slots' arange: no kernel
        self.block_slots, self.block_valid, self.block_all_valid = slots, block_valid, all_valid
        self.valid.scatter_(1, slots, block_valid)
        if offsets is None:
            offsets = self._slots[:t] if all_valid else block_valid.long().cumsum(-1) - 1
        position_ids = self.next_pos[:, None] + offsets  # (B, T)
        if not all_valid:  # left padding: -1 before a row's first token
            position_ids = position_ids.clamp_min(0)
        self.window = self.max_len if self.static else self.longest + t
        allowed = self._allowed(slots, within)
        if not self.static and t == 1 and bool(allowed.all()):
            return None, position_ids  # nothing to hide: sdpa's unmasked kernel
        return additive_mask(allowed, dtype), position_ids

    def _reserve(self, slots: int) -> None:
        """Buffers of at least `slots` slots a row (doubled as rows grow; static: all of them from the start). A
        jump past doubling (a prompt, rows loaded from a prompt cache) gets room for as many again: the next step
        always needs more, and would otherwise make every stack anew and copy it at once (at most the call's
        length either way)."""
        if slots > self.capacity:
            grown = 2 * self.capacity if slots <= 2 * self.capacity else 2 * slots
            self.capacity = min(self.max_len, grown)
            for stack in self.stacks:
                stack.reserve(self.capacity)

    def _allowed(self, slots: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, window) bool: the keys each of a block's slots (B, T) attends to: the valid slots up to its own,
        those of its own block as `within` (`prepare_block`) lays them out, and always its own."""
        b, t = slots.shape
        keys = self._slots[: self.window]  # (W,)
        before = keys[None, None, :] <= slots[:, :, None]  # (B, T, W) causal order
        if within is not None:  # the block's own keys as its layout has them (a subset of causal order)
            before.scatter_(2, slots[:, None, :].expand(b, t, t), within.expand(b, t, t))
        allowed = self.valid[:, None, : self.window] & before
        return allowed | (keys[None, None, :] == slots[:, :, None])

    def prepare_rewrite(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Place a block at slots the cache already holds, (B, T), at most each row's length (that slot: the next
        block's, which writes over it): for stacks that left those tokens out and now compute them (plain decoding
        steps that skipped the extra heads). A query attends to the valid slots up to its own and to its own; the
        slots' validity and the rows' lengths do not change. Returns the additive mask (B, 1, T, window)."""
        self.block_slots, self.block_valid = slots, torch.ones_like(slots, dtype=torch.bool)
        self.block_all_valid = True
        self._reserve(self.longest + 1)
        self.window = self.max_len if self.static else self.longest + 1
        return additive_mask(self._allowed(slots), dtype)

    def commit(self, keep: torch.Tensor | None = None) -> None:
        """After the current block: row b keeps its first keep[b] slots (None: all); the rest is forgotten (the
        next block is written over it). A row that keeps none stays as it was (a finished row's)."""
        slots, block_valid = self.block_slots, self.block_valid
        t = slots.shape[1]
        if keep is None:
            keep = torch.full_like(self.length, t)
        if self.block_all_valid:  # every kept slot holds a token
            self.next_pos += keep
        else:
            kept = self._slots[None, :t] < keep[:, None]  # (B, T)
            self.next_pos += (block_valid & kept).sum(-1)
        self.length += keep
        if not self.static:
            self.longest = int(self.length.max())

    def keep_path(self, prefix: int, count: torch.Tensor, path: torch.Tensor | None,
                  active: torch.Tensor | None = None) -> None:
        """After verifying a block of `prefix` fed slots then drafts: row b keeps the prefix and `count[b]`
        drafts (rows not `active` keep nothing). A chain's drafts are kept in place (`path` None); a tree's kept
        path (B, D) of node indices, in depth order, is first moved to the slots right after the prefix (a node's
        ancestors are always in earlier slots, so every move goes to a slot no later than its source)."""
        if path is not None:
            depth = path.shape[1] if self.static else int(count.max())  # nothing to move when no row kept one
            if depth:
                start = self.length[:, None] + prefix  # (B, 1) the first draft's slot
                source = start + path[:, :depth]  # (B, depth)
                target = start + self._slots[:depth]
                for stack in self.stacks:
                    if torch.compiler.is_compiling() and stack.kv is not None:
                        # an index_put into the buffer itself: torch.compile writes it in place (a scatter into
                        # a view of it became a copy of the whole buffer and back, every step)
                        rows = torch.arange(source.shape[0], device=source.device)[:, None]  # (B, 1)
                        stack.kv[:, :, rows, :, target] = stack.kv[:, :, rows, :, source]  # (B, depth, layers, 2, H, D)
                        continue  # (eagerly the gather and scatter below cost the host a third of the indexing)
                    for buf in stack.buffers():  # (layers * 2, B, heads, L, D)
                        shape = (buf.shape[0], -1, buf.shape[2], -1, buf.shape[4])
                        moved = buf.gather(3, source[None, :, None, :, None].expand(*shape))
                        buf.scatter_(3, target[None, :, None, :, None].expand(*shape), moved)
        keep = prefix + count
        self.commit(keep if active is None else torch.where(active, keep, 0))

    @property
    def nbytes(self) -> int:
        """Bytes of the cache's key/value buffers (allocated at their first write: 0 before the first step)."""
        return sum(t.numel() * t.element_size() for stack in self.stacks for t in stack.buffers())

    def reset(self) -> None:
        self.valid.zero_()
        self.length.zero_()
        self.next_pos.zero_()
        self.longest = 0

    def load_rows(self, parts: list[tuple[MTPCache, torch.Tensor]]) -> None:
        """Rows `index` of each cache in `parts` (of the same stacks and length), in order, become this cache's
        rows: a batch that shrinks, or that prompts join. Where the batch size stays, in place (the buffers keep
        their addresses: a captured graph reads them); otherwise as new tensors (eager decoding)."""
        if any(c.max_len != self.max_len for c, _ in parts):
            raise MTPError(f"caches of {sorted({c.max_len for c, _ in parts})} slots cannot join one of {self.max_len}")

        def put(mine: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
            if mine is not None and mine.shape == value.shape:
                return mine.copy_(value)
            return value

        for name in ("valid", "length", "next_pos"):  # (cat: a new tensor, so a cache may load its own rows)
            setattr(self, name, put(getattr(self, name), torch.cat([getattr(c, name)[i] for c, i in parts])))
        if not self.static:
            self.longest = int(self.length.max()) if self.length.numel() else 0
        capacity = max((s.kv.shape[4] for c, _ in parts for s in c.stacks if s.kv is not None), default=0)
        if not self.static and capacity:  # the largest of the parts' (rows of fewer slots are padded)
            self.capacity = capacity
        for k, mine in enumerate(self.stacks):
            theirs = [(c.stacks[k], i) for c, i in parts]
            written = next((s for s, _ in theirs if s.kv is not None), None)
            if written is None:  # a stack this decoding never wrote (greedy: the extra heads')
                continue
            mine.row = dict(written.row)
            shape = written.kv.shape[:4] + (capacity,) + written.kv.shape[5:]  # (layers, 2, B, H, slots, D)
            rows = []
            for s, i in theirs:
                kv = s.kv[:, :, i] if s.kv is not None else written.kv.new_zeros(shape[:2] + (len(i),) + shape[3:])
                if kv.shape[4] < capacity:
                    kv = torch.nn.functional.pad(kv, (0, 0, 0, capacity - kv.shape[4]))
                rows.append(kv)
            mine.kv = put(mine.kv, torch.cat(rows, 2))

    def start_rows(self, starts: list) -> None:
        """Row b starts as the first `starts[b].slots` slots of the one-row cache `starts[b].cache` (the keys and
        values of tokens its prompt starts with, computed before: `mtp.decoding.prefixes`), or empty (None). In
        place where the buffers exist (a captured graph reads them)."""
        self.reset()
        used = [(b, s) for b, s in enumerate(starts) if s is not None and s.slots > 0]
        if not used:
            return
        self._reserve(max(s.slots for _, s in used))
        for b, s in used:
            self.valid[b, : s.slots] = True
        rows = torch.tensor([b for b, _ in used], device=self.length.device)
        counts = torch.tensor([s.slots for _, s in used], device=self.length.device)
        self.length[rows] = counts
        self.next_pos[rows] = counts
        if not self.static:
            self.longest = max(s.slots for _, s in used)
        groups: dict[tuple[int, int], tuple[object, list[int]]] = {}  # rows that start alike: one copy a stack
        for b, s in used:
            groups.setdefault((id(s.cache), s.slots), (s, []))[1].append(b)
        for k, mine in enumerate(self.stacks):
            for s, group in groups.values():
                theirs = s.cache.stacks[k]
                if theirs.kv is None:  # a stack the start's decoding never wrote (it does not need it either)
                    continue
                if mine.kv is None:  # (layers, 2, B, kv_heads, slots, D)
                    shape = theirs.kv.shape
                    mine.kv = theirs.kv.new_zeros((shape[0], 2, self.batch_size, shape[3], self.capacity, shape[5]))
                    mine.row = dict(theirs.row)
                index = torch.tensor(group, device=mine.kv.device)
                mine.kv[:, :, index, :, : s.slots] = theirs.kv[:, :, :1, :, : s.slots]

    def compact_row(self, row: int, most: int | None = None, drop: int = 0) -> MTPCache:
        """Row `row`'s tokens as a one-row cache of its own, slot i holding its i-th token (its padding left out):
        what a later prompt that starts with the same tokens starts from (`start_rows`). At most its first `most`
        tokens, and not its last `drop` (tokens some stacks have not computed yet)."""
        slots = self.valid[row, : int(self.length[row])].nonzero()[:, 0]  # (n,) the row's tokens, in order
        n = max(0, slots.numel() - drop) if most is None else max(0, min(most, slots.numel() - drop))
        slots = slots[:n]
        out = MTPCache(1, max(n, 1), len(self.stacks), self.valid.device)
        out.valid[0, :n] = True
        out.length.fill_(n)
        out.next_pos.fill_(n)
        out.capacity = out.longest = n
        for mine, theirs in zip(self.stacks, out.stacks, strict=True):
            if mine.kv is not None:
                theirs.row, theirs.num_layers = dict(mine.row), mine.kv.shape[0]
                theirs.kv = mine.kv[:, :, row : row + 1].index_select(4, slots)  # (layers, 2, 1, H, n, D): a copy
        return out

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing work)."""
        self.valid = self.valid[index]
        self.length = self.length[index]
        self.next_pos = self.next_pos[index]
        if not self.static:
            self.longest = int(self.length.max()) if self.length.numel() else 0
        for stack in self.stacks:
            stack.select_rows(index)
