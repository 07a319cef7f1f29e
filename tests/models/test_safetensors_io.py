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
