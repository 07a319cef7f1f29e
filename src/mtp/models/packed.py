"""fp16 weights packed for fbgemm: the matmul the lean decoding step and `mtp.models.quantize` build on.

fp32 arithmetic over half the bytes, and every row of a block computed exactly as it would be alone, so
speculative output still equals greedy output (see `mtp.models.quantize`).
"""

from __future__ import annotations

import torch
from torch import nn

from mtp.errors import MTPError


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
        if len(linears) == 1:  # no concatenated copy (an unembedding is the largest matrix of a small model)
            weight = linears[0].weight.detach().float()
            bias = linears[0].bias.detach().float() if linears[0].bias is not None else None
        else:
            weight = torch.cat([lin.weight.detach().float() for lin in linears])  # (sum of out, in)
            bias = torch.cat([lin.bias.detach().float() for lin in linears]) if linears[0].bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, shape[-1]), self._packed)  # (N, out)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (fbgemm packed)"


class _PackedPart(nn.Module):
    """Stands in for a projection whose weight now lives only in a fused packed matmul (`decode_only`): the
    Hugging Face layer (uncached forwards) computes the fused output and keeps its columns. Correct but not
    fast; decoding goes through the lean step, which calls the fused matmul once."""

    def __init__(self, packed: PackedLinear, begin: int, end: int):
        super().__init__()
        self.packed, self.begin, self.end = packed, begin, end
        self.in_features, self.out_features = packed.in_features, end - begin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x)
        return y if (self.begin, self.end) == (0, y.shape[-1]) else y[..., self.begin:self.end]
