"""Multi-token prediction with mask tokens (Kirchenbauer et al. 2026, arXiv 2602.06019): no new heads.

One mask token is added to the vocabulary. To predict k tokens after position t, k-1 masks follow t; the logits
at t and at the masks are the k predictions. Training cuts rows into regions (`mask_layout`); decoding appends
masks after the tokens it feeds (`mtp.decoding.drafters.MaskDrafter`).

Adapters:
    full        the whole model trains (the paper); its teacher is a frozen copy made when training starts
    gated-lora  LoRA adapters on the attention and MLP projections that act only at mask positions (Samragh et
                al. 2025, arXiv 2507.11851): a real token computes exactly the base model, so the teacher is
                the same weights with the adapters off, and verified decoding returns the base model's answer

Checkpoint folder: the base model's config.json plus an `mtp` section (`method: "mask_tokens"`, the mask token's
id and string, adapter, rank, k), model.safetensors with the base weights under their Hugging Face names (so
transformers loads the folder as the plain model) and the adapters as `mtp_lora.{module}.{A,B}`, tokenizer files
with the mask token added.
"""

from __future__ import annotations

import copy
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtp.arguments import check_values
from mtp.errors import CheckpointMismatchError, MTPError
from mtp.io import as_path
from mtp.models.cache import additive_mask
from mtp.models.folder_kind import FORMAT_VERSION, MASK_TOKENS_METHOD, read_mtp_section
from mtp.runtime import resolve_device

MASK_TOKEN = "<|mtp_mask|>"
METHOD = MASK_TOKENS_METHOD
ADAPTERS = ("full", "gated-lora")
LORA_PREFIX = "mtp_lora."
# Projections that get a gated LoRA adapter: Llama family, fused ones (Phi-3, GLM), an ungated MLP's (nanochat),
# then GPT-2 (Conv1D).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj", "fc1", "fc2", "c_attn", "c_proj", "c_fc")


# ------------------------------------------------------------------------------------------------ training layout
@dataclass
class MaskLayout:
    is_mask: torch.Tensor  # (S,) bool
    position_ids: torch.Tensor  # (S,) long: the position of the token a slot holds or stands for
    allowed: torch.Tensor  # (S, S) bool: allowed[q, kv], query slot q may attend to key slot kv
    predict: torch.Tensor  # (regions, k) long: the prediction slots, the region's last real token then its masks
    source: torch.Tensor  # (S,) long: index of the real token a slot holds; for a mask, its region's last one
    prefix_len: int
    k: int
    regions: int


def mask_layout(prefix_len: int, k: int, regions: int) -> MaskLayout:
    """The training layout of `regions` regions of `prefix_len` (P) real tokens followed by k-1 masks.

    Real tokens x_0 .. x_{MP-1}; region r holds x_{rP} .. x_{rP+P-1}, then masks 1..k-1. Mask j of region r
    stands for x_{rP+P-1+j}, the token j steps after the region's last real token (those tokens are the first
    real tokens of region r+1), so its position id is rP+P-1+j. S = regions * (P + k - 1) slots. Example
    P=2, k=3, regions=2 (x: real, m: mask; position ids below):

        slot      0   1   2   3   4   5   6   7
        token     x0  x1  m   m   x2  x3  m   m
        position  0   1   2   3   2   3   4   5

        attends to (1 = allowed)                who
        slot 0: 1 . . . . . . .                 real tokens: causally, real tokens only (x0..x3 in order)
        slot 1: 1 1 . . . . . .
        slot 2: 1 1 1 . . . . .                 mask 1 of region 0: x0 x1, itself
        slot 3: 1 1 1 1 . . . .                 mask 2 of region 0: x0 x1, mask 1, itself
        slot 4: 1 1 . . 1 . . .                 x2: x0 x1 x2 (never a mask)
        slot 5: 1 1 . . 1 1 . .
        slot 6: 1 1 . . 1 1 1 .                 mask 1 of region 1: every real token of regions 0-1, itself
        slot 7: 1 1 . . 1 1 1 1

    Predictions of region r: its last real token (t+1) and its k-1 masks (t+2..t+k), k slots.
    """
    if prefix_len < 1 or k < 1 or regions < 1:
        raise MTPError(f"a mask layout needs prefix_len, k and regions >= 1, got {prefix_len}, {k}, {regions}")
    p, m = prefix_len, k - 1
    span = p + m
    s = regions * span
    slot = torch.arange(s)
    region, within = slot // span, slot % span
    is_mask = within >= p
    # Index of the real token a slot holds (real) or of the region's last real token (mask), and the mask's step.
    step = (within - p + 1).clamp_min(0)  # 0 for real slots, j for mask j
    source = region * p + torch.where(is_mask, torch.full_like(within, p - 1), within)
    position_ids = source + step
    real_q, real_kv = ~is_mask[:, None], ~is_mask[None, :]
    causal_real = real_q & real_kv & (source[None, :] <= source[:, None])
    mask_sees_real = is_mask[:, None] & real_kv & (region[None, :] <= region[:, None])
    mask_sees_mask = (is_mask[:, None] & is_mask[None, :] & (region[None, :] == region[:, None])
                      & (step[None, :] <= step[:, None]))
    allowed = causal_real | mask_sees_real | mask_sees_mask
    last_real = torch.arange(regions) * span + p - 1
    predict = last_real[:, None] + torch.arange(k)[None, :]  # (regions, k)
    return MaskLayout(is_mask, position_ids, allowed, predict, source, p, k, regions)


@dataclass
class LayoutBatch:
    input_ids: torch.Tensor  # (B, S) real tokens, mask id in mask slots
    position_ids: torch.Tensor  # (B, S)
    attention: torch.Tensor  # (B, S, S) bool: the layout's pairs, minus keys that are padding
    is_mask: torch.Tensor  # (S,) bool
    predict: torch.Tensor  # (regions, k) slot indices
    region_weight: torch.Tensor  # (B, regions) float: 1 for a region whose predictions count, else 0
    next_token: torch.Tensor  # (B, S) the data's next token after each real slot (-100 where none)
    layout: MaskLayout

    def without_idle_regions(self, keep_one: bool = False) -> LayoutBatch:
        """The same batch without the masks of regions that count in no row (e.g. regions inside the prompts):
        every real token stays (they are the context), so what the kept slots compute does not change.
        `keep_one`: when no region counts, keep the first (its weight stays 0), so the passes still run."""
        keep = self.region_weight.bool().any(0)  # (M,)
        if keep_one and not bool(keep.any()) and keep.numel():
            keep[0] = True
        if bool(keep.all()):
            return self
        span = self.is_mask.numel() // keep.numel()
        region = torch.arange(self.is_mask.numel(), device=keep.device) // span
        slots = (~self.is_mask | keep[region]).nonzero().squeeze(1)  # (S',)
        new_index = torch.full((self.is_mask.numel(),), -1, dtype=torch.long, device=keep.device)
        new_index[slots] = torch.arange(slots.numel(), device=keep.device)
        return LayoutBatch(self.input_ids[:, slots], self.position_ids[:, slots],
                           self.attention[:, slots][:, :, slots], self.is_mask[slots], new_index[self.predict[keep]],
                           self.region_weight[:, keep], self.next_token[:, slots], self.layout)


def gather_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: MaskLayout, mask_id: int,
                  offset: int = 0, loss_mask: torch.Tensor | None = None) -> LayoutBatch:
    """Lay a batch of right-padded token rows (B, L) out as `layout`, starting `offset` tokens into each row.

    A region counts when its last real token is a real token of the row and, with `loss_mask` (B, L) (the
    positions whose token is a target, e.g. the answer), when the token after it is a target.
    """
    b, length = input_ids.shape
    is_mask = layout.is_mask
    source = offset + layout.source
    inside = source < length  # (S,)
    idx = source.clamp_max(length - 1).to(input_ids.device)
    tokens = input_ids[:, idx].masked_fill(is_mask.to(input_ids.device)[None], mask_id)  # (B, S)
    real_valid = attention_mask[:, idx].bool() & inside.to(input_ids.device)[None]  # (B, S)
    slot_valid = real_valid | is_mask.to(input_ids.device)[None]
    attention = layout.allowed.to(input_ids.device)[None] & slot_valid[:, None, :]  # (B, S, S)
    last = layout.predict[:, 0].to(input_ids.device)  # (regions,)
    weight = real_valid[:, last]
    nxt_idx = (source + 1).clamp_max(length - 1).to(input_ids.device)
    nxt_ok = ((source + 1) < length).to(input_ids.device)[None] & attention_mask[:, nxt_idx].bool()
    if loss_mask is not None:
        weight = weight & loss_mask[:, nxt_idx[last]].bool() & nxt_ok[:, last]
        nxt_ok = nxt_ok & loss_mask[:, nxt_idx].bool()
    next_token = input_ids[:, nxt_idx].masked_fill(~(nxt_ok & real_valid & ~is_mask.to(input_ids.device)), -100)
    positions = (layout.position_ids + offset).to(input_ids.device)[None].expand(b, -1)
    return LayoutBatch(tokens, positions, attention, is_mask.to(input_ids.device), layout.predict.to(input_ids.device),
                       weight.float(), next_token, layout)


# ------------------------------------------------------------------------------------------------ gated LoRA
class GatedLoRA(nn.Module):
    """LoRA adapters on a model's projections that act only where the gate is 1 (mask tokens).

    Forward hooks add gate * (x A^T B^T) * alpha/rank to each target projection's output, so the model's own
    modules, their names and their weights stay as they are (the folder still loads in transformers), and the
    lean decoding step calls the hooked projections as modules. B starts at zero: a new adapter changes nothing.
    With the gate off (`None`) the model is exactly the base model; a 0 in the gate adds an exact zero.
    """

    def __init__(self, model: nn.Module, rank: int = 16, alpha: float | None = None,
                 targets: tuple[str, ...] = LORA_TARGETS, first_layer: int = 0):
        super().__init__()
        if rank < 1:
            raise MTPError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha if alpha is not None else 2 * rank)
        self.scale = self.alpha / rank
        self.gate: torch.Tensor | None = None  # (B, T, 1) float, set around each forward
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._handles = []
        ref = next(model.parameters())
        self.first_layer = first_layer  # decoder layers below this one have no adapter
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in targets or _layer_index(name) < first_layer:
                continue
            shape = _in_out(module)
            if shape is None:
                continue
            key = name.replace(".", "__")
            a = torch.empty(rank, shape[0], dtype=ref.dtype, device=ref.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[key] = nn.Parameter(a)
            self.B[key] = nn.Parameter(torch.zeros(shape[1], rank, dtype=ref.dtype, device=ref.device))
            self._handles.append(module.register_forward_hook(self._hook(key)))
        if not self.A:
            raise MTPError("gated LoRA found no attention/MLP projection to adapt in this model")

    def _hook(self, key: str):
        def hook(module, inputs, output):
            gate = self.gate
            if gate is None:
                return output
            x = inputs[0]
            delta = F.linear(F.linear(x, self.A[key]), self.B[key]) * self.scale  # (B, T, out)
            if delta.dim() == 2:  # a projection over the tokens flattened (B T, out): a mixture's shared expert
                t = gate.shape[-2]  # (the gate (B or 1, T, 1) broadcasts over the rows)
                gate = gate.expand(delta.shape[0] // t, t, 1).reshape(-1, 1)
            return output + delta * gate.to(delta.dtype)
        return hook

    def state_dict_flat(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.A:
            name = key.replace("__", ".")
            out[f"{LORA_PREFIX}{name}.A"] = self.A[key].detach().contiguous()
            out[f"{LORA_PREFIX}{name}.B"] = self.B[key].detach().contiguous()
        return out

    def load_flat(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = set(self.state_dict_flat())
        given = {k for k in state if k.startswith(LORA_PREFIX)}
        if expected != given:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise CheckpointMismatchError(f"{source}: the LoRA adapters do not match the model "
                                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for key in self.A:
                name = key.replace("__", ".")
                for part, store in (("A", self.A), ("B", self.B)):
                    t = state[f"{LORA_PREFIX}{name}.{part}"]
                    if t.shape != store[key].shape:
                        raise CheckpointMismatchError(f"{source}: {LORA_PREFIX}{name}.{part} has shape "
                                                      f"{tuple(t.shape)}, the model {tuple(store[key].shape)}")
                    store[key].copy_(t)


def _layer_index(name: str) -> int:
    """Decoder layer of a module name (`model.layers.3.mlp.up_proj`, `transformer.h.3.attn.c_attn`)."""
    match = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return None


class _PrefixKV:
    """Records the keys and values each layer computes (a pass over the layout's real tokens)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _OnPrefix:
    """A later pass attends to the recorded prefix then to itself; nothing is written into the prefix, so
    student and teacher passes can share one (and autograd sees no in-place change)."""

    def __init__(self, prefix: _PrefixKV):
        self.prefix = prefix

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys = torch.cat([self.prefix.keys[layer_idx], key_states], 2)  # (B, kv_heads, R + T, D)
        return keys, torch.cat([self.prefix.values[layer_idx], value_states], 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix.keys[layer_idx].shape[2] if layer_idx in self.prefix.keys else 0


# ------------------------------------------------------------------------------------------------ the model
class MaskTokenModel(nn.Module):
    """A causal LM with a mask token: decodes several tokens per forward through the common decoding loop.

    `self.lm` is the base model seen as a 1-head `MTPModel` (trunk + head 0 = the whole model), so decoding
    uses the same cache, lean layer step and batching as the parallel heads.
    """

    def __init__(self, base: nn.Module, mask_token_id: int, mask_token: str | None = None, adapter: str = "full",
                 rank: int = 16, k: int = 4, max_k: int | None = None, lora_layers: int | None = None):
        super().__init__()
        from mtp.models.parallel_heads import MTPModel, check_base

        check_base(base)
        check_values({"mask_token_id": mask_token_id, "k": k, "lora_rank": rank, "lora_layers": lora_layers},
                     flags=False)
        if adapter not in ADAPTERS:
            raise MTPError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
        vocab = base.get_input_embeddings().weight.shape[0]
        if not 0 <= mask_token_id < vocab:
            raise MTPError(f"mask token id {mask_token_id} is outside the embedding matrix of {vocab} rows")
        self.base = base
        self.mask_token_id, self.mask_token = int(mask_token_id), mask_token
        self.adapter, self.rank = adapter, rank
        self.default_k = k  # k the model was trained for (decoding's default)
        self.max_k = max_k or max(k, 16)
        self.lm = MTPModel(base, num_heads=1)
        num_layers = self.lm.num_layers
        if lora_layers is not None and not 1 <= lora_layers <= num_layers:
            raise MTPError(f"lora_layers must be in [1, {num_layers}], got {lora_layers}")
        # Adapters on the top `lora_layers` decoder layers (default all): layers below then need no backward.
        first = num_layers - (lora_layers or num_layers)
        self.lora = GatedLoRA(base, rank, first_layer=first) if adapter == "gated-lora" else None
        self.tokenizer = None
        self.source = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_base(cls, base, mask_token: str | None = None, mask_token_id: int | None = None,
                  adapter: str = "full", rank: int = 16, k: int = 4, tokenizer=None, lora_layers: int | None = None,
                  **load_kwargs) -> MaskTokenModel:
        """Wrap a transformers causal LM (or load one by name/path, `mtp.hub`) and give it a mask token.

        `mask_token_id` uses a token the model already has (checkpoints trained with the
        self-distillation authors' code ship one); otherwise
        `mask_token` (default `<|mtp_mask|>`) is used if the tokenizer knows it, or added: to the tokenizer and
        to the embedding, in a spare padded row when the matrix has more rows than the tokenizer has tokens,
        else in a new row, initialised to the mean of the existing rows.
        """
        source = None
        if base is None or isinstance(base, str | os.PathLike):  # None: the embedded default model
            from mtp.hub import load_base_model

            base, tokenizer, source = load_base_model(None if base is None else str(base), **load_kwargs)
        if mask_token_id is None:
            mask_token_id, mask_token = add_mask_token(base, tokenizer, mask_token or MASK_TOKEN)
        elif mask_token is None and tokenizer is not None:
            mask_token = tokenizer.convert_ids_to_tokens(int(mask_token_id))
        elif mask_token is not None and tokenizer is not None \
                and tokenizer.convert_tokens_to_ids(mask_token) != int(mask_token_id):
            raise MTPError(f"mask_token {mask_token!r} is not token {mask_token_id} of this tokenizer; give the token "
                           "or its id")
        _check_not_reserved(int(mask_token_id), mask_token, base, tokenizer)
        model = cls(base, mask_token_id, mask_token, adapter=adapter, rank=rank, k=k, lora_layers=lora_layers)
        model.tokenizer, model.source = tokenizer, source
        return model

    @property
    def config(self):
        return self.base.config

    @property
    def backbone(self):
        return self.lm.backbone

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def draft_vocab(self):
        return None

    def set_fast_decoding(self, weights: str | None) -> None:
        if weights == "fp16" and self.lora is not None:
            raise MTPError("fp16 packing is not available with gated-LoRA adapters (their projections are hooked)")
        self.lm.set_fast_decoding(weights)

    @property
    def fast_decoding(self):
        return self.lm.fast_decoding

    # ---------------------------------------------------------------- adapters
    @contextmanager
    def gate(self, is_mask: torch.Tensor | None):
        """Adapters act where `is_mask` (B, T) or (T,) is True (None: the base model everywhere)."""
        if self.lora is None or is_mask is None:
            yield
            return
        g = is_mask.to(self.dtype)
        self.lora.gate = (g[None] if g.dim() == 1 else g)[..., None]  # (B|1, T, 1)
        try:
            yield
        finally:
            self.lora.gate = None

    def make_teacher(self) -> nn.Module:
        """The frozen teacher's base model: the same weights with the adapters off (gated LoRA), else a copy."""
        if self.lora is not None:
            return self.base
        teacher = copy.deepcopy(self.base).eval()
        teacher.requires_grad_(False)
        return teacher

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.lora is not None:
            return list(self.lora.parameters())
        return [p for p in self.base.parameters()]

    # ---------------------------------------------------------------- forwards
    def layout_hidden_reference(self, batch: LayoutBatch, model: nn.Module | None = None,
                                adapters: bool = True) -> torch.Tensor:
        """Final hidden states (B, S, H) of a training layout in one forward of the Hugging Face model with the
        layout as a 4-D attention mask. The plain statement of what `real_pass` + `mask_pass` compute faster."""
        model = model if model is not None else self.base
        dtype = model.get_input_embeddings().weight.dtype
        mask = additive_mask(batch.attention, dtype)  # (B, 1, S, S)
        with self.gate(batch.is_mask if adapters and model is self.base else None):
            out = model.base_model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                   use_cache=False)
        return out.last_hidden_state

    def real_pass(self, batch: LayoutBatch, model: nn.Module | None = None) -> tuple[torch.Tensor, _PrefixKV]:
        """The layout's real tokens alone (they never attend to a mask): final hidden states (B, R, H) and
        their keys and values, which the masks then attend to (`mask_pass`). With gated LoRA this is exactly
        the base model, shared by student and teacher."""
        real = (~batch.is_mask).nonzero().squeeze(1)  # (R,)
        allowed = batch.attention[:, real][:, :, real]  # (B, R, R)
        prefix = _PrefixKV()
        hidden = self._run(model, batch.input_ids[:, real], batch.position_ids[:, real], allowed, prefix)
        return hidden, prefix

    def mask_pass(self, batch: LayoutBatch, prefix: _PrefixKV, tokens: torch.Tensor | None = None,
                  model: nn.Module | None = None, adapters: bool = True) -> torch.Tensor:
        """The layout's mask slots (B, Q, H) over the real tokens' keys and values in `prefix`. `tokens` (B, S):
        what the mask slots hold instead of the mask token (the teacher reads the student's guesses there)."""
        masks = batch.is_mask.nonzero().squeeze(1)  # (Q,)
        real = (~batch.is_mask).nonzero().squeeze(1)
        rows = batch.attention[:, masks]  # (B, Q, S)
        allowed = torch.cat([rows[:, :, real], rows[:, :, masks]], -1)  # (B, Q, R + Q): prefix keys first
        ids = (tokens if tokens is not None else batch.input_ids)[:, masks]
        gate = batch.is_mask[masks] if adapters else None
        return self._run(model, ids, batch.position_ids[:, masks], allowed, _OnPrefix(prefix), gate)

    def _run(self, model, ids, positions, allowed, kv, gate=None) -> torch.Tensor:
        """The decoder layers and final norm of `model` (default: this model's base) over `ids` with an
        explicit (B, T, keys) attention pattern, through the Hugging Face layers' attention interface."""
        model = model if model is not None else self.base
        backbone = self.lm.backbone if model is self.base else self._teacher_backbone(model)
        dtype = model.get_input_embeddings().weight.dtype
        if allowed.shape[1] == allowed.shape[2]:  # a padding query sees itself (no all-masked row)
            allowed = allowed | torch.eye(allowed.shape[1], dtype=torch.bool, device=allowed.device)
        mask = additive_mask(allowed, dtype)  # (B, 1, T, keys)
        # With adapters only, nothing below the first adapted layer trains: those layers need no backward.
        frozen_below = self.lora.first_layer if self.lora is not None and model is self.base else 0
        grad = torch.is_grad_enabled()
        with self.gate(gate if model is self.base else None):
            hidden = backbone.embed(ids, positions)  # (B, T, H)
            shared = backbone.layer_inputs(hidden, positions)
            for i, layer in enumerate(backbone.layers):
                with torch.set_grad_enabled(grad and i >= frozen_below):
                    hidden = backbone.run_layer(layer, hidden, mask, kv, shared)
            return backbone.norm(hidden)

    def _teacher_backbone(self, model):
        from mtp.models.backbones import backbone_for

        cached = getattr(self, "_teacher_bb", None)
        if cached is None or cached[0] is not model:
            self._teacher_bb = (model, backbone_for(model))
        return self._teacher_bb[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Logits of a plain causal forward (B, T, 1, V), as `MTPModel` with one head; masks in `input_ids`
        switch the adapters on there."""
        is_mask = input_ids == self.mask_token_id
        with self.gate(is_mask if bool(is_mask.any()) else None):
            return self.without_mask_token(self.lm(input_ids, attention_mask, **kwargs))

    def next_token_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`MTPModel.next_token_hidden` of real tokens (no masks: the adapters stay off, as in `forward`)."""
        return self.lm.next_token_hidden(input_ids, attention_mask)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.without_mask_token(self.lm.lm_head(hidden))

    def without_mask_token(self, logits: torch.Tensor) -> torch.Tensor:
        """The mask token is an input, never an output: its logit is set to the lowest value (probability 0),
        so a decoded sequence never holds a token that would read as a mask."""
        logits = logits.clone()
        logits[..., self.mask_token_id] = torch.finfo(logits.dtype).min
        return logits

    def block_forward(self, tokens, valid, cache, offsets, within, is_mask) -> torch.Tensor:
        """One cached decoding forward of a block laid out by `MaskDrafter`: final hidden states (B, T, H). The
        cache keeps nothing yet: the decoding step keeps what it accepted."""
        with self.gate(is_mask):
            trunk, ctx = self.lm.trunk_forward(tokens, valid, cache, offsets, within)
            return self.lm.head_forward(0, trunk, ctx)

    # ---------------------------------------------------------------- decoding
    kind = "mask_tokens"  # what decoding drafts with (`mtp.decoding.drafters.drafter_for`) and checkpoints hold

    def draft_depth(self, k: int | None = None) -> int:
        """How many tokens past the next one k-1 masks draft (k: the decoding's, default the trained one)."""
        return (k if k is not None else self.default_k) - 1

    def new_cache(self, batch_size: int, max_len: int, static: bool = False):
        return self.lm.new_cache(batch_size, max_len, static=static)

    def can_generate(self) -> bool:
        """What transformers' pipelines ask before they call `generate` (`pipeline("text-generation", model=m)`)."""
        return True

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """transformers' `generate` (a LongTensor of prompts + new tokens; see `mtp.decoding.hf_generate`), with
        mtp's strategies: `strategy="confadapt", tau=0.9, k=8`, `use_speculative=True` (lossless), ..."""
        from mtp.decoding.hf_generate import hf_generate

        return hf_generate(self, input_ids, attention_mask, **kwargs)

    @property
    def generation_config(self):
        return getattr(self.base, "generation_config", None)

    # ---------------------------------------------------------------- checkpoints
    def mtp_config(self) -> dict:
        cfg = {"method": METHOD, "mask_token_id": self.mask_token_id, "mask_token": self.mask_token,
               "adapter": self.adapter, "k": self.default_k, "max_k": self.max_k, "format_version": FORMAT_VERSION}
        if self.lora is not None:
            cfg.update(rank=self.lora.rank, alpha=self.lora.alpha, lora_layers=self.lm.num_layers - self.lora.first_layer)
        return cfg

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        state, seen = {}, set()
        for name, tensor in self.base.state_dict().items():
            if tensor.data_ptr() in seen and tensor.numel() > 0:  # tied (unembedding = embedding): once
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous()
        if self.lora is not None:
            state.update(self.lora.state_dict_flat())
        return state

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                        frozen_apart: bool = False, link_from: Path | None = None) -> Path:
        """A model folder, as `MTPModel.save_pretrained` writes one (with the same refusals and options)."""
        from mtp.models.parallel_heads import frozen_names, write_model_folder

        state = self.checkpoint_state_dict()
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
        return write_model_folder(directory, self.base, self.mtp_config(), shapes, state.__getitem__,
                                  tokenizer if tokenizer is not None else self.tokenizer, overwrite,
                                  frozen_names(self) if frozen_apart else (), link_from)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, load_tokenizer: bool = True) -> MaskTokenModel:
        """Load a folder written by `save_pretrained`, as `MTPModel.from_pretrained` does: the base model is built
        on the meta device and each tensor is read from model.safetensors straight into its place, in `dtype` on
        `device` (one copy of the weights in memory); mismatched tensors raise an error naming them."""
        from transformers import AutoConfig

        from mtp.models.parallel_heads import MTPModel, _pick_dtype
        from mtp.models.safetensors_io import FolderWeights, check_floating

        device = resolve_device(device)  # before anything is read
        directory = as_path(directory, "directory")
        raw = read_mtp_section(directory)  # checks there are weights
        if raw.get("method") != METHOD:
            raise MTPError(f"{directory}: not a mask-token model (its mtp section has method {raw.get('method')!r})")
        config = AutoConfig.from_pretrained(directory)
        layers = int(config.num_hidden_layers)
        lm = MTPModel.empty(config, num_heads=1, num_trunk_layers=layers - 1, dtype=dtype)
        with FolderWeights(directory) as reader:
            weights = reader.path
            names = [k for k in reader.tensors if not k.startswith(LORA_PREFIX)]
            shapes = {k: reader.tensors[k].shape for k in names}
            lm.check_checkpoint_shapes(shapes, source=str(weights))
            check_floating({k: reader.tensors[k].dtype for k in names}, lm.base.state_dict(), str(weights))
            lm.materialise(names, lambda k: reader.read(k, _pick_dtype(reader, k, dtype, None), device))
            lora_state = {k: reader.read(k, dtype, device) for k in reader.tensors if k.startswith(LORA_PREFIX)}
        lm.to(device).eval()  # the buffers (rotary frequencies)
        model = cls(lm.base, int(raw["mask_token_id"]), raw.get("mask_token"), adapter=raw.get("adapter", "full"),
                    rank=int(raw.get("rank", 16)), k=int(raw.get("k", 4)), max_k=raw.get("max_k"),
                    lora_layers=raw.get("lora_layers"))
        if model.lora is not None:
            model.lora.alpha = float(raw.get("alpha", model.lora.alpha))
            model.lora.scale = model.lora.alpha / model.lora.rank
            model.lora.load_flat(lora_state, str(weights))
        elif lora_state:
            raise CheckpointMismatchError(f"{directory}: LoRA weights in a model without adapters")
        model.eval()
        from mtp.hub import check_finite_weights
        from mtp.hub import load_tokenizer as read_tokenizer  # (not the argument's name)

        check_finite_weights(model, str(weights))
        if load_tokenizer and (directory / "tokenizer_config.json").is_file():
            model.tokenizer = read_tokenizer(directory)
        return model


def _check_not_reserved(token_id: int, token: str | None, base: nn.Module, tokenizer) -> None:
    """A mask token is not the start, end or padding token: masked slots have the mask's logit pinned low and
    every such token in the training rows would be read as a mask (an end token as the mask: answers that never
    end)."""
    for name, what in (("eos", "end-of-sequence"), ("bos", "start"), ("pad", "padding")):
        given = (getattr(base.config, f"{name}_token_id", None), getattr(tokenizer, f"{name}_token_id", None))
        ids = {i for v in given for i in (v if isinstance(v, list | tuple) else [v]) if isinstance(i, int)}  # (a
        # list: Llama 3's configs name several end tokens)
        if token_id in ids:
            raise MTPError(f"the mask token {token!r} (id {token_id}) is the model's {what} token; choose another "
                           f"(by default a new one, {MASK_TOKEN!r}, is added)")


def add_mask_token(base: nn.Module, tokenizer, token: str = MASK_TOKEN) -> tuple[int, str]:
    """Give `base` (and `tokenizer`) the mask token; returns its id. See `MaskTokenModel.from_base`."""
    emb = base.get_input_embeddings().weight
    rows = emb.shape[0]
    if tokenizer is None:  # no tokenizer: a new last row
        new_id = rows
    else:
        known = tokenizer.convert_tokens_to_ids(token)
        if isinstance(known, int) and known != tokenizer.unk_token_id and known is not None and known < rows:
            return known, token
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
        new_id = tokenizer.convert_tokens_to_ids(token)
    if new_id < rows:  # a spare padded row of the matrix
        with torch.no_grad():
            emb[new_id] = emb[: min(rows, new_id)].mean(0)
        return new_id, token
    base.resize_token_embeddings(new_id + 1, mean_resizing=False)
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    # Fresh parameters: resizing swaps `.data`, which autograd nodes of an earlier backward do not follow.
    inp.weight = nn.Parameter(inp.weight.detach())
    if out is not None:
        out.weight = inp.weight if tied else nn.Parameter(out.weight.detach())
    with torch.no_grad():
        inp.weight[new_id:] = inp.weight[:rows].mean(0)
        if out is not None and not tied:
            out.weight[new_id:] = out.weight[:rows].mean(0)
    return new_id, token
