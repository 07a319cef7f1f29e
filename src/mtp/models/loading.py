"""One loader for every command: any model argument -> an `MTPModel` with its tokenizer attached."""

from __future__ import annotations

import time
from typing import Literal

import torch

from mtp.errors import MTPError
from mtp.hub import (
    ModelSource,
    check_finite_weights,
    check_model_folder,
    default_model_folder,
    load_base_model,
    resolve_model,
)
from mtp.models.parallel_heads import MTPModel, packing_dtypes
from mtp.runtime import resolve_runtime

Quantize = Literal["none", "fp16", "int8"]


def load(spec: str | None = None, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         num_heads: int | None = None, num_trunk_layers: int | None = None, quantize: Quantize = "none",
         decode_only: bool = False, mask_token_id: int | None = None, mask_token: str | None = None):
    """`mtp.load`: the model `spec` names (None: the embedded default; an mtp or Hugging Face folder, a hub id, a
    .gguf, a Meta checkpoint), on the commands' device rule (auto: CUDA in bfloat16 when there is a GPU, else the
    CPU in float32). `num_heads`, `num_trunk_layers`: the heads given to a plain model (default 4 on all layers but
    the last; a folder keeps its own); `quantize` ("fp16", "int8": CPU packed weights) and `decode_only` (no
    training copy of the weights kept: smaller, faster on a CPU) for a model that only decodes; `mask_token_id` or
    `mask_token`: load a plain model as a mask-token model. See `load_mtp_model`."""
    return load_mtp_model(spec, num_heads=num_heads, num_trunk_layers=num_trunk_layers, device=device, dtype=dtype,
                          quantize=quantize, decode_only=decode_only, mask_token_id=mask_token_id,
                          mask_token=mask_token)


def load_mtp_model(spec: str | None = None, num_heads: int | None = None, num_trunk_layers: int | None = None,
                   device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", quantize: Quantize = "none",
                   default_num_heads: int = 4, mask_token_id: int | None = None,
                   mask_token: str | None = None, decode_only: bool = False):
    """Load `spec` (see `mtp.hub.resolve_model`) as an MTP model.

    An MTP folder or a Meta checkpoint brings its own heads (asking for a different number is an error); a plain
    model is wrapped with `num_heads` heads (default 4) whose extra heads start as copies of the last layer(s).
    A mask-token folder loads as a `MaskTokenModel`, and so does a plain model given `mask_token_id` or
    `mask_token` (a token it already has, as checkpoints trained with the self-distillation
    authors' code ship one).
    `device` and `dtype` may be "auto" (`mtp.runtime`); a device this torch cannot use is an error before loading.
    `decode_only` (commands that only decode): fp32 weights on a CPU are kept only in the blocked layout oneDNN's
    matmul reads (`mtp.models.quantize.block_for_decoding`), as fast as the copies kept beside trainable weights,
    in half their memory; `quantize` other than "none" is always decode-only.
    """
    from mtp.models.folder_kind import is_mask_token_folder
    from mtp.models.mask_tokens import MaskTokenModel

    runtime = resolve_runtime(device, dtype, quantize)
    device, torch_dtype = runtime.device, runtime.dtype
    start = time.perf_counter()
    source = resolve_model(spec)
    # Weights about to be fp16-packed (decode-only) are loaded in fp16: the fp32 copy never exists. Those about to
    # be blocked (decode-only fp32) are read into memory too, not mapped from the file as transformers loads them:
    # each layer's then goes when its blocked copy is made (a mapped file stays resident while any tensor of it
    # lives).
    packing = packing_dtypes if quantize == "fp16" and torch_dtype == torch.float32 else None
    read_into_memory = packing is not None or (decode_only and quantize == "none" and device.type == "cpu"
                                               and torch_dtype == torch.float32)
    plain = None
    if read_into_memory and source.kind in ("default", "hf_folder") and mask_token_id is None and mask_token is None:
        folder = default_model_folder() if source.kind == "default" else source.location
        if source.kind == "hf_folder":
            check_model_folder(folder)  # as transformers' load would first: a damaged file is one line
        plain = MTPModel.from_hf_folder(folder, num_heads or default_num_heads, num_trunk_layers, device=device,
                                        dtype=torch_dtype, tensor_dtype=packing)
    if source.kind == "mtp_folder" and is_mask_token_folder(source.location):
        check_model_folder(source.location)
        model = MaskTokenModel.from_pretrained(source.location, device=device, dtype=torch_dtype)
        source.load_seconds = time.perf_counter() - start
        model.source = source
    elif mask_token_id is not None or mask_token is not None:
        model = _with_mask_token(spec, source, mask_token_id, mask_token, device, torch_dtype)
    elif plain is not None:
        model = plain
        source.load_seconds = time.perf_counter() - start
        model.source = source
    elif source.kind in ("mtp_folder", "meta"):
        model = _with_own_heads(source, num_heads, num_trunk_layers, device, torch_dtype, packing)
        source.load_seconds = time.perf_counter() - start
        model.source = source
    else:
        base, tokenizer, source = load_base_model(spec, device=device, dtype=torch_dtype)
        model = MTPModel(base, num_heads=num_heads or default_num_heads, num_trunk_layers=num_trunk_layers)
        model.tokenizer, model.source = tokenizer, source
    model.eval()
    if quantize != "none":
        quantize_model(model, quantize, decode_only=True)  # commands that take --quantize only decode
    elif decode_only:
        from mtp.models.quantize import block_for_decoding

        # (a mask-token model decodes through its base as .lm; mtp folders and simple HF folders were read into
        # memory, the rest loaded by transformers, which maps the file)
        in_memory = plain is not None or (source.kind == "mtp_folder" and mask_token_id is None and mask_token is None)
        block_for_decoding(getattr(model, "lm", model), mapped=not in_memory)
    return model


def _with_mask_token(spec: str | None, source, mask_token_id: int | None, mask_token: str | None,
                     device: torch.device, dtype: torch.dtype):
    """A plain model as a `MaskTokenModel` with the mask token given by id or by a token its tokenizer has."""
    from mtp.models.mask_tokens import MaskTokenModel

    if source.kind in ("mtp_folder", "meta"):
        raise MTPError(f"{source.location} is a parallel-heads model; a mask token applies to a plain model")
    base, tokenizer, source = load_base_model(spec, device=device, dtype=dtype)
    if mask_token is not None and mask_token_id is None:
        known = tokenizer.convert_tokens_to_ids(mask_token) if tokenizer is not None else None
        if not isinstance(known, int) or known == getattr(tokenizer, "unk_token_id", None):
            raise MTPError(f"the tokenizer of {source.location} has no token {mask_token!r}")
        mask_token_id = known
    model = MaskTokenModel.from_base(base, mask_token_id=mask_token_id, mask_token=mask_token, tokenizer=tokenizer)
    model.source = source
    return model


def _with_own_heads(source, num_heads: int | None, num_trunk_layers: int | None, device: torch.device,
                    dtype: torch.dtype, packing) -> MTPModel:
    """An mtp folder or a Meta checkpoint: its own heads, which the flags may name but not change."""
    if source.kind == "mtp_folder":
        check_model_folder(source.location)
        model = MTPModel.from_pretrained(source.location, device=device, dtype=dtype, tensor_dtype=packing)
    else:
        from mtp.formats.meta import meta_to_mtp

        model = meta_to_mtp(source.location, dtype=dtype).to(device)
        check_finite_weights(model, source.location)
    if num_heads is not None and num_heads != model.num_heads:
        raise MTPError(f"{source.location} has {model.num_heads} heads; --num-heads {num_heads} does not match "
                       "(omit it, or convert a base model)")
    if num_trunk_layers is not None and num_trunk_layers != model.num_trunk_layers:
        raise MTPError(f"{source.location} has {model.num_trunk_layers} trunk layers, not {num_trunk_layers}")
    return model


def quantize_model(model, fmt: str, decode_only: bool = False):
    """`mtp.models.quantize.quantize_for_decoding` for either kind of model (a mask-token model packs the base
    model it decodes with); returns the model."""
    from mtp.models.mask_tokens import MaskTokenModel
    from mtp.models.quantize import quantize_for_decoding

    if isinstance(model, MaskTokenModel):
        if model.lora is not None and fmt == "fp16":
            raise MTPError("--quantize fp16 is not available for gated-LoRA mask-token models yet (their adapters "
                           "hook the projections that fp16 packing replaces)")
        quantize_for_decoding(model.lm, fmt, decode_only=decode_only)
        return model
    return quantize_for_decoding(model, fmt, decode_only=decode_only)


def check_seq_len(model, seq_len: int, masks: int = 0) -> None:
    """Training rows of `seq_len` tokens (and `masks` positions past them: `mtp.hub.check_positions`) fit the
    model's positions."""
    from mtp.decoding.generate import context_limit
    from mtp.hub import check_positions

    check_positions(seq_len, context_limit(model), masks)


def describe_source(source: ModelSource | None) -> str:
    if source is None:
        return "built in memory"
    seconds = f" (loaded in {source.load_seconds:.1f} s)" if source.load_seconds is not None else ""
    return f"{source.description}{seconds}"
