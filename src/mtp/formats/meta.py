"""Meta's multi-token checkpoint format (Gloeckle et al. 2024: Meta's released 7B checkpoints) <-> `MTPModel`.

A Meta checkpoint folder holds `params.json` and `consolidated.00.pth`, a Llama-format state dict:

    tok_embeddings.weight, norm.weight, output.weight
    layers.{i}.attention.{wq,wk,wv,wo}.weight, layers.{i}.feed_forward.{w1,w2,w3}.weight,
    layers.{i}.{attention_norm,ffn_norm}.weight
    extra_heads.{j}.<the same layer keys>

`params.json`'s `n_layers` counts every transformer block, the extra heads included (Meta's `Transformer` builds
`n_layers - n_future_tokens + 1` blocks in `layers` and `n_future_tokens - 1` in `extra_heads`). `layers.*` is the
trunk followed by the next-token head (its last entry); `extra_heads.{j}` is the head predicting token t+2+j.
So a Meta model is an `MTPModel` over a Llama with `n_layers - n_future_tokens + 1` layers, one layer per head.

Meta's rotary embedding rotates interleaved pairs (complex form); Hugging Face Llama rotates halves. The rows of
`wq` and `wk` are permuted between the two, exactly as transformers' `convert_llama_weights_to_hf.py` does; the
permutation is a pure re-indexing, so meta -> mtp -> meta is bit-exact.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch

from mtp.errors import MTPError
from mtp.io import atomic_folder, check_replaceable, read_json_object

PARAMS_NAME = "params.json"
WEIGHTS_NAME = "consolidated.00.pth"
TOKENIZER_NAME = "tokenizer.model"
META_PARAMS_ATTR = "meta_params"  # the original params.json, kept in the HF config for an exact round trip

# Meta's ModelArgs defaults for keys a params.json may leave out.
_DEFAULTS = {"multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0,
             "n_future_tokens": 1}
_REQUIRED = ("dim", "n_layers", "n_heads")
# Keys of a checkpoint that carry no weights (precomputed RoPE frequencies in some Llama releases).
_IGNORED_KEYS = ("rope.freqs",)

# Meta layer key -> Hugging Face Llama decoder-layer key.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# -------------------------------------------------------------------------------------------- reading
# Model-parallel shards (Meta's llama: fairscale's ColumnParallelLinear splits the output rows, RowParallelLinear
# and ParallelEmbedding the input columns; norms are replicated): the axis each key's pieces are joined along.
_SPLIT_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1}


def split_dim(key: str) -> int | None:
    """The axis model-parallel shards of `key` are concatenated along (None: replicated in every shard)."""
    if key in _SPLIT_DIM:
        return _SPLIT_DIM[key]
    rest = key.split(".", 2)[-1] if key.startswith(("layers.", "extra_heads.")) else key
    return _SPLIT_DIM.get(rest)


class MetaCheckpoint:
    """A Meta checkpoint folder opened without reading its weights: `params.json` and every `consolidated.*.pth`
    memory-mapped (`torch.load(mmap=True, weights_only=True)`). `tensor(key)` joins the shards of one tensor;
    `release(tensor)` hands a mapped tensor's pages back once it has been copied, so a conversion holds about
    one tensor at a time instead of the whole file."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not folder.is_dir():
            raise MTPError(f"Meta checkpoint folder not found: {folder}")
        params_path = folder / PARAMS_NAME
        if not params_path.is_file():
            raise MTPError(f"{params_path}: missing {PARAMS_NAME} (not a Meta checkpoint folder)")
        self.folder = folder
        self.params = read_json_object(params_path, "Meta's params.json")
        self.paths = sorted(folder.glob("consolidated.*.pth"))
        if not self.paths:
            raise MTPError(f"{folder}: missing {WEIGHTS_NAME} (no consolidated.*.pth file)")
        self.shards: list[dict[str, torch.Tensor]] = []
        self.mapped: list[bool] = []
        for path in self.paths:
            state, mapped = _load_shard(path)
            self.shards.append(state)
            self.mapped.append(mapped)
        first = set(self.shards[0])
        for path, shard in zip(self.paths[1:], self.shards[1:], strict=True):
            if set(shard) != first:
                diff = sorted(first.symmetric_difference(shard))
                raise MTPError(f"{path} does not hold the same tensors as {self.paths[0].name} "
                               f"(model-parallel shards must; differ: {', '.join(diff[:5])})")
        self.source = str(self.paths[0]) if len(self.paths) == 1 else f"{folder}/consolidated.*.pth"

    def keys(self) -> list[str]:
        return list(self.shards[0])

    def shape(self, key: str) -> tuple[int, ...]:
        pieces = [s[key] for s in self.shards]
        shape = list(pieces[0].shape)
        dim = split_dim(key) if len(pieces) > 1 else None
        if dim is not None and len(shape) > dim:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][key].dtype

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor: the mapped one itself for a single shard, else the shards joined (a new tensor)."""
        pieces = [s[key] for s in self.shards]
        if len(pieces) == 1:
            return pieces[0]
        dim = split_dim(key)
        if dim is None or pieces[0].dim() <= dim:
            return pieces[0]  # replicated (norms, rope.freqs)
        return torch.cat(pieces, dim=dim)

    def release(self, key: str) -> None:
        """Drop the resident pages of `key`'s mapped pieces (they are read again from the file if touched)."""
        for shard, mapped in zip(self.shards, self.mapped, strict=True):
            if mapped:
                _drop_pages(shard[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.keys()}


def _load_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    try:
        try:
            state, mapped = torch.load(path, weights_only=True, map_location="cpu", mmap=True), True
        except RuntimeError as e:  # files in the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state, mapped = torch.load(path, weights_only=True, map_location="cpu"), False
    except pickle.UnpicklingError as e:  # (torch's own text goes on to suggest loading it unsafely: not for a user)
        raise MTPError(f"cannot read {path}: it holds Python objects besides tensors, which mtp does not unpickle "
                       "(unpickling runs code the file names); convert it to safetensors with a tool you trust") from e
    except Exception as e:  # torch raises many types for a corrupt or non-weights file
        raise MTPError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MTPError(f"{path}: expected a state dict of tensors")
    return state, mapped


def _drop_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside a file-mapped (private) tensor: the process stops holding
    them; reading the tensor again reads the file. Best effort: nothing happens where madvise is unavailable."""
    libc = _libc()
    if libc is None or tensor.numel() == 0:
        return
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def read_meta_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params, state dict) of a Meta checkpoint folder: `params.json` + `consolidated.*.pth` (one file, or
    model-parallel shards joined along their split axes)."""
    checkpoint = MetaCheckpoint(folder)
    return checkpoint.params, checkpoint.state_dict()


def _param(params: dict, key: str):
    if key in _REQUIRED and key not in params:
        raise MTPError(f"{PARAMS_NAME}: missing {key!r}")
    value = params.get(key, _DEFAULTS.get(key))
    if key == "n_kv_heads" and value is None:
        value = _param(params, "n_heads")
    return value


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size Meta's FeedForward derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class _Shape:
    """The model dimensions a params.json describes."""

    def __init__(self, params: dict, shapes: dict[str, tuple[int, ...]]):
        try:
            self.dim = int(_param(params, "dim"))
            self.n_layers = int(_param(params, "n_layers"))
            self.n_heads = int(_param(params, "n_heads"))
            self.n_kv_heads = int(_param(params, "n_kv_heads"))
            self.num_heads = int(_param(params, "n_future_tokens"))
            multiple_of, multiplier = int(_param(params, "multiple_of")), _param(params, "ffn_dim_multiplier")
            self.norm_eps = float(_param(params, "norm_eps"))
            self.rope_theta = float(_param(params, "rope_theta"))
        except (TypeError, ValueError) as e:
            raise MTPError(f"{PARAMS_NAME}: bad value: {e}") from e
        # (0: a division by zero below; a negative or absurd count: the expected shapes, a dict of n_layers x 9
        # keys, filled memory before the checkpoint was compared with them)
        for key, value in (("dim", self.dim), ("n_layers", self.n_layers), ("n_heads", self.n_heads),
                           ("n_kv_heads", self.n_kv_heads), ("multiple_of", multiple_of)):
            if value < 1:
                raise MTPError(f"{PARAMS_NAME}: {key} must be at least 1, got {value}")
        if multiplier is not None and (isinstance(multiplier, bool) or not isinstance(multiplier, int | float)
                                       or not multiplier > 0):
            raise MTPError(f"{PARAMS_NAME}: ffn_dim_multiplier must be a positive number or null, got {multiplier!r}")
        if self.n_layers > len(shapes):  # every block holds nine tensors
            raise MTPError(f"{PARAMS_NAME}: n_layers {self.n_layers:,}, but the checkpoint holds {len(shapes)} "
                           "tensors in all")
        self.intermediate = ffn_hidden_size(self.dim, multiple_of, multiplier)
        vocab = params.get("vocab_size", -1)
        if vocab is None or int(vocab) <= 0:  # Llama's "-1": taken from the tokenizer; here from the embedding
            emb = shapes.get("tok_embeddings.weight")
            if emb is None or len(emb) != 2:
                raise MTPError(f"{PARAMS_NAME} has no vocab_size and the checkpoint no tok_embeddings.weight")
            vocab = emb[0]
        self.vocab = int(vocab)
        if params.get("use_scaled_rope"):
            raise MTPError(f"{PARAMS_NAME}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
        if self.num_heads < 1:
            raise MTPError(f"{PARAMS_NAME}: n_future_tokens must be >= 1, got {self.num_heads}")
        # Meta's Transformer: n_layers blocks in all, n_future_tokens - 1 of them in extra_heads.
        self.num_layers = self.n_layers - self.num_heads + 1  # len(layers): trunk + next-token head
        if self.num_layers < 1:
            raise MTPError(f"{PARAMS_NAME}: n_layers ({self.n_layers}) must be at least n_future_tokens "
                           f"({self.num_heads})")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise MTPError(f"{PARAMS_NAME}: dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads} "
                           "do not give an even head size shared by the key/value groups")
        self.head_dim = self.dim // self.n_heads

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every Meta key with its shape."""
        d, i, hd = self.dim, self.intermediate, self.head_dim
        layer = {
            "attention.wq.weight": (self.n_heads * hd, d),
            "attention.wk.weight": (self.n_kv_heads * hd, d),
            "attention.wv.weight": (self.n_kv_heads * hd, d),
            "attention.wo.weight": (d, self.n_heads * hd),
            "feed_forward.w1.weight": (i, d),
            "feed_forward.w2.weight": (d, i),
            "feed_forward.w3.weight": (i, d),
            "attention_norm.weight": (d,),
            "ffn_norm.weight": (d,),
        }
        shapes = {"tok_embeddings.weight": (self.vocab, d), "norm.weight": (d,), "output.weight": (self.vocab, d)}
        prefixes = [f"layers.{n}." for n in range(self.num_layers)]
        prefixes += [f"extra_heads.{j}." for j in range(self.num_heads - 1)]
        for prefix in prefixes:
            shapes.update({prefix + k: s for k, s in layer.items()})
        return shapes


def _check_meta_state(shapes: dict[str, tuple[int, ...]], shape: _Shape, source: str) -> None:
    state = {k: tuple(v) for k, v in shapes.items()}
    expected = shape.expected()
    missing = sorted(k for k in expected if k not in state)
    extra = sorted(k for k in state if k not in expected and k not in _IGNORED_KEYS)
    misshaped = sorted(f"{k} (checkpoint {state[k]}, params.json {expected[k]})"
                       for k in state if k in expected and state[k] != expected[k])
    if not (missing or extra or misshaped):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{label}: {shown}")
    hint = ""
    if any(k.startswith("layers.") for k in extra + missing):
        found = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        hint = (f" (params.json says n_layers={shape.n_layers} blocks in all, n_future_tokens={shape.num_heads}: "
                f"expected layers.0..{shape.num_layers - 1}, found {found} layers.* blocks)")
    raise MTPError(f"{source} does not match {PARAMS_NAME}: " + "; ".join(parts) + hint)


# -------------------------------------------------------------------------------------------- permutations
def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> Hugging Face (rotate-half) row order of a q/k projection."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face (rotate-half) -> Meta (interleaved pairs): the inverse of `_permute`."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _meta_to_ours_key(key: str) -> str:
    if key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[key]
    kind, index, rest = key.split(".", 2)
    if kind == "layers":
        return f"model.layers.{index}.{_LAYER_KEYS[rest]}"
    return f"extra_heads.{index}.0.{_LAYER_KEYS[rest]}"  # one layer per head


# -------------------------------------------------------------------------------------------- meta -> mtp
META_CONTEXT = 4096  # the context of a params.json without max_seq_len (Meta's reference code's default)


def _llama_config(shape: _Shape, params: dict, dtype: torch.dtype):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=int(params.get("max_seq_len", META_CONTEXT)),
        rms_norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    config.dtype = dtype
    setattr(config, META_PARAMS_ATTR, dict(params))
    return config


def _open_meta(folder: str | os.PathLike, dtype: torch.dtype | None):
    """(checkpoint, empty MTPModel on the meta device, dtype, read(our key) -> converted tensor) of a folder."""
    from mtp.models.parallel_heads import MTPModel

    checkpoint = MetaCheckpoint(folder)
    shapes = checkpoint.shapes()
    shape = _Shape(checkpoint.params, shapes)
    _check_meta_state(shapes, shape, checkpoint.source)
    if dtype is None:
        dtype = checkpoint.dtype("tok_embeddings.weight")
    config = _llama_config(shape, checkpoint.params, dtype)
    model = MTPModel.empty(config, num_heads=shape.num_heads, num_trunk_layers=shape.num_layers - 1, dtype=dtype)
    ours = {_meta_to_ours_key(k): k for k in checkpoint.keys() if k not in _IGNORED_KEYS}

    def read(name: str) -> torch.Tensor:
        key = ours[name]
        tensor = checkpoint.tensor(key)
        if key.endswith("attention.wq.weight"):
            tensor = _permute(tensor, shape.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = _permute(tensor, shape.n_kv_heads)
        tensor = tensor.to(dtype)
        storage = tensor.untyped_storage().data_ptr()
        if any(m and s[key].untyped_storage().data_ptr() == storage
               for s, m in zip(checkpoint.shards, checkpoint.mapped, strict=True)):
            tensor = tensor.clone()  # our own memory, not the file's mapping (its pages are dropped below)
        checkpoint.release(key)
        return tensor

    model.check_checkpoint_shapes({n: shapes[k] for n, k in ours.items()}, checkpoint.source)
    return checkpoint, model, dtype, read, list(ours)


def meta_to_mtp(folder: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                load_tokenizer: bool = True):
    """Load a Meta multi-token checkpoint folder as an `MTPModel` (eval mode, on the CPU).

    `dtype=None` keeps the checkpoint's dtype. A `tokenizer.model` (sentencepiece) in the folder or its parent
    is attached as `model.tokenizer` when `load_tokenizer` and it can be read. Model-parallel shards
    (`consolidated.00.pth`, `.01`, ...) are joined. The model is built on the meta device and each tensor is
    converted from the memory-mapped file into its place (about one copy of the weights in memory).
    """
    folder = Path(folder)
    checkpoint, model, dtype, read, names = _open_meta(folder, dtype)
    model.materialise(names, read)
    del checkpoint
    model.eval()
    try:
        from mtp.hub import ModelSource

        model.source = ModelSource("meta", str(folder.resolve()),
                                   f"Meta-format checkpoint {folder} (params.json + consolidated.*.pth)")
    except ImportError:  # mtp.hub is optional for this module
        pass
    if load_tokenizer:
        model.tokenizer = load_meta_tokenizer(folder)
        _ids_of(model, model.tokenizer)
    return model


def _ids_of(model, tokenizer) -> None:
    """The start, end and padding ids of the checkpoint's own tokenizer in the model's config (params.json has
    none: LlamaConfig's defaults, 1 and 2, are Llama 2's, and an ordinary token of another vocabulary)."""
    if tokenizer is None:
        return
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)


def convert_meta_to_mtp_folder(folder: str | os.PathLike, output: str | os.PathLike,
                               dtype: torch.dtype | None = None, overwrite: bool = False):
    """Write a Meta checkpoint as an mtp folder, one tensor at a time: read from the mapped file, permuted,
    cast, written, its pages dropped. Memory stays near one tensor (plus the mapped pages the kernel keeps
    reclaimable). Returns the (weightless) model describing what was written."""
    folder = Path(folder)
    checkpoint, model, dtype, read, names = _open_meta(folder, dtype)
    tokenizer = load_meta_tokenizer(folder)
    _ids_of(model, tokenizer)
    model.save_pretrained(output, tokenizer=tokenizer, weights=read, overwrite=overwrite)
    return model


def load_meta_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a Meta checkpoint: Hugging Face's tokenizer files in the folder (what `mtp_to_meta`
    writes for a model whose tokenizer is not sentencepiece), or the sentencepiece `tokenizer.model` in the folder
    or its parent, or None.

    Reading it needs transformers' sentencepiece conversion (the `sentencepiece` and `protobuf` packages); when
    that fails the weights still convert, without a tokenizer, and a warning says so.
    """
    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():  # Hugging Face's files, as `mtp convert --to meta` writes them
        from mtp.hub import load_tokenizer

        return load_tokenizer(folder)
    for candidate in (folder / TOKENIZER_NAME, folder.parent / TOKENIZER_NAME):
        if candidate.is_file():
            try:
                from transformers import LlamaTokenizer

                tokenizer = LlamaTokenizer.from_pretrained(str(candidate.parent))
            except Exception as e:  # optional: the weights convert without it
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"mtp: warning: cannot read the tokenizer {candidate} ({reason}); continuing without it",
                      file=sys.stderr)
                return None
            if len(tokenizer) <= 3:  # an empty vocabulary: the file was not understood
                print(f"mtp: warning: the tokenizer {candidate} could not be read; continuing without it",
                      file=sys.stderr)
                return None
            return tokenizer
    return None


# -------------------------------------------------------------------------------------------- mtp -> meta
def _rope(config) -> tuple[float, str]:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):  # transformers 5
        return float(rope.get("rope_theta", 10000.0)), str(rope.get("rope_type", "default"))
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(getattr(config, "rope_theta", 10000.0)), str(kind)


def _ffn_params(dim: int, intermediate: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's formula gives `intermediate`."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1, intermediate):
        if ffn_hidden_size(dim, multiple_of, None) == intermediate:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    multiplier = intermediate / base  # intermediate < base here
    for _ in range(8):  # float rounding: nudge until int(multiplier * base) lands on it
        if ffn_hidden_size(dim, 1, multiplier) == intermediate:
            return 1, multiplier
        multiplier = math.nextafter(multiplier, math.inf)
    raise MTPError(f"no multiple_of/ffn_dim_multiplier reproduces intermediate size {intermediate} for dim {dim}")


def meta_params_for(model) -> dict:
    """params.json for `model`: its original params.json when it still describes it, else derived ones."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise MTPError(f"Meta's format holds Llama models; this model is {getattr(config, 'model_type', '?')!r}")
    if model.num_layers - model.num_trunk_layers != 1:
        raise MTPError(f"Meta's format has one layer per head; this model has "
                       f"{model.num_layers - model.num_trunk_layers} (num_trunk_layers={model.num_trunk_layers} "
                       f"of {model.num_layers})")
    if model.reads_next_token:
        raise MTPError("Meta's format has heads that read the trunk alone; this model's extra heads also read the "
                       "next token (train heads with --no-next-token-input to export them)")
    if getattr(model, "draft_vocab", None) is not None:  # (a buffer state_dict leaves out: it would be lost)
        raise MTPError(f"Meta's format has heads over the whole vocabulary; this model's extra heads draft from "
                       f"{model.draft_vocab.numel():,} tokens (--draft-vocab): train heads without it to export them")
    dim, n_heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or dim // n_heads
    theta, rope_type = _rope(config)
    problems = []
    if head_dim * n_heads != dim:
        problems.append(f"head_dim {head_dim} x {n_heads} heads != hidden size {dim}")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (Meta's is silu)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases in attention or MLP")
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}")
    if problems:
        raise MTPError("this model cannot be written in Meta's format: " + "; ".join(problems))
    intermediate = int(config.intermediate_size)
    derived = {
        "dim": dim,
        "n_layers": model.num_trunk_layers + model.num_heads,
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(config, "num_key_value_heads", None) or n_heads),
        "vocab_size": int(config.vocab_size),
        "norm_eps": float(config.rms_norm_eps),
        "rope_theta": theta,
        "n_future_tokens": model.num_heads,
        "max_seq_len": int(config.max_position_embeddings),  # (read back as the context; 4096 where absent)
    }
    original = getattr(config, META_PARAMS_ATTR, None)
    if not isinstance(original, dict):
        multiple_of, multiplier = _ffn_params(dim, intermediate)
        return {**{k: derived[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")},
                "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
                **{k: derived[k] for k in ("norm_eps", "rope_theta", "n_future_tokens", "max_seq_len")}}
    # Keep the original file's keys and spelling wherever they still hold (absent defaults, vocab_size -1, ...).
    params = dict(original)
    for key, value in derived.items():
        if key == "vocab_size" and int(params.get(key) or -1) <= 0:
            continue
        if key == "max_seq_len" and key not in params and value == META_CONTEXT:  # (absent: the reader's default)
            continue
        try:
            current = _param(params, key)
        except MTPError:
            current = None
        if current != value:
            params[key] = value
    try:
        same_ffn = ffn_hidden_size(dim, int(_param(params, "multiple_of")),
                                   _param(params, "ffn_dim_multiplier")) == intermediate
    except (TypeError, ValueError):
        same_ffn = False
    if not same_ffn:
        params["multiple_of"], params["ffn_dim_multiplier"] = _ffn_params(dim, intermediate)
    return params


def mtp_to_meta(model, folder: str | os.PathLike, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `model` (a Llama-family `MTPModel`, one layer per head) as a Meta checkpoint folder, atomically.

    `dtype=None` keeps the model's dtype. The model's tokenizer goes beside the weights as Hugging Face's files
    (a sentencepiece one also as `tokenizer.model`), which `meta_to_mtp` reads back. A folder holding other files
    than these is refused unless `overwrite` (replacing it would delete them). Returns the folder.
    """
    from mtp.models.parallel_heads import MODEL_FILES

    check_replaceable(folder, {PARAMS_NAME, WEIGHTS_NAME, TOKENIZER_NAME, *MODEL_FILES}, overwrite)
    params = meta_params_for(model)
    n_heads, n_kv_heads = int(params["n_heads"]), int(_param(params, "n_kv_heads"))
    ours = {name.removeprefix("base."): t for name, t in model.state_dict().items()}
    wanted = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    prefixes = [f"layers.{n}." for n in range(model.num_layers)]
    prefixes += [f"extra_heads.{j}." for j in range(model.num_heads - 1)]
    wanted |= {p + k for p in prefixes for k in _LAYER_KEYS}
    state: dict[str, torch.Tensor] = {}
    used = set()
    for key in sorted(wanted, key=_meta_key_order):
        src = _meta_to_ours_key(key)
        if src not in ours:
            raise MTPError(f"the model has no {src} (needed for Meta's {key})")
        used.add(src)
        tensor = ours[src].detach()
        if key.endswith("attention.wq.weight"):
            tensor = _unpermute(tensor, n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = _unpermute(tensor, n_kv_heads)
        if dtype is not None:
            tensor = tensor.to(dtype)
        state[key] = tensor.to("cpu").contiguous()
    leftover = sorted(k for k in ours if k not in used)
    if leftover:
        raise MTPError("tensors with no place in Meta's format: " + ", ".join(leftover[:5]))
    if state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr():
        state["output.weight"] = state["output.weight"].clone()  # tied in HF; two tensors in Meta's format

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / PARAMS_NAME).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        torch.save(state, tmp / WEIGHTS_NAME)
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(tmp)
    return folder


def _meta_key_order(key: str) -> tuple:
    parts = key.split(".")
    group = {"tok_embeddings": 0, "layers": 1, "extra_heads": 2, "norm": 3, "output": 4}[parts[0]]
    index = int(parts[1]) if parts[0] in ("layers", "extra_heads") else 0
    return group, index, key
