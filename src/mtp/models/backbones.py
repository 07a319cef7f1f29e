"""What MTP needs from a Hugging Face decoder, for each supported family.

A `Backbone` exposes the pieces of a causal LM that multi-token prediction rearranges: token (and position)
embeddings, the list of decoder layers, the final norm and the unembedding, plus how to call one layer with an
explicit mask and cache. The model kind is read from `config.model_type`, never guessed from a file name.
The Hugging Face modules are used as they are (wrapped, not forked), so weights stay loadable by transformers.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from mtp.errors import MTPError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# Decoders laid out as Llama's (`model.embed_tokens`, `model.layers`, `model.norm`, `model.rotary_emb`) whose layers
# mtp runs as Hugging Face wrote them (no lean step of its own: other norms, fused or gated projections, layers
# without rotary, experts), with what their `*ForCausalLM` adds around the layers (`HFLayersBackbone`). Each is
# checked against transformers' logits and decoding (tests/models/test_families.py).
HF_LAYER_FAMILY = ("phi3", "smollm3", "gemma", "gemma2", "gemma3_text", "vaultgemma", "granite", "olmo", "olmo2",
                   "olmo3", "glm", "glm4", "helium", "cohere", "cohere2", "ministral", "exaone4", "seed_oss",
                   "hunyuan_v1_dense", "ernie4_5", "apertus", "apertus1p5_text", "arcee", "stablelm", "starcoder2",
                   "nemotron", "ministral3", "internlm3", "exaone", "granite_swa", "nanochat",
                   # mixtures of experts (each token's experts picked by its own router: a verify block's rows too)
                   "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "gpt_oss",
                   "glm4_moe", "exaone_moe", "ernie4_5_moe", "cohere2_moe", "minimax_m2", "flex_olmo", "afmoe",
                   "solar_open")
ROTARY_BY_LAYER_TYPE = ("gemma3_text", "olmo3")  # a rotary table for each kind of layer
NORMED_EMBEDDINGS = ("nanochat",)  # the embeddings pass through the model's norm before the first layer
# Families whose every layer attends within the config's `sliding_window` (the others name it on the layers)
CONFIG_WINDOW_TYPES = ("mistral", "ministral3", "phi3", "starcoder2", "mixtral", "phimoe")
# Rotary types whose frequencies do not depend on the sequence's length: their tables can be computed once
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
GPT2_FAMILY = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + HF_LAYER_FAMILY + GPT2_FAMILY


class Backbone:
    """Accessors over a Hugging Face `*ForCausalLM`; holds references, owns no parameters."""

    def __init__(self, causal_lm: nn.Module):
        self.causal_lm = causal_lm

    layers: nn.ModuleList
    norm: nn.Module
    supports_fast_layers = False  # has a lean decoding step (mtp.models.fast_llama)
    window: int | None = None  # the narrowest sliding attention window of its layers (None: they see everything)

    def use_fast_layers(self, layers, weights: str | None) -> None:
        """Route cached no-grad forwards of `layers` through the lean step (`weights` None: never)."""
        if weights is not None:
            raise MTPError(f"{type(self).__name__} has no fast decoding path")

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.lm_head

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_inputs(self, hidden: torch.Tensor, position_ids: torch.Tensor, max_position: int | None = None) -> dict:
        """Per-forward inputs shared by every layer (e.g. rotary cos/sin), computed once. `max_position`: a bound
        on the position ids of this and later forwards of one cache (its slots), when there is one."""
        return {}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, mask, cache, shared: dict,
                  reuse_input: bool = False) -> torch.Tensor:
        """One decoder layer. `reuse_input`: the caller never reads `hidden` again, so the layer may write its
        output into it (a lean step then adds the attention's residual inside its matmul: a kernel fewer)."""
        raise NotImplementedError

    def run_head_stack(self, levels: list[list[nn.Module]], hidden: torch.Tensor, mask, cache, shared: dict):
        """Heads that all read `hidden` (`levels[i]`: layer i of each), run together and through the final norm:
        (m, B, T, H), or None where this backbone has no such step for this call (the caller runs them one by
        one)."""
        return None

    def final_norm(self, hidden: torch.Tensor, shared: dict, cached: bool) -> torch.Tensor:
        """The final norm, over the outputs of a forward (through a cache, or not) whose `shared` inputs
        `layer_inputs` built."""
        return self.norm(hidden)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's `*ForCausalLM` does to the unembedding's output (most: nothing)."""
        return logits


class LlamaBackbone(Backbone):
    """Llama, SmolLM2, Mistral, Qwen2, Qwen3: `model.embed_tokens`, `model.layers`, `model.norm`, rotary."""

    supports_fast_layers = True

    def __init__(self, causal_lm: nn.Module):
        super().__init__(causal_lm)
        self.layers = causal_lm.model.layers
        self.norm = causal_lm.model.norm
        self.fast_layers: dict | None = None
        # kept, never replaced: a captured CUDA graph reads the tensors it was captured with (plain attributes,
        # not `__dict__.setdefault`, which torch 2.11's dynamo cannot trace inside a compiled step)
        self._rope_tables: dict = {}  # (size, dtype, device) -> (P, 2, D) cos and signed sin of every position
        self._head_stacks: dict = {}  # the extra heads' layers -> their FastHeadStack
        self.window = attention_window(causal_lm)

    def use_fast_layers(self, layers, weights):
        from mtp.models.fast_llama import FastLlamaLayer

        self.fast_layers = None if weights is None else {layer: FastLlamaLayer(layer, weights) for layer in layers}

    def embed(self, input_ids, position_ids):
        return self.causal_lm.model.embed_tokens(input_ids)  # (B, T, H)

    def layer_inputs(self, hidden, position_ids, max_position=None):
        if self.window is not None and max_position is None:  # (cached: `generate` keeps to `context_limit`)
            check_within_window(self.window, position_ids)
        shared = {"position_ids": position_ids}
        if self.fast_layers is not None and not torch.is_grad_enabled():  # the lean step's form of the tables
            shared["fast_rope"] = self._fast_rope(hidden, position_ids, max_position)
        else:
            shared["position_embeddings"] = self.causal_lm.model.rotary_emb(hidden, position_ids=position_ids)
        return shared

    def _fast_rope(self, hidden: torch.Tensor, position_ids: torch.Tensor, max_position: int | None):
        """(cos, signed sin), each (B, 1, T, D) (`fast_llama.rope_tables`). Within a cache of known length and for
        a rotary type with fixed frequencies, read from a table of every position computed once by the same
        function (one kernel a forward instead of ten: a GPU step costs per kernel); else computed as they come."""
        from mtp.models.fast_llama import rope_tables

        rotary = self.causal_lm.model.rotary_emb
        if max_position is None or getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
            return rope_tables(*rotary(hidden, position_ids=position_ids))
        size = max(256, 1 << (max_position - 1).bit_length())  # few sizes, each built once
        key = (size, hidden.dtype, hidden.device)
        tables = self._rope_tables
        table = tables.get(key)
        if table is None:
            cos, signed_sin = rope_tables(*rotary(hidden, position_ids=torch.arange(size, device=hidden.device)[None]))
            table = tables[key] = torch.stack((cos[0, 0], signed_sin[0, 0]), 1)  # (P, 2, D)
        picked = table[position_ids]  # (B, T, 2, D)
        return picked[:, None, :, 0], picked[:, None, :, 1]

    def run_layer(self, layer, hidden, mask, cache, shared, reuse_input=False):
        # The lean step only where the forward's shared inputs carry its tables (a cached no-grad forward): a
        # forward that switches gradients off for some layers only (frozen layers under adapters) keeps the HF ones.
        if cache is not None and "fast_rope" in shared and not torch.is_grad_enabled():
            fast = self.fast_layers.get(layer)
            if fast is not None:
                return fast(hidden, mask, cache, *shared["fast_rope"], reuse_input=reuse_input)
        if "position_embeddings" not in shared:  # a no-grad forward through a Hugging Face layer
            shared["position_embeddings"] = self.causal_lm.model.rotary_emb(hidden, shared["position_ids"])
        out = layer(hidden, attention_mask=mask, use_cache=cache is not None, **{_cache_kwarg(type(layer)): cache},
                    **shared)
        return out[0] if isinstance(out, tuple) else out

    def run_head_stack(self, levels, hidden, mask, cache, shared):
        # the GPU's fused path only (`fast_llama.FastHeadStack.applies`), for the lean step's forwards
        if cache is None or "fast_rope" not in shared or torch.is_grad_enabled() or not self.fast_layers:
            return None
        fast = [[self.fast_layers.get(layer) for layer in level] for level in levels]
        if any(f is None for level in fast for f in level):
            return None
        stacks = self._head_stacks
        key = tuple(id(layer) for level in levels for layer in level)
        stack = stacks.get(key)
        if stack is None or stack.levels != fast:  # (fast layers are rebuilt when the weight format changes)
            from mtp.models.fast_llama import FastHeadStack

            stack = stacks[key] = FastHeadStack(fast, self.norm)
        if not stack.applies(hidden, cache):
            return None
        return stack(hidden, mask, cache, *shared["fast_rope"])

    def final_norm(self, hidden, shared, cached):
        # where the lean layers ran (a cached no-grad forward, `run_layer`): one kernel, as their norms
        if cached and "fast_rope" in shared and not torch.is_grad_enabled():
            from mtp.models.fast_llama import rms_norm

            return rms_norm(hidden, self.norm)
        return self.norm(hidden)


class HFLayersBackbone(LlamaBackbone):
    """`HF_LAYER_FAMILY`: Llama's accessors, the layers always Hugging Face's, the embeddings and logits scaled as
    the family's model scales them."""

    supports_fast_layers = False

    def __init__(self, causal_lm: nn.Module):
        super().__init__(causal_lm)
        config = causal_lm.config
        self.embedding_multiplier = getattr(config, "embedding_multiplier", None)  # Granite
        self.normed_embeddings = config.model_type in NORMED_EMBEDDINGS
        self.logits_divisor = getattr(config, "logits_scaling", None)  # Granite
        self.logit_scale = getattr(causal_lm, "logit_scale", None)  # Cohere (a number on the model)
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3, VaultGemma, nanochat

    def use_fast_layers(self, layers, weights):
        Backbone.use_fast_layers(self, layers, weights)

    def embed(self, input_ids, position_ids):
        hidden = self.causal_lm.model.embed_tokens(input_ids)  # (B, T, H); Gemma's scales itself
        if self.normed_embeddings:  # (the final norm's module, as NanoChatModel applies it before the layers)
            hidden = self.norm(hidden)
        return hidden if self.embedding_multiplier is None else hidden * self.embedding_multiplier

    def scale_logits(self, logits):
        # the order and arithmetic of the families' own forwards (GraniteForCausalLM, CohereForCausalLM,
        # Gemma2ForCausalLM, ...), so that the logits are transformers' bit for bit
        if self.logits_divisor is not None:
            logits = logits / self.logits_divisor
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


class LayerTypeRotaryBackbone(HFLayersBackbone):
    """`ROTARY_BY_LAYER_TYPE` (Gemma 3, OLMo 3): the sliding-window and full-attention layers rotate by tables of
    their own (`layer_types`), as their models compute them: one per kind, once a forward."""

    def layer_inputs(self, hidden, position_ids, max_position=None):
        if self.window is not None and max_position is None:
            check_within_window(self.window, position_ids)
        return {"position_ids": position_ids, "rotary": {}}

    def run_layer(self, layer, hidden, mask, cache, shared, reuse_input=False):
        attn, tables = layer.self_attn, shared["rotary"]
        kind = getattr(attn, "layer_type", None) or self.causal_lm.config.layer_types[attn.layer_idx]
        if kind not in tables:
            tables[kind] = self.causal_lm.model.rotary_emb(hidden, shared["position_ids"], kind)
        out = layer(hidden, attention_mask=mask, use_cache=cache is not None, **{_cache_kwarg(type(layer)): cache},
                    position_ids=shared["position_ids"], position_embeddings=tables[kind])
        return out[0] if isinstance(out, tuple) else out


class GPT2Backbone(Backbone):
    """GPT-2: `transformer.wte` + learned `transformer.wpe`, `transformer.h`, `transformer.ln_f`."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__(causal_lm)
        self.layers = causal_lm.transformer.h
        self.norm = causal_lm.transformer.ln_f

    def embed(self, input_ids, position_ids):
        t = self.causal_lm.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids))  # (B, T, H)

    def run_layer(self, layer, hidden, mask, cache, shared, reuse_input=False):
        out = layer(hidden, attention_mask=mask, use_cache=cache is not None, **{_cache_kwarg(type(layer)): cache})
        return out[0] if isinstance(out, tuple) else out


def attention_window(causal_lm: nn.Module) -> int | None:
    """The narrowest sliding attention window of the model's layers (None: every layer attends to everything).
    Qwen2/Qwen3 (Gemma 2, SmolLM3, ...) name it on the layers that have one (`layer_types`); `CONFIG_WINDOW_TYPES`'
    layers all read the config's."""
    config = causal_lm.config
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in causal_lm.model.layers]
    if config.model_type in CONFIG_WINDOW_TYPES:
        windows.append(getattr(config, "sliding_window", None))
    return min((w for w in windows if w is not None), default=None)


def check_within_window(window: int, position_ids: torch.Tensor) -> None:
    """mtp's masks are causal over the whole sequence. A sliding window only changes what a query at position >=
    `window` sees (keys `window` or more positions back), so shorter sequences run exactly as transformers runs
    them, and longer ones are refused rather than run differently. For uncached forwards (training, scoring):
    a cached one's slots are no bound (padding, drafts' and joining prompts' room), so `generate` checks prompt
    and answer on the host instead (`context_limit` counts the window), with no read of the device."""
    span = int(position_ids.max()) + 1 if position_ids.numel() else 0
    if span > window:
        raise MTPError(f"this model attends within a sliding window of {window} tokens, which mtp does not "
                       f"implement: keep each sequence within {window} tokens (this one has {span})")


@functools.cache
def _cache_kwarg(layer_class: type) -> str:
    """What a decoder layer calls its cache: `cache` (transformers >= 5.2x; `past_key_values` is deprecated there)
    or `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def backbone_for(causal_lm: nn.Module) -> Backbone:
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return LlamaBackbone(causal_lm)
    if model_type in HF_LAYER_FAMILY:
        if model_type in ROTARY_BY_LAYER_TYPE:
            return LayerTypeRotaryBackbone(causal_lm)
        return HFLayersBackbone(causal_lm)
    if model_type in GPT2_FAMILY:
        return GPT2Backbone(causal_lm)
    raise MTPError(
        f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
