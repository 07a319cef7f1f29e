"""fp16 weights packed for fbgemm: the matmul the lean decoding step and `mtp.models.quantize` build on.

fp32 arithmetic over half the bytes, and every row of a block computed exactly as it would be alone, so
speculative output still equals greedy output (see `mtp.models.quantize`). On AVX2 CPUs that needs a row count
fbgemm computes uniformly (`row_invariant_count`): 1- and 2-row calls are padded to 3 rows, which costs greedy
decoding about a fifth of its speed there (Zen 3: 46-50 -> 57-59 ms a token); AVX-512 CPUs pad nothing.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
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
        # One fp32 temporary at most (fbgemm packs from fp32): fp16 weights are joined before the cast, and a
        # single fp32 linear is packed from its own weight (an unembedding is the largest matrix of a small model).
        weight = linears[0].weight.detach() if len(linears) == 1 else torch.cat([lin.weight.detach()
                                                                                 for lin in linears])
        weight = weight.float()  # (sum of out, in)
        bias = None
        if linears[0].bias is not None:
            bias = torch.cat([lin.bias.detach() for lin in linears]).float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        del weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in)
        n = x.shape[0]
        padded = row_invariant_count(n)
        if padded != n:  # zero rows up to a count whose rows come out as in any other (see row_invariant_count)
            x = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
        out = torch.ops.quantized.linear_dynamic_fp16(x, self._packed)  # (padded, out)
        return out[:n].reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (fbgemm packed)"

    @property
    def nbytes(self) -> int:
        return packed_bytes(self.in_features, self.out_features)


@functools.cache
def row_invariant_count(rows: int) -> int:
    """The smallest row count >= `rows` at which fbgemm's fp16 matmul computes every row exactly as at any other
    such count - what keeps a verify block's logits bit-identical to 1-token steps. fbgemm splits a call's rows
    into kernel blocks; with AVX-512 every block computes a row the same way, but on AVX2 a block of 1 or 2 rows
    accumulates in another order than blocks of 3 or more, so calls of 1, 2, 7, 14, 31, ... rows differ in the last
    bits (measured on Zen 3; the same for every matrix shape and thread count). Probed once per count on a small
    matrix against rows computed in blocks of 3; the answer is `rows` itself where nothing differs."""
    probe = _probe()
    x, reference = probe.inputs, probe.reference
    for count in range(rows, rows + 8):
        if count > x.shape[0]:
            break
        if torch.equal(probe.linear(x[:count]), reference[:count]):
            return count
    return rows


@functools.lru_cache(maxsize=1)
def _probe():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen)
    packed = torch.ops.quantized.linear_prepack_fp16(weight, None)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)

    inputs = torch.randn(1024, 32, generator=gen)
    reference = torch.cat([linear(row[None].expand(3, -1).contiguous())[:1] for row in inputs])  # (1024, 48)
    return types.SimpleNamespace(linear=linear, inputs=inputs, reference=reference)


def packed_bytes(in_features: int, out_features: int) -> int:
    """Bytes of an fp16 matrix in fbgemm's packed layout (`PackedGemmMatrixFP16`): the input dimension is padded to
    blocks of 512 rows and the output dimension to blocks of 2 SIMD widths (32 values with AVX-512, 16 with AVX2),
    plus 1 KiB. SmolLM2's 576-wide matrices thus take 1,024 rows: 1.78x their nominal fp16 bytes."""
    cols = 32 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 16
    rows = -(-in_features // 512) * 512
    return 2 * rows * (-(-out_features // cols) * cols) + 1024


class HalfEmbedding(nn.Module):
    """An embedding table stored in fp16 whose rows come out in `out_dtype` (fp32): what a decode-only fp16 model
    keeps instead of an fp32 table beside its packed unembedding (half the bytes; the tied unembedding is
    rounded to the same fp16 values). CPU decoding only: the table is not a parameter and does not train."""

    def __init__(self, embedding: nn.Embedding, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.out_dtype = out_dtype
        self.register_buffer("weight", embedding.weight.detach().to(torch.float16), persistent=False)  # (V, H)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(self.out_dtype)  # (..., H)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table=fp16, out={self.out_dtype}"


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
