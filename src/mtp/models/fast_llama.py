"""A lean decoding step for Llama-family layers (Llama, SmolLM2, Mistral, Qwen2, Qwen3).

On a CPU, a 1-token step of a small model spends more time in Python and in tiny tensor ops than in arithmetic:
transformers' layer runs ~60 ops, this one ~35 (fused QKV and gate/up projections when packed, sdpa with
grouped KV heads, or two matmuls for a 1-token step of a batch: `_attention`). It reads the weights of the
Hugging Face layer it mirrors - nothing is forked or converted on disk - and writes into the same `MTPCache`
buffers, so rollback, compaction and row selection work unchanged.
Used for cached, no-grad forwards (decoding); training and uncached forwards keep the Hugging Face layer, which
`tests/models/test_fast_llama.py` compares this one against.

Weights: "fp32" reads the Hugging Face projections' weights (int8-replaced or adapter-hooked ones are called as
modules); on a CPU through a blocked copy for oneDNN, the projections of one input joined (`self.blocked`,
`mtp.models.packed`: faster, bit-identical rows whatever the block size). "fp16" packs the fused projections for
fbgemm (half the bytes, fp32 arithmetic, bit-identical rows; see `mtp.models.quantize`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtp.errors import MTPError
from mtp.models.cache import write_kv
from mtp.models.packed import BlockedWeights, blocked_linear, blocked_pays, column_bounds
from mtp.models.weight_state import kept_copy

WEIGHT_FORMATS = ("fp32", "fp16", "blocked")  # blocked: decode-only fp32 on a CPU (`mtp.models.packed.BlockedLinear`)
QKV, OUT, GATE_UP, DOWN = range(4)  # the layer's projections, fused where the weights are packed
QKV_SWAPPED = 4  # q, k, v and then q and k again with each head's halves swapped: what `layer_step` reads
OUT_GROUP_MAJOR = 5  # the output projection reading its heads group-major (`_attention`'s `group_major`)
# Up to this many bytes of swapped q and k rows a layer, rotary takes each head's swapped halves from the
# projection (a kernel fewer, `layer_step`); past it, streaming those rows every step would cost more than the
# kernel (a 135M model's layer: 0.9 MB; an 8B model's: 42 MB, ~9 us at 4.8 TB/s).
SWAPPED_ROWS_BYTES = 8 << 20
# Devices where the projections that read one input (q, k, v; gate, up) run as one matmul over a fused copy of
# their weights: a GPU step is bound by its number of kernels, not by bytes, and this saves three matmuls and a
# rotary pass a layer. The copy costs those weights' memory once more (and q, k's a third time, `QKV_SWAPPED`);
# it is rebuilt when they change.
FUSED_DEVICES = {"cuda"}


class _PackedProjection:
    """Several projections of the same input as one packed matmul (fp16 for fbgemm, or fp32 blocked for
    oneDNN), split back into their outputs."""

    def __init__(self, linears: list[nn.Module], weights: str = "fp16"):
        from mtp.models.packed import BlockedLinear, PackedLinear

        self.linear = (BlockedLinear if weights == "blocked" else PackedLinear)(*linears)
        self.bounds = column_bounds(lin.out_features for lin in linears)  # output columns of each projection

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.linear(x)  # (..., sum of out)
        return [y[..., a:b] for a, b in self.bounds]  # slicing: Tensor.split costs ~45 us a call here


class FastLlamaLayer:
    """One decoder layer of the Llama family for cached decoding. Holds references, owns no parameters."""

    def __init__(self, layer: nn.Module, weights: str = "fp32"):
        if weights not in WEIGHT_FORMATS:
            raise MTPError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3 normalises queries and keys per head
        self.k_norm = getattr(attn, "k_norm", None)
        self.packed = None
        self._fused: dict[int, tuple] = {}  # projection group -> (weights' state, (weight, bias, bounds)): `kept_copy`
        self.blocked = BlockedWeights()  # projection group -> its fp32 weights for oneDNN (CPU decoding)
        if weights in ("fp16", "blocked"):
            self.packed = [_PackedProjection([attn.q_proj, attn.k_proj, attn.v_proj], weights),
                           _PackedProjection([attn.o_proj], weights),
                           _PackedProjection([mlp.gate_proj, mlp.up_proj], weights),
                           _PackedProjection([mlp.down_proj], weights)]
        act = getattr(mlp, "act_fn", None)
        self.act = F.silu if act is None or type(act).__name__ in ("SiLU", "SiLUActivation") else act

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache, cos: torch.Tensor,
                 signed_sin: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """cos, signed_sin: (B, 1, T, D) from `rope_tables`. `reuse_input`: the output may be written into `hidden`
        (the caller never reads it again)."""
        if self._whole_layer_fused(hidden, cache):
            return self._fused_call(hidden, mask, cache, cos, signed_sin, reuse_input)
        b, t, _ = hidden.shape
        x = rms_norm(hidden, self.ln1)
        q, k, v = self._project(QKV, x)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, D)
        if self._one_matmul(QKV, x) and self.q_norm is None:
            # q and k are adjacent columns of the fused projection's output: rotate them in one go
            heads, kv_heads = q.shape[-1] // self.head_dim, k.shape[-1] // self.head_dim
            qk = q.as_strided((b, t, heads + kv_heads, self.head_dim), (q.stride(0), q.stride(1), self.head_dim, 1))
            qk = _rotate(qk.transpose(1, 2), cos, signed_sin)  # (B, heads + kv_heads, T, D)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q = q.view(b, t, -1, self.head_dim)  # (B, T, heads, D)
            k = k.view(b, t, -1, self.head_dim)  # (B, T, kv_heads, D)
            if self.q_norm is not None:
                q, k = rms_norm(q, self.q_norm), rms_norm(k, self.k_norm)
            q = _rotate(q.transpose(1, 2), cos, signed_sin)  # (B, heads, T, D)
            k = _rotate(k.transpose(1, 2), cos, signed_sin)  # (B, kv_heads, T, D)
        keys, values = cache.update(k, v, self.layer_idx)  # (B, kv_heads, end, D)
        attn = _attention(q, keys, values, mask, self.scaling)  # (B, T, heads, D)
        hidden = hidden + self._project(OUT, attn.reshape(b, t, -1))[0]
        gate, up = self._project(GATE_UP, rms_norm(hidden, self.ln2))
        return hidden + self._project(DOWN, self.act(gate) * up)[0]

    def _whole_layer_fused(self, hidden: torch.Tensor, cache) -> bool:
        """Whether this call runs as `layer_step` over fused weights: on a GPU, plain linear projections (no
        adapters' hooks), SiLU, no per-head norms, the norms' dtype (float64 normalises apart, `rms_norm`)."""
        # the device first: on a CPU (every decoding step there) the answer is no, at once
        return (hidden.device.type in FUSED_DEVICES and self.packed is None and hasattr(cache, "buffer_row")
                and self.q_norm is None and self.act is F.silu and hidden.dtype == self.ln1.weight.dtype
                and hidden.dtype != torch.float64 and self._one_matmul(QKV, hidden)
                and self._one_matmul(GATE_UP, hidden)
                and all(type(p) is nn.Linear and not p._forward_hooks for p in (self.attn.o_proj, self.mlp.down_proj)))

    def _fused_call(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache, cos: torch.Tensor,
                    signed_sin: torch.Tensor, reuse_input: bool) -> torch.Tensor:
        b = hidden.shape[0]
        qkv = self._modules(QKV)
        qkv_w, qkv_b, bounds = self._fused_weights(self._qkv_group(hidden), qkv)
        gate_up_w, gate_up_b, _ = self._fused_weights(GATE_UP, self._modules(GATE_UP))
        heads, kv_heads = bounds[0][1] // self.head_dim, (bounds[1][1] - bounds[1][0]) // self.head_dim
        kv_stack, kv_row = cache.buffer_row(self.layer_idx, hidden.new_empty((b, kv_heads, 0, self.head_dim)))
        o, down = self.attn.o_proj, self.mlp.down_proj
        o_w, group_major = o.weight, False
        # The grouped attention comes out of CUDA's kernel group-major: a copy of the output projection's weight
        # that reads it so saves a kernel a layer (small layers: the copy's bytes, as above)
        if (_attention_path(b, hidden.shape[1], hidden.device.type) == "grouped" and heads != kv_heads
                and o.weight.numel() * o.weight.element_size() <= SWAPPED_ROWS_BYTES):
            o_w, _, _ = self._fused_weights(OUT_GROUP_MAJOR, (o,))
            group_major = True
        args = (hidden, mask, kv_stack, kv_row, cache.owner.block_slots, cache.owner.window, cos, signed_sin,
                self.ln1.weight, self.ln1.variance_epsilon, qkv_w, qkv_b, o_w, o.bias,
                self.ln2.weight, self.ln2.variance_epsilon, gate_up_w, gate_up_b, down.weight, down.bias,
                heads, kv_heads, self.scaling)
        return layer_step(*args, reuse_input=reuse_input and hidden.is_contiguous(), group_major=group_major)

    def _qkv_group(self, hidden: torch.Tensor) -> int:
        """QKV_SWAPPED where the swapped q and k rows are small enough to stream every step, else QKV."""
        q, k = self._modules(QKV)[:2]
        swap_bytes = (q.out_features + k.out_features) * q.in_features * hidden.element_size()
        return QKV_SWAPPED if swap_bytes <= SWAPPED_ROWS_BYTES else QKV

    def _modules(self, which: int) -> tuple[nn.Module, ...]:
        a, m = self.attn, self.mlp  # read at call time, so int8-replaced or moved projections are seen
        return ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj), (m.down_proj,))[which]

    def _one_matmul(self, which: int, x: torch.Tensor) -> bool:
        """Whether projection group `which` runs as one matmul (packed, or fused on this device)."""
        if self.packed is not None:
            return True
        modules = self._modules(which)
        # A projection with forward hooks (gated LoRA adapters, `mtp.models.mask_tokens`) is called as a module.
        return (len(modules) > 1 and x.device.type in FUSED_DEVICES
                and all(type(p) is nn.Linear and not p._forward_hooks for p in modules))

    def _project(self, which: int, x: torch.Tensor) -> list[torch.Tensor]:
        if self.packed is not None:
            return self.packed[which](x)
        modules = self._modules(which)
        if self._one_matmul(which, x):
            weight, bias, bounds = self._fused_weights(which, modules)
            y = F.linear(x, weight, bias)  # (..., sum of out)
            return [y[..., a:b] for a, b in bounds]
        plain = [type(p) is nn.Linear and not p._forward_hooks for p in modules]
        # fp32 on a CPU: one oneDNN matmul (`mtp.models.packed`), where there is memory for its copy
        blocked = self.blocked.get(which, tuple(p.weight for p in modules), tuple(p.bias for p in modules)) \
            if all(plain) and blocked_pays(x) else None
        if blocked is not None:
            weight, bias, bounds = blocked
            y = blocked_linear(x, weight, bias, bounds[-1][1])  # (..., sum of out)
            return [y] if len(bounds) == 1 else [y[..., a:b] for a, b in bounds]
        return [F.linear(x, p.weight, p.bias) if is_plain else p(x) for p, is_plain in zip(modules, plain, strict=True)]

    def _fused_weights(self, which: int, modules) -> tuple:
        """(weight, bias, bounds): the group's weights (and biases) joined, rebuilt whenever a weight changes
        (`kept_copy`); `QKV_SWAPPED` appends q's and k's rows once more with each head's two halves swapped
        (`layer_step`'s rotary)."""
        return kept_copy(self._fused, which, (p.weight for p in modules), lambda: self._join(which, modules))

    def _join(self, which: int, modules) -> tuple:
        weight = torch.cat([p.weight.detach() for p in modules])  # (sum of out, in)
        bias = None
        if any(p.bias is not None for p in modules):
            bias = torch.cat([p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features)
                              for p in modules])
        bounds = column_bounds(p.out_features for p in modules)
        if which == OUT_GROUP_MAJOR:
            weight = _group_major_columns(weight, self.attn.k_proj.out_features // self.head_dim, self.head_dim)
        if which == QKV_SWAPPED:
            qk = bounds[1][1]  # q's and k's rows
            weight = torch.cat([weight, _swap_halves(weight[:qk], self.head_dim)])
            bias = None if bias is None else torch.cat([bias, _swap_halves(bias[:qk], self.head_dim)])
        return weight, bias, bounds


def _group_major_columns(weight: torch.Tensor, kv: int, head_dim: int) -> torch.Tensor:
    """An output projection's weight (out, heads D) with its input columns reordered from the model's head order
    (kv, group, D) to group-major (group, kv, D), as the grouped attention leaves its output on CUDA."""
    return weight.view(weight.shape[0], kv, -1, head_dim).transpose(1, 2).reshape(weight.shape)


def _swap_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (heads * D, ...) with the two halves of each head's D rows swapped: a projection by them gives each
    head's output with its halves swapped, which rotary needs (`rope_tables`), without a kernel of its own."""
    half = head_dim // 2
    return rows.view(-1, 2, half, *rows.shape[1:]).flip(1).reshape(rows.shape)


def layer_step(hidden: torch.Tensor, mask: torch.Tensor | None, kv_stack: torch.Tensor, kv_row: int,
               slots: torch.Tensor, window: int, cos: torch.Tensor, signed_sin: torch.Tensor, ln1_w: torch.Tensor,
               ln1_eps: float,
               qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, o_w: torch.Tensor, o_b: torch.Tensor | None,
               ln2_w: torch.Tensor, ln2_eps: float, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor | None,
               down_w: torch.Tensor, down_b: torch.Tensor | None, heads: int, kv_heads: int,
               scale: float, reuse_input: bool = False, group_major: bool = False) -> torch.Tensor:
    """One decoder layer over fused weights as a function of tensors only: the arithmetic of `FastLlamaLayer`'s
    general path in fewer kernels, since a GPU step costs per kernel (15-16 a layer eagerly, against 21 for the
    same ops one by one), and what `torch.compile` fuses further (`generate(graphs="compile")`).
    hidden (B, T, H); kv_stack[kv_row] (2, B, kv_heads, max_len, D) keys and values, written at slots (B, T)
    (`write_kv`: row `kv_row` of the stack's buffer, which a compiled step writes in place); attention over the
    first `window` slots with the additive mask (B, 1, T, window) or None; cos/signed_sin (B, 1, T, D);
    qkv_w/qkv_b: q, k, v, then (`_fused_weights(QKV_SWAPPED)`, small layers) q and k with each head's halves
    swapped. `reuse_input` (contiguous `hidden` the caller never reads again): the attention's residual is added
    inside the output projection's matmul, into `hidden` (15 kernels a layer, against 16). `group_major` (grouped
    attention): o_w reads the heads group-major (`_fused_weights(OUT_GROUP_MAJOR)`)."""
    b, t, h = hidden.shape
    attn = _attention_half(hidden, mask, kv_stack, kv_row, slots, window, cos, signed_sin, ln1_w, ln1_eps, qkv_w,
                           qkv_b, heads, kv_heads, scale, group_major)  # (B, T, heads, D)
    attn = attn.reshape(b * t, -1)  # (B T, heads D): a view of what CUDA's kernels write
    if reuse_input:  # the residual add inside the matmul, into the caller's buffer
        hidden.view(b * t, h).addmm_(attn, o_w.t())
        hidden = hidden if o_b is None else hidden.add_(o_b)
    else:  # a new tensor: the second residual is written into it below
        hidden = hidden + F.linear(attn, o_w, o_b).view(b, t, h)
    gate_up = F.linear(F.rms_norm(hidden, ln2_w.shape, ln2_w, ln2_eps), gate_up_w, gate_up_b)
    inter = gate_up.shape[-1] // 2
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # (B, T, I)
    hidden.view(b * t, h).addmm_(act.view(b * t, inter), down_w.t())  # the residual add inside the matmul
    return hidden if down_b is None else hidden.add_(down_b)


def _attention_half(hidden: torch.Tensor, mask: torch.Tensor | None, kv_stack: torch.Tensor, kv_row: int,
                    slots: torch.Tensor, window: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                    ln1_w: torch.Tensor | None, ln1_eps: float, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                    heads: int, kv_heads: int, scale: float, group_major: bool) -> torch.Tensor:
    """`layer_step`'s attention: the input norm (`ln1_w` None: folded into `qkv_w`), the q/k/v projection, rotary
    in place, the cache write, attention: (B, T, heads, D) (see `_attention`)."""
    b, t, _ = hidden.shape
    d = kv_stack.shape[-1]
    qk_cols = (heads + kv_heads) * d
    shape = hidden.shape[-1:]
    y = F.linear(F.rms_norm(hidden, shape, ln1_w, ln1_eps), qkv_w, qkv_b)  # (B, T, (heads + 2 kv [+ h + kv]) D)
    qk = y[..., :qk_cols].view(b, t, heads + kv_heads, d)  # q and k, rotated together and in place:
    if y.shape[-1] > qk_cols + kv_heads * d:  # x * cos + swap_halves(x) * sin, swap_halves(x) projected too
        swapped = y[..., qk_cols + kv_heads * d :].view(b, t, heads + kv_heads, d)
    else:
        swapped = torch.cat((qk[..., d // 2 :], qk[..., : d // 2]), dim=-1)  # a copy, made before qk changes
    qk.mul_(cos.transpose(1, 2)).addcmul_(swapped, signed_sin.transpose(1, 2))  # (B, T, heads + kv, D)
    kv = y[..., heads * d : qk_cols + kv_heads * d].view(b, t, 2, kv_heads, d)  # rotated keys, then values
    write_kv(kv_stack, kv_row, slots, kv.permute(2, 0, 3, 1, 4))  # (2, B, kv_heads, T, D)
    kv_buf = kv_stack[kv_row]
    return _attention(qk[:, :, :heads].transpose(1, 2), kv_buf[0, :, :, :window], kv_buf[1, :, :, :window], mask,
                      scale, group_major)  # (B, T, heads, D)


def head_stack_step(x: torch.Tensor, mask: torch.Tensor | None, kv_stack: torch.Tensor, kv_row: int,
                    slots: torch.Tensor, window: int, cos: torch.Tensor, signed_sin: torch.Tensor, ln1_eps: float,
                    qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, o_w: torch.Tensor, o_b: torch.Tensor | None,
                    ln2_eps: float, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor | None, down_w: torch.Tensor,
                    down_b: torch.Tensor | None, final_w: torch.Tensor | None, final_eps: float, heads: int,
                    kv_heads: int, scale: float, group_major: bool) -> torch.Tensor:
    """A layer of each of m heads as one wide layer, then (`final_w`) the final norm: (m, B, T, H).
    The wide layer has m x the attention heads of one (head j's query heads j * heads.., its key/value heads
    j * kv_heads.., so each group still reads its own layer's keys) over kv_stack[kv_row] (2, B, m kv_heads,
    max_len, D), both norms' weights folded into the projections after them, a block-diagonal output projection
    o_w (m H, m heads D), and the MLPs as batched matmuls gate_up_w (m, H, 2I), down_w (m, I, H)
    (`FastHeadStack`). x (B, T, H): the input every head reads (their first layers; qkv_w (m (heads + 2 kv
    [+ heads + kv]) D, H), its sections q, k, v [, swapped q, k] each all m layers'), or (m, B, T, H): each head's
    own (a later layer of each; qkv_w (m, H, F), one layer's columns per head). ~15 kernels for m layers instead
    of ~13 each."""
    m = gate_up_w.shape[0]
    if x.dim() == 3:  # one input: the q/k/v of every head in one matmul
        b, t, h = x.shape
        attn = _attention_half(x, mask, kv_stack, kv_row, slots, window, cos, signed_sin, None, ln1_eps, qkv_w,
                               qkv_b, m * heads, m * kv_heads, scale, group_major)  # (B, T, m heads, D)
        residual = x.reshape(b * t, 1, h)
    else:
        _, b, t, h = x.shape
        attn = _stacked_attention(x, mask, kv_stack, kv_row, slots, window, cos, signed_sin, ln1_eps, qkv_w, qkv_b,
                                  heads, kv_heads, scale, group_major)
        residual = x.view(m, b * t, h).transpose(0, 1)
    mid = F.linear(attn.reshape(b * t, -1), o_w, o_b).view(b * t, m, h).add_(residual)  # (B T, m, H)
    gate_up = torch.bmm(F.rms_norm(mid, (h,), None, ln2_eps).transpose(0, 1), gate_up_w)  # (m, B T, 2I)
    if gate_up_b is not None:
        gate_up = gate_up.add_(gate_up_b)
    inter = gate_up.shape[-1] // 2
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # (m, B T, I)
    out = torch.baddbmm(mid.transpose(0, 1), act, down_w)  # (m, B T, H): the residual added inside the matmul
    if down_b is not None:
        out = out.add_(down_b)
    if final_w is not None:
        out = F.rms_norm(out, (h,), final_w, final_eps)
    return out.view(m, b, t, h)


def _stacked_attention(x: torch.Tensor, mask: torch.Tensor | None, kv_stack: torch.Tensor, kv_row: int,
                       slots: torch.Tensor,
                       window: int, cos: torch.Tensor, signed_sin: torch.Tensor, ln1_eps: float, qkv_w: torch.Tensor,
                       qkv_b: torch.Tensor | None, heads: int, kv_heads: int, scale: float,
                       group_major: bool) -> torch.Tensor:
    """`_attention_half` for m layers with inputs of their own, x (m, B, T, H): the q/k/v projections as one batched
    matmul, rotary in place, the keys and values written into kv_stack[kv_row] (2, B, m kv_heads, max_len, D) as
    (layer, head) in one scatter, the queries regrouped (a copy) for one attention: (B, T, m heads, D)."""
    m, b, t, h = x.shape
    d = kv_stack.shape[-1]
    y = torch.bmm(F.rms_norm(x.reshape(m, b * t, h), (h,), None, ln1_eps), qkv_w)  # (m, B T, F)
    if qkv_b is not None:
        y = y.add_(qkv_b)
    y = y.view(m, b, t, -1)
    qk_cols = (heads + kv_heads) * d
    qk = y[..., :qk_cols].view(m, b, t, heads + kv_heads, d)
    if y.shape[-1] > qk_cols + kv_heads * d:  # the swapped halves come out of the projection
        swapped = y[..., qk_cols + kv_heads * d :].view(m, b, t, heads + kv_heads, d)
    else:
        swapped = torch.cat((qk[..., d // 2 :], qk[..., : d // 2]), dim=-1)
    qk.mul_(cos.transpose(1, 2)).addcmul_(swapped, signed_sin.transpose(1, 2))  # (B, T, 1, D) over every layer
    kv = y[..., heads * d : qk_cols + kv_heads * d].view(m, b, t, 2, kv_heads, d).permute(3, 1, 0, 4, 2, 5)
    write_kv(kv_stack, kv_row, slots, kv)  # (2, B, m, kv, T, D): each layer's heads after the last's
    kv_buf = kv_stack[kv_row]
    q = qk[..., :heads, :].permute(1, 0, 3, 2, 4).reshape(b, m * heads, t, d)  # (B, m heads, T, D)
    return _attention(q, kv_buf[0, :, :, :window], kv_buf[1, :, :, :window], mask, scale, group_major)


class FastHeadStack:
    """An MTP model's extra heads, which all read the trunk's output, run together on a GPU: the first layer of
    every head as one wide layer, then the second of every head, ... (`head_stack_step`; heads of equal depth). A
    verify step of a 4-head model runs 3 one-layer heads in ~15 kernels instead of ~42 (each ~13 and a final
    norm). Their weights are copied once into the wide layers' layout (norm weights folded in: the drafts round a
    little differently from the separate layers', which only moves how many are accepted; the next-token head is
    never part of a stack) and again whenever one changes. Keys and values live in one cache stack with m x a
    layer's key/value heads. `levels[i]`: layer i of every head."""

    def __init__(self, levels: list[list[FastLlamaLayer]], final_norm: nn.Module):
        self.levels, self.final_norm = levels, final_norm
        self._weights: dict[int, tuple] = {}  # level -> (weights' state, tensors): `kept_copy`

    def applies(self, hidden: torch.Tensor, cache) -> bool:
        return (len(self.levels[0]) > 1 and self.final_norm.weight.dtype == hidden.dtype
                and all(layer._whole_layer_fused(hidden, cache) for level in self.levels for layer in level)
                and all(layer.ln1.variance_epsilon == level[0].ln1.variance_epsilon
                        and layer.ln2.variance_epsilon == level[0].ln2.variance_epsilon
                        for level in self.levels for layer in level))

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache, cos: torch.Tensor,
                 signed_sin: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> (m, B, T, H), each head's output after the final norm."""
        first = self.levels[0][0]
        b, m, d = hidden.shape[0], len(self.levels[0]), first.head_dim
        qkv = first._modules(QKV)
        heads, kv_heads = qkv[0].out_features // d, qkv[1].out_features // d
        group_major = (_attention_path(b, hidden.shape[1], hidden.device.type) == "grouped" and heads != kv_heads)
        swapped = first._qkv_group(hidden) == QKV_SWAPPED
        x = hidden
        for i, level in enumerate(self.levels):
            kv_stack, kv_row = cache.buffer_row(level[0].layer_idx, hidden.new_empty((b, m * kv_heads, 0, d)))
            last = i == len(self.levels) - 1  # the final norm after the last layer
            qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b = self._stacked(i, swapped, group_major)
            x = head_stack_step(x, mask, kv_stack, kv_row, cache.owner.block_slots, cache.owner.window, cos, signed_sin,
                                level[0].ln1.variance_epsilon, qkv_w, qkv_b, o_w, o_b, level[0].ln2.variance_epsilon,
                                gate_up_w, gate_up_b, down_w, down_b, self.final_norm.weight if last else None,
                                self.final_norm.variance_epsilon, heads, kv_heads, level[0].scaling, group_major)
        return x

    def _stacked(self, i: int, swapped: bool, group_major: bool) -> tuple:
        level = self.levels[i]
        modules = [p for layer in level for group in range(4) for p in layer._modules(group)]
        norms = [n.weight for layer in level for n in (layer.ln1, layer.ln2)]
        return kept_copy(self._weights, i, [p.weight for p in modules] + norms,
                         lambda: self._build(level, i > 0, swapped, group_major), extra=(swapped, group_major))

    @staticmethod
    def _build(level: list[FastLlamaLayer], own_inputs: bool, swapped: bool, group_major: bool) -> tuple:
        """A level's weights: (qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b) as `head_stack_step`
        reads them; `own_inputs`: each head reads its own input (a later layer), so q/k/v are a batched matmul."""
        first, m = level[0], len(level)
        d = first.head_dim

        def folded(weight: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # W diag(g): the norm's scale inside
            return (weight.detach().float() * norm.weight.detach().float()).to(weight.dtype)

        fused = [layer._fused_weights(QKV_SWAPPED if swapped else QKV, layer._modules(QKV)) for layer in level]
        if own_inputs:  # (m, H, F) and (m, 1, F): each head's fused q/k/v [+ swapped] as it is
            qkv_w = torch.stack([folded(f[0], layer.ln1).t() for f, layer in zip(fused, level, strict=True)])
            qkv_b = None if fused[0][1] is None else torch.stack([f[1] for f in fused])[:, None]
        else:  # (m F, H): the sections q, k, v [, swapped q, k], each every head's
            sections, bias_sections = [], []
            for (weight, bias, bounds), layer in zip(fused, level, strict=True):
                q, k = bounds[0][1], bounds[1][1] - bounds[1][0]  # rows of q, of k (and of v)
                cuts = [0, q, q + k, q + 2 * k] + ([q + 2 * k + q, q + 2 * k + q + k] if swapped else [])
                sections.append([folded(weight[a:z], layer.ln1) for a, z in zip(cuts, cuts[1:], strict=False)])
                if bias is not None:
                    bias_sections.append([bias[a:z] for a, z in zip(cuts, cuts[1:], strict=False)])
            qkv_w = torch.cat([part for i in range(len(sections[0])) for part in (s[i] for s in sections)])
            qkv_b = None if not bias_sections else \
                torch.cat([part for i in range(len(bias_sections[0])) for part in (s[i] for s in bias_sections)])
        o = [layer.attn.o_proj for layer in level]
        h, width = o[0].out_features, o[0].in_features  # (H, heads D)
        o_w = o[0].weight.new_zeros(m * h, m * width)
        for j, proj in enumerate(o):
            o_w[j * h:(j + 1) * h, j * width:(j + 1) * width] = proj.weight.detach()
        if group_major:  # as `_fused_weights(OUT_GROUP_MAJOR)`, over all m layers' key/value heads
            o_w = _group_major_columns(o_w, m * first.attn.k_proj.out_features // d, d)
        o_b = None if all(p.bias is None for p in o) else \
            torch.cat([p.bias.detach() if p.bias is not None else o_w.new_zeros(h) for p in o])
        gate_up = [layer._fused_weights(GATE_UP, layer._modules(GATE_UP)) for layer in level]
        gate_up_w = torch.stack([folded(g[0], layer.ln2).t() for g, layer in zip(gate_up, level, strict=True)])
        gate_up_b = None if gate_up[0][1] is None else torch.stack([g[1] for g in gate_up])[:, None]  # (m, 1, 2I)
        down = [layer.mlp.down_proj for layer in level]
        down_w = torch.stack([p.weight.detach().t() for p in down])  # (m, I, H)
        down_b = None if all(p.bias is None for p in down) else \
            torch.stack([p.bias.detach() if p.bias is not None else down_w.new_zeros(h) for p in down])[:, None]
        return qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b

# For a 1-token step of a batch, two batched matmuls beat sdpa's fused CPU kernel (which tiles for long blocks):
# 0.64 vs 1.35 ms at 16 rows, 2.2 vs 5.8 ms at 48 rows with a padding mask - a third of a 48-row decoding step.
# For blocks of 2-8 tokens (verify steps) the two are within noise of each other, so sdpa stays.
# On a GPU a step is bound by its number of kernels, not by its rows. sdpa with an arbitrary mask and grouped
# key/value heads (`enable_gqa`) falls back to its math path there, which copies the keys and values once per
# query head, so CUDA regroups the queries instead: the query heads that share a key/value head become the rows
# of one head of an ordinary attention, which sdpa's fused kernel (memory-efficient attention: any additive
# mask) computes in one kernel where the two matmuls take four ("grouped", the default). "matmul" keeps the two
# matmuls up to blocks of CUDA_MATMUL_BLOCK (sdpa past that). Which is faster is measured on a GPU
# (`scripts/decode_speed.py --attention`); the kernel counts are docs/benchmarks.md's.
CUDA_ATTENTION = "grouped"
CUDA_MATMUL_BLOCK = 64
ATTENTION_PATHS = ("grouped", "matmul")


def _attention_path(batch: int, block: int, device_type: str = "cpu") -> str:
    """"sdpa" (grouped key/value heads as sdpa takes them), "grouped" (query heads regrouped, one sdpa kernel on a
    GPU) or "matmul" (two batched matmuls)."""
    if device_type == "cuda":
        if CUDA_ATTENTION == "grouped":
            return "grouped"
        return "matmul" if block <= CUDA_MATMUL_BLOCK else "sdpa"
    return "matmul" if block == 1 and batch >= 2 else "sdpa"


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float, group_major: bool = False) -> torch.Tensor:
    """Causal attention of a block of T queries over the cache: q (B, heads, T, D), keys/values (B, kv, end, D),
    mask (B, 1, T, end) additive, or None for a 1-token step over a hole-free cache (attend to everything).
    Returns (B, T, heads, D), whatever its strides: callers flatten the heads for the output projection (a view
    where the layout allows; sdpa's CUDA kernels write (B, T, heads, D) in memory). `group_major` (the grouped
    path): the heads in the order (group, kv), which is how CUDA's kernel writes them when the rows are ordered
    (T, group), for an output projection whose columns are in that order."""
    b, heads, t, d = q.shape
    kv, end = keys.shape[1], keys.shape[2]
    path = _attention_path(b, t, q.device.type)
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=heads != kv).transpose(1, 2)  # (B, T, heads, D)
    group = heads // kv  # query head h reads key/value head h // group, as sdpa's enable_gqa does
    if path == "grouped" and group_major:  # rows (T, group) of key/value head kv_i: query head kv_i * group + g
        rows = q.view(b, kv, group, t, d).transpose(2, 3).reshape(b, kv, t * group, d)  # a copy for T > 1
        if mask is not None and t > 1:  # every row of token t sees the block's mask row t (one row: it broadcasts)
            mask = _rows_mask(mask, group)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)  # (B, kv, T group, D)
        # CUDA's kernels write (B, T group, kv, D) in memory (a transposed view): per token, group-major heads
        return out.transpose(1, 2).reshape(b, t, heads, d)  # a view on CUDA (a copy of the CPU's layout)
    if path == "grouped":  # rows (group, T): the query heads are regrouped afterwards
        if mask is not None and t > 1:  # every row of a group sees the block's mask (one row: it broadcasts)
            mask = mask[:, :, None].expand(b, 1, group, t, end).reshape(b, 1, group * t, end)
        out = F.scaled_dot_product_attention(q.reshape(b, kv, group * t, d), keys, values, attn_mask=mask,
                                             scale=scale)  # (B, kv, group T, D)
        # CUDA's kernels lay their output out as (B, group T, kv, D) (a transposed view): regrouping the heads
        # (h = kv_i * group + g) is a copy there, whatever the block (docs/benchmarks.md)
        return out.reshape(b, kv, group, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, heads, d)
    # 3-D for baddbmm, which scales inside the matmul (one kernel fewer than a multiply after it)
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q.reshape(b * kv, group * t, d),
                           keys.reshape(b * kv, end, d).transpose(1, 2), beta=0, alpha=scale)  # (B kv, group T, end)
    if mask is not None:
        scores = scores.view(b, kv, group, t, end) + mask[:, :, None]  # (B, 1, 1, T, end) broadcast over heads
    probs = torch.softmax(scores, dim=-1).view(b * kv, group * t, end)
    out = torch.bmm(probs, values.reshape(b * kv, end, d))  # (B kv, group T, D)
    return out.view(b, heads, t, d).transpose(1, 2)  # (B, T, heads, D): a view (a 1-token block flattens as it is)


def _rows_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(B, 1, T, end) -> (B, 1, T x group, end): row (t, g) reads mask row t. Built by a forward's first layer and
    kept on the mask, which every layer of the forward is handed: one copy a forward instead of one a layer (a
    captured step records the one)."""
    b, _, t, end = mask.shape
    if torch.compiler.is_compiling():  # inside a compiled step: no Python state (inductor fuses the copy anyway)
        return mask[:, :, :, None].expand(b, 1, t, group, end).reshape(b, 1, t * group, end)
    by_group = mask.__dict__.setdefault("_mtp_rows_masks", {})
    rows = by_group.get(group)
    if rows is None:
        rows = by_group[group] = mask[:, :, :, None].expand(b, 1, t, group, end).reshape(b, 1, t * group, end)
    return rows


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # In fp32 torch's fused kernel computes transformers' six ops bit for bit (on SmolLM2's rows), in one op. In
    # bf16/fp16 it also computes in fp32 but scales by the weight before rounding once, where transformers rounds,
    # then scales in the low precision: the last bit may differ from the Hugging Face layer, never between the rows
    # of a block - and one kernel instead of four is what a GPU step is short of (a kernel a layer costs more there
    # than the arithmetic).
    # (float64 stays transformers' way: it normalises in fp32 even then.)
    if x.dtype == norm.weight.dtype and x.dtype != torch.float64:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary tables (B, T, D) -> (cos, sin with its first half negated), (B, 1, T, D), once per
    forward: then x * cos + swap_halves(x) * signed_sin equals transformers' x * cos + rotate_half(x) * sin bit for
    bit ((-a) * b == a * (-b)) in three ops fewer."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin
