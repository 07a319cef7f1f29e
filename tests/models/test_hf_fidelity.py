"""Decoding against transformers for the config variants real checkpoints use: what `generate` gives with
head 0 only is what transformers' greedy `generate` gives, and what mtp cannot honour it refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mtp import MTPError, MTPModel
from mtp.decoding.generate import generate

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=71, bos_token_id=None, eos_token_id=None, pad_token_id=None)
WINDOW = 16
SLIDING = {
    "mistral": lambda: MistralConfig(sliding_window=WINDOW, **COMMON),
    "qwen2": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **COMMON),
    "qwen3": lambda: Qwen3Config(head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                 **COMMON),
    "phi3": lambda: Phi3Config(sliding_window=WINDOW, **COMMON),  # every layer, as Mistral
    "gemma2": lambda: Gemma2Config(head_dim=8, sliding_window=WINDOW, **COMMON),  # every other layer
    **{kind: (lambda kind=kind, extra=extra: AutoConfig.for_model(kind, sliding_window=WINDOW, **COMMON, **extra))
       for kind, extra in {"starcoder2": {}, "ministral": {"head_dim": 8}, "cohere2": {}, "exaone4": {},
                           "vaultgemma": {"head_dim": 8}, "mixtral": {"num_local_experts": 4},
                           "ministral3": {"head_dim": 8}, "granite_swa": {"head_dim": 8},
                           "cohere2_moe": {"head_dim": 8}, "afmoe": {"head_dim": 8},
                           "phimoe": {"num_local_experts": 4}, "gpt_oss": {"head_dim": 8, "num_local_experts": 4},
                           "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "use_sliding_window": True,
                                         "max_window_layers": 1}}.items()
       if kind in CONFIG_MAPPING},
}
FLOAT32 = {"mixtral", "phimoe", "gpt_oss", "qwen3_moe", "cohere2_moe", "afmoe"}  # experts' grouped matmuls take no float64


def base_of(config, seed: int = 0):
    torch.manual_seed(seed)
    dtype = torch.float32 if config.model_type in FLOAT32 else torch.float64
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def hf_greedy(base, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_sliding_window_inside_the_window_is_transformers_and_past_it_an_error(kind):
    """Up to the window a sliding-window model is a causal one: greedy gives transformers' tokens. Past it
    transformers hides the keys the window leaves out and mtp's masks do not: refused, one line, never decoded
    differently (before the check, every row past the window decoded other tokens than transformers)."""
    base = base_of(SLIDING[kind]())
    model = MTPModel(base, num_heads=2)
    short = list(range(3, 9))
    assert generate(model, [short], max_new_tokens=6, strategy="greedy", stop_token_ids=[]).tokens == \
        [hf_greedy(base, short, 6)]
    long = list(range(3, 3 + WINDOW))
    with pytest.raises(MTPError, match=f"context of {WINDOW} tokens \\(its sliding attention window\\)"):
        generate(model, [long], max_new_tokens=8, strategy="greedy", stop_token_ids=[])
    ids = torch.tensor([list(range(3, 3 + WINDOW + 4))])
    with torch.no_grad(), pytest.raises(MTPError, match=f"sliding window of {WINDOW} tokens"):
        model(ids)  # an uncached forward (training, scoring) past the window
    with torch.no_grad():
        inside = ids[:, :WINDOW]
        tolerance = 1e-5 if kind in FLOAT32 else 1e-9
        assert (model(inside)[:, :, 0] - base(inside).logits).abs().max() <= tolerance


def test_a_window_the_config_switches_off_is_no_window():
    """Qwen2.5's configs name a sliding_window with use_sliding_window false: every layer attends to everything
    (transformers ignores the window), and so does mtp, past it too."""
    base = base_of(Qwen2Config(use_sliding_window=False, sliding_window=8, **COMMON))
    prompt = list(range(3, 17))
    got = generate(MTPModel(base, num_heads=1), [prompt], max_new_tokens=10, strategy="greedy", stop_token_ids=[])
    assert got.tokens == [hf_greedy(base, prompt, 10)]


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_a_sequence_that_ends_at_the_window_decodes(kind):
    """The window bounds the positions decoded, not the cache's slots: a cache holds more (the drafts' room,
    rounding, a server's room for joining prompts), and counting those refused prompts whose answer ends
    within the window (greedy up to the window exactly; a server refused any past window - 512)."""
    base = base_of(SLIDING[kind]())
    model = MTPModel(base, num_heads=2)
    prompt = list(range(3, 9))
    new = WINDOW - len(prompt)
    assert generate(model, [prompt], max_new_tokens=new, strategy="greedy", stop_token_ids=[]).tokens == \
        [hf_greedy(base, prompt, new)]
    assert generate(model, [prompt], max_new_tokens=new - 2, strategy="speculative", stop_token_ids=[]).tokens == \
        [hf_greedy(base, prompt, new - 2)]
