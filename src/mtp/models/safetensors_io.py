"""Reading and writing safetensors files one tensor at a time, so memory stays at one copy of the weights.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the end
of the header), then the tensors' bytes.

Why not `safetensors.torch.load_file` / `safe_open(...).get_tensor`: those map the file into memory, and every
page of the mapping that a copy or a dtype conversion touches counts in the process's resident memory until the
whole mapping goes away - so a load that converts or copies peaks at two copies. Here each tensor is read with
`readinto` straight into its destination tensor (file pages stay in the page cache, which is not the process's
memory); a dtype conversion costs one tensor's temporary buffer. `save_file` builds every tensor's bytes before
writing; `write_safetensors` writes them one by one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp.errors import CheckpointMismatchError, MTPError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # Hugging Face's sharded layout: {"metadata", "weight_map": {name: file}}
# A model folder whose frozen weights are kept apart (`write_weights(frozen=...)`): the frozen ones first, the
# trained ones second, so checkpoints of one run can share the first file (a hard link) instead of a copy each.
SHARD_NAMES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
FROZEN_KEY = "mtp_frozen_shard"  # the index's metadata entry naming the shard of frozen weights
_STAGING_BYTES = 4 << 20  # a dtype-converting read goes through a buffer this size


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """The header of a safetensors file, checked against the file's size, and tensors read on demand.

    A truncated or corrupt file raises `MTPError` naming it (at opening for anything the header reveals).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._staging: torch.Tensor | None = None  # for reads that convert the dtype
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        except OSError as e:
            raise MTPError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            self.metadata, self.tensors = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> MTPError:
        return MTPError(f"{self.path} is not a valid safetensors file ({why}); the file is damaged or truncated: "
                        "write it again")

    def _read_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise self._bad(f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + n
        tensors = {}
        spans = []
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"bad entry for tensor {name!r}") from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or end - begin != expected or begin < 0:
                raise self._bad(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {entry['dtype']}")
            if start + end > size:
                raise self._bad(f"tensor {name!r} ends at byte {start + end} of a {size}-byte file")
            tensors[name] = TensorInfo(dtype, shape, start + begin, start + end)
            spans.append((begin, end))
        spans.sort()
        for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
            if b1 < e0:
                raise self._bad("tensors overlap")
        return metadata, tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name`, cast to `dtype` (None: as stored) on `device`: one read, no whole-tensor temporary."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=dtype if dtype is not None else info.dtype)
        if info.nbytes:
            self._file.seek(info.begin)
            if out.dtype == info.dtype:
                self._read_into(name, out.reshape(-1).view(torch.uint8))
            else:
                self._read_converting(name, out.reshape(-1), info)
        if torch.device(device).type != "cpu":
            out = out.to(device)
        return out

    def _read_into(self, name: str, raw: torch.Tensor) -> None:
        got = self._file.readinto(memoryview(raw.numpy()))
        if got != raw.numel():
            raise self._bad(f"tensor {name!r}: read {got} of {raw.numel()} bytes")

    def _read_converting(self, name: str, flat: torch.Tensor, info: TensorInfo) -> None:
        """Read a tensor stored in another dtype into `flat` through a small staging buffer: a whole-tensor
        temporary (fp32 read, then cast to fp16) would leave holes in the heap that glibc does not return, and
        a load that converts every tensor then peaks well above the weights it keeps."""
        if self._staging is None:  # one buffer for every read: allocating one per tensor fragments the heap too
            self._staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)
        staging = self._staging.view(info.dtype)
        step = staging.numel()  # values per chunk
        for begin in range(0, flat.numel(), step):
            n = min(step, flat.numel() - begin)
            self._read_into(name, staging[:n].view(torch.uint8))
            flat[begin:begin + n].copy_(staging[:n])  # the cast, chunk by chunk

    def close(self) -> None:
        self._file.close()
        self._staging = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(path: str | os.PathLike, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensor: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (name -> (shape, dtype), in this order) are produced one at a time
    by `tensor(name)`: only one of them needs to exist at once. Readable by `safetensors.safe_open`."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        if dtype not in NAMES:
            raise MTPError(f"safetensors cannot hold {dtype} (tensor {name})")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in shapes.items():
            t = tensor(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise MTPError(f"internal: tensor {name} is {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t


class FolderWeights:
    """A model folder's weights, one model.safetensors or the shards its model.safetensors.index.json lists, read
    as one file: `tensors` (name -> TensorInfo), `shapes()`, `read(name, ...)`. `path` names the folder's weights
    in messages. A damaged index (not JSON, a shard missing, a tensor not where it says) is an MTPError naming it.
    """

    def __init__(self, folder: str | os.PathLike):
        from mtp.io import read_json_object

        folder = Path(folder)
        self._readers: list[SafetensorsReader] = []
        self._owner: dict[str, SafetensorsReader] = {}
        if (folder / WEIGHTS_NAME).is_file() or not (folder / INDEX_NAME).is_file():
            self.path = folder / WEIGHTS_NAME
            self._readers.append(SafetensorsReader(self.path))
            self._owner = dict.fromkeys(self._readers[0].tensors, self._readers[0])
            self.index_metadata: dict = {}
            self.tensors = dict(self._readers[0].tensors)
            return
        self.path = folder / INDEX_NAME
        index = read_json_object(self.path, "a weights index")
        weight_map, metadata = index.get("weight_map"), index.get("metadata", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise MTPError(f"{self.path}: \"weight_map\" must map tensor names to file names in the folder")
        self.index_metadata = metadata if isinstance(metadata, dict) else {}
        try:
            for shard in dict.fromkeys(weight_map.values()):
                reader = SafetensorsReader(folder / shard)
                self._readers.append(reader)
                listed = {name for name, file in weight_map.items() if file == shard}
                if set(reader.tensors) != listed:
                    odd = sorted(set(reader.tensors) ^ listed)
                    raise MTPError(f"{folder / shard} does not hold what {INDEX_NAME} says it holds (e.g. {odd[0]}); "
                                   "the folder is damaged: write it again")
                self._owner.update(dict.fromkeys(listed, reader))
        except BaseException:
            self.close()
            raise
        self.tensors = {name: reader.tensors[name] for name, reader in self._owner.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: reader.tensors[name].shape for name, reader in self._owner.items()}

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name` from the file that holds it (`SafetensorsReader.read`)."""
        return self._owner[name].read(name, dtype, device)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> FolderWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether `folder` has weights in either layout (checked for damage only when read)."""
    return (Path(folder) / WEIGHTS_NAME).is_file() or (Path(folder) / INDEX_NAME).is_file()


def write_weights(folder: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  tensor: Callable[[str], torch.Tensor], frozen: Collection[str] = (),
                  link_from: Path | None = None) -> list[str]:
    """The weights of a model folder being written (`folder`, a fresh temporary one): one model.safetensors, or,
    when some but not all of them are `frozen` (weights a training run does not change), the frozen ones in a
    shard of their own and the rest in another, with Hugging Face's index. Then the frozen shard of `link_from`
    (an earlier checkpoint of the same run, or None), when it holds the same names, shapes and dtypes, becomes this
    folder's by a hard link: no copy written. The caller vouches that `link_from`'s frozen weights are these (the
    trainer links only to what it wrote or resumed from). Returns the files written."""
    metadata = {"format": "pt"}
    frozen_shapes = {k: v for k, v in shapes.items() if k in frozen}
    if not frozen_shapes or len(frozen_shapes) == len(shapes):
        write_safetensors(folder / WEIGHTS_NAME, shapes, tensor, metadata)
        return [WEIGHTS_NAME]
    trained_shapes = {k: v for k, v in shapes.items() if k not in frozen}
    first, second = SHARD_NAMES
    if not _link_frozen_shard(link_from, folder / first, frozen_shapes):
        write_safetensors(folder / first, frozen_shapes, tensor, metadata)
    write_safetensors(folder / second, trained_shapes, tensor, metadata)
    size = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes.values())
    index = {"metadata": {"total_size": size, FROZEN_KEY: first},
             "weight_map": {**dict.fromkeys(frozen_shapes, first), **dict.fromkeys(trained_shapes, second)}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [first, second, INDEX_NAME]


def _link_frozen_shard(source: Path | None, target: Path, shapes: dict) -> bool:
    """Hard-link `source`'s frozen shard to `target` when it holds exactly `shapes`; False where it cannot."""
    if source is None or not (source / INDEX_NAME).is_file():
        return False
    try:
        with FolderWeights(source) as weights:
            shard = weights.index_metadata.get(FROZEN_KEY)
            if shard not in SHARD_NAMES:
                return False
            with SafetensorsReader(source / shard) as reader:
                same = {k: (i.shape, i.dtype) for k, i in reader.tensors.items()} == \
                    {k: (tuple(shape), dtype) for k, (shape, dtype) in shapes.items()}
        if same:
            os.link(source / shard, target)
        return same
    except (MTPError, OSError):  # a damaged earlier checkpoint, or a file system without hard links: write it
        return False


def check_floating(stored: Mapping[str, torch.dtype], model: Mapping[str, torch.Tensor], source: str) -> None:
    """Every tensor the model holds in floating point is stored in floating point: integers (a file another
    tool wrote, or a damaged one) would not load, or would load as whole numbers."""
    wrong = sorted(f"{name} ({NAMES.get(dtype, dtype)})" for name, dtype in stored.items()
                   if name in model and model[name].is_floating_point() and not dtype.is_floating_point)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise CheckpointMismatchError(f"{source}: weights stored as integers, not floating point: {shown}")
