"""What kind of MTP model a folder holds, read from its config.json's `mtp` section: parallel heads
(`mtp.models.parallel_heads`) or mask tokens (`mtp.models.mask_tokens`). Both model classes read it, so it lives
apart from either."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mtp.errors import MTPError
from mtp.io import read_json_object
from mtp.models.safetensors_io import INDEX_NAME, WEIGHTS_NAME, has_weights

MASK_TOKENS_METHOD = "mask_tokens"  # the `mtp` section's "method" of a mask-token folder (parallel heads: none)
# The layout of the folders this mtp writes (the `mtp` section's "format_version"; folders from before it had one are
# of format 1). A change older code would misread (a renamed key, weights of another layout) raises it, so that the
# older code refuses such a folder instead of loading something else.
FORMAT_VERSION = 1


def check_format_version(section: dict, config: Path) -> None:
    """A folder written by a newer mtp, in a format this one does not know, is refused with what to do."""
    version = section.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MTPError(f"{config}: the \"mtp\" section's format_version must be a whole number of 1 or more, "
                       f"got {version!r}")
    if version > FORMAT_VERSION:
        raise MTPError(f"{config.parent} was written by a newer mtp (folder format {version}; this one reads up to "
                       f"{FORMAT_VERSION}): install a newer mtp to read it")


def read_mtp_section(directory: Path) -> dict:
    """The `mtp` section of a model folder's config.json (checked: there is one, and the weights file)."""
    path = directory / "config.json"
    if not path.is_file():
        raise MTPError(f"{directory}: no config.json (not a model folder)")
    section = read_json_object(path, "a model config").get("mtp")
    if not isinstance(section, dict):
        raise MTPError(f"{directory}: config.json has no 'mtp' section (a plain model: wrap it with from_base)")
    check_format_version(section, path)
    if not has_weights(directory):
        raise MTPError(f"{directory}: missing {WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
    return section


def _mtp_setting(directory: str | os.PathLike, key: str):
    """`key` of a folder's `mtp` section, or None for anything that is not an MTP model folder (a quick look, for
    choosing a path; loading checks the folder in full)."""
    path = Path(directory).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("mtp", {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def reads_next_token(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a parallel-heads model whose extra heads read the next token."""
    return _mtp_setting(directory, "next_token_input") is True


def folder_num_heads(directory: str | os.PathLike) -> int | None:
    """The heads of a parallel-heads model folder (None: not one, or not told)."""
    n = _mtp_setting(directory, "num_heads")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def is_mask_token_folder(directory: str | os.PathLike) -> bool:
    return _mtp_setting(directory, "method") == MASK_TOKENS_METHOD


def folder_draft_limits(directory: str | os.PathLike) -> tuple[int, int, str] | None:
    """(most k, default k, what the model is called in messages) of an MTP folder's heads or mask tokens, read
    from its config (None: not an MTP folder, or not told)."""
    if _mtp_setting(directory, "method") == MASK_TOKENS_METHOD:
        most, default, what = _mtp_setting(directory, "max_k"), _mtp_setting(directory, "k"), "mask-token model"
    else:
        most = default = folder_num_heads(directory)
        what = f"{most}-head model"
    if not isinstance(most, int) or isinstance(most, bool):
        return None
    return most, default if isinstance(default, int) and not isinstance(default, bool) else most, what
