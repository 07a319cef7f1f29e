"""Mask-token models: the training layout, its forwards against plain forwards, the mask token, checkpoints."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_base, tiny_tokenizer
from mtp.errors import MTPError
from mtp.models.mask_tokens import MaskTokenModel, gather_layout, mask_layout


def layout_by_rule(p: int, k: int, m: int) -> tuple[list[bool], list[int], list[list[bool]]]:
    """The layout written out slot by slot from the rules in words, for comparison."""
    slots = []  # (region, is_mask, index of real token or mask step)
    for r in range(m):
        slots += [(r, False, r * p + i) for i in range(p)] + [(r, True, j) for j in range(1, k)]
    is_mask = [s[1] for s in slots]
    pos = [s[2] if not s[1] else s[0] * p + p - 1 + s[2] for s in slots]
    allowed = []
    for rq, mq, iq in slots:
        row = []
        for rk, mk, ik in slots:
            if not mq:  # real query: earlier-or-equal real tokens only
                row.append(not mk and ik <= iq)
            elif not mk:  # mask query, real key: every real token of its own and earlier regions
                row.append(rk <= rq)
            else:  # mask query, mask key: its own region's masks up to itself
                row.append(rk == rq and ik <= iq)
        allowed.append(row)
    return is_mask, pos, allowed


def test_docstring_example():
    lay = mask_layout(2, 3, 2)
    assert lay.is_mask.tolist() == [False, False, True, True, False, False, True, True]
    assert lay.position_ids.tolist() == [0, 1, 2, 3, 2, 3, 4, 5]
    assert lay.predict.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert lay.allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("p,k,m", [(1, 1, 1), (3, 1, 2), (1, 4, 3), (4, 2, 1), (5, 5, 4), (2, 8, 2)])
def test_every_pair_follows_the_rules(p, k, m):
    lay = mask_layout(p, k, m)
    is_mask, pos, allowed = layout_by_rule(p, k, m)
    assert lay.is_mask.tolist() == is_mask
    assert lay.position_ids.tolist() == pos
    assert lay.allowed.tolist() == allowed
    assert lay.allowed.shape == (m * (p + k - 1),) * 2
    # the k prediction slots of a region: its last real token, then its masks
    for r in range(m):
        slots = lay.predict[r].tolist()
        assert not is_mask[slots[0]] and all(is_mask[s] for s in slots[1:])
        assert [pos[s] for s in slots] == list(range(r * p + p - 1, r * p + p - 1 + k))


def test_bad_layouts_are_errors():
    for args in ((0, 2, 1), (2, 0, 1), (2, 2, 0)):
        with pytest.raises(MTPError):
            mask_layout(*args)


def random_mask_model(family: str, adapter: str, seed: int = 0, vocab: int = 40) -> MaskTokenModel:
    model = MaskTokenModel.from_base(tiny_base(family, seed=seed, dtype=torch.float64, vocab_size=vocab),
                                     adapter=adapter, rank=4).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking adapters and mask embedding: they must change the mask slots
        if model.lora is not None:
            for b in model.lora.B.values():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.3)
        model.base.get_input_embeddings().weight[model.mask_token_id].normal_(generator=gen)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layout_forwards_equal_plain_forwards(family, adapter, attn):
    model = random_mask_model(family, adapter)
    model.base.config._attn_implementation = attn
    tol = 1e-10 if attn == "sdpa" else 1e-5  # eager attention takes its softmax in float32
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 39, (2, 30), generator=gen)
    valid = torch.ones_like(ids)
    valid[1, 21:] = 0  # a right-padded row: region 4 ends on x_21, a padding slot
    lay = mask_layout(4, 3, 5)
    off = 2
    lb = gather_layout(ids, valid, lay, model.mask_token_id, offset=off)
    with torch.no_grad():
        ref = model.layout_hidden_reference(lb)  # (B, S, H) one forward of the whole layout
        real_h, prefix = model.real_pass(lb)
        mask_h = model.mask_pass(lb, prefix)
        real_ok = torch.ones(real_h.shape[:2], dtype=torch.bool)
        real_ok[1, 19:] = False  # row 1's x_21: padding, whatever it computes is never used
        torch.testing.assert_close(real_h[real_ok], ref[:, ~lay.is_mask][real_ok], atol=tol, rtol=0)
        torch.testing.assert_close(mask_h, ref[:, lay.is_mask], atol=tol, rtol=0)
        logits = model.lm_head(ref)
        # real slots: a plain causal forward of the real tokens (positions from the offset)
        real_src = off + lay.source[~lay.is_mask]
        plain = model.base(ids[:1, off:off + 20], position_ids=torch.arange(off, off + 20)[None]).logits
        plain = model.without_mask_token(plain)  # the mask token is never an output of ours
        torch.testing.assert_close(logits[:1, ~lay.is_mask], plain[:, real_src - off], atol=tol, rtol=0)
        # a mask slot: a forward of its prefix plus its masks, adapters on at the masks
        for r, j in [(0, 1), (2, 2), (4, 1)]:
            slot = int(lay.predict[r, j])
            end = off + r * 4 + 4  # one past the region's last real token
            seq = torch.cat([ids[:1, off:end], torch.full((1, j), model.mask_token_id)], 1)
            pos = torch.arange(off, off + seq.shape[1])[None]
            with model.gate(seq[0] == model.mask_token_id):
                h = model.base.base_model(input_ids=seq, position_ids=pos).last_hidden_state[:, -1]
            torch.testing.assert_close(logits[:1, slot], model.lm_head(h), atol=tol, rtol=0)
    # padding: row 1's real tokens after its end are not valid keys; regions ending there do not count
    assert lb.region_weight[1].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert lb.region_weight[0].tolist() == [1.0] * 5


def test_gated_lora_leaves_real_tokens_exactly_the_base_model():
    model = random_mask_model("llama", "gated-lora")
    ids = torch.randint(0, 39, (2, 12))
    with torch.no_grad():
        plain = model.without_mask_token(model.base(ids).logits)
        ours = model(ids)[:, :, 0]  # no mask in the input: adapters never act
        assert torch.equal(plain, ours)
        with_masks = ids.clone()
        with_masks[:, 8:] = model.mask_token_id
        ours = model(with_masks)[:, :, 0]
        assert torch.equal(ours[:, :8], model.without_mask_token(model.base(ids[:, :8]).logits))  # causal: masks only change what follows
        assert not torch.allclose(ours[:, 8:], model.base(with_masks).logits[:, 8:])  # adapters act at masks


def test_mask_token_is_added_to_tokenizer_and_embedding(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_base("llama", vocab_size=len(tok))
    rows = base.get_input_embeddings().weight.shape[0]
    mean = base.get_input_embeddings().weight.detach().mean(0)
    model = MaskTokenModel.from_base(base, tokenizer=tok)
    assert model.mask_token_id == rows and len(tok) == rows + 1
    assert tok.convert_ids_to_tokens(model.mask_token_id) == "<|mtp_mask|>"
    emb = model.base.get_input_embeddings().weight
    assert emb.shape[0] == rows + 1
    torch.testing.assert_close(emb[-1].detach(), mean)
    assert model.base.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    # a matrix with spare padded rows: the mask token takes one, nothing is resized
    tok2 = tiny_tokenizer()
    padded = tiny_base("llama", vocab_size=len(tok2) + 6)
    m2 = MaskTokenModel.from_base(padded, tokenizer=tok2)
    assert m2.mask_token_id == len(tok2) - 1 and m2.base.get_input_embeddings().weight.shape[0] == len(tok2) + 5
    # an existing token used as the mask (checkpoints trained with the authors' code ship one)
    m3 = MaskTokenModel.from_base(tiny_base("llama", vocab_size=len(tok2)), mask_token_id=3, tokenizer=tok2)
    assert m3.mask_token_id == 3 and m3.config.vocab_size == len(tok2)
    with pytest.raises(MTPError, match="outside"):
        MaskTokenModel.from_base(tiny_base("llama", vocab_size=20), mask_token_id=20)
    # not the end, start or padding token (an end token as the mask: answers that never end), nor a name and an
    # id that disagree
    for kwargs in ({"mask_token_id": tok2.eos_token_id}, {"mask_token": tok2.eos_token},
                   {"mask_token_id": tok2.bos_token_id}, {"mask_token_id": tok2.pad_token_id}):
        with pytest.raises(MTPError, match=r"is the model's (end-of-sequence|start|padding) token"):
            MaskTokenModel.from_base(tiny_base("llama", vocab_size=len(tok2)), tokenizer=tok2, **kwargs)
    several_ends = tiny_base("llama", vocab_size=len(tok2))
    several_ends.config.eos_token_id = [7, 9]  # as Llama 3's configs name their end tokens (a list crashed the check)
    assert MaskTokenModel.from_base(several_ends, tokenizer=tok2, mask_token_id=3).mask_token_id == 3
    with pytest.raises(MTPError, match="is the model's end-of-sequence token"):
        MaskTokenModel.from_base(several_ends, tokenizer=tok2, mask_token_id=9)
    with pytest.raises(MTPError, match="mask_token 'x' is not token 3 of this tokenizer"):
        MaskTokenModel.from_base(tiny_base("llama", vocab_size=len(tok2)), tokenizer=tok2, mask_token_id=3,
                                 mask_token="x")


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_save_and_load_round_trip(tmp_path, adapter):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = MaskTokenModel.from_base(tiny_base("llama", vocab_size=len(tok)), tokenizer=tok, adapter=adapter, rank=4,
                                     k=3)
    if model.lora is not None:
        with torch.no_grad():
            for b in model.lora.B.values():
                b.normal_()
    folder = model.save_pretrained(tmp_path / "m")
    again = MaskTokenModel.from_pretrained(folder)
    assert (again.mask_token_id, again.mask_token, again.adapter, again.default_k) == \
        (model.mask_token_id, "<|mtp_mask|>", adapter, 3)
    assert again.tokenizer.convert_tokens_to_ids("<|mtp_mask|>") == model.mask_token_id
    ids = torch.tensor([[5, 6, model.mask_token_id, model.mask_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
    plain = AutoModelForCausalLM.from_pretrained(folder)  # the base weights under their usual names
    with torch.no_grad():
        torch.testing.assert_close(plain(ids[:, :2]).logits, model.base(ids[:, :2]).logits)
