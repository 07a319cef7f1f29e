"""Process-wide runtime settings shared by the commands."""

from __future__ import annotations

import torch

from mtp.errors import MTPError


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: torch's choice). Decoding a small model is bound by memory and per-op overhead;
    on a busy machine fewer threads than cores can be faster, so every command takes --threads."""
    if threads is None:
        return
    if threads < 1:
        raise MTPError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
