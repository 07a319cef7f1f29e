"""MTPModel against Hugging Face logits on tiny random configs (litgpt style)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

from conftest import tiny_base, tiny_mtp
from mtp import CheckpointMismatchError, MTPError, MTPModel

FAMILIES = ["llama", "gpt2"]


def small_config(kind: str):
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=71)
    return {"qwen2": Qwen2Config, "qwen3": lambda **kw: Qwen3Config(head_dim=8, **kw),
            "mistral": MistralConfig}[kind](**common)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_head_is_exactly_the_base_model(family):
    base = tiny_base(family)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = base(ids).logits
        got = MTPModel(base, num_heads=1)(ids)  # (B, T, 1, V)
    assert got.shape == (2, 11, 1, 61)
    assert (got[:, :, 0] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_members(kind):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(small_config(kind)).eval()
    ids = torch.randint(0, 71, (1, 9))
    with torch.no_grad():
        got = MTPModel(base, num_heads=3)(ids, return_all_heads=True)
        assert (got[:, :, 0] - base(ids).logits).abs().max() <= 1e-5
    # extra heads start as copies of head 0
    assert torch.allclose(got[:, :, 1], got[:, :, 0], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_heads(family):
    model = tiny_mtp(family, num_heads=4)
    ids = torch.randint(0, 61, (3, 7))
    with torch.no_grad():
        all_heads = model(ids, return_all_heads=True)
        first = model(ids)
    assert all_heads.shape == (3, 7, 4, 61)
    assert first.shape == (3, 7, 1, 61)
    assert torch.equal(first[:, :, 0], all_heads[:, :, 0])
    assert not torch.allclose(all_heads[:, :, 1], all_heads[:, :, 0])  # randomised extra heads differ


def test_trunk_split_gpt2_9_shared_layers_4_heads():
    """GPT-2 with 9 shared layers and 4 heads (a published GPT-2 MTP model's shape): heads of 3 layers."""
    model = tiny_mtp("gpt2", num_heads=4, num_trunk_layers=9, layers=12)
    assert len(model.trunk_layers) == 9
    assert all(len(model.head_layers(h)) == 3 for h in range(4))
    with pytest.raises(MTPError, match="num_trunk_layers"):
        MTPModel(tiny_base("gpt2"), num_heads=2, num_trunk_layers=3)
    with pytest.raises(MTPError, match="num_heads"):
        MTPModel(tiny_base("gpt2"), num_heads=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_gives_the_unpadded_logits(family):
    model = tiny_mtp(family, num_heads=2)
    row = torch.randint(0, 61, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(row, return_all_heads=True)
        inside = model(padded, attention_mask=mask, return_all_heads=True)[:, 3:]
    assert (alone - inside).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_forward_with_cache_equals_full_forward(family):
    model = tiny_mtp(family, num_heads=3)
    ids = torch.randint(0, 61, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_all_heads=True)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, a:b], attention_mask=mask[:, a:b], cache=cache, return_all_heads=True)
                 for a, b in [(0, 5), (5, 6), (6, 10), (10, 12)]]
    inc = torch.cat(parts, 1)
    assert (inc[0] - full[0]).abs().max() <= 1e-5
    assert (inc[1, 4:] - full[1, 4:]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_gives_identical_logits(tmp_path, family):
    model = tiny_mtp(family, num_heads=3)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["mtp"]["num_heads"] == 3
    again = MTPModel.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, return_all_heads=True), again(ids, return_all_heads=True))
    # the base weights keep their Hugging Face names: transformers loads the folder as the plain model
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert (plain(ids).logits - model(ids)[:, :, 0]).abs().max() <= 1e-6


def test_draft_vocabulary_is_saved_with_the_model(tmp_path):
    model = tiny_mtp("llama", num_heads=3)
    model.set_draft_vocab([9, 4, 4, 30])  # duplicates and order do not matter
    assert model.draft_vocab.tolist() == [4, 9, 30]
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mtp"]["draft_vocab_size"] == 3
    again = MTPModel.from_pretrained(tmp_path / "m")
    assert again.draft_vocab.tolist() == [4, 9, 30]
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, return_all_heads=True), again(ids, return_all_heads=True))
    # A checkpoint without one clears it (the checkpoint decides what the heads predict).
    plain = tiny_mtp("llama", num_heads=3)
    again.load_checkpoint_state_dict(plain.checkpoint_state_dict())
    assert again.draft_vocab is None
    with torch.no_grad():
        assert torch.equal(plain(ids, return_all_heads=True), again(ids, return_all_heads=True))
        # draft_logits scores exactly the draft vocabulary's columns of the full logits
        model_hidden = torch.randn(5, model.config.hidden_size)
        torch.testing.assert_close(model.draft_logits(model_hidden), model.lm_head(model_hidden)[:, [4, 9, 30]])


def test_mismatched_checkpoints_name_the_tensors(tmp_path):
    model = tiny_mtp("llama", num_heads=3)
    folder = model.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    missing = dict(state)
    del missing["extra_heads.1.0.mlp.up_proj.weight"]
    save_file(missing, weights)
    with pytest.raises(CheckpointMismatchError, match=r"missing: extra_heads\.1\.0\.mlp\.up_proj\.weight"):
        MTPModel.from_pretrained(folder)
    save_file({**state, "extra_heads.7.0.bogus": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: extra_heads\.7\.0\.bogus"):
        MTPModel.from_pretrained(folder)
    wrong = dict(state)
    wrong["model.norm.weight"] = torch.zeros(5)
    save_file(wrong, weights)
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped: model\.norm\.weight \(checkpoint \(5,\)"):
        MTPModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MTPError, match="missing model.safetensors"):
        MTPModel.from_pretrained(folder)


def test_save_is_atomic_and_replaces(tmp_path):
    model = tiny_mtp("gpt2", num_heads=2)
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_unsupported_model_type_is_a_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(MTPError, match="unsupported model type 'bert'"):
        MTPModel(BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, vocab_size=50)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reload_in_a_dtype_keeps_ties_and_buffers(tmp_path, dtype):
    model = tiny_mtp("llama", num_heads=3)
    folder = model.save_pretrained(tmp_path / "m")
    again = MTPModel.from_pretrained(folder, dtype=dtype)
    base = again.base
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, as in the saved model
    assert all(p.dtype == dtype for p in again.parameters())
    assert not any(t.is_meta for t in [*again.parameters(), *again.buffers()])
    rotary = base.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, model.base.model.rotary_emb.inv_freq.float())
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        expected = model.to(dtype)(ids, return_all_heads=True)
        torch.testing.assert_close(again(ids, return_all_heads=True), expected, atol=0.05, rtol=0.05)
        assert torch.equal(again.extra_heads[0][0].mlp.up_proj.weight, model.extra_heads[0][0].mlp.up_proj.weight)


def test_damaged_weights_file_is_an_error_naming_it(tmp_path):
    model = tiny_mtp("llama", num_heads=2)
    folder = model.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(MTPError, match=r"model\.safetensors.*truncated"):
        MTPModel.from_pretrained(folder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(MTPError, match=r"model\.safetensors is not a valid safetensors file \(header is not JSON"):
        MTPModel.from_pretrained(folder)
    weights.write_bytes(b"abc")
    with pytest.raises(MTPError, match=r"model\.safetensors is not a valid"):
        MTPModel.from_pretrained(folder)


def test_saved_file_is_read_by_safetensors_itself(tmp_path):
    model = tiny_mtp("llama", num_heads=2)
    model.set_draft_vocab([3, 5])
    folder = model.save_pretrained(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    ours = model.checkpoint_state_dict()
    assert state.keys() == ours.keys()
    assert all(torch.equal(state[k], ours[k]) for k in ours)


def test_from_base_object_keeps_the_tokenizer_it_is_given(tmp_path):
    """`MTPModel.from_base(model_object, tokenizer=tok)`: the folder it saves has the tokenizer (formats.md's
    example saved a folder no command could decode with)."""
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    model = MTPModel.from_base(tiny_base("llama", vocab_size=len(tok)), num_heads=2, tokenizer=tok)
    folder = model.save_pretrained(tmp_path / "m")
    assert MTPModel.from_pretrained(folder).tokenizer.encode("Tom has 3 apples") == tok.encode("Tom has 3 apples")
    assert MTPModel.from_base(tiny_base("llama", vocab_size=len(tok)), num_heads=2).tokenizer is None
