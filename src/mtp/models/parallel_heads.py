"""Parallel multi-token prediction heads on a shared trunk (Gloeckle et al. 2024).

A decoder with L layers becomes a trunk (its first `num_trunk_layers` layers, shared) and `num_heads` heads, each
a stack of the remaining L - num_trunk_layers layers. Head 0 is the original top of the model (predicts token
t+1); head i starts as a copy of it and learns to predict token t+1+i. All heads share the final norm and the
unembedding. The Hugging Face model is kept whole inside (`self.base`): with one head this *is* the base model,
and its weights save under their usual names, so transformers can still load the folder as a plain LM.

    input_ids ─ embed ─ trunk layers ─┬─ head 0 layers (base) ─┐
                                      ├─ head 1 layers (copy) ─┼─ norm ─ lm_head ─ logits (B, T, n, V)
                                      └─ ...                  ─┘

With a next-token input (`add_next_token_input`), the extra heads at position t read the trunk's output plus a
learned projection of token t+1's embedding: the token head 0 predicts there, which decoding has verified by the
time the drafts are made (Hydra and EAGLE feed drafters the same token). The heads stay parallel: they all read
the same input. On 1,100 self-answered GSM8K rows it lifts head 1's held-out top-1 from 0.56 to 0.61.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtp.arguments import check_values
from mtp.decoding.inputs import token_batch
from mtp.errors import CheckpointMismatchError, MTPError
from mtp.io import as_path, atomic_folder, check_replaceable
from mtp.models.backbones import backbone_for
from mtp.models.cache import MTPCache, additive_mask
from mtp.models.folder_kind import FORMAT_VERSION, MASK_TOKENS_METHOD, WEIGHTS_NAME, read_mtp_section
from mtp.models.packed import BlockedWeights, blocked_linear, blocked_pays
from mtp.models.safetensors_io import INDEX_NAME, SHARD_NAMES
from mtp.models.weight_state import kept_copy

EXTRA_HEADS_PREFIX = "extra_heads."
NEXT_TOKEN_PREFIX = "next_token_in."  # the extra heads' projection of the next token's embedding
OWN_PREFIXES = (EXTRA_HEADS_PREFIX, NEXT_TOKEN_PREFIX)  # weights outside the base model
DRAFT_VOCAB_KEY = "mtp.draft_vocab"
# What a model folder holds: what `save_pretrained` writes (transformers names the tokenizer files, by kind).
MODEL_FILES = frozenset({
    "config.json", WEIGHTS_NAME, INDEX_NAME, *SHARD_NAMES, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})


@dataclass
class ForwardContext:
    """What the trunk computed once per forward and every head reuses: mask, positions, rotary tables."""

    mask: torch.Tensor | None
    valid: torch.Tensor  # (B, T) real tokens of this block (False: left padding)
    position_ids: torch.Tensor  # (B, T)
    shared: dict
    cache: MTPCache | None


class MTPModel(nn.Module):
    # Set by `mtp.models.quantize`: weights packed for CPU decoding ("fp16", "int8"), and whether the fp32 copies
    # of the packed weights were dropped (`decode_only`). Such a model decodes; it is not trained, cast or loaded into.
    quantized: str | None = None
    decode_only: bool = False

    def __init__(self, base: nn.Module, num_heads: int = 4, num_trunk_layers: int | None = None):
        super().__init__()
        check_base(base)
        check_values({"num_heads": num_heads, "num_trunk_layers": num_trunk_layers}, flags=False)
        self.base = base
        self.backbone = backbone_for(base)
        num_layers = len(self.backbone.layers)
        if num_trunk_layers is None:
            num_trunk_layers = num_layers - 1
        if not 0 <= num_trunk_layers < num_layers:
            raise MTPError(f"num_trunk_layers must be in [0, {num_layers - 1}] for a {num_layers}-layer model, "
                           f"got {num_trunk_layers}")
        self.num_heads = num_heads
        self.num_trunk_layers = num_trunk_layers
        head0 = self.backbone.layers[num_trunk_layers:]
        # Extra heads start as copies of head 0 (the original top layers); training makes them predict further.
        self.extra_heads = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(layer) for layer in head0) for _ in range(num_heads - 1)
        )
        # Token ids the extra heads may predict (None: all). Not a weight: saved as DRAFT_VOCAB_KEY, and moved
        # with the model (a non-persistent buffer).
        self.next_token_in: nn.Linear | None = None  # `add_next_token_input`
        self.register_buffer("draft_vocab", None, persistent=False)
        self.register_buffer("_draft_index", None, persistent=False)
        self._kept: dict = {}  # copies made from weights for decoding (`kept_copy`): the draft vocabulary's rows
        self.packed_draft_head: nn.Module | None = None  # set by quantize_for_decoding when the unembedding is packed
        self.blocked = BlockedWeights()  # the unembedding's fp32 weights for oneDNN (CPU decoding, `lm_head`)
        self.set_fast_decoding("fp32" if self.backbone.supports_fast_layers else None)
        self.tokenizer = None  # attached by loaders; saved with the model when present
        self.source = None  # where the weights came from (mtp.hub.ModelSource), for `mtp info`

    # ---------------------------------------------------------------- construction and structure
    @classmethod
    def from_base(cls, base, num_heads: int = 4, num_trunk_layers: int | None = None, tokenizer=None,
                  **load_kwargs) -> MTPModel:
        """Wrap a transformers causal LM object, or load one by name/path first (see `mtp.hub`), with its
        tokenizer (`tokenizer`, or the one loaded with it): what `save_pretrained` writes beside the weights."""
        source = None
        if isinstance(base, str | os.PathLike):
            from mtp.hub import load_base_model

            base, loaded, source = load_base_model(str(base), **load_kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded
        model = cls(base, num_heads=num_heads, num_trunk_layers=num_trunk_layers)
        model.tokenizer, model.source = tokenizer, source
        return model

    def add_next_token_input(self) -> MTPModel:
        """Give the extra heads the next token's embedding as an input (see the module's docstring), through a
        projection that starts at zero: the model computes what it did before until it is trained. Returns the
        model; a model that has one keeps it."""
        if self.next_token_in is None:
            h = self.config.hidden_size
            weight = self.base.get_input_embeddings().weight
            self.next_token_in = nn.Linear(h, h, bias=False, device=weight.device,
                                           dtype=next(self.extra_heads.parameters(), weight).dtype)
            if not weight.is_meta:
                nn.init.zeros_(self.next_token_in.weight)
        return self

    @property
    def reads_next_token(self) -> bool:
        """Whether the extra heads read the next token (`add_next_token_input`)."""
        return self.next_token_in is not None

    def head_modules(self) -> list[nn.Module]:
        """What training the extra heads trains: their layers, and the next-token projection if there is one."""
        return [self.extra_heads] + ([self.next_token_in] if self.next_token_in is not None else [])

    @property
    def config(self):
        return self.base.config

    @property
    def num_layers(self) -> int:
        return len(self.backbone.layers)

    @property
    def trunk_layers(self) -> nn.ModuleList:
        return self.backbone.layers[: self.num_trunk_layers]

    def head_layers(self, head: int) -> nn.ModuleList:
        return self.backbone.layers[self.num_trunk_layers:] if head == 0 else self.extra_heads[head - 1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The hidden states' dtype: the embedding's output (its table may be stored in fp16 while it computes in
        fp32, `mtp.models.packed.HalfEmbedding`; the unembedding may be packed)."""
        embedding = self.base.get_input_embeddings()
        return getattr(embedding, "out_dtype", None) or embedding.weight.dtype

    def frozen_trunk_in(self, dtype: torch.dtype) -> MTPModel:
        """For heads-only training: everything that stays frozen (embeddings, trunk, head 0, final norm,
        unembedding) in `dtype` (bf16: half the memory of the largest part), the extra heads kept in fp32 as master
        weights (their updates are too small for bf16). Train under autocast in the same dtype (`--autocast
        bfloat16`), which runs the heads' matmuls in it and accumulates their gradients in fp32. Returns the model."""
        self.to(dtype)
        for module in self.head_modules():
            module.float()
        return self

    def set_fast_decoding(self, weights: str | None) -> None:
        """Decode (cached, no-grad forwards) with the lean layer step, weights "fp32" or "fp16"; None: the
        Hugging Face layers everywhere. On by default (fp32) for the Llama family."""
        layers = list(self.backbone.layers) + [layer for head in self.extra_heads for layer in head]
        self.backbone.use_fast_layers(layers, weights)
        self.fast_decoding = weights

    kind = "parallel_heads"  # what decoding drafts with (`mtp.decoding.drafters.drafter_for`) and checkpoints hold

    def draft_depth(self, k: int | None = None) -> int:
        """How many tokens past the next one the model drafts: one per extra head."""
        return self.num_heads - 1

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> MTPCache:
        layers = [self.num_trunk_layers] + [len(self.head_layers(h)) for h in range(self.num_heads)]
        return MTPCache(batch_size, max_len, num_stacks=1 + self.num_heads, device=self.device, stack_layers=layers,
                        static=static)

    # ---------------------------------------------------------------- forward pieces (used by decoding, training)
    def trunk_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: MTPCache | None = None, offsets: torch.Tensor | None = None,
                      within: torch.Tensor | None = None) -> tuple[torch.Tensor, ForwardContext]:
        """Embed and run the trunk. With a cache, `input_ids` are the next T tokens after what it holds;
        `offsets` and `within` lay out a block that is not a chain (`MTPCache.prepare_block`). No
        `attention_mask`: every token is real."""
        b, t = input_ids.shape
        valid = (torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                 else attention_mask.bool())  # (B, T)
        dtype = self.activation_dtype
        if cache is not None:
            mask, position_ids = cache.prepare_block(valid, dtype, offsets, within, all_valid=attention_mask is None)
        else:
            mask, position_ids = _uncached_mask(valid, dtype, self.config)
        hidden = self.backbone.embed(input_ids, position_ids)  # (B, T, H)
        shared = self.backbone.layer_inputs(hidden, position_ids, cache.max_len if cache is not None else None)
        ctx = ForwardContext(mask, valid, position_ids, shared, cache)
        stack = cache.stack(0) if cache is not None else None
        for layer in self.trunk_layers:  # the embeddings, then each layer's output, are read by the next layer only
            hidden = self.backbone.run_layer(layer, hidden, mask, stack, shared, reuse_input=True)
        return hidden, ctx

    def extra_head_input(self, trunk_hidden: torch.Tensor, next_ids: torch.Tensor | None) -> torch.Tensor:
        """What the extra heads read at each position (B, T, H): the trunk's output, plus the projected
        embedding of the token after the position, `next_ids` (B, T), when the model reads the next token."""
        if self.next_token_in is None:
            return trunk_hidden
        if next_ids is None:
            raise MTPError("this model's extra heads read the next token: pass next_ids (next_token_ids gives the "
                           "input's own, decoding passes head 0's)")
        embedded = self.base.get_input_embeddings()(next_ids)  # (B, T, H)
        weight = getattr(self.next_token_in, "weight", None)
        if isinstance(weight, torch.Tensor):  # (int8-quantised it is a method, fp16-packed absent: both take fp32)
            embedded = embedded.to(weight.dtype)  # fp32 master weights beside a bf16 frozen trunk
        return trunk_hidden + self.next_token_in(embedded).to(trunk_hidden.dtype)

    def head_forward(self, head: int, trunk_hidden: torch.Tensor, ctx: ForwardContext,
                     next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run head `head`'s layers on the trunk output (an extra head: on `extra_head_input`) and the shared final
        norm: (B, T, H)."""
        if head > 0:
            trunk_hidden = self.extra_head_input(trunk_hidden, next_ids)
        return self._run_head(head, trunk_hidden, ctx)

    def _run_head(self, head: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        stack = ctx.cache.stack(1 + head) if ctx.cache is not None else None
        for i, layer in enumerate(self.head_layers(head)):  # every head reads the trunk's output: left as it is
            hidden = self.backbone.run_layer(layer, hidden, ctx.mask, stack, ctx.shared, reuse_input=i > 0)
        return self.backbone.final_norm(hidden, ctx.shared, cached=ctx.cache is not None)

    def extra_heads_forward(self, heads: int, trunk_hidden: torch.Tensor, ctx: ForwardContext,
                            next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Extra heads 1..heads-1 on the trunk output: (B, T, heads - 1, H). Through a cache on a GPU they run
        together, layer i of every head as one wide layer (`fast_llama.FastHeadStack`; their keys and values in
        head 1's cache stack). The next-token head always runs alone (`head_forward(0, ...)`), as in a greedy
        step, so verifying computes greedy's tokens."""
        extra = range(1, heads)
        if not extra:
            return trunk_hidden[:, :, None, :][:, :, :0]
        hidden = self.extra_head_input(trunk_hidden, next_ids)  # every extra head reads the same input
        depths = {len(self.head_layers(j)) for j in extra}
        if ctx.cache is not None and len(extra) > 1 and len(depths) == 1:
            levels = [[self.head_layers(j)[i] for j in extra] for i in range(depths.pop())]
            stacked = self.backbone.run_head_stack(levels, hidden, ctx.mask, ctx.cache.stack(2),
                                                   ctx.shared)  # (heads - 1, B, T, H)
            if stacked is not None:
                return stacked.permute(1, 2, 0, 3)
        return torch.stack([self._run_head(j, hidden, ctx) for j in extra], dim=2)

    def rewrite_extra_heads(self, heads: int, trunk_hidden: torch.Tensor, next_ids: torch.Tensor | None,
                            cache: MTPCache, slots: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Run extra heads 1..heads-1 over tokens the cache already holds at `slots` (B, T) (at most each row's
        length), from their trunk outputs (B, T, H), next tokens (B, T) and positions (B, T): their keys and
        values are written there. Decoding's plain steps leave the extra heads out; this catches them up before
        the heads draft again."""
        mask = cache.prepare_rewrite(slots, self.activation_dtype)
        shared = self.backbone.layer_inputs(trunk_hidden, position_ids, cache.max_len)
        ctx = ForwardContext(mask, torch.ones_like(slots, dtype=torch.bool), position_ids, shared, cache)
        self.extra_heads_forward(heads, trunk_hidden, ctx, next_ids)

    def finish_block(self, ctx: ForwardContext) -> None:
        """Keep the whole block in the cache once every stack has written its keys and values (decoding instead
        keeps what its verifier accepted: `MTPCache.keep_path`)."""
        if ctx.cache is not None:
            ctx.cache.commit()

    def _apply(self, fn, recurse: bool = True):
        """`Module.to`, `.float()`, ...: the blocked copies of the weights (fp32 CPU decoding) are dropped first,
        since the parameters keep their objects and may get their storage where the old one was. A model packed
        for decoding stays on the CPU in fp32 (its packed matmuls take nothing else): another dtype or device is
        an MTPError, not oneDNN's or fbgemm's error at the next call."""
        if self.quantized is not None or self.decode_only:
            probe = fn(torch.zeros(1))
            if probe.dtype != torch.float32 or probe.device.type != "cpu":
                raise MTPError(f"this model's weights are packed for CPU decoding ({self._packed_kind()}): it decodes "
                               f"in fp32 on the CPU only; load it again for {probe.dtype} on {probe.device.type}")
        self.drop_blocked_weights()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        """The first line of `repr(model)`: what the module tree below it does not say."""
        packed = f", packed for decoding: {self._packed_kind()}" if self.quantized or self.decode_only else ""
        return (f"num_heads={self.num_heads}, num_trunk_layers={self.num_trunk_layers} of {self.num_layers}, "
                f"next_token_input={self.reads_next_token}, draft_vocab="
                f"{None if self.draft_vocab is None else self.draft_vocab.numel()}{packed}")

    def _packed_kind(self) -> str:
        return f"{self.quantized or 'fp32 blocked'}{', decode-only' if self.decode_only else ''}"

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, refused for a model packed for decoding (its packed matmuls hold copies of
        the weights the state dict does not reach): load the weights into an unpacked model, then pack it."""
        if self.quantized is not None or self.decode_only:
            raise MTPError(f"this model's weights are packed for CPU decoding ({self._packed_kind()}): load the "
                           "weights into the model before packing it (mtp.load, or quantize_for_decoding after)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def drop_blocked_weights(self) -> None:
        """Forget the blocked copies of the weights (`mtp.models.packed.BlockedWeights`); the next fp32 CPU
        decoding step makes them again."""
        if "blocked" in self.__dict__:
            self.blocked = BlockedWeights()
        backbone = self.__dict__.get("backbone")
        for layer in (getattr(backbone, "fast_layers", None) or {}).values():
            layer.blocked = BlockedWeights()

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden states (..., H) -> logits (..., V), as the base model's forward computes them."""
        head = self.backbone.lm_head
        if type(head) is nn.Linear and blocked_pays(hidden):  # fp32 CPU decoding (`mtp.models.packed`)
            logits = self._blocked_linear("lm_head", hidden, head.weight, head.bias)
        else:
            logits = head(hidden)
        return self.backbone.scale_logits(logits)

    def _blocked_linear(self, name: str, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear over a blocked copy of `weight`, or over `weight` where there is no memory for one."""
        blocked = self.blocked.get(name, (weight,), (bias,))
        if blocked is None:
            return F.linear(x, weight, bias)
        return blocked_linear(x, blocked[0], blocked[1], blocked[2][0][1])

    # ---------------------------------------------------------------- draft vocabulary of the extra heads
    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Restrict what heads 1..n-1 predict to `token_ids` (None: the whole vocabulary).

        Large vocabularies make the unembedding the costliest part of training heads and of drafting, while
        drafts come from a small set of frequent tokens (FR-Spec, Zhao et al. 2025). Head 0 keeps the whole
        vocabulary and verifies every draft, so decoding stays lossless; a draft outside the set is never
        proposed, which only costs acceptance.
        """
        self._kept.pop("draft_rows", None)
        self.packed_draft_head = None
        if token_ids is None:
            self.draft_vocab = self._draft_index = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted
        vocab = self.config.vocab_size
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise MTPError(f"a draft vocabulary needs token ids in [0, {vocab}), got {ids.numel()} ids")
        device = self.device
        index = torch.full((vocab,), -1, dtype=torch.long)
        index[ids] = torch.arange(ids.numel())
        self.draft_vocab, self._draft_index = ids.to(device), index.to(device)

    def draft_targets(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> their column in `draft_logits` (-1 outside the draft vocabulary); identity without one."""
        return token_ids if self.draft_vocab is None else self._draft_index[token_ids]

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """An extra head's normed hidden state (..., H) -> logits over the draft vocabulary (..., K): only
        those rows of the unembedding are computed (training, held-out accuracy). Without a draft
        vocabulary: all V logits."""
        if self.draft_vocab is None:
            return self.lm_head(hidden)
        head = self.backbone.lm_head
        if self.packed_draft_head is not None:
            logits = self.packed_draft_head(hidden)  # (..., K)
        elif type(head) is not nn.Linear:  # quantised for decoding: no weight rows to pick
            return self.lm_head(hidden)[..., self.draft_vocab]
        else:
            rows, bias = self.draft_rows(head)
            blocked = blocked_pays(hidden)
            logits = self._blocked_linear("draft_rows", hidden, rows, bias) if blocked else F.linear(hidden, rows, bias)
        return self.backbone.scale_logits(logits)  # (..., K)

    def draft_rows(self, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft vocabulary's rows of the unembedding's weight and bias. While gradients are on they are
        gathered at each call (training: they may train, and autograd needs the gather); otherwise (decoding)
        they are kept until the weight changes, which saves a K x H copy per step."""
        vocab = self.draft_vocab
        if torch.is_grad_enabled():
            return head.weight[vocab], head.bias[vocab] if head.bias is not None else None

        def rows() -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = head.bias[vocab].detach().clone() if head.bias is not None else None
            return head.weight[vocab].detach().clone(), bias

        return kept_copy(self._kept, "draft_rows", (head.weight, vocab), rows, extra=(vocab.device,))

    def restrict_to_draft_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) of extra heads with every token outside the draft vocabulary at the
        lowest value (never the argmax, probability 0); unchanged without a draft vocabulary."""
        if self.draft_vocab is None:
            return logits
        outside = self._draft_index < 0  # (V,)
        return logits.masked_fill(outside, torch.finfo(logits.dtype).min)

    def next_token_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token head's final hidden states (B, T, H) of a plain forward, before the unembedding: what
        scoring reads at the positions it needs (`lm_head` of those only, not of all T)."""
        trunk, ctx = self.trunk_forward(input_ids, attention_mask)
        return self._run_head(0, trunk, ctx)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_all_heads: bool = False, cache: MTPCache | None = None) -> torch.Tensor:
        """Logits `(B, T, n, V)` with `return_all_heads`, else `(B, T, 1, V)` from the next-token head (Meta's API).

        With a cache, every head's layers still run (their caches must stay complete), only the unembedding of
        the heads not asked for is skipped. Malformed input (dtype, shape, device, ids outside the vocabulary)
        is an MTPError saying what (`mtp.decoding.inputs.token_batch`).
        """
        if self.training and self.quantized is not None and torch.is_grad_enabled():
            raise MTPError(f"this model's weights are packed for CPU decoding ({self._packed_kind()}): no gradient "
                           "reaches them; train the fp32 model, then pack it")
        input_ids, attention_mask = token_batch(self, input_ids, attention_mask)
        trunk, ctx = self.trunk_forward(input_ids, attention_mask, cache)
        heads = self.num_heads if (return_all_heads or cache is not None) else 1
        first = self.lm_head(self._run_head(0, trunk, ctx))[:, :, None]  # (B, T, 1, V)
        next_ids = None
        if heads > 1 and self.reads_next_token:  # after the last token: head 0's, as decoding feeds them
            next_ids = next_token_ids(input_ids, first[:, -1, 0].argmax(-1))
        extra = self.extra_heads_forward(heads, trunk, ctx, next_ids)  # (B, T, heads - 1, H)
        self.finish_block(ctx)
        if not return_all_heads or heads == 1:
            return first
        return torch.cat([first, self.restrict_to_draft_vocab(self.lm_head(extra))], dim=2)  # (B, T, n, V)

    def can_generate(self) -> bool:
        """What transformers' pipelines ask before they call `generate` (`pipeline("text-generation", model=m)`)."""
        return True

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """transformers' `generate`: a LongTensor (B, P + N) of prompts and new tokens (`return_dict_in_generate`:
        an output with `.sequences`, `.stats`, `.texts`); takes `**tokenizer(...)`, `max_new_tokens`, `do_sample`,
        `generation_config`, ... and mtp's arguments (`use_speculative=True`, `strategy`, `tau`, ...). See
        `mtp.decoding.hf_generate`; `mtp.decoding.generate.generate` returns the rich `GenerationResult`."""
        from mtp.decoding.hf_generate import hf_generate

        return hf_generate(self, input_ids, attention_mask, **kwargs)

    @property
    def generation_config(self):
        """The base model's `GenerationConfig` (its end and pad tokens, ...): what `generate` falls back on."""
        return getattr(self.base, "generation_config", None)

    # ---------------------------------------------------------------- checkpoints
    def mtp_config(self) -> dict:
        config = {"num_heads": self.num_heads, "num_trunk_layers": self.num_trunk_layers, "format_version": FORMAT_VERSION}
        if self.next_token_in is not None:
            config["next_token_input"] = True
        if self.draft_vocab is not None:
            config["draft_vocab_size"] = int(self.draft_vocab.numel())
        return config

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Base weights under their Hugging Face names, extra heads as `extra_heads.{head-1}.{layer}.*`.

        A weight tied to another (the unembedding to the embedding) is stored once, as transformers does.
        """
        state = {}
        seen: dict[int, str] = {}
        for name, tensor in self.state_dict().items():
            key = name.removeprefix("base.")
            ptr = tensor.data_ptr()
            if ptr in seen and tensor.numel() > 0:
                continue
            seen[ptr] = key
            state[key] = tensor.detach().contiguous()
        if self.draft_vocab is not None:
            state[DRAFT_VOCAB_KEY] = self.draft_vocab.detach().cpu().contiguous()
        return state

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None, weights=None,
                        overwrite: bool = False, frozen_apart: bool = False, link_from: Path | None = None) -> Path:
        """Write config.json (base config + `mtp` section), model.safetensors and tokenizer files, atomically.

        An existing folder is replaced only when it holds nothing but a model's files (`MODEL_FILES`), or with
        `overwrite=True`; an existing file is refused before anything is written.
        The weights are written one tensor at a time from the model's own memory (no serialised copy), or,
        with `weights` (a function of a checkpoint name), from what it returns: then the model may be `empty`
        and only one tensor exists at a time (streaming conversions). `frozen_apart`: the weights that do not
        require grad in a shard of their own, hard-linked from `link_from`'s where it holds them (training's
        checkpoints: `mtp.models.safetensors_io.write_weights`)."""
        frozen = frozen_names(self) if frozen_apart else ()
        if weights is None:
            state = self.checkpoint_state_dict()
            shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
            weights = state.__getitem__
        else:
            tied = _tied_aliases(self)
            shapes = {k: (tuple(t.shape), t.dtype) for k, t in
                      ((n.removeprefix("base."), t) for n, t in self.state_dict(keep_vars=True).items())
                      if k not in tied}
        return write_model_folder(directory, self.base, self.mtp_config(), shapes, weights,
                                  tokenizer if tokenizer is not None else self.tokenizer, overwrite, frozen, link_from)

    @classmethod
    def empty(cls, config, num_heads: int, num_trunk_layers: int, dtype: torch.dtype = torch.float32,
              next_token_input: bool = False) -> MTPModel:
        """The model for `config` with every parameter on the meta device (no memory, no initialisation), to be
        filled by `materialise`. Buffers (rotary frequencies) are real: they are computed, not loaded."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with _skip_weight_init(), init_empty_weights(include_buffers=False):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        base.tie_weights()  # no_init_weights also skips (and blocks) the tying that from_config normally does
        with init_empty_weights(include_buffers=False):
            model = cls(base, num_heads=num_heads, num_trunk_layers=num_trunk_layers)
            return model.add_next_token_input() if next_token_input else model

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, load_tokenizer: bool = True,
                        tensor_dtype=None) -> MTPModel:
        """Load a folder written by `save_pretrained`. Mismatched tensors raise an error naming them.

        The model is built without weights (meta device) and each tensor is read from model.safetensors straight
        into its place, in `dtype` on `device`: loading holds one copy of the weights, plus one tensor while
        converting a dtype. `tensor_dtype(name)` (optional) picks another dtype per floating-point tensor (None:
        `dtype`), e.g. fp16 for the weights about to be packed."""
        from transformers import AutoConfig

        from mtp.hub import ModelSource, check_finite_weights, check_tree_statistics
        from mtp.hub import load_tokenizer as read_tokenizer  # (not the argument's name)
        from mtp.models.safetensors_io import FolderWeights, check_floating
        from mtp.runtime import resolve_device

        device = resolve_device(device)  # a device this torch cannot use: an MTPError before anything is read
        directory = as_path(directory, "directory")
        mtp_cfg = read_mtp_section(directory)
        if mtp_cfg.get("method") == MASK_TOKENS_METHOD:
            raise MTPError(f"{directory} is a mask-token model: load it with MaskTokenModel.from_pretrained (or "
                           "mtp.models.loading.load_mtp_model, which loads either kind)")
        if not all(isinstance(mtp_cfg.get(k), int) for k in ("num_heads", "num_trunk_layers")):
            raise MTPError(f"{directory / 'config.json'}: the \"mtp\" section needs integers num_heads and "
                           "num_trunk_layers")
        check_tree_statistics(directory)
        config = AutoConfig.from_pretrained(directory)
        if not isinstance(mtp_cfg.get("next_token_input", False), bool):
            raise MTPError(f"{directory / 'config.json'}: \"next_token_input\" in the \"mtp\" section must be true "
                           "or false")
        model = cls.empty(config, mtp_cfg["num_heads"], mtp_cfg["num_trunk_layers"], dtype,
                          mtp_cfg.get("next_token_input", False))
        with FolderWeights(directory) as reader:
            weights = reader.path
            model.check_checkpoint_shapes(reader.shapes(), source=str(weights))
            check_floating({k: t.dtype for k, t in reader.tensors.items()}, model.named_checkpoint_tensors(),
                           str(weights))
            names = [k for k in reader.tensors if k != DRAFT_VOCAB_KEY]
            model.materialise(names, lambda key: reader.read(key, _pick_dtype(reader, key, dtype, tensor_dtype),
                                                              device))
            model.set_draft_vocab(reader.read(DRAFT_VOCAB_KEY) if DRAFT_VOCAB_KEY in reader.tensors else None)
        model.to(device).eval()  # the buffers
        check_finite_weights(model, str(weights))
        model.source = ModelSource("mtp_folder", str(directory), f"MTP folder {directory}")
        if load_tokenizer and (directory / "tokenizer_config.json").is_file():
            model.tokenizer = read_tokenizer(directory)
        return model

    @classmethod
    def from_hf_folder(cls, directory: str | os.PathLike, num_heads: int = 4, num_trunk_layers: int | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       tensor_dtype=None) -> MTPModel | None:
        """A plain Llama-family Hugging Face folder with safetensors weights (one file or shards) as an MTP model,
        loaded the way `from_pretrained` loads (meta device, each tensor read into place; extra heads read as copies
        of head 0's layers), or None when the folder is not that simple (then load it with transformers)."""
        from transformers import AutoConfig, GenerationConfig

        from mtp.hub import check_finite_weights, load_tokenizer
        from mtp.models.backbones import LLAMA_FAMILY
        from mtp.models.safetensors_io import FolderWeights, check_floating, has_weights

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not has_weights(directory):
            return None
        config = AutoConfig.from_pretrained(directory)
        if getattr(config, "model_type", None) not in LLAMA_FAMILY:
            return None
        layers = int(config.num_hidden_layers)
        trunk = layers - 1 if num_trunk_layers is None else num_trunk_layers
        if num_heads < 1 or not 0 <= trunk < layers:
            return None  # the constructor's errors come from the usual path
        model = cls.empty(config, num_heads, trunk, dtype)
        with FolderWeights(directory) as reader:
            weights = reader.path
            sources = {k: k for k in reader.tensors}
            for j in range(num_heads - 1):
                for i in range(layers - trunk):
                    prefix = f"model.layers.{trunk + i}."
                    sources.update({f"{EXTRA_HEADS_PREFIX}{j}.{i}.{k.removeprefix(prefix)}": k
                                    for k in reader.tensors if k.startswith(prefix)})
            try:
                model.check_checkpoint_shapes({n: reader.tensors[k].shape for n, k in sources.items()}, str(weights))
            except CheckpointMismatchError:
                return None
            check_floating({n: reader.tensors[k].dtype for n, k in sources.items()}, model.named_checkpoint_tensors(),
                           str(weights))
            model.materialise(list(sources), lambda n: reader.read(
                sources[n], _pick_dtype(reader, sources[n], dtype, tensor_dtype and (lambda _: tensor_dtype(n))),
                device))
        model.to(device).eval()
        check_finite_weights(model, str(weights))
        if (directory / "generation_config.json").is_file():
            model.base.generation_config = GenerationConfig.from_pretrained(directory)
        if (directory / "tokenizer_config.json").is_file():
            model.tokenizer = load_tokenizer(directory)
        return model

    def named_checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors under the names a checkpoint gives them (`checkpoint_state_dict`)."""
        return {name.removeprefix("base."): t for name, t in self.state_dict().items()}

    def check_checkpoint_shapes(self, shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> None:
        """Raise `CheckpointMismatchError` naming every missing, unexpected and mis-shaped tensor of a checkpoint
        (`shapes`: its names, under `checkpoint_state_dict`'s names, and shapes)."""
        shapes = {k: tuple(s) for k, s in shapes.items() if k != DRAFT_VOCAB_KEY}
        expected = {name: tuple(t.shape) for name, t in self.named_checkpoint_tensors().items()}
        tied = _tied_aliases(self)
        missing = sorted(k for k in expected if k not in shapes and k not in tied)
        extra = sorted(k for k in shapes if k not in expected)
        misshaped = sorted(f"{k} (checkpoint {shapes[k]}, model {expected[k]})"
                           for k in shapes if k in expected and shapes[k] != expected[k])
        if missing or extra or misshaped:
            parts = []
            for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
                if names:
                    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                    parts.append(f"{label}: {shown}")
            raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(parts))

    def materialise(self, names, read) -> None:
        """Put tensor `read(name)` in place of each checkpoint name (as `checkpoint_state_dict` names them), by
        assignment: no copy into existing memory, so a model built by `empty` gets its weights without a second
        copy. Tied weights stay tied (every module sharing a tensor gets the new one). Names must have been
        checked (`check_checkpoint_shapes`); anything left on the meta device afterwards is an error."""
        slots: dict[int, list[tuple[nn.Module, str]]] = {}
        by_name: dict[str, torch.Tensor] = {}
        for mod_name, module in self.named_modules(remove_duplicate=False):
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is None:
                    continue
                where = slots.setdefault(id(t), [])
                if (module, attr) not in where:
                    where.append((module, attr))
                by_name.setdefault(f"{mod_name}.{attr}".removeprefix("base."), t)
        for name in names:
            old = by_name[name]
            tensor = read(name)
            new = nn.Parameter(tensor, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else tensor
            for module, attr in slots[id(old)]:
                if attr in module._parameters:
                    module._parameters[attr] = new
                else:
                    module._buffers[attr] = new
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointMismatchError(f"no weights loaded for: {', '.join(left[:5])}")

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a `checkpoint_state_dict` into the model; its draft vocabulary (or none) comes with it."""
        state = dict(state)
        draft_vocab = state.pop(DRAFT_VOCAB_KEY, None)
        self.check_checkpoint_shapes({k: tuple(t.shape) for k, t in state.items()}, source)
        full = {("base." + k if not k.startswith(OWN_PREFIXES) else k): v for k, v in state.items()}
        self.load_state_dict(full, strict=False)
        self.set_draft_vocab(draft_vocab)


def next_token_ids(input_ids: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) -> the token after each position (B, T): the input's own, then `last` (B,) after the final one (0
    without it: training has no target there)."""
    after = input_ids.new_zeros(input_ids.shape[0], 1) if last is None else last[:, None].to(input_ids.dtype)
    return torch.cat([input_ids[:, 1:], after], 1)


def check_base(base) -> None:
    """The Python API is given a transformers causal LM, not its name (`from_base` and `from_pretrained` load)."""
    if not isinstance(base, nn.Module) or not hasattr(base, "config"):
        raise MTPError(f"expected a transformers causal LM (a torch module with a config), got {type(base).__name__}; "
                       "load one by name or folder with from_base, or an mtp folder with from_pretrained")


def _pick_dtype(reader, key: str, dtype: torch.dtype, tensor_dtype) -> torch.dtype | None:
    if not reader.tensors[key].dtype.is_floating_point:
        return None  # ids (the draft vocabulary) stay as stored
    return (tensor_dtype(key) if tensor_dtype is not None else None) or dtype


def packing_dtypes(name: str) -> torch.dtype | None:
    """`tensor_dtype` for a Llama-family model about to be fp16-packed for decoding: the decoder layers'
    projection weights, the embedding table and the unembedding load in fp16 (packing rounds them to fp16
    anyway, fp16 -> fp32 -> fp16 is exact, and a decode-only model keeps its embedding table in fp16), the rest
    as asked."""
    in_layer = ".layers." in f".{name}" or name.startswith(EXTRA_HEADS_PREFIX)
    if in_layer and name.endswith("_proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight"):
        return torch.float16
    return None



def write_model_folder(directory: str | os.PathLike, base, mtp_section: dict, shapes: dict, weights,
                       tokenizer=None, overwrite: bool = False, frozen=(), link_from: Path | None = None) -> Path:
    """An mtp model folder, atomically: config.json (the base config plus `mtp_section`), model.safetensors written
    one tensor at a time (`weights(name)` for each name of `shapes`; the `frozen` ones apart, see `write_weights`),
    generation config, tokenizer files. A folder holding anything else is refused unless `overwrite` (replacing it
    would delete those files)."""
    from mtp.models.safetensors_io import write_weights

    directory = as_path(directory, "directory")
    check_replaceable(directory, MODEL_FILES, overwrite)
    with atomic_folder(directory) as tmp:
        config = base.config.to_dict()
        config["mtp"] = mtp_section
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_weights(tmp, shapes, weights, frozen, link_from)
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # generation config is optional, a bad one must not block saving weights
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory

def frozen_names(model: nn.Module) -> set[str]:
    """The names in `model.checkpoint_state_dict()` whose tensors are parameters that do not require grad (and are
    not also a trained parameter's storage): what a training run leaves as it found it."""
    trained = {p.data_ptr() for p in model.parameters() if p.requires_grad and p.numel()}
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad and p.numel()} - trained
    return {name for name, t in model.checkpoint_state_dict().items() if t.numel() and t.data_ptr() in frozen}


def _tied_aliases(model: MTPModel) -> set[str]:
    """Names whose tensor is an earlier name's (e.g. lm_head.weight tied to embeddings): the same object, or the
    same storage (meta tensors have none, so only identity counts for them)."""
    seen_ids: set[int] = set()
    seen_ptrs: set[int] = set()
    aliases = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = name.removeprefix("base.")
        tensor = t.data if isinstance(t, nn.Parameter) else t
        ptr = None if tensor.is_meta or tensor.numel() == 0 else tensor.data_ptr()
        if id(t) in seen_ids or (ptr is not None and ptr in seen_ptrs):
            aliases.add(key)
        seen_ids.add(id(t))
        if ptr is not None:
            seen_ptrs.add(ptr)
    return aliases


def _skip_weight_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _uncached_mask(valid: torch.Tensor, dtype: torch.dtype, config) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Causal mask for a forward without cache: None when nothing is padded and sdpa applies causality itself."""
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, T): left padding does not shift positions
    if bool(valid.all()) and getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return None, position_ids
    t = valid.shape[1]
    idx = torch.arange(t, device=valid.device)
    allowed = valid[:, None, :] & (idx[None, None, :] <= idx[None, :, None])  # (B, T, T)
    allowed |= idx[None, None, :] == idx[None, :, None]
    return additive_mask(allowed, dtype), position_ids  # (B, 1, T, T)
