"""Reading tensors one at a time: dtype conversion through a small staging buffer, fp16 loading for packing."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_mtp
from mtp.decoding.generate import generate, left_pad
from mtp.models import safetensors_io
from mtp.models.loading import load_mtp_model
from mtp.models.packed import HalfEmbedding, PackedLinear, packed_bytes
from mtp.models.quantize import quantize_for_decoding
from mtp.models.safetensors_io import SafetensorsReader, write_safetensors

needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="fp16 packing needs fbgemm (x86)")


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wanted", [torch.float32, torch.bfloat16, torch.float16])
def test_converting_read_in_chunks_equals_a_whole_tensor_cast(tmp_path, monkeypatch, stored, wanted):
    monkeypatch.setattr(safetensors_io, "_STAGING_BYTES", 64)  # 8..32 values a chunk: many chunks, a ragged end
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 13, generator=gen).to(stored), "b": torch.randn(3, generator=gen).to(stored),
               "empty": torch.zeros(0, 4, dtype=stored)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, tensors.__getitem__)
    with SafetensorsReader(path) as reader:
        for name, t in tensors.items():
            got = reader.read(name, wanted)
            assert got.dtype == wanted and torch.equal(got, t.to(wanted)), name
            assert torch.equal(reader.read(name), t)  # as stored: read straight into place


def test_packed_bytes_pads_the_input_dimension_to_512():
    cols = 32 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 16
    assert packed_bytes(512, 2 * cols) == 2 * 512 * 2 * cols + 1024
    assert packed_bytes(576, 960) == 2 * 1024 * 960 + 1024  # SmolLM2's QKV: 1.78x its 2-byte size
    assert packed_bytes(1536, 576) == 2 * 1536 * 576 + 1024
    assert packed_bytes(10, 1) == 2 * 512 * cols + 1024


@needs_fbgemm
def test_loading_for_fp16_decoding_reads_fp16_and_decodes_as_packing_after_a_fp32_load(tmp_path):
    """`--quantize fp16` loads the layers, the embedding and the unembedding in fp16 (never fp32) and keeps the
    table once in fp16: the same tokens as a fp32 load packed afterwards (weights rounded to fp16 first, so
    both hold exactly the same values), speculative equal to greedy."""
    model = tiny_mtp("llama", num_heads=3, seed=7, vocab_size=97)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    folder = model.save_pretrained(tmp_path / "m")
    lean = load_mtp_model(str(folder), quantize="fp16")
    assert isinstance(lean.base.get_input_embeddings(), HalfEmbedding)
    assert isinstance(lean.base.lm_head, PackedLinear)
    assert not any(p.dtype != torch.float32 or p.dim() == 2 for p in lean.parameters())
    reference = quantize_for_decoding(load_mtp_model(str(folder)), "fp16", decode_only=True)
    ids, mask = left_pad([[5, 9, 2, 7, 1, 3], [3, 1, 4], [8]])
    greedy = generate(lean, ids, mask, max_new_tokens=16, stop_token_ids=[])
    assert greedy.tokens == generate(reference, ids, mask, max_new_tokens=16, stop_token_ids=[]).tokens
    assert generate(lean, ids, mask, max_new_tokens=16, strategy="speculative", stop_token_ids=[]).tokens \
        == greedy.tokens


@needs_fbgemm
def test_memory_report_counts_padded_packed_bytes(tmp_path):
    from mtp.memory import memory_report, tensor_bytes

    folder = tiny_mtp("llama", num_heads=2, seed=1, vocab_size=97).save_pretrained(tmp_path / "m")
    packed = load_mtp_model(str(folder), quantize="fp16")
    assert tensor_bytes(packed, padded=True) > tensor_bytes(packed)  # 32-wide matrices padded to 512 rows
    lines = memory_report(str(folder), quantize="fp16", max_new_tokens=2, tree_size=3, lookup=2)
    if lines[0].startswith("memory:"):
        pytest.skip("no /proc/self/clear_refs here")
    assert any(line.startswith("load + pack fp16") for line in lines)
    assert any(line.startswith("decode 2 (greedy)") for line in lines)
    assert any(line.startswith("decode 2 (speculative, tree 3, lookup 2)") for line in lines)
    ratio = next(line for line in lines if line.startswith("speculative decoding's peak is"))
    assert 0.5 < float(ratio.split()[4].rstrip("x")) < 2.0
    assert "fbgemm pads them" in lines[1]


def _frozen_trunk(model):
    """`model` as `mtp train --freeze-trunk` leaves it: only the extra heads require grad."""
    model.requires_grad_(False)
    for module in model.head_modules():
        module.requires_grad_(True)
    return model


def test_frozen_weights_go_apart_and_later_saves_link_them(tmp_path):
    """`save_pretrained(frozen_apart=True)`: the weights that do not require grad in a shard of their own, with
    Hugging Face's index; a later save with `link_from` takes that shard by a hard link where it holds the same
    names, shapes and dtypes (and writes it where not); both load as the model, with ours and with transformers."""
    from transformers import AutoModelForCausalLM

    from mtp.models.parallel_heads import MTPModel
    from mtp.models.safetensors_io import INDEX_NAME, SHARD_NAMES, WEIGHTS_NAME

    model = _frozen_trunk(tiny_mtp(num_heads=3))
    first = model.save_pretrained(tmp_path / "step-1", frozen_apart=True)
    assert not (first / WEIGHTS_NAME).exists() and (first / INDEX_NAME).is_file()
    frozen, trained = (first / name for name in SHARD_NAMES)
    with SafetensorsReader(trained) as reader:
        assert reader.tensors and all(k.startswith("extra_heads.") for k in reader.tensors)
    with SafetensorsReader(frozen) as reader:
        assert "model.embed_tokens.weight" in reader.tensors and not any(k.startswith("extra_heads.")
                                                                         for k in reader.tensors)
    with torch.no_grad():
        for p in model.head_modules()[0].parameters():
            p.add_(1.0)  # a training step, between the checkpoints
    second = model.save_pretrained(tmp_path / "step-2", frozen_apart=True, link_from=first)
    assert (second / SHARD_NAMES[0]).stat().st_ino == frozen.stat().st_ino  # the same file, not a copy
    assert (second / SHARD_NAMES[1]).stat().st_ino != trained.stat().st_ino
    loaded = MTPModel.from_pretrained(second)
    for name, t in model.checkpoint_state_dict().items():
        assert torch.equal(loaded.checkpoint_state_dict()[name], t), name
    hf = AutoModelForCausalLM.from_pretrained(second)  # the standard sharded layout: transformers reads it too
    assert torch.equal(hf.model.embed_tokens.weight, model.base.model.embed_tokens.weight)
    plain = model.save_pretrained(tmp_path / "plain")  # without frozen_apart: one file, as before
    assert sorted(p.name for p in plain.iterdir() if "safetensors" in p.name) == [WEIGHTS_NAME]
    model.base.model.norm.weight.requires_grad_(True)  # now the frozen set differs from step-1's: written anew
    third = model.save_pretrained(tmp_path / "step-3", frozen_apart=True, link_from=first)
    assert (third / SHARD_NAMES[0]).stat().st_ino != frozen.stat().st_ino
    assert torch.equal(MTPModel.from_pretrained(third).base.model.norm.weight, model.base.model.norm.weight)


def test_a_damaged_weights_index_is_named(tmp_path):
    """A sharded folder whose index lists a missing shard, or a shard that holds other tensors than it says, is
    one MTPError naming the file, before any weight is read."""
    import json

    from mtp.errors import MTPError
    from mtp.models.loading import load_mtp_model
    from mtp.models.safetensors_io import INDEX_NAME, SHARD_NAMES

    folder = _frozen_trunk(tiny_mtp(num_heads=2)).save_pretrained(tmp_path / "m", frozen_apart=True)
    index = json.loads((folder / INDEX_NAME).read_text())
    name = next(k for k, v in index["weight_map"].items() if v == SHARD_NAMES[0])
    index["weight_map"][name] = SHARD_NAMES[1]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MTPError, match="does not hold what model.safetensors.index.json says"):
        load_mtp_model(str(folder))
    (folder / SHARD_NAMES[1]).unlink()
    with pytest.raises(MTPError, match=SHARD_NAMES[1]):
        load_mtp_model(str(folder))


def test_a_sharded_hugging_face_folder_loads_read_into_memory(tmp_path, monkeypatch):
    """A Llama folder in shards (as every model past 5 GB ships) takes the same lean path as one file: each tensor
    read into place (`from_hf_folder`, not transformers' mapped load), with the same weights."""
    from conftest import tiny_base, tiny_tokenizer
    from mtp.models.parallel_heads import MTPModel
    from mtp.models.safetensors_io import INDEX_NAME

    tok = tiny_tokenizer()
    base = tiny_base("llama", vocab_size=len(tok))
    base.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    tok.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / INDEX_NAME).is_file() and len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    lean = MTPModel.from_hf_folder(tmp_path / "hf", num_heads=2)
    assert lean is not None
    for name, t in base.state_dict().items():
        assert torch.equal(lean.base.state_dict()[name], t), name
    calls = []
    monkeypatch.setattr(MTPModel, "from_hf_folder", classmethod(lambda cls, *a, **k: calls.append(a) or lean))
    assert load_mtp_model(str(tmp_path / "hf"), num_heads=2, decode_only=True) is lean and calls
