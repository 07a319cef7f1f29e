"""Training checkpoints: a model folder (loads with `MTPModel.from_pretrained`) plus the trainer state.

    <output>/checkpoints/step-000200/
        config.json, model.safetensors, tokenizer files    <- MTPModel.save_pretrained
        trainer_state.json, trainer_state.safetensors       <- step, optimizer, scheduler, grad scaler, RNG states

The trainer state is data only, never a pickle: its tensors go to safetensors, everything else (numbers,
strings, lists, Python's and numpy's RNG states) to JSON, where a tensor is a reference to its safetensors key.
Reading it runs no code. A `trainer_state.pt` written by an older mtp is refused (unpickling a file can run
arbitrary code); resume such a run with the older version or start it again.

A torchrun run (`--parallel`) writes sharded checkpoints instead: the model and optimizer tensors as
torch.distributed.checkpoint shards, one file per rank, which any later world size (one process too) reads
(only the weights that train: the frozen ones are the starting model's, which a resumed run builds again);
the trainer state as above, its optimizer part only the parameter groups:

    <output>/checkpoints/step-000200/
        sharded/.metadata, sharded/__0_0.distcp, ...       <- every rank its shards
        trainer_state.json, trainer_state.safetensors       <- rank 0

A checkpoint is built in a temporary folder next to its final place and renamed into it, so a crash leaves
either a complete checkpoint or none (a stale temporary folder is ignored and removed by the next save).
Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from mtp.errors import MTPError, first_line
from mtp.io import atomic_folder, read_json_object, remove_stale_temporaries

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "trainer_state.safetensors"
LEGACY_STATE_NAME = "trainer_state.pt"  # a pickle, as mtp 0.1.0 wrote it; never loaded
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        has_state = (path / STATE_NAME).is_file() or (path / LEGACY_STATE_NAME).is_file()
        if m and has_state and ((path / "config.json").is_file() or is_sharded(path)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def is_sharded(folder: str | os.PathLike) -> bool:
    """A checkpoint written by a torchrun run (shards, no model folder)."""
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under `root` (or under `root/checkpoints`), or None."""
    root = Path(root)
    found = list_checkpoints(root) or list_checkpoints(root / "checkpoints")
    return found[-1][1] if found else None


def newest_intact_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint under `root` that reads back (its model folder intact, its trainer state readable),
    or None where there is none. A newer one that is damaged (a bad copy, a disk that filled) is named and passed
    over: `--resume` goes on from the one before it instead of refusing the run. All damaged: the newest's error."""
    from mtp.hub import check_model_folder

    damaged: list[tuple[Path, MTPError]] = []
    for _, folder in reversed(list_checkpoints(root)):
        try:
            if not is_sharded(folder):
                check_model_folder(folder)
            load_trainer_state(folder)
        except MTPError as e:
            damaged.append((folder, e))
            continue
        for bad, e in damaged:
            print(f"mtp: {bad} cannot be read ({e}); going on from {folder.name}", file=sys.stderr, flush=True)
        return folder
    if damaged:
        raise MTPError(f"no checkpoint in {root} can be read; the newest: {damaged[0][1]}")
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is a dependency, but RNG capture must not be the reason a save fails
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, model, state: dict, keep: int | None = 2,
                    link_from: Path | None = None) -> Path:
    """Write `root/step-{step}` atomically (model folder + trainer state), then prune to the last `keep`.

    The weights a run does not train (a frozen trunk, the base under LoRA) go in a shard of their own, which is
    `link_from`'s (the run's previous checkpoint) by a hard link where that holds them: a run's checkpoints hold
    its frozen weights once, not once each (an 8B model's frozen trunk is 16 GB)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash in an earlier save, as mtp 0.1.0 named them
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(root)  # left by saves that were killed
    with atomic_folder(checkpoint_dir(root, step)) as tmp:
        # itself atomic: takes the place of the empty temporary folder
        model.save_pretrained(tmp, frozen_apart=True, link_from=link_from)
        save_trainer_state(tmp, {**state, "step": step})
    prune_checkpoints(root, step, keep)
    return checkpoint_dir(root, step)


def prune_checkpoints(root: Path, step: int, keep: int | None) -> None:
    """Keep the last `keep` checkpoints up to `step`. One past it (a damaged one `--resume` passed over, going on
    from an older) is neither counted nor removed: counted, it would have pushed out the good ones before it."""
    if keep is not None and keep > 0:
        for _, old in [c for c in list_checkpoints(root) if c[0] <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(root: str | os.PathLike, step: int, model, optimizer, state: dict,
                            keep: int | None = 2) -> Path:
    """`save_checkpoint` for a torchrun run; every rank calls it. Rank 0 makes the temporary folder and tells
    the others its name, every rank writes its shards into it, rank 0 adds the trainer state and, once all have
    written, renames it into place; so a kill at any moment leaves the complete earlier checkpoints only."""
    from mtp.training.distributed import barrier, broadcast_text, is_main, save_sharded

    root = Path(root)
    final = checkpoint_dir(root, step)
    main = is_main()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
    with atomic_folder(final) if main else contextlib.nullcontext(None) as tmp:
        tmp = Path(broadcast_text(str(tmp) if main else None))
        groups = save_sharded(tmp / SHARDED_DIR, model, optimizer)
        if main:
            save_trainer_state(tmp, {**state, "optimizer_param_groups": groups, "step": step})
        barrier()  # every rank's shards are written before rank 0 renames the folder
    if main:
        prune_checkpoints(root, step, keep)
    barrier()
    return final


def save_trainer_state(folder: str | os.PathLike, state: dict) -> None:
    """`state` (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as JSON + safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    folder = Path(folder)
    save_file(tensors, str(folder / TENSORS_NAME))
    (folder / STATE_NAME).write_text(json.dumps(tree) + "\n", encoding="utf-8")


def load_trainer_state(folder: str | os.PathLike) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / STATE_NAME
    if not path.is_file():
        if (folder / LEGACY_STATE_NAME).is_file():
            raise MTPError(f"{folder / LEGACY_STATE_NAME}: a trainer state in the old pickle format, which mtp no "
                           "longer loads (unpickling can run code); resume with the mtp that wrote it, or start over")
        raise MTPError(f"{folder}: no {STATE_NAME} (not a training checkpoint)")
    tree = read_json_object(path, "a trainer state")
    tensors_path = folder / TENSORS_NAME
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as e:  # missing, truncated or not safetensors
        raise MTPError(f"{tensors_path}: cannot read the trainer state's tensors ({first_line(e)})") from None
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise MTPError(f"{path}: not a trainer state written by mtp ({first_line(e)})") from None


# JSON cannot hold tensors, tuples, numpy arrays or dicts with non-string keys (the optimizer's state is keyed by
# parameter index); each becomes a one-key object naming what it was.
_TENSOR, _TUPLE, _ARRAY, _ITEMS = "__tensor__", "__tuple__", "__ndarray__", "__items__"


def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _TUPLE, _ARRAY, _ITEMS} & value.keys():
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if type(value).__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
        return value.item()  # a numpy scalar
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a trainer state")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ARRAY in value:
        import numpy as np

        return np.array(value[_ARRAY], dtype=np.dtype(value["dtype"]))
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}
