"""Weight quantisation for decoding on CPU.

Decoding a small model on a CPU is bound by streaming weights from memory (REFERENCE §5: a 1-token step costs
about one pass over the fp32 weights), and MKL's fp32 GEMM for a few rows - the verify step - is slow. int8
dynamic quantisation (fbgemm) stores weights in a quarter of the bytes and is fast for 1 to 16 rows. It changes
the model's numbers slightly, so greedy output can differ from the fp32 model's; speculative decoding stays
exactly equal to greedy decoding *of the quantised model*. Inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from mtp.errors import MTPError


def quantize_for_decoding(model, mode: str = "int8"):
    if mode == "none":
        return model
    if mode != "int8":
        raise MTPError(f"unknown quantization {mode!r}; choose none or int8")
    if model.device.type != "cpu":
        raise MTPError("int8 dynamic quantization runs on the CPU only; use --dtype bfloat16 on GPUs")
    if model.dtype != torch.float32:
        model.float()
    # Untie the unembedding first: quantising lm_head must not touch the embedding table it shares.
    head = model.backbone.lm_head
    if head.weight is getattr(model.base.get_input_embeddings(), "weight", None):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.engine
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    model.quantized = mode
    return model
