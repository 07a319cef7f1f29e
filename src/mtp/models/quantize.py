"""Weight formats for fast decoding on CPU.

Decoding a small model on a CPU is bound by streaming weights from memory (a 1-token step costs about one pass
over the weights). MKL's fp32 GEMM streams them slowly for a few rows and costs a verify block several 1-row
steps, so fp32 decoding reads a blocked copy of the weights through oneDNN instead (`mtp.models.packed`, with no
flag: "none" below); two fbgemm formats store fewer bytes:

    mode   weights                lm_head ms (1/4/8 rows, 2 threads, Zen 4)   rows computed independently   speculative == greedy
    none   fp32, MKL (before)     9.6 / 17.0 / 17.5                           no (near-ties)                yes, up to near-ties
    none   fp32, oneDNN blocked   3.8 /  3.9 /  4.7                           yes (bit-identical)           yes
    fp16   fp16                   1.0 /  1.5 /  2.6                           yes (bit-identical)           yes
    int8   int8                   2.1 /  2.5 /  3.6 (an older CPU)            no: one activation scale      no (close)
                                                                              per call, shared by the rows

fp16 keeps the arithmetic in fp32 and only stores weights in half the bytes; each output row is the same
computation whatever the number of rows, so a verify block gives bit-identical logits to 1-token steps and
lossless speculative decoding stays exactly equal to greedy decoding. The embedded default's weights come from
a 4-bit GGUF, which fp16 represents almost exactly. int8 dynamic quantisation picks one activation scale for all
rows of a call, so a block's numbers differ slightly from 1-token steps: speculative output can then differ from
greedy output. Inference only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mtp.errors import MTPError
from mtp.models.packed import HalfEmbedding, PackedLinear, _PackedPart  # noqa: F401  (PackedLinear: re-exported)

MODES = ("none", "fp16", "int8")


_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))  # fast_llama's QKV, OUT, GATE_UP, DOWN


def _pack_layers_dropping_fp32(model, weights: str = "fp16") -> None:
    """Pack every decoder layer for the lean step (`weights`: "fp16" for fbgemm, "blocked" fp32 for oneDNN), one
    layer at a time, and replace its Linear modules by views of the packed matmuls: the original weights are
    freed as the packed ones are built, so memory peaks at one copy of the weights plus one layer, and ends at the
    packed size."""
    from mtp.models.fast_llama import FastLlamaLayer

    layers = list(model.backbone.layers) + [layer for head in model.extra_heads for layer in head]
    fast = {}
    for layer in layers:
        fast[layer] = step = FastLlamaLayer(layer, weights)
        for (owner, names), projection in zip(_PROJECTIONS, step.packed, strict=True):
            parent = getattr(layer, owner)
            for name, (begin, end) in zip(names, projection.bounds, strict=True):
                setattr(parent, name, _PackedPart(projection.linear, begin, end))
        # The freed weights and the packing's fp32 temporaries leave holes between the packed matrices that
        # glibc keeps; returned layer by layer, they never add up (about 200 MB on the default model).
        _return_freed_memory()
    model.backbone.fast_layers = fast
    model.fast_decoding = weights


def block_for_decoding(model, mapped: bool = True):
    """Decode-only fp32 on a CPU: every projection of the Llama-family layers, the unembedding and the draft
    vocabulary's rows kept only as blocked copies for oneDNN (`mtp.models.packed.BlockedLinear`), so decoding
    is as fast and exact as with the copies `BlockedWeights` keeps beside the weights, in the memory of one copy
    (the embedding table stays, in fp32). What `mtp generate` and `mtp eval` load; the model can no longer be
    trained, copied or pickled. `mapped`: the weights may be pages of a file transformers mapped, whose mapping
    lives (resident) while any tensor of it does; what is left at the end is then copied out of it. Returns the
    model; one it does not apply to (another device or dtype, GPT-2, adapters hooked on its projections, no oneDNN)
    is returned as it is."""
    from mtp.models.packed import BlockedLinear, blocked_available

    hooked = any(m._forward_hooks for m in model.modules() if isinstance(m, nn.Linear))
    head = model.base.lm_head
    if (model.device.type != "cpu" or model.dtype != torch.float32 or not model.backbone.supports_fast_layers
            or hooked or model.fast_decoding != "fp32" or type(head) is not nn.Linear or not blocked_available()):
        return model
    _pack_layers_dropping_fp32(model, "blocked")  # first: the unembedding's copy then comes on top of one copy
    if model.draft_vocab is not None:
        model.packed_draft_head = BlockedLinear(_draft_vocab_rows(model, head))
    model.base.lm_head = BlockedLinear(head)  # (a tied embedding table keeps its weight)
    del head
    if mapped:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
    model.drop_blocked_weights()
    model.decode_only = True
    _return_freed_memory()
    return model


def _draft_vocab_rows(model, head: nn.Linear) -> nn.Linear:
    """The draft vocabulary's rows of the unembedding as a Linear of their own (the extra heads' drafts score K
    rows, not V), for a packed format to take."""
    rows = nn.Linear(head.in_features, model.draft_vocab.numel(), bias=head.bias is not None)
    with torch.no_grad():
        weight, bias = model.draft_rows(head)
    rows.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        rows.bias = nn.Parameter(bias, requires_grad=False)
    return rows


def _pack_unembedding_keeping_half_table(model) -> None:
    """Decode-only: pack the unembedding and keep the embedding table in fp16 (`HalfEmbedding`), not in fp32
    beside the packed copy. Done before the layers are packed, while they are still at their fp16 load size, so
    the fp32 temporary that packing the unembedding needs does not come on top of the packed layers."""
    head = model.base.lm_head
    embedding = model.base.get_input_embeddings()
    model.base.lm_head = PackedLinear(head)
    del head
    model.base.set_input_embeddings(HalfEmbedding(embedding))
    del embedding
    _return_freed_memory()


def quantize_for_decoding(model, mode: str = "fp16", decode_only: bool = False):
    """Replace the model's Linear layers in place for CPU decoding (`mode` in MODES); returns the model.

    `decode_only` (fp16): the fp32 copies of the packed weights are dropped, so the model ends smaller than the
    fp32 one (what `--quantize fp16` does for generate/eval/bench). Without it the Hugging Face layers keep their
    fp32 weights next to the packed ones, but the unembedding is packed alone: either way the model decodes, and
    is neither trained, cast nor loaded into (an MTPError says so; `fp16_decoding` is the way to decode a model
    being trained with packed weights)."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise MTPError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if model.device.type != "cpu":
        raise MTPError(f"{mode} packed weights run on the CPU only (fbgemm); use --dtype bfloat16 on GPUs")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise MTPError(f"{mode} packed weights need PyTorch's fbgemm backend (x86 CPUs); this build lacks it")
    torch.backends.quantized.engine = "fbgemm"
    lean = mode == "fp16" and decode_only and model.backbone.supports_fast_layers
    if model.dtype != torch.float32 and not lean:
        model.float()
    # Untie the unembedding first: packing lm_head must not touch the embedding table it shares. (Packing only
    # reads the weight, so a decode-only model keeps one table.)
    head = model.backbone.lm_head
    if head.weight is getattr(model.base.get_input_embeddings(), "weight", None) and not (decode_only
                                                                                         and mode == "fp16"):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if mode == "fp16" and model.draft_vocab is not None:  # the extra heads' drafts score K rows, not V
        model.packed_draft_head = PackedLinear(_draft_vocab_rows(model, head))
    if lean:
        _pack_unembedding_keeping_half_table(model)
        _pack_layers_dropping_fp32(model)
        for p in model.parameters():  # what is left: norms (activations are fp32 with packed weights)
            p.data = p.data.float()
        _return_freed_memory()
    elif mode == "fp16" and model.backbone.supports_fast_layers:
        model.set_fast_decoding("fp16")  # the decoder layers, fused and packed; the HF layers keep fp32 for training
        model.base.lm_head = PackedLinear(model.base.lm_head)
    elif mode == "fp16":
        _replace_linears(model, PackedLinear)
    else:
        _int8_dynamic(model)
        if model.backbone.supports_fast_layers:
            model.set_fast_decoding("fp32")  # the lean step then calls the int8 modules
    model.quantized = mode
    model.decode_only = decode_only
    return model


def _int8_dynamic(model) -> None:
    """Every Linear as fbgemm's dynamic int8 matmul, with a scale per output channel of its weight: one scale per
    matrix (torch's default) lets the few large channels of a trained LLM's projections flatten all the others
    (SmolLM2-135M then answers "What is 7 + 5?" with "SyntaxError: Missing comma"). The activations still get one
    scale per call, which is what keeps int8 lossy here."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch's notices that its own int8 modules are deprecated: nothing to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


@contextlib.contextmanager
def fp16_decoding(model):
    """Within the block, cached no-grad forwards of a CPU fp32 Llama-family model use fp16-packed layer weights
    and unembedding (faster; numbers within fp16 rounding of the fp32 model's, as with `--quantize fp16`). The
    fp32 parameters stay as they are (training goes on with them); other models decode as they are."""
    previous = getattr(model, "fast_decoding", None)
    usable = (model.backbone.supports_fast_layers and model.device.type == "cpu" and model.dtype == torch.float32
              and "fbgemm" in torch.backends.quantized.supported_engines and previous == "fp32")
    head = model.base.lm_head
    if usable:
        model.set_fast_decoding("fp16")
        if type(head) is nn.Linear:  # a packed copy: the fp32 weight (maybe tied to the embedding) is untouched
            model.base.lm_head = PackedLinear(head)
    try:
        yield model
    finally:
        if usable:
            model.set_fast_decoding(previous)
            model.base.lm_head = head


def _return_freed_memory() -> None:
    """Hand the freed weights' pages back to the system (glibc keeps freed heap memory otherwise)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)
