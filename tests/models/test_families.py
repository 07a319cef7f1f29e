"""The decoder families mtp runs through their own Hugging Face layers (`backbones.HF_LAYER_FAMILY`), against
transformers on tiny random configs, in float64 (the mixtures of experts in float32): the same logits (padded
batches too, the families' embedding multipliers and logit scales set away from 1), the same greedy tokens,
lossless speculative decoding equal to greedy, heads that train, a saved folder that loads back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import mtp.decoding.generate as generate_module
from conftest import tiny_tokenizer
from mtp import MTPModel
from mtp.decoding.generate import generate
from mtp.models.backbones import HF_LAYER_FAMILY, HFLayersBackbone
from mtp.models.mask_tokens import MaskTokenModel
from mtp.models.quantize import quantize_for_decoding

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=71, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# What each family does differently, set where a default would hide it (a multiplier of 1, no cap in reach)
EXTRA = {
    "phi3": dict(partial_rotary_factor=0.5),
    "smollm3": dict(no_rope_layer_interval=2),  # every second layer without rotary
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=2.0, query_pre_attn_scalar=6),
    "gemma3_text": dict(head_dim=8, sliding_window=64, final_logit_softcapping=0.5, rope_local_base_freq=100.0),
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(logit_scale=0.5),
    "glm": dict(head_dim=8),
    "helium": dict(head_dim=8),
    "olmo": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=64),
    "vaultgemma": dict(head_dim=8, final_logit_softcapping=0.5),
    "glm4": dict(head_dim=8),
    "cohere2": dict(logit_scale=0.5),
    "ministral": dict(head_dim=8),
    "exaone4": {},
    "seed_oss": dict(head_dim=8),
    "hunyuan_v1_dense": dict(head_dim=8),
    "ernie4_5": dict(head_dim=8),
    "apertus": {},
    "arcee": {},
    "stablelm": {},
    "starcoder2": {},
    "nemotron": {},
    "mixtral": dict(num_local_experts=4),
    "phimoe": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32),
    "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, embedding_multiplier=3.0, logits_scaling=2.5),
    "gpt_oss": dict(head_dim=8, num_local_experts=4),
    **{kind: dict(head_dim=8) for kind in ("ministral3", "internlm3", "exaone", "solar_open", "apertus1p5_text",
                                          "glm4_moe", "exaone_moe", "ernie4_5_moe", "minimax_m2",
                                          "flex_olmo", "afmoe")},
    "granite_swa": dict(head_dim=8, embedding_multiplier=3.0, logits_scaling=2.5),
    "granitemoeshared": dict(head_dim=8, embedding_multiplier=3.0, logits_scaling=2.5),
    "cohere2_moe": dict(head_dim=8, logit_scale=0.5),
    "nanochat": dict(head_dim=8, final_logit_softcapping=0.5),
}
# Experts' grouped matmuls take no float64: these run in float32 (logits then agree to ~1e-7, not ~1e-15)
FLOAT32 = {"mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "gpt_oss",
           "glm4_moe", "exaone_moe", "ernie4_5_moe", "cohere2_moe", "minimax_m2", "flex_olmo", "afmoe", "solar_open"}
AVAILABLE = [kind for kind in HF_LAYER_FAMILY if kind in CONFIG_MAPPING]  # (an older transformers has fewer)


def base_of(kind: str, seed: int = 0, vocab_size: int = 71):
    config = AutoConfig.for_model(kind, **{**COMMON, "vocab_size": vocab_size}, **EXTRA.get(kind, {}))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(torch.float32 if kind in FLOAT32 else torch.float64).eval()


def mtp_of(base, num_heads: int, seed: int = 1) -> MTPModel:
    model = MTPModel(base, num_heads=num_heads)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # heads that disagree with head 0 (copies of it would always be accepted)
        for p in model.extra_heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.eval()


def hf_greedy(base, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_every_family_listed_is_checked_here():
    assert set(EXTRA) == set(HF_LAYER_FAMILY)


@pytest.mark.parametrize("kind", AVAILABLE)
def test_head_zero_is_transformers_logits_in_a_padded_batch(kind):
    base = base_of(kind)
    model = MTPModel(base, num_heads=2)
    assert isinstance(model.backbone, HFLayersBackbone)
    ids = torch.randint(3, 71, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    with torch.no_grad():
        got = model(ids, attention_mask=mask)[:, :, 0]
        # each row alone (transformers' Gemma 2 gives a left-padded row NaN logits: its padding queries see no
        # key). Gemma's norms compute in float32 even in float64: a batch's other summation order can move a
        # logit by ~1e-8 there; a scale or cap left out moves them by more than 1e-2.
        tolerance = 1e-4 if kind in FLOAT32 else 1e-6
        assert (got[0] - base(ids[:1]).logits[0]).abs().max() <= tolerance
        assert (got[1, 3:] - base(ids[1:, 3:]).logits[0]).abs().max() <= tolerance


@pytest.mark.parametrize("kind", AVAILABLE)
def test_greedy_is_transformers_and_speculative_is_greedy(kind):
    base = base_of(kind)
    model = mtp_of(base, num_heads=3)
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 4]]
    greedy = generate(model, prompts, max_new_tokens=10, strategy="greedy", stop_token_ids=[]).tokens
    assert greedy == [hf_greedy(base, p, 10) for p in prompts]
    for settings in ({}, {"tree": "dynamic", "tree_size": 4, "lookup": 3}):  # (a fixed tree: the static step's)
        spec = generate(model, prompts, max_new_tokens=10, strategy="speculative", stop_token_ids=[], **settings)
        assert spec.tokens == greedy, settings


@pytest.mark.parametrize("kind", AVAILABLE)
def test_the_static_step_and_mask_tokens_decode_as_greedy(kind, monkeypatch):
    """The GPU's path (static shapes, the replayed step; forced on the CPU) through the family's own layers, with
    heads and with mask tokens (self-distillation's model, its gated LoRA on every projection of the family)."""
    base = base_of(kind)
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 4]]
    greedy = [hf_greedy(base, p, 8) for p in prompts]
    monkeypatch.setattr(generate_module, "_use_graphs", lambda graphs, device, proposer: bool(graphs))
    got = generate(mtp_of(base, num_heads=3), prompts, max_new_tokens=8, strategy="speculative", tree="auto",
                   tree_size=4, lookup=2, stop_token_ids=[], graphs=True).tokens
    assert got == greedy
    masks = MaskTokenModel.from_base(base_of(kind), adapter="gated-lora", rank=4, k=3).eval()
    routers = {"router", "gate", "shared_expert_gate"}  # (mixtures of experts: no adapter on a router)
    projections = {name for name, m in masks.base.named_modules() if isinstance(m, torch.nn.Linear)
                   and ".layers." in name and name.rsplit(".", 1)[-1] not in routers}
    assert {key.replace("__", ".") for key in masks.lora.A} == projections
    with torch.no_grad():
        for b in masks.lora.B.values():  # (zero at the start: the adapter would change nothing)
            b.normal_()
    got = generate(masks, prompts, max_new_tokens=8, strategy="speculative", k=3, stop_token_ids=[],
                   graphs=True).tokens
    assert got == greedy


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="packing needs fbgemm (x86)")
@pytest.mark.parametrize("kind", AVAILABLE)
def test_packed_weights_decode_speculatively_as_their_greedy(kind):
    """`--quantize fp16|int8` (the CPU's fast rows) on a family without the lean layers: every Linear packed. fp16
    computes each row of a block as alone (equal to its greedy); int8 shares an activation scale between the rows
    (`mtp.models.quantize`: close, not equal), so it only has to decode."""
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 4]]
    model = quantize_for_decoding(mtp_of(base_of(kind).float(), num_heads=3), "fp16")
    greedy = generate(model, prompts, max_new_tokens=8, strategy="greedy", stop_token_ids=[]).tokens
    assert generate(model, prompts, max_new_tokens=8, strategy="speculative", tree="auto", tree_size=4,
                    stop_token_ids=[]).tokens == greedy
    model = quantize_for_decoding(mtp_of(base_of(kind).float(), num_heads=3), "int8")
    tokens = generate(model, prompts, max_new_tokens=8, strategy="speculative", stop_token_ids=[]).tokens
    assert [len(t) for t in tokens] == [8, 8]


@pytest.mark.parametrize("kind", AVAILABLE)
def test_the_heads_train_and_the_folder_loads_back(kind, tmp_path):
    tok = tiny_tokenizer()
    model = MTPModel(base_of(kind, vocab_size=len(tok)).float(), num_heads=2).train()
    model.tokenizer = tok
    ids = torch.randint(3, len(tok), (2, 12))
    before = [p.detach().clone() for p in model.extra_heads.parameters()]
    optimizer = torch.optim.SGD(model.extra_heads.parameters(), lr=0.1)
    logits = model(ids, return_all_heads=True)  # (B, T, 2, V): head j reads token t + 1 + j
    loss = sum(torch.nn.functional.cross_entropy(logits[:, : 12 - 1 - j, j].flatten(0, 1), ids[:, 1 + j :].flatten())
               for j in range(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.extra_heads.parameters(), strict=True))
    again = MTPModel.from_pretrained(model.eval().save_pretrained(tmp_path / kind))
    with torch.no_grad():
        assert torch.equal(again(ids, return_all_heads=True), model(ids, return_all_heads=True))
