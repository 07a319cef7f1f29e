"""Frozen-trunk features on disk: the trunk output at every position of every training row, in half precision,
appended to a raw file as it is computed and read back one batch at a time.

Files in the run folder, beside the answers cache (`self_targets.jsonl`):

    trunk_features.bin     the rows' features back to back, each (positions, H) float16 (bfloat16 for a bf16
                           trunk), little-endian, no header
    trunk_features.jsonl   a header line {"format": "mtp-trunk-features", "dtype": "float16", "hidden_size": 576},
                           then one line per row: {"key": "9c1e...", "offset": 123456, "positions": 87}

A row's `key` hashes the model's next-token path (`model_fingerprint`, as in the answers' keys) and the row's
tokens: all its trunk outputs depend on. So a row's features are found whoever wrote them: recorded while the
model answered the question (`--targets self`, `FeatureRecorder`), or computed by a trunk pass over the row
(answers that came from the cache, `--targets data`, `complete_features`). Like the answers cache, both files are
only appended to: a block of rows is written and flushed to disk before its index lines, so a run killed at any
moment leaves at most an unreferenced tail in the .bin and a cut-off last line in the .jsonl (skipped when read),
and the next run appends after them and reuses every complete row. Under torchrun each rank writes a pair of its
own (`trunk_features.rank{r}.*`); every rank reads all pairs.

Features are read with plain reads into the batch's tensor, not through a memory map: the page cache keeps what
fits in memory, and the process's own resident memory stays one batch whatever the data's size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from mtp.errors import MTPError
from mtp.io import open_append
from mtp.progress import progress_bar
from mtp.training.data import TokenizedData

FEATURES_NAME = "trunk_features"
_FORMAT = "mtp-trunk-features"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TRUNK_CACHE = ("auto", "device", "disk", "off")


_TOO_LARGE = ("trunk outputs up to {:.0f} exceed float16's range; train with --dtype bfloat16 (bf16 features) or "
              "--trunk-cache off")


class FeatureStore:
    """The trunk features of one model's rows in a folder (module docstring). `part`: which pair of files this
    process appends to ("" alone, "rank{r}" under torchrun)."""

    def __init__(self, folder: str | os.PathLike, model_key: str, hidden_size: int,
                 dtype: torch.dtype = torch.float16, part: str = ""):
        if dtype not in _DTYPES.values():
            raise MTPError(f"trunk features are stored in float16 or bfloat16, not {dtype}")
        self.folder, self.model_key, self.hidden_size, self.dtype, self.part = (
            Path(folder), model_key, hidden_size, dtype, part)
        self._files = None  # (data, index), opened by the first write

    @classmethod
    def for_model(cls, folder: str | os.PathLike, model, model_key: str, part: str = "") -> FeatureStore:
        """A store for `model`'s trunk: bf16 features for a bf16 trunk, else fp16 (3 more mantissa bits)."""
        dtype = torch.bfloat16 if model.activation_dtype == torch.bfloat16 else torch.float16
        return cls(folder, model_key, model.config.hidden_size, dtype, part)

    def header(self) -> dict:
        return {"format": _FORMAT, "dtype": str(self.dtype).removeprefix("torch."), "hidden_size": self.hidden_size}

    def key(self, tokens: Sequence[int] | torch.Tensor) -> str:
        h = hashlib.sha256(f"{self.model_key}|".encode())
        h.update(np.asarray(tokens, dtype="<i4").tobytes())
        return h.hexdigest()[:16]

    def to_storage(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` in the store's dtype; an MTPError where float16 cannot hold a value."""
        out = hidden.detach().to(self.dtype)
        if self.dtype == torch.float16 and bool(torch.isinf(out).any()) and bool(torch.isfinite(hidden).all()):
            raise MTPError(_TOO_LARGE.format(float(hidden.abs().max())))
        return out

    # ------------------------------------------------------------------------------------------ writing
    def _paths(self, part: str) -> tuple[Path, Path]:
        name = FEATURES_NAME + (f".{part}" if part else "")
        return self.folder / f"{name}.bin", self.folder / f"{name}.jsonl"

    def _open(self):
        if self._files is None:
            data_path, index_path = self._paths(self.part)
            if _read_header(index_path) not in (None, self.header()):  # another dtype or width: useless here
                data_path.unlink(missing_ok=True)
                index_path.unlink()
            index = open_append(index_path)
            if index.tell() == 0:
                index.write(json.dumps(self.header()) + "\n")
            self._files = (data_path.open("ab"), index)
        return self._files

    def write(self, keys: Sequence[str], rows: Sequence[torch.Tensor]) -> None:
        """Append one block: the rows' features ((positions, H) each, in the store's dtype, on the CPU) back to
        back, then, once they are on disk, their index lines."""
        data, index = self._open()
        offset = data.seek(0, os.SEEK_END)  # after whatever a killed run left
        lines = []
        for key, row in zip(keys, rows, strict=True):
            if row.dtype != self.dtype or row.dim() != 2 or row.shape[1] != self.hidden_size:
                raise ValueError(f"a row of features must be (positions, {self.hidden_size}) {self.dtype}")
            row = row.contiguous()
            data.write(row.view(torch.uint8).numpy())
            lines.append(json.dumps({"key": key, "offset": offset, "positions": row.shape[0]}) + "\n")
            offset += row.numel() * row.element_size()
        data.flush()
        os.fsync(data.fileno())
        index.write("".join(lines))
        index.flush()
        os.fsync(index.fileno())

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None

    # ------------------------------------------------------------------------------------------ reading
    def lookup(self, keys: Sequence[str]) -> StoredFeatures:
        """The features of rows with these keys, from every part of the store (a row stored nowhere is missing)."""
        n = len(keys)
        part = torch.full((n,), -1, dtype=torch.int32)
        offset, positions = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
        first: dict[str, int] = {}
        repeats = []  # (row, an earlier row with the same tokens)
        for i, key in enumerate(keys):
            if key in first:
                repeats.append((i, first[key]))
            else:
                first[key] = i
        files = []
        row_bytes = self.hidden_size * self.dtype.itemsize
        for index_path in sorted(self.folder.glob(f"{FEATURES_NAME}*.jsonl")):
            data_path = index_path.with_suffix(".bin")
            if _read_header(index_path) != self.header() or not data_path.is_file():
                continue
            files.append(data_path)
            for record in _intact_records(index_path, data_path.stat().st_size, row_bytes):
                i = first.get(record["key"])
                if i is not None:
                    part[i], offset[i], positions[i] = len(files) - 1, record["offset"], record["positions"]
        for i, j in repeats:
            part[i], offset[i], positions[i] = part[j], offset[j], positions[j]
        return StoredFeatures(files, part, offset, positions, self.hidden_size, self.dtype)


def _read_header(index_path: Path) -> dict | None:
    """The index's header line; None for no index yet, {} for one that cannot be read."""
    if not index_path.is_file() or index_path.stat().st_size == 0:
        return None
    with index_path.open(encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())
        except ValueError:
            return {}
    return header if isinstance(header, dict) else {}


def _index_records(index_path: Path) -> Iterator[dict]:
    """The complete row lines of an index (the header, a line cut off by an interruption and foreign lines
    skipped)."""
    with index_path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                record = {"key": str(record["key"]), "offset": int(record["offset"]),
                          "positions": int(record["positions"])}
            except (ValueError, KeyError, TypeError):
                continue
            if record["offset"] >= 0 and record["positions"] >= 0:
                yield record


def _intact_records(index_path: Path, size: int, row_bytes: int) -> list[dict]:
    """The index's records whose bytes are still theirs, in file order. Rows are only appended, so a record's
    bytes end before the next records' begin; a .bin cut short (a bad copy, a full disk) loses the rows past its
    end, and the next run appends at the cut: the rows it writes there overlap the older records that reached
    past it, whose bytes are now another row's. Those, and any past the file's end, are dropped (their rows are
    computed again), never read as another row's features."""
    records = list(_index_records(index_path))
    intact, later_start = [], size  # where the earliest later record begins (or the file ends)
    for record in reversed(records):
        if record["offset"] + record["positions"] * row_bytes <= later_start:
            intact.append(record)
        later_start = min(later_start, record["offset"])
    return intact[::-1]


class StoredFeatures:
    """The features of N rows in a `FeatureStore`, read when indexed: `features[rows, :T]` (rows: indices or a
    slice) is (B, T, H) in the store's dtype, zero past what was stored of a row (the last token of an answer is
    never fed while answering, so its trunk output is never computed; nothing reads it)."""

    def __init__(self, files: list[Path], part: torch.Tensor, offset: torch.Tensor, positions: torch.Tensor,
                 hidden_size: int, dtype: torch.dtype):
        self.files, self.part, self.offset, self.positions = files, part, offset, positions  # (N,) each
        self.hidden_size, self.dtype = hidden_size, dtype
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.part.shape[0]

    def missing(self) -> torch.Tensor:
        """(M,) the rows stored nowhere."""
        return (self.part < 0).nonzero().squeeze(1)

    def __getitem__(self, index: tuple) -> torch.Tensor:
        rows, cols = index
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        if not isinstance(cols, slice) or cols.start not in (None, 0) or cols.step not in (None, 1):
            raise IndexError("stored features are read as features[rows, :T]")
        width = cols.stop if cols.stop is not None else int(self.positions[rows].max()) if len(rows) else 0
        out = torch.zeros(len(rows), width, self.hidden_size, dtype=self.dtype)  # (B, T, H)
        for b, r in enumerate(rows.tolist()):
            if self.part[r] < 0:
                raise MTPError(f"row {r} has no stored trunk features")
            n = min(int(self.positions[r]), width)
            if n:
                f = self._handle(int(self.part[r]))
                f.seek(int(self.offset[r]))
                if f.readinto(out[b, :n].view(torch.uint8).numpy()) != n * self.hidden_size * self.dtype.itemsize:
                    raise MTPError(f"{self.files[int(self.part[r])]}: cut short (was it changed while training?)")
        return out

    def _handle(self, part: int):
        if part not in self._handles:
            self._handles[part] = open(self.files[part], "rb", buffering=0)  # kept open: read again every batch
        return self._handles[part]

    def load(self, width: int, device: torch.device, rows_per_read: int = 256) -> torch.Tensor:
        """All rows' features, (N, width, H) in the store's dtype, on `device` (`--trunk-cache device`)."""
        out = torch.empty(len(self), width, self.hidden_size, dtype=self.dtype, device=device)
        for start in range(0, len(self), rows_per_read):
            rows = slice(start, start + rows_per_read)
            out[rows] = self[rows, :width].to(device)
        return out


def features_home(mode: str, nbytes: int, device: torch.device) -> str:
    """Where a run's trunk features live, "device" or "disk", for `--trunk-cache mode`; "auto": on a GPU when
    they take at most a quarter of its free memory, on disk otherwise (on a CPU the page cache keeps what fits
    in memory anyway, without the process holding it)."""
    if mode in ("device", "disk"):
        return mode
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if nbytes <= free // 4 else "disk"
    return "disk"


class FeatureRecorder:
    """A `TrunkObserver` (`mtp.decoding.generate`) for one batch of answers: each row's trunk output at the
    positions of its sequence, copied as generation computes it into one (B, capacity, H) buffer in the store's
    dtype, on the trunk's device; `write` stores the rows.

    A call only queues work on the device, no host read (`queues_only`): generate calls it before it launches the
    next step, which writes over the step's outputs after the copy has read them (the device's order), so
    replayed steps still run ahead of the host (on a GPU, answering a batch of hundreds of questions: a host read
    a row took longer than the step)."""

    queues_only = True

    def __init__(self, store: FeatureStore, batch_size: int, capacity: int):
        self.store, self.batch_size, self.capacity = store, batch_size, capacity
        # (B, C + 1, H) on the trunk's device from the first call, uninitialised (only the positions written are
        # read; pages never written take no memory); column C takes the positions not kept, and those past C
        self.buffer: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None  # (B,) positions of each row seen so far (kept or past C)
        self.largest: torch.Tensor | None = None  # () the largest |value| of calls with finite values (float16)

    def __call__(self, rows: torch.Tensor, trunk: torch.Tensor, kept: torch.Tensor) -> None:
        """Row rows[b]'s trunk outputs trunk[b] (B', T, H) at its kept positions kept[b] (B', T), after those it
        saw before."""
        if self.buffer is None:
            self.buffer = torch.empty(self.batch_size, self.capacity + 1, trunk.shape[-1], dtype=self.store.dtype,
                                      device=trunk.device)
            self.filled = torch.zeros(self.batch_size, dtype=torch.long, device=trunk.device)
            self.largest = torch.zeros((), device=trunk.device)
        kept, rows = kept.bool(), rows.to(trunk.device)
        slot = self.filled[rows][:, None] + kept.long().cumsum(1) - 1  # (B', T) a kept position's place in its row
        slot = torch.where(kept & (slot < self.capacity), slot, self.capacity)
        self.buffer[rows[:, None].expand_as(slot), slot] = trunk.detach().to(self.buffer.dtype)
        self.filled[rows] += kept.sum(1)
        if self.buffer.dtype == torch.float16:  # (reductions only: no copy of a prefill's outputs)
            low, high = torch.aminmax(trunk.detach())
            most = torch.maximum(-low, high).float()  # a call with a NaN or an infinity is not checked, as
            self.largest = torch.maximum(self.largest, torch.where(torch.isfinite(most), most, 0.0))  # to_storage

    def write(self, keys: Sequence[str], lengths: Sequence[int]) -> None:
        """Store row r's first lengths[r] positions (fewer when its last token was never fed) under keys[r]; an
        MTPError where a value recorded for a float16 store exceeds its range."""
        if self.buffer is None:  # (no step was seen)
            empty = torch.empty(0, self.store.hidden_size, dtype=self.store.dtype)
            self.store.write(keys, [empty] * len(keys))
            return
        if self.buffer.dtype == torch.float16 and torch.isinf(self.largest.to(torch.float16)):
            raise MTPError(_TOO_LARGE.format(float(self.largest)))
        seen = self.filled.tolist()
        self.store.write(keys, [self.buffer[r, : min(n, seen[r], self.capacity)].cpu()
                                for r, n in enumerate(lengths)])


# ---------------------------------------------------------------------------------------------- trunk passes
def trunk_batches(model, data: TokenizedData, rows: torch.Tensor, batch_size: int = 8,
                  autocast: Callable = nullcontext, progress: bool = False,
                  desc: str = "trunk cache") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The frozen trunk over `rows` of `data`, `batch_size` rows at a time: (row indices (B,), output (B, T, H))."""
    starts = range(0, len(rows), batch_size)
    bar = progress_bar(progress, len(starts), desc, "batch")  # (off: a plain line every 5 minutes)
    try:
        for start in starts:
            chunk = rows[start:start + batch_size]
            batch = data.batch(chunk)
            with autocast():
                hidden, _ = model.trunk_forward(batch["input_ids"].to(model.device),
                                                batch["attention_mask"].to(model.device))
            yield chunk, hidden
            bar.update(1)
    finally:
        bar.close()


@torch.no_grad()
def compute_trunk_features(model, data: TokenizedData, batch_size: int = 8, autocast: Callable = nullcontext,
                           progress: bool = False, desc: str = "trunk cache") -> torch.Tensor:
    """Trunk outputs of every row in memory, (N, L, H) on the model's device, L the longest row; zero past a
    row's end.

    Only valid for a frozen trunk in eval mode. Positions past a row's length never influence its real
    positions (causal attention), so zeros there change nothing the loss sees.
    """
    features = None
    for rows, hidden in trunk_batches(model, data, torch.arange(len(data)), batch_size, autocast, progress, desc):
        if features is None:
            features = torch.zeros(len(data), int(data.lengths.max()), hidden.shape[-1], dtype=hidden.dtype,
                                   device=hidden.device)
        real = torch.arange(hidden.shape[1], device=hidden.device) < data.lengths[rows, None].to(hidden.device)
        features[rows, : hidden.shape[1]] = hidden.masked_fill(~real[..., None], 0)
    return features if features is not None else torch.zeros(0, 0, model.config.hidden_size)


@torch.no_grad()
def complete_features(store: FeatureStore, model, data: TokenizedData, batch_size: int = 8,
                      autocast: Callable = nullcontext, progress: bool = False, desc: str = "trunk cache",
                      write: bool = True) -> StoredFeatures:
    """The stored features of every row of `data`, the missing ones computed now by a pass of the frozen trunk
    and stored. Under torchrun every rank computes them (FSDP's collectives run in step) and only the one with
    `write` stores them; all wait for it, then read."""
    from mtp.training.distributed import barrier

    keys = [store.key(data.row(i)) for i in range(len(data))]
    stored = store.lookup(keys)
    barrier()  # every rank has looked before any writes: they agree on what is missing
    missing = stored.missing()
    if not len(missing):
        return stored
    try:
        for rows, hidden in trunk_batches(model, data, missing, batch_size, autocast, progress, desc):
            if write:
                lengths = data.lengths[rows].tolist()
                store.write([keys[r] for r in rows.tolist()],
                            [store.to_storage(hidden[b, :n]).cpu() for b, n in enumerate(lengths)])
    finally:
        store.close()
    barrier()
    return store.lookup(keys)
