"""Parallel multi-token prediction heads on a shared trunk (Gloeckle et al. 2024).

A decoder with L layers becomes a trunk (its first `num_trunk_layers` layers, shared) and `num_heads` heads, each
a stack of the remaining L - num_trunk_layers layers. Head 0 is the original top of the model (predicts token
t+1); head i starts as a copy of it and learns to predict token t+1+i. All heads share the final norm and the
unembedding. The Hugging Face model is kept whole inside (`self.base`): with one head this *is* the base model,
and its weights save under their usual names, so transformers can still load the folder as a plain LM.

    input_ids ─ embed ─ trunk layers ─┬─ head 0 layers (base) ─┐
                                      ├─ head 1 layers (copy) ─┼─ norm ─ lm_head ─ logits (B, T, n, V)
                                      └─ ...                  ─┘
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

from mtp.decoding.inputs import token_batch
from mtp.errors import CheckpointMismatchError, MTPError
from mtp.io import atomic_folder
from mtp.models.backbones import backbone_for
from mtp.models.cache import MTPCache

WEIGHTS_NAME = "model.safetensors"
EXTRA_HEADS_PREFIX = "extra_heads."
DRAFT_VOCAB_KEY = "mtp.draft_vocab"


@dataclass
class ForwardContext:
    """What the trunk computed once per forward and every head reuses: mask, positions, rotary tables."""

    mask: torch.Tensor | None
    valid: torch.Tensor  # (B, T) real tokens of this block (False: left padding)
    position_ids: torch.Tensor  # (B, T)
    shared: dict
    cache: MTPCache | None


class MTPModel(nn.Module):
    def __init__(self, base: nn.Module, num_heads: int = 4, num_trunk_layers: int | None = None):
        super().__init__()
        self.base = base
        self.backbone = backbone_for(base)
        num_layers = len(self.backbone.layers)
        if num_trunk_layers is None:
            num_trunk_layers = num_layers - 1
        if not 0 <= num_trunk_layers < num_layers:
            raise MTPError(f"num_trunk_layers must be in [0, {num_layers - 1}] for a {num_layers}-layer model, "
                           f"got {num_trunk_layers}")
        if num_heads < 1:
            raise MTPError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        self.num_trunk_layers = num_trunk_layers
        head0 = self.backbone.layers[num_trunk_layers:]
        # Extra heads start as copies of head 0 (the original top layers); training makes them predict further.
        self.extra_heads = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(layer) for layer in head0) for _ in range(num_heads - 1)
        )
        # Token ids the extra heads may predict (None: all). Not a weight: saved as DRAFT_VOCAB_KEY, and moved
        # with the model (a non-persistent buffer).
        self.register_buffer("draft_vocab", None, persistent=False)
        self.register_buffer("_draft_index", None, persistent=False)
        self._draft_rows_cache: tuple | None = None  # (key, weight rows, bias rows) for decoding
        self.packed_draft_head: nn.Module | None = None  # set by quantize_for_decoding when the unembedding is packed
        self.set_fast_decoding("fp32" if self.backbone.supports_fast_layers else None)
        self.tokenizer = None  # attached by loaders; saved with the model when present
        self.source = None  # where the weights came from (mtp.hub.ModelSource), for `mtp info`

    # ---------------------------------------------------------------- construction and structure
    @classmethod
    def from_base(cls, base, num_heads: int = 4, num_trunk_layers: int | None = None, **load_kwargs) -> MTPModel:
        """Wrap a transformers causal LM object, or load one by name/path first (see `mtp.hub`)."""
        tokenizer = source = None
        if isinstance(base, str | os.PathLike):
            from mtp.hub import load_base_model

            base, tokenizer, source = load_base_model(str(base), **load_kwargs)
        model = cls(base, num_heads=num_heads, num_trunk_layers=num_trunk_layers)
        model.tokenizer, model.source = tokenizer, source
        return model

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

    def set_fast_decoding(self, weights: str | None) -> None:
        """Decode (cached, no-grad forwards) with the lean layer step, weights "fp32" or "fp16"; None: the
        Hugging Face layers everywhere. On by default (fp32) for the Llama family."""
        layers = list(self.backbone.layers) + [layer for head in self.extra_heads for layer in head]
        self.backbone.use_fast_layers(layers, weights)
        self.fast_decoding = weights

    def new_cache(self, batch_size: int, max_len: int) -> MTPCache:
        return MTPCache(batch_size, max_len, num_stacks=1 + self.num_heads, device=self.device)

    # ---------------------------------------------------------------- forward pieces (used by decoding, training)
    def trunk_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: MTPCache | None = None) -> tuple[torch.Tensor, ForwardContext]:
        """Embed and run the trunk. With a cache, `input_ids` are the next T tokens after what it holds."""
        b, t = input_ids.shape
        valid = (torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                 else attention_mask.bool())  # (B, T)
        dtype = self.base.get_input_embeddings().weight.dtype  # activations' dtype (lm_head may be quantised)
        if cache is not None:
            mask, position_ids = cache.prepare_block(valid, dtype)
        else:
            mask, position_ids = _uncached_mask(valid, dtype, self.config)
        hidden = self.backbone.embed(input_ids, position_ids)  # (B, T, H)
        shared = self.backbone.layer_inputs(hidden, position_ids)
        ctx = ForwardContext(mask, valid, position_ids, shared, cache)
        stack = cache.stack(0) if cache is not None else None
        for layer in self.trunk_layers:
            hidden = self.backbone.run_layer(layer, hidden, mask, stack, shared)
        return hidden, ctx

    def head_forward(self, head: int, trunk_hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Run head `head`'s layers on the trunk output and the shared final norm: (B, T, H)."""
        stack = ctx.cache.stack(1 + head) if ctx.cache is not None else None
        hidden = trunk_hidden
        for layer in self.head_layers(head):
            hidden = self.backbone.run_layer(layer, hidden, ctx.mask, stack, ctx.shared)
        return self.backbone.norm(hidden)

    def finish_block(self, ctx: ForwardContext) -> None:
        """Advance the cache once every stack has written the block's keys and values."""
        if ctx.cache is not None:
            ctx.cache.commit_block(ctx.valid)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.lm_head(hidden)

    # ---------------------------------------------------------------- draft vocabulary of the extra heads
    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Restrict what heads 1..n-1 predict to `token_ids` (None: the whole vocabulary).

        Large vocabularies make the unembedding the costliest part of training heads and of drafting, while
        drafts come from a small set of frequent tokens (FR-Spec, Zhao et al. 2025). Head 0 keeps the whole
        vocabulary and verifies every draft, so decoding stays lossless; a draft outside the set is never
        proposed, which only costs acceptance.
        """
        self._draft_rows_cache = self.packed_draft_head = None
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
        if self.packed_draft_head is not None:
            return self.packed_draft_head(hidden)  # (..., K)
        head = self.backbone.lm_head
        if type(head) is not nn.Linear:  # quantised for decoding: no weight rows to pick
            return self.lm_head(hidden)[..., self.draft_vocab]
        return F.linear(hidden, *self.draft_rows(head))  # (..., K)

    def draft_rows(self, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft vocabulary's rows of the unembedding's weight and bias. While gradients are on they are
        gathered at each call (training: they may train, and autograd needs the gather); otherwise (decoding)
        they are kept until the weight changes, which saves a K x H copy per step."""
        vocab = self.draft_vocab
        if torch.is_grad_enabled():
            return head.weight[vocab], head.bias[vocab] if head.bias is not None else None
        key = (head.weight.data_ptr(), head.weight._version, vocab.data_ptr(), vocab.device)
        if self._draft_rows_cache is None or self._draft_rows_cache[0] != key:
            bias = head.bias[vocab].detach().clone() if head.bias is not None else None
            self._draft_rows_cache = (key, head.weight[vocab].detach().clone(), bias)
        return self._draft_rows_cache[1], self._draft_rows_cache[2]

    def restrict_to_draft_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) of extra heads with every token outside the draft vocabulary at the
        lowest value (never the argmax, probability 0); unchanged without a draft vocabulary."""
        if self.draft_vocab is None:
            return logits
        outside = self._draft_index < 0  # (V,)
        return logits.masked_fill(outside, torch.finfo(logits.dtype).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_all_heads: bool = False, cache: MTPCache | None = None) -> torch.Tensor:
        """Logits `(B, T, n, V)` with `return_all_heads`, else `(B, T, 1, V)` from the next-token head (Meta's API).

        With a cache, every head's layers still run (their caches must stay complete), only the unembedding of
        the heads not asked for is skipped. Malformed input (dtype, shape, device, ids outside the vocabulary)
        is an MTPError saying what (`mtp.decoding.inputs.token_batch`).
        """
        input_ids, attention_mask = token_batch(self, input_ids, attention_mask)
        trunk, ctx = self.trunk_forward(input_ids, attention_mask, cache)
        heads = range(self.num_heads) if (return_all_heads or cache is not None) else range(1)
        hidden = [self.head_forward(h, trunk, ctx) for h in heads]
        self.finish_block(ctx)
        if not return_all_heads:
            return self.lm_head(hidden[0])[:, :, None]  # (B, T, 1, V)
        logits = self.lm_head(torch.stack(hidden, dim=2))  # (B, T, n, V)
        if self.draft_vocab is not None:
            logits = torch.cat([logits[:, :, :1], self.restrict_to_draft_vocab(logits[:, :, 1:])], dim=2)
        return logits

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
        config = {"num_heads": self.num_heads, "num_trunk_layers": self.num_trunk_layers, "format_version": 1}
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

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> Path:
        """Write config.json (base config + `mtp` section), model.safetensors and tokenizer files, atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_folder(directory) as tmp:
            config = self.config.to_dict()
            config["mtp"] = self.mtp_config()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(self.checkpoint_state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            gen = getattr(self.base, "generation_config", None)
            if gen is not None:
                try:
                    gen.save_pretrained(tmp)
                except Exception:  # generation config is optional, a bad one must not block saving weights
                    pass
            tokenizer = tokenizer if tokenizer is not None else self.tokenizer
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, load_tokenizer: bool = True) -> MTPModel:
        """Load a folder written by `save_pretrained`. Mismatched tensors raise an error naming them."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise MTPError(f"{directory}: no config.json (not a model folder)")
        raw = json.loads(config_path.read_text())
        if "mtp" not in raw:
            raise MTPError(f"{directory}: config.json has no 'mtp' section (a plain model: use MTPModel.from_base)")
        if not (directory / WEIGHTS_NAME).is_file():
            raise MTPError(f"{directory}: missing {WEIGHTS_NAME}")
        mtp_cfg = raw["mtp"]
        config = AutoConfig.from_pretrained(directory)
        with _skip_weight_init():  # every weight is overwritten by the checkpoint; random init costs seconds
            base = AutoModelForCausalLM.from_config(config)
        base.tie_weights()  # no_init_weights also skips the tying that from_config normally does
        model = cls(base, num_heads=int(mtp_cfg["num_heads"]), num_trunk_layers=int(mtp_cfg["num_trunk_layers"]))
        state = load_file(str(directory / WEIGHTS_NAME))
        model.load_checkpoint_state_dict(state, source=str(directory / WEIGHTS_NAME))
        model.to(device=device, dtype=dtype).eval()
        if load_tokenizer and (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            model.tokenizer = AutoTokenizer.from_pretrained(directory)
        return model

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a `checkpoint_state_dict` into the model; its draft vocabulary (or none) comes with it."""
        state = dict(state)
        draft_vocab = state.pop(DRAFT_VOCAB_KEY, None)
        expected = {name.removeprefix("base."): t for name, t in self.state_dict().items()}
        tied = _tied_aliases(self)
        missing = sorted(k for k in expected if k not in state and k not in tied)
        extra = sorted(k for k in state if k not in expected)
        misshaped = sorted(f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                           for k in state if k in expected and state[k].shape != expected[k].shape)
        if missing or extra or misshaped:
            parts = []
            for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
                if names:
                    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                    parts.append(f"{label}: {shown}")
            raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(parts))
        full = {("base." + k if not k.startswith(EXTRA_HEADS_PREFIX) else k): v for k, v in state.items()}
        self.load_state_dict(full, strict=False)
        self.set_draft_vocab(draft_vocab)


def _tied_aliases(model: MTPModel) -> set[str]:
    """Names whose tensor is the same storage as an earlier name (e.g. lm_head.weight tied to embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = name.removeprefix("base.")
        tensor = t.data if isinstance(t, nn.Parameter) else t
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            aliases.add(key)
        else:
            seen[ptr] = key
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
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], position_ids  # (B, 1, T, T)
