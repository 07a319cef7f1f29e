"""`mtp train` under torchrun: process group, FSDP2 wrapping, the rank's share of a batch, reductions,
sharded checkpoints. The models know nothing of this; the trainer calls it.

    torchrun --nproc-per-node N -m mtp train --parallel fsdp ...

- `--parallel fsdp`: `torch.distributed.fsdp.fully_shard` on every decoder layer (trunk and each head's
  layers, which are decoder layers too) and on the model for what is left (embeddings, final norm,
  unembedding, LoRA adapters). `--parallel ddp`: the same wrapping on a (N, 1) device mesh, i.e. every rank
  keeps whole parameters and gradients are all-reduced (HSDP with shards of one: DDP's arithmetic). Both go
  through FSDP2's hooks because the trainer calls model methods other than `forward` (`trunk_forward`,
  `head_forward`, `real_pass`, ...): each is registered with `register_fsdp_forward_method`, which plain DDP
  cannot do.
- Frozen parameters (a frozen trunk, the parts of the model under gated LoRA) never get a gradient: they keep
  `requires_grad=False`, and the optimizer is built over the trainable ones only, so they have no optimizer
  state. A separate frozen teacher (self-distillation, `--adapter full`) has its decoder layers sharded, each
  gathered for its forward and freed after it; its embeddings, norm and unembedding stay whole on every rank
  (on GPUs in the low precision).
- Gradients are summed across ranks (divide factor 1): the losses divide by the global target count, so the
  sum is the gradient of the global batch, whatever the world size.
- Mixed precision (`MixedPrecisionPolicy`, bf16/fp16 parameters, fp32 gradient reduction) on GPUs only; on a
  CPU (gloo) the parameters stay in fp32.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mtp.errors import MTPError
from mtp.runtime import resolve_device

PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class Parallel:
    """This process's place in a torchrun job."""

    mode: str  # "ddp" or "fsdp"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ wrapping
    def wrap(self, model: nn.Module, forward_methods: Sequence[str], frozen: Iterable[nn.Module] = (),
             precision: str = "fp32") -> None:
        """Shard `model` in place (see the module docstring); `forward_methods` are the methods of `model`
        the trainer calls, `frozen` separate modules used under no_grad (a teacher)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            FSDPModule,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        from mtp.models.backbones import backbone_for

        kind = self.device.type
        if self.mode == "fsdp":
            mesh = init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
        else:  # replicated: every rank whole parameters, gradients all-reduced
            mesh = init_device_mesh(kind, (self.world_size, 1), mesh_dim_names=("replicate", "shard"))
        policy = MixedPrecisionPolicy()
        if kind == "cuda" and precision in ("bf16", "fp16"):
            low = torch.bfloat16 if precision == "bf16" else torch.float16
            policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        layer_type = type(backbone_for(model.base).layers[0])
        if hasattr(model, "set_fast_decoding"):
            # The lean decoding step reads a layer's weights without calling the layer, so FSDP's hooks would
            # not gather them; cached no-grad passes (held-out evaluation) take the Hugging Face layers instead.
            model.set_fast_decoding(None)
        for module in list(model.modules()):
            if isinstance(module, layer_type):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
        for teacher in frozen:
            # Frozen and computed in the low precision anyway: stored in it too (half the memory); CPUs keep fp32.
            teacher.to(self.device, dtype=policy.param_dtype or next(teacher.parameters()).dtype)
            for module in list(teacher.modules()):
                if isinstance(module, layer_type) and not isinstance(module, FSDPModule):
                    # Each layer is its own root (the teacher's forward is never called as a whole); an explicit
                    # reshard_after_forward frees its gathered weights after each use even so.
                    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)

    # ------------------------------------------------------------------------------------------ data
    def share(self, rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's part of a global batch's row indices, and whether it is a stand-in: when a short last
        batch has fewer rows than ranks, a rank without rows runs the first row with no target, so every rank
        runs the same forwards and collectives and the stand-in adds nothing to losses or gradients."""
        mine = rows.tensor_split(self.world_size)[self.rank]
        if mine.numel() == 0:
            return rows[:1], True
        return mine, False


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (or any launcher setting its variables)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise MTPError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers: {env['RANK']!r}, {env['WORLD_SIZE']!r}") \
            from None


def check_parallel(mode: str) -> None:
    """The checks `start` makes, without starting anything (for the start of a command)."""
    if mode not in PARALLEL:
        raise MTPError(f"--parallel must be one of {', '.join(PARALLEL)}, got {mode!r}")
    env = torchrun_env()
    if mode == "none" and env is not None and env[1] > 1:
        raise MTPError(f"this is one of {env[1]} torchrun processes: give --parallel fsdp or --parallel ddp")
    if mode != "none" and env is None:
        raise MTPError(f"--parallel {mode} runs under torchrun: torchrun --nproc-per-node N -m mtp train "
                       f"--parallel {mode} ...")


def start(mode: str, device: str = "auto") -> Parallel | None:
    """Join the torchrun job (nccl on GPUs, gloo on CPUs); None for a single process (`--parallel none`), which
    never touches torch.distributed."""
    check_parallel(mode)
    if mode == "none":
        return None
    rank, world, local = torchrun_env()
    use_cuda = resolve_device(device, flags=True).type == "cuda"
    if use_cuda:  # one GPU per process: the local rank's
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Parallel(mode, rank, world, local, dev)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- collectives
# Each is a no-op in a single process, so shared code calls them unconditionally.
def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_text(text: str | None) -> str:
    """Rank 0's string on every rank."""
    if not dist.is_initialized():
        return text or ""
    box = [text]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def as_float(value) -> float:
    """A scalar tensor, or a DTensor (a gradient norm over sharded gradients), as a Python float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every rank writes its shards of the trainable weights and the optimizer's tensors into `folder`
    (torch.distributed.checkpoint); returns the optimizer's parameter groups (numbers and parameter names),
    which go to the JSON trainer state, so the shards hold tensors only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": _trainable(model, model_state), "optimizer": optim_state["state"]}, checkpoint_id=str(folder))
    return optim_state["param_groups"]


def _trainable(model: nn.Module, state: dict) -> dict:
    """The entries of a model state dict that train. A sharded run resumes by building its starting model
    again, so frozen weights (a frozen trunk, the base under gated LoRA) need not be saved."""
    names = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def load_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict]) -> None:
    """Read a `save_sharded` folder into this run's model and optimizer, whatever world size wrote it (the
    checkpoint planner re-slices every tensor to this run's shards; one process reads whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # a fresh optimizer gets zero states first
    state = {"model": _trainable(model, model_state), "optimizer": optim_state["state"]}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=safe_reader(folder))
    except (CheckpointException, MTPError, AssertionError, RuntimeError, KeyError, ValueError) as e:
        # DCP reports a rank's failure (a refused index, a missing or mis-shaped tensor) as one of these
        raise MTPError(f"{folder}: cannot load this sharded checkpoint ({_first_line(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": param_groups},
                   options=StateDictOptions(strict=False))  # the frozen weights are the starting model's


def load_whole_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.state_dict()` of an unsharded run of the same model (trainable parameters in model order)
    into the optimizer of a sharded one: each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    whole = {"state": {names[int(i)]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, whole, options=StateDictOptions(full_state_dict=True))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


class _MetadataUnpickler(pickle.Unpickler):
    """DCP keeps its index (`.metadata`) as a pickle. Only the classes such an index is made of load; anything
    else (a function, a class from another module) is refused, so reading a checkpoint runs no code."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                        "torch.distributed.checkpoint.planner")
    _ALLOWED = {("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
                ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "bool"), ("torch", "uint8"),
                ("torch", "strided"), ("torch", "contiguous_format"), ("collections", "OrderedDict"),
                ("builtins", "set"), ("builtins", "frozenset"), ("torch", "device"),
                ("torch.serialization", "_get_layout"),  # looks a layout up by its name
                *((module, name) for module in ("pathlib", "pathlib._local")  # (Python 3.13's home of the classes)
                  for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        # From the index's modules, only the classes they define, by plain name: pickle looks a dotted name up
        # attribute by attribute, so "os.system" in torch.distributed.checkpoint.metadata was its `os`'s system
        # (any name of the module went: a checkpoint ran code again).
        if module in self._ALLOWED_MODULES and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a checkpoint index")


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    class Reader(FileSystemReader):
        """A FileSystemReader whose index is read with `_MetadataUnpickler`, and which refuses entries that are
        pickled objects rather than tensors (mtp writes none; tensors themselves load with weights_only)."""

        def read_metadata(self, *args, **kwargs):
            # the index FileSystemWriter writes, named here (torch's helper for it is private, and new in 2.9)
            rank = kwargs.get("rank")
            path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise MTPError(f"{path}: not a checkpoint index written by mtp ({e})") from None
            pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
            if pickled:
                raise MTPError(f"{path}: holds pickled objects ({', '.join(pickled[:3])}), which mtp does not load")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def safe_reader(folder: str | os.PathLike):
    """A torch.distributed.checkpoint reader of `folder` that runs no code from it (see `_safe_reader_class`)."""
    return _safe_reader_class()(str(Path(folder)))


def full_state_on_main(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer of a sharded model, whole and on the CPU, on rank 0 (None elsewhere); all
    ranks must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None
