"""`mtp info`: what a model is made of and where it came from."""

from __future__ import annotations

from typing import Literal

from mtp.models.loading import describe_source, load_mtp_model
from mtp.runtime import DType, Runtime


def _count(params) -> int:
    return sum(p.numel() for p in params)


def info(model: str | None = None, num_heads: int | None = None, num_trunk_layers: int | None = None,
         memory: bool = False, dtype: DType = "auto", quantize: Literal["none", "fp16", "int8"] = "none",
         device: str = "auto", max_new_tokens: int = 16, tree_size: int | None = None, lookup: int = 0) -> int:
    """Print a model's architecture: trunk and head layers, parameter counts, vocabulary, weights' origin.

    Args:
        model: the embedded default (omit), a local folder, a .gguf file, a Meta checkpoint or a hub id.
        num_heads: heads to give a plain model (default 4); an MTP folder brings its own.
        num_trunk_layers: shared trunk layers of a plain model (default: all but the last).
        memory: instead, measure peak resident memory of loading (in --dtype), packing (--quantize) and a short decode, against the size of the weights
        dtype: the weights' dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16
        quantize: with --memory: pack the weights for decoding (decode-only, CPU) after loading
        device: where to load the model: auto (CUDA when available), cpu, cuda or cuda:N
        max_new_tokens: with --memory: tokens to decode, greedily and then speculatively (a model that drafts)
        tree_size: with --memory: the speculative decode verifies an "auto" draft tree of this many nodes
        lookup: with --memory: the speculative decode also verifies up to this many prompt-lookup drafts
    """
    if memory:
        from mtp.memory import memory_report

        for line in memory_report(model, dtype=dtype, quantize=quantize, device=device,
                                  max_new_tokens=max_new_tokens, tree_size=tree_size, lookup=lookup):
            print(line)
        return 0
    m = load_mtp_model(model, num_heads=num_heads, num_trunk_layers=num_trunk_layers, device=device, dtype=dtype)
    rows = _mask_token_rows(m) if m.kind == "mask_tokens" else _heads_rows(m)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _mask_token_rows(m) -> list[tuple[str, str]]:
    cfg = m.config
    adapters = _count(m.lora.parameters()) if m.lora is not None else 0
    return [
        ("architecture", f"{type(m.base).__name__} (model_type={cfg.model_type}) with a mask token"),
        ("mask token", f"{m.mask_token!r} (id {m.mask_token_id})"),
        ("adapter", "gated LoRA: active at mask tokens only (real tokens are exactly the base model), rank "
                    f"{m.lora.rank} on the top {m.lm.num_layers - m.lora.first_layer} layers" if m.lora is not None
         else "full (every weight trained)"),
        ("k", f"{m.default_k} tokens per forward by default (k-1 masks), up to {m.max_k}"),
        ("layers", f"{m.lm.num_layers}"),
        ("vocabulary", _vocabulary(m.base.get_input_embeddings().weight.shape[0], m.tokenizer)),
        ("parameters", f"{_count(m.base.parameters()):,} + {adapters:,} in adapters"),
        ("device, dtype", Runtime(m.device, m.dtype).describe()),
        ("weights from", describe_source(m.source)),
    ]


def _vocabulary(rows: int, tokenizer) -> str:
    """The embedding's rows, and the tokenizer's tokens where fewer: real models pad the embedding (Qwen2.5's
    151,936 rows for 151,665 tokens), and the rows past the tokenizer's last token are no token."""
    tokens = len(tokenizer) if tokenizer is not None else rows
    if not 0 < tokens < rows:
        return f"{rows:,} tokens"
    return f"{tokens:,} tokens + {rows - tokens:,} padding rows"


def _heads_rows(m) -> list[tuple[str, str]]:
    cfg = m.config
    trunk = _count(m.trunk_layers.parameters())
    head0 = _count(m.head_layers(0).parameters())
    extra = _count(m.extra_heads.parameters())
    embed = m.base.get_input_embeddings().weight
    lm_w = m.backbone.lm_head.weight
    tied = lm_w.data_ptr() == embed.data_ptr()
    total = _count({id(p): p for p in m.parameters()}.values())
    head_span = f"{m.num_trunk_layers}..{m.num_layers - 1}" if m.num_layers - m.num_trunk_layers > 1 \
        else f"{m.num_trunk_layers}"
    return [
        ("architecture", f"{type(m.base).__name__} (model_type={cfg.model_type})"),
        ("layers", f"{m.num_layers} in the base model"),
        ("trunk", f"layers 0..{m.num_trunk_layers - 1} ({m.num_trunk_layers} layers, shared)"),
        ("heads", f"{m.num_heads} (head 0 = base layer {head_span}; heads 1..{m.num_heads - 1} are copies/trained "
                  f"layers, {m.num_layers - m.num_trunk_layers} layer(s) each)" if m.num_heads > 1
         else "1 (the base model itself)"),
        ("hidden size", str(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", "?")))),
        ("vocabulary", _vocabulary(embed.shape[0], m.tokenizer) + (f", tokenizer {type(m.tokenizer).__name__}"
                                                       if m.tokenizer is not None else ", no tokenizer")),
        ("draft vocabulary", "the whole vocabulary" if m.draft_vocab is None else
         f"{m.draft_vocab.numel():,} tokens (what heads 1..{m.num_heads - 1} may propose)"),
        ("context", str(getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", "?")))),
        ("parameters", f"{total:,} total"),
        ("  trunk", f"{trunk:,}"),
        ("  head 0", f"{head0:,}"),
        ("  extra heads", f"{extra:,} ({m.num_heads - 1} x {extra // max(m.num_heads - 1, 1):,})"),
        *([("  next-token input", f"{m.next_token_in.weight.numel():,} (the extra heads read the next token)")]
          if m.reads_next_token else []),
        ("  embeddings", f"{embed.numel():,}" + (" (tied with the unembedding)" if tied else "")),
        ("  unembedding", "shared by all heads" + ("" if tied else f", {lm_w.numel():,}")),
        ("device, dtype", Runtime(m.device, m.dtype).describe()),
        ("weights from", describe_source(m.source)),
    ]
