"""The one device and dtype rule (`mtp.runtime`): what auto resolves to, the devices torch cannot use (one-line
errors before anything loads, in every command and in the Python API), and what the commands choose from it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_base, tiny_tokenizer
from mtp.errors import MTPError
from mtp.runtime import Runtime, resolve_device, resolve_runtime
from test_cli import run_cli


def fake_gpus(monkeypatch, count: int = 1, bf16: bool = True, name: str = "NVIDIA H200") -> None:
    """torch as it looks on a machine with `count` GPUs (nothing is ever run on them in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_in_float32_without_a_gpu(monkeypatch):
    no_gpu(monkeypatch)
    runtime = resolve_runtime()
    assert runtime == Runtime(torch.device("cpu"), torch.float32)
    assert runtime.to_dict() == {"device": "cpu", "gpu": None, "dtype": "float32"}
    assert runtime.describe() == "cpu, float32"
    assert resolve_runtime("cpu", "bfloat16").dtype == torch.bfloat16  # an explicit dtype is kept
    assert resolve_runtime("cpu", quantize="fp16").device.type == "cpu"  # packing is the CPU's


def test_auto_is_the_first_gpu_in_bfloat16_with_one(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    runtime = resolve_runtime()
    assert runtime == Runtime(torch.device("cuda", 0), torch.bfloat16)
    assert runtime.to_dict() == {"device": "cuda:0", "gpu": "NVIDIA H200", "dtype": "bfloat16"}
    assert runtime.describe() == "cuda:0 (NVIDIA H200), bfloat16"
    assert resolve_device("cuda") == torch.device("cuda", 0)  # compares equal to a model's .device
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_runtime("auto", "float32").dtype == torch.float32
    fake_gpus(monkeypatch, bf16=False, name="Tesla V100")
    assert resolve_runtime().dtype == torch.float16  # a GPU without bf16


@pytest.mark.parametrize("gpus, spec, message", [
    (0, "cuda", "--device cuda: this torch is a CPU-only build" if torch.version.cuda is None
     else "--device cuda: torch sees no CUDA device"),
    (0, "cuda:0", "--device cuda:0: "),
    (1, "cuda:7", "--device cuda:7: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    (1, "bogus", "--device 'bogus': unknown device; choose auto, cpu, cuda or cuda:N"),
    (1, "meta", "--device meta: not supported; choose auto, cpu, cuda or cuda:N"),
])
def test_devices_torch_cannot_use_are_errors(gpus, spec, message, monkeypatch):
    fake_gpus(monkeypatch, count=gpus) if gpus else no_gpu(monkeypatch)
    with pytest.raises(MTPError) as error:
        resolve_device(spec, flags=True)
    assert str(error.value).startswith(message)


def test_packing_is_for_the_cpu(monkeypatch):
    fake_gpus(monkeypatch)
    with pytest.raises(MTPError, match="--quantize fp16 packs weights for CPUs"):
        resolve_runtime("auto", quantize="fp16", flags=True)


COMMANDS = [["info"], ["generate", "--prompt", "hi"], ["eval"], ["bench"], ["demo"], ["train", "--output", "o"],
            ["bench-train"], ["chat"], ["serve", "--port", "0"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("device, message", [("cuda", "--device cuda: "), ("bogus", "unknown device")])
def test_every_command_checks_its_device_before_any_work(command, device, message, monkeypatch, capsys):
    no_gpu(monkeypatch)
    model = [] if command[0] == "demo" else ["--model", "/no/such/model"]  # loading would fail on this instead
    code, _, err = run_cli([*command, *model, "--device", device], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "not found" not in err


def test_packing_on_a_gpu_is_refused_before_loading(monkeypatch, capsys):
    fake_gpus(monkeypatch)
    code, _, err = run_cli(["generate", "--model", "/no/such/model", "--prompt", "hi", "--quantize", "int8"], capsys)
    assert code == 2 and "--quantize int8 packs weights for CPUs" in err


def test_the_python_api_refuses_a_device_before_loading(tiny_mtp_folder, tmp_path, monkeypatch):
    from mtp.hub import load_base_model
    from mtp.models.loading import load_mtp_model
    from mtp.models.mask_tokens import MaskTokenModel

    no_gpu(monkeypatch)
    tok = tiny_tokenizer()
    mask_model = MaskTokenModel.from_base(tiny_base(vocab_size=len(tok)), tokenizer=tok)
    mask_folder = mask_model.save_pretrained(tmp_path / "mask")
    for load in (lambda: load_mtp_model(str(tiny_mtp_folder), device="cuda"),
                 lambda: MaskTokenModel.from_pretrained(mask_folder, device="cuda"),
                 lambda: load_base_model("/no/such/model", device="cuda")):
        with pytest.raises(MTPError, match="cuda: this torch|cuda: torch sees no"):
            load()
    assert load_mtp_model(str(tiny_mtp_folder), device="auto", dtype="auto").device.type == "cpu"


def test_eval_batches_more_on_a_gpu():
    from mtp.runtime import default_batch_rows

    assert default_batch_rows(torch.device("cuda", 0)) == 64
    assert default_batch_rows(torch.device("cpu")) == 8


@pytest.mark.parametrize("method, freeze_trunk, autocast, gpu, expected", [
    ("heads", True, "auto", True, "bfloat16"),  # the frozen part in bf16 where autocast computes in it anyway
    ("heads", True, "float32", True, "float32"),
    ("heads", False, "auto", True, "float32"),  # trained weights stay fp32 (bf16 autocast on the GPU)
    ("selfdistill", False, "auto", True, "float32"),
    ("heads", True, "auto", False, "float32"),
])
def test_train_dtype_auto(method, freeze_trunk, autocast, gpu, expected, monkeypatch):
    from mtp.training.commands import _Args, _validate, train_defaults

    fake_gpus(monkeypatch) if gpu else no_gpu(monkeypatch)
    args = train_defaults()
    a = _Args({**args, "output": "o", "method": method, "freeze_trunk": freeze_trunk, "autocast": autocast})
    _validate(a)
    assert a.dtype == expected


def test_demo_plans_for_its_device(monkeypatch, capsys):
    from mtp.evaluation.demo import CPU_PLAN, GPU_PLAN, _announce, plan_for, train_settings

    assert plan_for(torch.device("cpu")) is CPU_PLAN and plan_for(torch.device("cuda", 0)) is GPU_PLAN
    assert GPU_PLAN.budget_minutes is None  # a GPU answers all 7,473 questions
    settings = train_settings(None, 3.0, None, "cuda:0", GPU_PLAN)
    assert settings["limit"] is None and settings["answer_minutes"] is None and settings["device"] == "cuda:0"
    assert settings["gen_batch_size"] == GPU_PLAN.gen_batch_size > CPU_PLAN.gen_batch_size
    assert (settings["batch_size"], settings["lr"]) == (16, 1e-2)  # a GPU's step costs launches, not rows
    assert (train_settings(None, 3.0)["batch_size"], train_settings(None, 3.0)["lr"]) == (4, 5e-3)  # the CPU's
    fake_gpus(monkeypatch)
    _announce(resolve_runtime(), GPU_PLAN, None, None)
    out = capsys.readouterr().out
    assert "on cuda:0 (NVIDIA H200), bfloat16; all 7,473 GSM8K train questions, no time budget" in out


def test_more_threads_than_cores_are_the_cores(capsys):
    """Threads past the cores this process may use wait on each other (--threads 9999 did not decode 16 tokens in
    two minutes on 2 cores and slowed the whole machine): a warning, and the cores."""
    import os

    from mtp.runtime import set_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        set_threads(cores)
        assert capsys.readouterr().err == "" and torch.get_num_threads() == cores
        set_threads(cores * 100)
        assert capsys.readouterr().err == \
            f"mtp: warning: --threads {cores * 100} is more than the {cores} cores this process may use: using {cores}\n"
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


@pytest.mark.machine_load
def test_core_wait_is_the_share_of_the_threads_time_spent_waiting(monkeypatch):
    """`CoreWait`: over the threads that ran since it started (a new thread from its birth), the time they waited
    for a core over the time they ran or waited; a note only where that passed CONTENDED at more than one
    thread. On Linux it reads the kernel's figures: a share between 0 and 1."""
    import mtp.runtime as runtime

    real = runtime.CoreWait().fraction()
    assert real is None or 0 <= real <= 1
    s = 10**9  # (ns)
    times = iter([{"1": (1 * s, 0), "2": (5 * s, 0)}, {"1": (4 * s, s), "2": (8 * s, s), "3": (2 * s, 0)},
                  {"1": (1 * s, 0)}, {"1": (2 * s, s)}])
    clock = iter([0.0, 5.0, 0.0, 10.0])  # (seconds)
    monkeypatch.setattr(runtime, "_thread_times", lambda: next(times))
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    wait = runtime.CoreWait()
    assert wait.fraction() == pytest.approx(2 / (3 + 3 + 2 + 2))
    assert runtime.CoreWait().fraction() is None  # 2 s of threads in 10: it mostly waited for another process
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "_thread_times", lambda: None)
    assert runtime.CoreWait().fraction() is None  # (not Linux)
    for share, threads, noted in ((0.2, 2, True), (0.05, 2, False), (0.2, 1, False), (None, 2, False)):
        monkeypatch.setattr(runtime.CoreWait, "fraction", lambda self, share=share: share)
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert (runtime.CoreWait().note() is not None) == noted
