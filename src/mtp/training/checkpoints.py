"""Training checkpoints: a model folder (loads with `MTPModel.from_pretrained`) plus `trainer_state.pt`.

    <output>/checkpoints/step-000200/
        config.json, model.safetensors, tokenizer files    <- MTPModel.save_pretrained
        trainer_state.pt                                    <- step, optimizer, scheduler, grad scaler, RNG states

A checkpoint is built in a temporary folder next to its final place and renamed into it, so a crash leaves
either a complete checkpoint or none (a stale temporary folder is ignored and removed by the next save).
Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from mtp.errors import MTPError

STATE_NAME = "trainer_state.pt"
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
        if m and (path / STATE_NAME).is_file() and (path / "config.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under `root` (or under `root/checkpoints`), or None."""
    root = Path(root)
    found = list_checkpoints(root) or list_checkpoints(root / "checkpoints")
    return found[-1][1] if found else None


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


def save_checkpoint(root: str | os.PathLike, step: int, model, state: dict, keep: int | None = 2) -> Path:
    """Write `root/step-{step}` atomically (model folder + trainer_state.pt), then prune to the last `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash in the middle of an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        folder = tmp / "ckpt"
        model.save_pretrained(folder)  # itself atomic: writes a temporary folder and renames it
        torch.save({**state, "step": step}, folder / STATE_NAME)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a scheduled save)
            shutil.rmtree(final)
        folder.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise MTPError(f"{folder}: no {STATE_NAME} (not a training checkpoint)")
    try:
        # Our own file, holding Python RNG state tuples and numpy arrays besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise MTPError(f"{path}: cannot read the trainer state ({e})") from None
