"""`mtp eval`, `mtp bench` and `mtp generate` on a CUDA GPU (`pytest -m cuda`; skipped where torch sees none), on a
tiny model: what --device auto chooses there, the GPU rows of the bench, what the reports record."""

from __future__ import annotations

import json

import pytest
import torch

from mtp.errors import MTPError
from mtp.evaluation.commands import bench, eval_
from mtp.runtime import resolve_device, resolve_runtime
from test_cli import run_cli

pytestmark = pytest.mark.cuda
pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file

FAST = {"max_new_tokens": 6, "shots": 1, "progress": False}


def test_auto_is_the_gpu_in_bfloat16():
    runtime = resolve_runtime()
    assert runtime.device == torch.device("cuda", torch.cuda.current_device())
    assert runtime.dtype == torch.bfloat16  # an H100/H200 has bf16
    assert runtime.to_dict()["gpu"] == torch.cuda.get_device_name(runtime.device)
    with pytest.raises(MTPError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_generate_on_the_gpu(tiny_model_dir, capsys):
    code, out, err = run_cli(["generate", "--model", str(tiny_model_dir), "--prompt", "Tom has 3 apples",
                              "--strategy", "speculative", "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    assert "tokens per forward pass; cuda:" in err and "bfloat16" in err


def test_eval_batches_on_the_gpu_and_speculative_equals_greedy(tiny_model_dir, gsm8k_file, tmp_path):
    outputs = {}
    for strategy in ("greedy", "speculative"):
        out = tmp_path / strategy
        assert eval_(model=str(tiny_model_dir), data=str(gsm8k_file), strategy=strategy, dtype="float32",
                     output=str(out), **FAST) == 0
        summary = json.loads((out / "summary.json").read_text())
        runtime = summary["runtime"]
        assert runtime["device"].startswith("cuda") and runtime["gpu"] and runtime["batch_size"] == 64
        assert summary["n"] == 5
        outputs[strategy] = [json.loads(x)["output"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert outputs["speculative"] == outputs["greedy"]  # fp32 on the GPU: lossless


def test_bench_on_the_gpu(tiny_model_dir, gsm8k_file, tmp_path):
    """--device auto: the GPU; transformers' static-cache peer (compiled during its warm-up), no fp16/int8 rows;
    peak GPU memory per row, ms a step beside the floor, batch rows. fp32: lossless rows equal greedy exactly
    (in bf16 a near-tie may part them)."""
    out = tmp_path / "bench"
    assert bench(model=str(tiny_model_dir), prompts=str(gsm8k_file), limit=2, max_new_tokens=6, output=str(out),
                 tau=[0.5], k=[2], int8=True, tree_size=[3], lookup=2, batch_size=[1, 4],
                 dtype="float32", progress=False) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["device"].startswith("cuda") and report["runtime"]["dtype"] == "float32"
    assert report["runtime"]["gpu"] and "cuda" in report["bandwidth"]["source"]
    rows = {r["method"]: r for r in report["methods"]}
    assert {"hf-greedy", "hf-static", "greedy", "speculative", "speculative-tree3-lookup2"} <= set(rows)
    assert not [name for name in rows if name.endswith(("-fp16", "-int8"))]
    assert any("fbgemm" in note for note in report["notes"])  # --int8 asked for: said why it is left out
    for name in ("hf-greedy", "hf-static", "greedy", "speculative"):
        assert rows[name]["peak_memory_mb"] > 0 and rows[name]["ms_per_step"] > 0 and rows[name]["floor_ms"] > 0
    assert rows["hf-static"]["equal_to_hf_greedy"] is not None
    batches = report["batch_rows"]
    assert [(r["batch_size"], r["prompts"]) for r in batches] == [(1, 2), (1, 2), (4, 4), (4, 4)]
    assert batches[0]["method"] == "greedy" and all(r["tokens_per_second"] > 0 for r in batches)
    assert "| batch | method |" in (out / "report.md").read_text()
