"""Weight formats for fast decoding on CPU.

Decoding a small model on a CPU is bound by streaming weights from memory (REFERENCE §5: a 1-token step costs
about one pass over the fp32 weights), and MKL's fp32 GEMM for a few rows - the verify step of speculative
decoding - costs several 1-row steps. Two fbgemm formats fix both:

    mode   weights   lm_head ms (1/4/8 rows, 2 threads)   rows computed independently   speculative == greedy
    none   fp32      9.0 / 17.5 / 27.8                    yes (in practice)             yes
    fp16   fp16      5.0 /  5.9 /  7.3                    yes (bit-identical)           yes
    int8   int8      2.1 /  2.5 /  3.6                    no: one activation scale       no (close)
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

MODES = ("none", "fp16", "int8")


class PackedLinear(nn.Module):
    """nn.Linear with fp16 weights in fbgemm's packed layout; inputs and outputs stay fp32. Several linears that
    read the same input can be packed as one (`fused`): one kernel call instead of several."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        for lin in linears:
            if type(lin) is not nn.Linear:
                raise MTPError(f"fp16 packing needs plain nn.Linear layers, got {type(lin).__name__}")
        self.in_features = linears[0].in_features
        self.out_features = sum(lin.out_features for lin in linears)
        weight = torch.cat([lin.weight.detach().float() for lin in linears])  # (sum of out, in)
        bias = torch.cat([lin.bias.detach().float() for lin in linears]) if linears[0].bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, shape[-1]), self._packed)  # (N, out)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (fbgemm packed)"


def quantize_for_decoding(model, mode: str = "fp16"):
    """Replace the model's Linear layers in place for CPU decoding (`mode` in MODES); returns the model."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise MTPError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if model.device.type != "cpu":
        raise MTPError(f"{mode} packed weights run on the CPU only (fbgemm); use --dtype bfloat16 on GPUs")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise MTPError(f"{mode} packed weights need PyTorch's fbgemm backend (x86 CPUs); this build lacks it")
    torch.backends.quantized.engine = "fbgemm"
    if model.dtype != torch.float32:
        model.float()
    # Untie the unembedding first: packing lm_head must not touch the embedding table it shares.
    head = model.backbone.lm_head
    if head.weight is getattr(model.base.get_input_embeddings(), "weight", None):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if mode == "fp16" and model.draft_vocab is not None:  # the extra heads' drafts score K rows, not V
        rows = nn.Linear(head.in_features, model.draft_vocab.numel(), bias=head.bias is not None)
        weight, bias = model.draft_rows(head)
        rows.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            rows.bias = nn.Parameter(bias, requires_grad=False)
        model.packed_draft_head = PackedLinear(rows)
    if mode == "fp16" and model.backbone.supports_fast_layers:
        model.set_fast_decoding("fp16")  # the decoder layers, fused and packed; the HF layers keep fp32 for training
        model.base.lm_head = PackedLinear(model.base.lm_head)
    elif mode == "fp16":
        _replace_linears(model, PackedLinear)
    else:
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        if model.backbone.supports_fast_layers:
            model.set_fast_decoding("fp32")  # the lean step then calls the int8 modules
    model.quantized = mode
    return model


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


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)
