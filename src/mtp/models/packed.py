"""fp16 weights packed for fbgemm: the matmul the lean decoding step and `mtp.models.quantize` build on.

fp32 arithmetic over half the bytes, and every row of a block computed exactly as it would be alone, so
speculative output still equals greedy output (see `mtp.models.quantize`). On AVX2 CPUs that needs a row count
fbgemm computes uniformly (`row_invariant_count`): 1- and 2-row calls are padded to 3 rows, which costs greedy
decoding about a fifth of its speed there (Zen 3: 46-50 -> 57-59 ms a token); AVX-512 CPUs pad nothing.
"""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mtp.errors import MTPError
from mtp.models.weight_state import kept_copy


class PackedLinear(nn.Module):
    """nn.Linear with fp16 weights in fbgemm's packed layout; inputs and outputs stay fp32. Several linears that
    read the same input can be packed as one (`fused`): one kernel call instead of several."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        # One fp32 temporary at most (fbgemm packs from fp32): fp16 weights are joined before the cast, and a
        # single fp32 linear is packed from its own weight (an unembedding is the largest matrix of a small model).
        self.in_features, self.out_features, weight, bias = _joined(linears, "fp16 packing")
        weight = weight.float()  # (sum of out, in)
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


def _joined(linears: tuple[nn.Linear, ...], what: str) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """(in features, out features, weight (sum of out, in), fp32 bias or None) of linears that read one input,
    joined by rows (`_join`); `what` names the format for a layer it cannot take."""
    for lin in linears:
        if type(lin) is not nn.Linear:
            raise MTPError(f"{what} needs plain nn.Linear layers, got {type(lin).__name__}")
    weight, bias = _join([lin.weight for lin in linears], [lin.bias for lin in linears])
    return linears[0].in_features, sum(lin.out_features for lin in linears), weight, bias


def _join(weights, biases) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights (out_i, in) joined by rows (a lone one as it is, no copy), and their biases as one fp32 vector
    (zeros for a missing one; None where all are)."""
    weight = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([(b if b is not None else w.new_zeros(w.shape[0])).detach().float()
                          for w, b in zip(weights, biases, strict=True)])
    return weight, bias


def column_bounds(sizes: Iterable[int]) -> list[tuple[int, int]]:
    """(first, end) output column of each of several projections joined by rows, of `sizes` outputs each."""
    ends = [0, *itertools.accumulate(sizes)]
    return list(zip(ends[:-1], ends[1:], strict=True))


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


# ------------------------------------------------------------------------------------------------ fp32, oneDNN
# fp32 decoding on a CPU is bound by streaming the weights, and MKL's fp32 matmul streams them slowly for the few
# rows a decoding step has: on a 2-core Zen 4, SmolLM2's unembedding took 9.4 ms for 1 row (~12 GB/s) and 16-33 ms
# for 2-11 rows (it repacks the weight every call), while fbgemm's fp16 matmul reads at ~44 GB/s. oneDNN's matmul
# over weights reordered once into its blocked layout ("blocked" here) took 3.2-4.7 ms for 1 to 16 rows. It also
# computes every row of a call of 2 or more rows the same way whatever their number (a lone row takes another path
# for some shapes), and streams the weights faster for 4 rows than for 1-3, so calls of fewer rows are padded to 4:
# a verify block's logits are then bit-identical to 1-token steps, as with fp16 packing, and fp32 speculative
# decoding equals greedy exactly.
BLOCKED_MIN_ROWS = 4  # rows a call is padded to
BLOCKED_ROWS_HINT = 2  # the row count oneDNN lays the weights out for (2 to 16 read alike; 1 is slower)
# oneDNN keeps what it builds for a call's shape for as long as the process lives, ~0.6 MB per row count and matrix
# shape (SmolLM2: ~6 MB per prompt length): a server that met prompts of every length grew by gigabytes. So calls
# run at few row counts: up to 31 rows (every decoding step of a batch of one) as they are, then padded to one of
# 16 counts a doubling (at most 6.25% more rows: a prompt's forward), and longer than 1,024 rows in calls of 1,024.
BLOCKED_EXACT_ROWS = 31
BLOCKED_CALL_ROWS = 1024


@functools.cache
def blocked_rows(n: int) -> int:
    """The row count a call of `n` rows (at most `BLOCKED_CALL_ROWS`) runs at: at least `BLOCKED_MIN_ROWS`, `n`
    itself up to `BLOCKED_EXACT_ROWS`, then rounded up to a multiple of 2^(bits of n - 5) (32-63: even, 64-127: a
    multiple of 4, ...). Padded rows are zeros, and every row comes out as in any call of 4 or more rows."""
    if n <= BLOCKED_EXACT_ROWS:
        return max(n, BLOCKED_MIN_ROWS)
    step = 1 << (n.bit_length() - 5)
    return -(-n // step) * step


@functools.cache
def blocked_available() -> bool:
    """Whether this torch has oneDNN's fp32 matmul over reordered weights (x86 and Arm builds; the op is the one
    torch.compile's CPU backend uses)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8), BLOCKED_ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 8.0)))


def blocked_pays(x: torch.Tensor) -> bool:
    """Whether a no-grad matmul over `x` runs on blocked weights: fp32 on a CPU (float64 and bf16 keep torch's
    own matmul; training keeps autograd's, and so do its held-out checks under torchrun, whose weights FSDP
    gathers into reused buffers; a traced step keeps what torch.compile makes of F.linear)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
            and blocked_available())  # (last: its first call runs oneDNN once, which a torchrun job never does)


def blocked_weight(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 (out, in) weight reordered into oneDNN's blocked layout: an opaque tensor (about the weight's bytes)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), BLOCKED_ROWS_HINT)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """F.linear over a `blocked_weight`: (..., in) -> (..., out_features). The rows are computed in calls of
    `blocked_rows` rows (fewer than 4 in a call of 4, see above), so each row comes out as in any other block."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, in)
    n = x.shape[0]
    if n > BLOCKED_CALL_ROWS:
        out = torch.cat([blocked_linear(x[i:i + BLOCKED_CALL_ROWS], weight, bias, out_features)
                         for i in range(0, n, BLOCKED_CALL_ROWS)])  # (N, out)
        return out.reshape(*shape[:-1], out_features)
    rows = blocked_rows(n)
    if rows != n:
        x = torch.cat([x, x.new_zeros(rows - n, x.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (rows, out)
    return (out[:n] if rows != n else out).reshape(*shape[:-1], out_features)


def memory_to_spare(nbytes: int) -> bool:
    """Whether a copy of `nbytes` leaves at least a quarter of the machine's memory available (Linux's
    MemAvailable; elsewhere, yes). Blocked copies double the fp32 weights' memory: a model that fills the machine
    decodes with torch's matmul instead of running out of memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
    except OSError:
        return True
    if "MemAvailable" not in info or "MemTotal" not in info:
        return True
    return info["MemAvailable"] - nbytes >= info["MemTotal"] / 4


class BlockedWeights:
    """Blocked copies of a model's fp32 weights for decoding, by name, each remade when its weight changes
    (training, loading). The copies are opaque tensors that neither copy nor pickle, so a copied or pickled model
    starts with none (they are rebuilt on first use); they are not parameters (no state dict holds them)."""

    def __init__(self):
        self.entries: dict = {}  # name -> (the weights' state, (blocked weight, bias, output columns of each))

    def get(self, name, weights: tuple[torch.Tensor, ...],
            biases: tuple[torch.Tensor | None, ...]) -> tuple | None:
        """(blocked weight, bias, [(first, end) output column of each weight]) of `weights` joined by rows: one
        matmul for projections of the same input. None where the machine has no memory to spare for the copy
        (`memory_to_spare`): that matmul stays torch's."""

        def build() -> tuple | None:
            if not memory_to_spare(sum(w.numel() for w in weights) * 4):
                return None
            joined, bias = _join(weights, biases)
            return blocked_weight(joined), bias, column_bounds(w.shape[0] for w in weights)

        return kept_copy(self.entries, name, weights, build)

    def __deepcopy__(self, memo) -> BlockedWeights:
        return BlockedWeights()

    def __getstate__(self) -> dict:
        return {"entries": {}}


class BlockedLinear(nn.Module):
    """nn.Linear with fp32 weights kept only in oneDNN's blocked layout (decode-only fp32 on a CPU: the copy that
    `BlockedWeights` keeps beside the weights, without them). Several linears of the same input can be joined
    (`_PackedPart` then serves each projection's columns to the Hugging Face layer)."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, weight, self._bias = _joined(linears, "blocking fp32 weights")
        self._blocked = blocked_weight(weight)
        del weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blocked_linear(x, self._blocked, self._bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp32 (oneDNN blocked)"

    @property
    def nbytes(self) -> int:
        return 4 * self.in_features * self.out_features

    def __deepcopy__(self, memo):
        raise MTPError("a decode-only fp32 model (its weights blocked for oneDNN) cannot be copied; load it again")

    def __reduce__(self):
        raise MTPError("a decode-only fp32 model (its weights blocked for oneDNN) cannot be pickled; save the "
                       "model it was loaded from instead")
