"""`mtp train` on a CUDA GPU (`pytest -m cuda`; skipped where torch sees none): heads and both self-distillation
adapters a few steps, on a tiny model and on the default model, the --lora-layers crash (KeyError 'fast_rope')
and torchrun with nccl in one process. Each is a few seconds on an H100/H200."""

from __future__ import annotations

import json

import pytest
import torch
from test_commands import write_data
from test_distributed import torchrun
from training_helpers import tiny_llama, train_tokenizer

from mtp.models.mask_tokens import MaskTokenModel, gather_layout, mask_layout
from mtp.models.parallel_heads import MTPModel
from mtp.training.commands import train

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tok) -> str:
    folder = tmp_path_factory.mktemp("cuda") / "hf-llama"
    model = tiny_llama(vocab_size=len(tok), num_heads=1, tokenizer=tok)
    model.base.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _report(out) -> dict:
    report = json.loads((out / "eval.json").read_text())
    runtime, speed = report["runtime"], report["training_speed"]
    assert runtime["device"].startswith("cuda") and runtime["gpu"]  # --device auto found the GPU
    assert speed["tokens_per_second"] > 0 and speed["peak_gpu_memory_mb"] > 0
    return report


def test_heads_train_on_the_gpu(tmp_path, hf_folder):
    out = tmp_path / "heads"
    assert train(output=str(out), model=hf_folder, data=write_data(tmp_path / "d.jsonl", n=16), num_heads=3,
                 freeze_trunk=True, targets="self", max_new_tokens=8, seq_len=64, steps=4, holdout=0.25,
                 progress=False) == 0
    report = _report(out)
    # --dtype auto: the frozen trunk in bf16 where autocast computes in it; the heads train in fp32
    assert report["runtime"]["dtype"] == "bfloat16" and report["runtime"]["autocast"] == "bfloat16"
    assert MTPModel.from_pretrained(out).num_heads == 3


def test_trunk_features_on_the_gpu_or_on_disk_train_the_same(tmp_path, hf_folder):
    """--trunk-cache device keeps the frozen trunk's features in GPU memory, disk reads them per batch from the
    run folder: the same features, so the same held-out losses; auto chooses the GPU for a small run."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    losses = {}
    for where in ("device", "disk", "auto"):
        out = tmp_path / where
        assert train(output=str(out), model=hf_folder, data=data, num_heads=3, freeze_trunk=True, targets="self",
                     max_new_tokens=8, seq_len=64, steps=4, holdout=0.25, trunk_cache=where, seed=3,
                     progress=False) == 0
        report = _report(out)
        assert report["trunk_cache"] == ("device" if where == "auto" else where)
        assert report["peak_memory_gb"]["gpu"] > 0
        losses[where] = [h["loss"] for h in report["heads"]]
    torch.testing.assert_close(losses["disk"], losses["device"], rtol=1e-3, atol=1e-4)
    assert losses["auto"] == losses["device"]


@pytest.mark.parametrize("adapter", ["full", "gated-lora"])
def test_self_distillation_trains_on_the_gpu(tmp_path, hf_folder, adapter):
    out = tmp_path / adapter
    extra = {"lora_layers": 1, "lora_rank": 4} if adapter == "gated-lora" else {}  # the layers below: the crash
    assert train(output=str(out), model=hf_folder, data=write_data(tmp_path / "d.jsonl", n=12),
                 method="selfdistill", adapter=adapter, k_min=2, k_max=4, regions=4, seq_len=48, steps=3, lr=1e-3,
                 holdout=0.25, progress=False, **extra) == 0
    report = _report(out)
    assert report["runtime"]["dtype"] == "float32" and report["runtime"]["autocast"] == "bfloat16"
    assert MaskTokenModel.from_pretrained(out, device="cuda").device.type == "cuda"


def test_a_mask_pass_under_adapters_on_the_top_layers_only(tok):
    """The crash on CUDA (KeyError 'fast_rope'): frozen layers under the adapters inside a pass with gradients."""
    model = MaskTokenModel.from_base(tiny_llama(vocab_size=len(tok), num_heads=1).base, adapter="gated-lora",
                                     rank=4, lora_layers=1, tokenizer=tok).cuda()
    ids = torch.randint(5, len(tok), (2, 24), device="cuda")
    lb = gather_layout(ids, torch.ones_like(ids), mask_layout(4, 3, 5), model.mask_token_id, 1)
    with torch.no_grad():
        _, prefix = model.real_pass(lb)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mask_h = model.mask_pass(lb, prefix)
        mask_h.float().square().sum().backward()
    assert all(p.grad is not None for p in model.lora.parameters() if p.requires_grad)


def test_torchrun_nccl_in_one_process(tmp_path, hf_folder):
    """torchrun's multi-GPU path (nccl) with one process: FSDP2 and DDP on CUDA."""
    data = write_data(tmp_path / "d.jsonl", n=12)
    for mode in ("fsdp", "ddp"):
        out = tmp_path / mode
        torchrun({"model": hf_folder, "data": data, "output": str(out), "parallel": mode, "device": "cuda",
                  "steps": 3, "seq_len": 48, "batch_size": 2, "num_heads": 2, "holdout": 0.25, "progress": False},
                 nproc=1)
        report = _report(out)
        assert report["runtime"]["device"] == "cuda:0"
        assert MTPModel.from_pretrained(out).num_heads == 2


@pytest.mark.real_model
def test_the_default_model_trains_on_the_gpu(tmp_path):
    """The default model, a few steps each: heads (frozen trunk, bf16), and self-distillation with gated LoRA on
    the top 12 of its 30 layers (the command that crashed) and with full fine-tuning."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = {"data": data, "steps": 2, "holdout": 0.25, "progress": False, "limit": 16}
    assert train(output=str(tmp_path / "heads"), freeze_trunk=True, seq_len=128, **common) == 0
    _report(tmp_path / "heads")
    for adapter, extra in (("gated-lora", {"lora_layers": 12, "lora_rank": 32}), ("full", {})):
        out = tmp_path / adapter
        assert train(output=str(out), method="selfdistill", adapter=adapter, k_min=2, k_max=16, regions=5,
                     seq_len=160, **common, **extra) == 0
        _report(out)
