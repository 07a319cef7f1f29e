"""`mtp convert`: Meta's multi-token checkpoints <-> mtp folders, and plain models -> mtp folders."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mtp.errors import MTPError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What hub.resolve_model calls a model -> the --from names.
_KIND_TO_FORMAT = {"meta": "meta", "mtp_folder": "mtp", "hf_folder": "hf", "hub": "hf", "default": "hf",
                   "gguf": "gguf"}


def convert(
    input: str,
    output: str,
    from_: Literal["meta", "mtp", "hf", "gguf"] | None = None,
    to: Literal["meta", "mtp"] = "mtp",
    num_heads: int | None = None,
    num_trunk_layers: int | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    overwrite: bool = False,
) -> int:
    """Convert checkpoints: Meta's multi-token format <-> mtp folders; a plain model (HF folder, GGUF) -> mtp.

    Args:
        input: the checkpoint to read: a Meta folder (params.json + consolidated.00.pth), an mtp folder, a Hugging Face folder or hub id, or a .gguf file
        output: the folder to write (written to a temporary name, then renamed)
        from_: the input's format, checked against what is on disk (detected from it when omitted)
        to: the format to write: mtp (our folder) or meta (params.json + consolidated.00.pth)
        num_heads: number of heads when wrapping a plain model (--from hf/gguf; default 4)
        num_trunk_layers: shared trunk layers when wrapping a plain model (default: all layers but the last)
        dtype: weights' dtype in the output; auto keeps the input's (float32 for hf/gguf)
        overwrite: replace an existing, non-empty output folder
    """
    from mtp.formats.meta import convert_meta_to_mtp_folder, meta_to_mtp, mtp_to_meta
    from mtp.models.parallel_heads import MTPModel

    source = _detect_format(input)
    if from_ is not None and from_ != source:
        raise MTPError(f"--from {from_}: {input} is {_FORMAT_NAMES[source]} (--from {source}, or leave --from out)")
    if source == to:
        raise MTPError(f"{input} is already in the {to} format (use --to to pick the other format)")
    if source in ("meta", "mtp") and (num_heads is not None or num_trunk_layers is not None):
        raise MTPError("--num-heads and --num-trunk-layers apply only when wrapping a plain model (--from hf/gguf); "
                       f"a {source} checkpoint has its heads already")
    out = Path(output).expanduser()
    _check_output(Path(input).expanduser(), out, overwrite)
    target = _DTYPES.get(dtype)

    if source == "meta" and to == "mtp":  # streamed tensor by tensor: memory stays near one tensor
        model = convert_meta_to_mtp_folder(input, out, dtype=target, overwrite=overwrite)
        tok = "with" if (out / "tokenizer_config.json").is_file() else "without"
        print(f"wrote {out}: mtp folder (config.json, model.safetensors) {tok} a tokenizer, {model.num_heads} heads "
              f"on a {model.num_trunk_layers}-layer trunk ({model.num_layers} layers), {model.dtype}")
        return 0
    if source == "meta":
        model = meta_to_mtp(input, dtype=target)
    elif source == "mtp":
        from mtp.hub import check_model_folder

        check_model_folder(input)
        model = MTPModel.from_pretrained(input, dtype=target or _mtp_folder_dtype(Path(input)))
    else:
        from mtp.hub import load_base_model

        base, tokenizer, model_source = load_base_model(input, dtype=target or torch.float32)
        model = MTPModel(base, num_heads=4 if num_heads is None else num_heads, num_trunk_layers=num_trunk_layers)
        model.tokenizer, model.source = tokenizer, model_source

    heads = f"{model.num_heads} heads on a {model.num_trunk_layers}-layer trunk ({model.num_layers} layers)"
    if to == "meta":
        mtp_to_meta(model, out, overwrite=overwrite)
        print(f"wrote {out}: Meta checkpoint (params.json, consolidated.00.pth), {heads}, {model.dtype}")
    else:
        model.save_pretrained(out, overwrite=overwrite)
        tok = "with" if model.tokenizer is not None else "without"
        print(f"wrote {out}: mtp folder (config.json, model.safetensors) {tok} a tokenizer, {heads}, {model.dtype}")
    return 0


_FORMAT_NAMES = {"meta": "a Meta checkpoint", "mtp": "an mtp folder", "hf": "a Hugging Face model",
                 "gguf": "a GGUF file"}


def _detect_format(input: str) -> str:
    from mtp.hub import resolve_model

    return _KIND_TO_FORMAT[resolve_model(input).kind]


def _check_output(input: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and input.exists() and output.resolve() == input.resolve():
        raise MTPError(f"--output {output} is the input; write to another folder")
    if output.exists() and input.exists() and input.resolve().is_relative_to(output.resolve()):
        raise MTPError(f"--output {output} holds the input {input}: replacing it would delete the input; write to "
                       "another folder")
    if output.exists() and not output.is_dir():
        raise MTPError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MTPError(f"--output {output} exists and is not empty (pass --overwrite to replace it)")


def _mtp_folder_dtype(folder: Path) -> torch.dtype:
    """The dtype the weights of an mtp folder are stored in (read from the safetensors header)."""
    from mtp.models.safetensors_io import FolderWeights, has_weights

    if not has_weights(folder):
        return torch.float32  # from_pretrained reports the missing file
    with FolderWeights(folder) as weights:
        return next((info.dtype for info in weights.tensors.values() if info.dtype.is_floating_point), torch.float32)
