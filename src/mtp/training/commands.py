"""`mtp train` and `mtp bench-train`."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from mtp.arguments import current_arguments, spelled
from mtp.errors import MTPError
from mtp.io import atomic_write_json, disk_errors, remove_stale_temporaries, temporary_prefix
from mtp.process import output_lock
from mtp.runtime import (
    DType,
    Runtime,
    auto_dtype,
    describe_runtime,
    parse_dtype,
    peak_memory,
    resolve_device,
    set_threads,
)
from mtp.training.distributed import Parallel

TRAIN_CONFIG = "train_config.json"
EVAL_NAME = "eval.json"
# Flags that do not change what a run computes: free to differ when resuming.
_NOT_RUN_IDENTITY = {"output", "resume", "device", "threads", "progress", "save_every", "keep_checkpoints",
                     "eval_every", "gen_batch_size", "trunk_cache", "gradient_checkpointing", "parallel"}
LossOrder = Literal["memory-efficient", "naive"]
# An --autocast dtype -> the name the training loop gives that precision (`mtp.training.loop.TrainConfig`).
_PRECISION = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_AUTOCAST = {precision: dtype for dtype, precision in _PRECISION.items()}
# The mask-token method's own flags: with --method heads, one set away from its default is an error.
SELFDISTILL_ONLY = ("prefix_loss", "entropy_loss", "k", "k_min", "k_max", "adapter", "lora_rank", "lora_layers",
                    "regions", "supervision", "mask_token", "mask_token_id", "per_rank_k")


def train(
    output: str,
    model: str | None = None,
    data: str = "gsm8k",
    method: Literal["heads", "selfdistill"] = "heads",
    num_heads: int | None = None,
    num_trunk_layers: int | None = None,
    freeze_trunk: bool = False,
    targets: Literal["data", "self"] = "data",
    data_format: Literal["auto", "gsm8k", "metamathqa", "text", "jsonl"] = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    template: Literal["auto", "chat", "plain"] = "auto",
    loss_on: Literal["answer", "all"] = "answer",
    pack: bool = False,
    seq_len: int = 512,
    holdout: float = 0.05,
    holdout_max: int = 200,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float | None = None,
    min_lr_ratio: float = 0.1,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    head_weights: str = "equal",
    loss_order: LossOrder = "memory-efficient",
    autocast: DType = "auto",
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    gradient_checkpointing: bool = False,
    trunk_cache: Literal["auto", "device", "disk", "off"] = "auto",
    draft_vocab: int = 8192,
    max_new_tokens: int = 256,
    gen_batch_size: int = 16,
    answer_minutes: float | None = None,
    eval_every: int = 0,
    save_every: int = 100,
    keep_checkpoints: int = 2,
    resume: bool = False,
    adapter: Literal["full", "gated-lora"] = "full",
    lora_rank: int = 16,
    lora_layers: int | None = None,
    k: int | None = None,
    k_min: int | None = None,
    k_max: int | None = None,
    regions: int = 5,
    supervision: Literal["hard", "soft"] = "hard",
    prefix_loss: float = 0.0,
    entropy_loss: float = 0.0,
    mask_token: str | None = None,
    mask_token_id: int | None = None,
    per_rank_k: bool = False,
    parallel: Literal["none", "ddp", "fsdp"] = "none",
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> int:
    """Train MTP heads (or the whole model) on question/answer data or text; the output folder is an MTP model.

    Args:
        output: run folder: the trained model, checkpoints/, metrics.jsonl, loss.png, eval.json, self_targets.jsonl
        model: base model (default: embedded SmolLM2-135M-Instruct), HF folder, .gguf, hub id, or an MTP folder
        data: "gsm8k" (shipped), a GSM8K/MetaMathQA-style .jsonl/.json, a text file, a Hugging Face dataset name
            or a dataset's folder (both need the `datasets` package); a .jsonl or a dataset is read lazily
        method: "heads": parallel MTP heads on a shared trunk; "selfdistill": a mask token trained by
            self-distillation from a frozen teacher (Kirchenbauer et al. 2026)
        num_heads: heads including the next-token head (default 4; an MTP folder keeps its own)
        num_trunk_layers: shared layers (default: all but the last)
        freeze_trunk: train the extra heads only; the trunk and head 0 stay exactly as the base model
        targets: "data": the dataset's answers; "self": the model's own greedy answers to the prompts
        data_format: how to read --data (auto looks at the contents)
        question_field: prompt column of JSON records / datasets
        answer_field: answer column of JSON records / datasets
        split: dataset split (gsm8k: train or test)
        limit: use only the first N examples
        template: "chat" (tokenizer's chat template), "plain" ("question\\n\\nanswer"); auto: chat when available
        loss_on: "answer" tokens only, or "all" tokens
        pack: concatenate examples into full rows instead of one padded row each
        seq_len: tokens per row
        holdout: fraction of the examples held out for per-head accuracy (0: none)
        holdout_max: at most this many held-out examples
        steps: optimizer steps (or give --epochs; default 1 epoch)
        epochs: passes over the training rows (may be fractional)
        batch_size: rows per micro-batch (under torchrun: of all processes together, each computes its share)
        grad_accum: micro-batches per optimizer step
        lr: peak learning rate (default 1e-3 with --freeze-trunk, 5e-5 otherwise)
        min_lr_ratio: the cosine schedule ends at lr * this
        warmup_steps: linear warmup steps (default: 5 percent of the steps)
        weight_decay: AdamW weight decay
        max_grad_norm: gradient clipping (0: off)
        head_weights: "equal", "medusa" (0.2*0.8^(i-1) for head i>=1), or comma-separated weights per head
        loss_order: "memory-efficient" (one head's logits at a time) or "naive" (all heads at once)
        autocast: the dtype the forward and backward passes compute in (torch.autocast; the weights that train
            stay float32): auto (bfloat16 on a GPU, float16 where it has no bfloat16; float32 on a CPU), float32
            (no autocast), bfloat16, float16 (GPU only)
        dtype: with --freeze-trunk: the frozen part's weights (bfloat16: half the memory; loaded straight in it);
            the extra heads keep fp32 master weights and train under autocast in this dtype (--autocast auto);
            auto: bfloat16 on a GPU that has it, else float32 (trained weights are always fp32)
        gradient_checkpointing: recompute layer activations in the backward pass (less memory, slower)
        trunk_cache: with --freeze-trunk, compute the frozen trunk's outputs once per row (or keep those computed
            while answering) and reuse them every epoch: "disk" (in the run folder, fp16, read per batch),
            "device" (all in GPU or CPU memory), "off" (run the trunk every step); auto: device on a GPU when
            they take at most a quarter of its free memory, else disk
        draft_vocab: the extra heads predict among the N most frequent tokens of the training rows (much faster
            training and drafting, lossless decoding); 0: the whole vocabulary
        max_new_tokens: --targets self: longest self-generated answer
        gen_batch_size: --targets self: prompts answered per batch
        answer_minutes: --targets self: answer as many of the (--limit) questions, in order, as fit in about this
            many minutes, measured on the first batch, instead of all of them; the count is kept for --resume
        eval_every: held-out evaluation every N steps (0: at the end only)
        save_every: checkpoint every N steps (0: at the end and on Ctrl-C only)
        keep_checkpoints: keep the last K checkpoints
        resume: continue the run in --output from its last checkpoint (flags default to the run's own)
        adapter: --method selfdistill: "full" trains the whole model (teacher: a frozen copy); "gated-lora" trains
            LoRA adapters active at mask tokens only (real tokens stay exactly the base model)
        lora_rank: --adapter gated-lora: rank of the adapters
        lora_layers: --adapter gated-lora: adapters on the top N decoder layers only (default all); the layers
            below need no backward pass, so training is faster
        k: --method selfdistill: tokens predicted per position (the masks are k-1); default 4
        k_min: draw k per step uniformly from [k-min, k-max] (seeded) instead of a fixed --k
        k_max: see --k-min
        regions: --method selfdistill: regions per row of --seq-len slots (each: real tokens, then k-1 masks)
        supervision: "hard": cross-entropy to the teacher's argmax (the paper's default); "soft": KL to its
            distribution
        prefix_loss: weight of the next-token loss on the real tokens (0: off)
        entropy_loss: weight of the student's entropy at the prediction slots, minimised (0: off): sharper
            guesses, so ConfAdapt's threshold passes more often
        mask_token: the mask token's string (default <|mtp_mask|>; added to the tokenizer when new)
        mask_token_id: use this existing token id as the mask token (e.g. a checkpoint that ships one)
        per_rank_k: under torchrun, each rank draws its own k per step from [k-min, k-max] (the paper's recipe)
        parallel: under torchrun (torchrun --nproc-per-node N -m mtp train ...): "fsdp" shards parameters,
            gradients and optimizer state over the processes (FSDP2), "ddp" replicates them; "none": one process
        seed: data order, held-out split and initialisation seed
        device: auto (CUDA when available), cpu, cuda or cuda:N
        threads: torch CPU threads (default: torch's choice)
        progress: progress bars
    """
    args = {name: value for name, value in locals().items()}
    t_start = time.perf_counter()
    out = Path(output).expanduser()
    set_threads(threads)
    from mtp.training.distributed import torchrun_env

    env = torchrun_env()
    # One run per folder: under torchrun its rank 0 holds the folder for the whole job.
    with output_lock(out) if env is None or env[0] == 0 else contextlib.nullcontext():
        return _start(args, out, t_start)


def _start(args: dict, out: Path, t_start: float) -> int:
    """`train` once this process holds the run folder: the arguments checked, the torchrun job joined."""
    from mtp.training.checkpoints import latest_checkpoint

    checkpoint = None
    if args["resume"]:
        saved = _read_train_config(out)
        args = _merge_resume_args(args, saved)
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is None:
            print(f"mtp: no checkpoint in {out / 'checkpoints'} yet; starting the run from step 0", flush=True)
    else:
        _check_fresh_output(out)
    _check_same_data(args)
    a = _Args(args)
    _validate(a)
    args["dtype"] = a.dtype  # what auto resolved to: a resumed run keeps it, wherever it resumes
    from mtp.training.distributed import barrier, check_parallel, start, stop

    check_parallel(a.parallel)
    par = start(a.parallel, a.device)
    try:
        barrier()  # every rank has checked --output before rank 0 writes into it
        code = _train(a, args, out, checkpoint, par, t_start)
        # Rank 0 writes the final folder after the last collective; the others wait for it rather than tear the
        # process group down under a peer that still holds it (gloo aborts a rank whose peer went away).
        barrier()
        return code
    finally:
        if par is not None:
            stop()


def _train(a: _Args, args: dict, out: Path, checkpoint: Path | None, par: Parallel | None, t_start: float) -> int:
    """`train` once the arguments are checked and this process has joined its torchrun job (`par`, or None)."""
    from mtp.models.loading import check_seq_len
    from mtp.training.checkpoints import is_sharded, load_trainer_state
    from mtp.training.distributed import full_state_on_main

    main = par is None or par.is_main
    timings: dict[str, float] = {}
    dev = par.device if par is not None else resolve_device(a.device, flags=True)
    torch.manual_seed(a.seed)  # the same on every rank: new weights start alike everywhere

    # ------------------------------------------------------------------ model
    method = _method(a)
    state = None
    sharded = checkpoint is not None and is_sharded(checkpoint)
    if checkpoint is not None:
        from mtp.hub import check_model_folder

        if not sharded:
            check_model_folder(checkpoint)
        state = load_trainer_state(checkpoint)  # before any work: a damaged state must not cost the data stage
    # A sharded checkpoint holds no model folder: the run's starting model is built again and the shards are
    # read into it once it is wrapped.
    mtp_model = method.load(a, None if sharded else checkpoint, dev)
    if checkpoint is not None and mtp_model.tokenizer is None:
        raise MTPError(f"{checkpoint} has no tokenizer files")
    timings["load_model"] = time.perf_counter() - t_start
    tokenizer = mtp_model.tokenizer
    if tokenizer is None:
        raise MTPError("the model has no tokenizer; give a --model folder with tokenizer files")
    check_seq_len(mtp_model, a.seq_len)
    if a.template == "auto":
        a.template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"

    # ------------------------------------------------------------------ data
    train_data, held_data, store = _training_data(a, args, out, method, mtp_model, par)
    timings["data_and_targets"] = time.perf_counter() - t_start - timings["load_model"]

    # ------------------------------------------------------------------ schedule
    from mtp.training.data import batches_per_epoch
    from mtp.training.loop import TrainConfig, steps_for_epochs
    from mtp.training.losses import head_weights as parse_head_weights

    total_steps = a.steps if a.steps is not None else steps_for_epochs(train_data, a.epochs or 1.0, a.batch_size,
                                                                      a.grad_accum)
    lr = a.lr if a.lr is not None else method.default_lr(a)
    warmup = a.warmup_steps if a.warmup_steps is not None else round(0.05 * total_steps)
    config = TrainConfig(
        steps=total_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=lr, min_lr_ratio=a.min_lr_ratio,
        warmup_steps=warmup, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
        head_weights=parse_head_weights(a.head_weights, mtp_model.num_heads), loss_order=a.loss_order,
        precision=_PRECISION[a.autocast], gradient_checkpointing=a.gradient_checkpointing,
        freeze_trunk=a.freeze_trunk, trunk_cache=a.trunk_cache, eval_every=a.eval_every, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, seed=a.seed, progress=a.progress)
    trainer = method.trainer(mtp_model, train_data, held_data, config, a, out, parallel=par, features=store)
    if sharded:
        trainer.resume_sharded(checkpoint)
    elif checkpoint is not None:  # a single process's checkpoint: its weights were loaded with the model
        if par is not None:
            trainer.load_whole_optimizer_state(state.pop("optimizer"))
        trainer.load_state_dict(state)
        trainer.last_checkpoint = checkpoint
    target_tokens = train_data.target_count()
    where = f"; {par.world_size} processes, --parallel {par.mode}, {par.device.type}" if par is not None else ""
    if main:
        print(f"mtp train: {method.describe(mtp_model, a)}{where}; "
              f"{len(train_data)} training rows ({target_tokens:,} target tokens), "
              f"{len(held_data) if held_data is not None else 0} held-out rows; {total_steps} steps of "
              f"{a.batch_size}x{a.grad_accum} rows (~{total_steps * a.batch_size * a.grad_accum / len(train_data):.2f} "
              f"epochs, {batches_per_epoch(train_data, a.batch_size)} batches per epoch); lr {lr:g}, "
              f"autocast {_AUTOCAST[trainer.precision]}"
              + (f"; resuming at step {trainer.step}" if checkpoint is not None else ""), flush=True)

    start = time.perf_counter()
    with peak_memory(dev) as memory:
        result = trainer.train()
    timings["trunk_cache_train_eval"] = time.perf_counter() - start
    speed = {**training_speed(result.history), "peak_gpu_memory_mb": memory["peak_mb"]}
    runtime = {**Runtime(dev, parse_dtype(a.dtype)).to_dict(), "autocast": _AUTOCAST[trainer.precision]}
    # ------------------------------------------------------------------ final model and reports
    if par is None:
        install_model(mtp_model, out)
    else:  # the ordinary model folder, written by rank 0 from the gathered weights
        whole = full_state_on_main(mtp_model)
        if not main:
            return 0
        install_model(_unsharded_copy(method, a, mtp_model, whole), out)
    timings["total"] = time.perf_counter() - t_start
    _write_report(out, a, result, held_data, timings, speed, runtime, trainer, dev)
    return 0


def _feature_store(a: _Args, out: Path, method, model, par: Parallel | None):
    """Where a frozen-trunk run keeps its trunk outputs (`mtp.training.features`, in the run folder); None when
    it keeps none."""
    if not method.wants_trunk_features(a):
        return None
    from mtp.training.features import FeatureStore
    from mtp.training.targets import model_fingerprint

    return FeatureStore.for_model(out, model, model_fingerprint(model), f"rank{par.rank}" if par is not None else "")


def _training_data(a: _Args, args: dict, out: Path, method, mtp_model, par: Parallel | None):
    """The training and held-out rows: the data's answers, or the model's own (`--targets self`, cached in the
    run folder), and the run's feature store (or None). Writes train_config.json (rank 0) once the run's question
    count is settled."""
    from mtp.training.data import held_out, open_examples, tokenize_split

    examples = open_examples(a.data, format=a.data_format, question_field=a.question_field,
                             answer_field=a.answer_field, split=a.split, limit=a.limit)
    if not len(examples):
        raise MTPError(f"{a.data}: no examples")
    out.mkdir(parents=True, exist_ok=True)
    store = _feature_store(a, out, method, mtp_model, par)
    if a.targets == "self":
        return *_self_answered_data(a, args, out, method, mtp_model, par, store, examples), store
    held = held_out(len(examples), a.holdout, a.seed, max_items=a.holdout_max)
    _check_train_left(a, len(examples) - len(held), len(held))
    if par is None or par.is_main:
        _write_train_config(out, args, a)
    return *tokenize_split(examples, held, mtp_model.tokenizer, a.template, a.seq_len, a.loss_on, a.pack), store


def _self_answered_data(a: _Args, args: dict, out: Path, method, mtp_model, par: Parallel | None, store, examples):
    """--targets self: rows of the model's own answers to the examples' prompts, with the trunk outputs computed
    while answering recorded into `store`."""
    from mtp.training.data import held_out
    from mtp.training.targets import (
        CACHE_NAME,
        TokenLists,
        model_fingerprint,
        prompt_token_ids,
        self_distilled_rows,
    )

    tokenizer = mtp_model.tokenizer
    prompts, asked = TokenLists(), False
    for ex in examples:
        asked = asked or bool(ex.prompt)
        prompts.append(prompt_token_ids(tokenizer, ex.prompt, a.template))
    if not asked:
        raise MTPError(f"{a.data}: --targets self needs prompts for the model to answer (question/answer data); "
                       "plain text has none, use --targets data")
    answering = method.answering_model(mtp_model)
    fingerprint = store.model_key if store is not None else model_fingerprint(answering)  # the same model's
    # The answers must come from the model the run started from; after full fine-tuning they cannot be
    # produced again, so only a cache hit is accepted then.
    key = args.get("_answers_model_key") or fingerprint
    args["_answers_model_key"] = key
    if par is None or par.is_main:
        _write_train_config(out, args, a)
    recording = store if store is not None and fingerprint == key and not a.pack else None
    if a.answer_minutes is not None:  # the examples that fit the budget, decided once per run
        if par is not None:
            raise MTPError("--answer-minutes measures one process's answering speed; under torchrun give "
                           "--limit instead")
        if "_answer_count" not in args:
            args["_answer_count"] = _count_within_budget(answering, tokenizer, prompts, a, out / CACHE_NAME, key,
                                                         recording)
            _write_train_config(out, args, a)
        prompts = prompts.take(range(args["_answer_count"]))
    held = held_out(len(prompts), a.holdout, a.seed, max_items=a.holdout_max)
    _check_train_left(a, len(prompts) - len(held), len(held))
    groups = [[i for i in range(len(prompts)) if i not in held], sorted(held)]
    return self_distilled_rows(
        answering, tokenizer, prompts, groups, seq_len=a.seq_len, max_new_tokens=a.max_new_tokens,
        loss_on=a.loss_on, pack=a.pack, features=recording,
        ids=groups if a.answer_minutes is not None else None,  # the measured batch's ids: positions in the examples
        cache_path=out / CACHE_NAME, batch_size=a.gen_batch_size, model_key=key, generate_missing=fingerprint == key,
        progress=a.progress, desc=_targets_label(a, len(prompts)),
        share=(par.rank, par.world_size) if par is not None else (0, 1))


def training_speed(history) -> dict:
    """Throughput of this invocation's optimizer steps (`StepMetrics`): tokens (every real token of the rows)
    per second of step time, and the median step time."""
    seconds = sum(m.seconds for m in history)
    tokens = sum(m.tokens for m in history)
    return {"steps_timed": len(history), "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "step_seconds_median": round(statistics.median(m.seconds for m in history), 4) if history else None}


def _write_report(out: Path, a: _Args, result, held_data, timings: dict[str, float], speed: dict,
                  runtime: dict, trainer, dev: torch.device) -> None:
    """eval.json (what the run measured, held-out figures included) and the printed summary."""
    report = {"step": result.step, "targets": a.targets,
              "held_out_rows": len(held_data) if held_data is not None else 0,
              "train_loop_seconds": round(result.seconds, 1),  # optimizer steps only, summed over resumes
              "seconds_this_invocation": {k: round(v, 1) for k, v in timings.items()},
              "runtime": runtime, "training_speed": speed,
              "trunk_cache": getattr(trainer, "trunk_cache", "off"), "peak_memory_gb": peak_memory_gb(dev)}
    if result.evaluation is not None:
        ev = result.evaluation
        report.update(ev.to_dict())
        report["heads"] = [{"head": j, "predicts": f"t+{j + 1}", "top1_accuracy": round(ev.head_accuracy[j], 4),
                            "loss": round(ev.head_loss[j], 4), "tokens": ev.head_tokens[j]}
                           for j in range(len(ev.head_accuracy))]
    atomic_write_json(out / EVAL_NAME, report)
    _print_summary(out, result, report)


# ---------------------------------------------------------------------------------------------- helpers
class _Args:
    def __init__(self, args: dict):
        self.__dict__.update(args)


def _check_train_left(a: _Args, train: int, held: int) -> None:
    if not train:
        raise MTPError(f"{a.data}: no training examples left after holding out {held}")


def _count_within_budget(model, tokenizer, prompts, a: _Args, cache: Path, key: str, features) -> int:
    """--answer-minutes: how many of the prompts, in order, fit the budget (mtp.training.targets)."""
    from mtp.training.targets import answers_within_minutes

    n = answers_within_minutes(model, tokenizer, prompts, a.answer_minutes, max_new_tokens=a.max_new_tokens,
                               budgets=[max(0, a.seq_len - k) for k in prompts.lengths], cache_path=cache,
                               batch_size=a.gen_batch_size, model_key=key, progress=a.progress, features=features)
    print(f"mtp train: {n} of {len(prompts)} questions fit in --answer-minutes {a.answer_minutes:g} "
          f"(extrapolated from a batch of {min(a.gen_batch_size, len(prompts))})", flush=True)
    return n


def _targets_label(a: _Args, n: int) -> str:
    if a.answer_minutes is None:
        return "self-distilled targets"
    return f"self-distilled targets ({n} fit in {a.answer_minutes:g} min)"


def _validate(a: _Args) -> None:
    """What the per-flag rules (mtp.arguments, applied by the CLI) cannot see: flags that exclude each other."""
    if a.steps is not None and a.epochs is not None:
        raise MTPError("give --steps or --epochs, not both")
    if a.freeze_trunk and a.num_heads == 1:
        raise MTPError("--freeze-trunk trains the extra heads only; use --num-heads 2 or more")
    if a.method == "heads":  # the mask-token method's flags would otherwise be ignored without a word
        defaults = inspect.signature(train).parameters
        given = [spelled(name, True) for name in SELFDISTILL_ONLY if getattr(a, name) != defaults[name].default]
        if given:
            raise MTPError(f"{', '.join(given)}: for --method selfdistill (mask tokens); --method heads trains "
                           "parallel heads")
    if a.answer_minutes is not None and a.targets != "self":
        raise MTPError("--answer-minutes budgets the model's own answers; it needs --targets self")
    dev = resolve_device(a.device, flags=True)  # before anything loads
    from mtp.training.loop import resolve_precision

    resolve_precision(_PRECISION[a.autocast], dev)  # what the training loop would refuse, refused before any work
    if a.dtype == "auto":  # frozen weights in bf16 where the GPU computes in it anyway (autocast); else fp32
        bf16 = auto_dtype(dev) == torch.bfloat16 and a.autocast in ("auto", "bfloat16")
        a.dtype = "bfloat16" if bf16 and a.method == "heads" and a.freeze_trunk else "float32"
    if a.trunk_cache in ("device", "disk") and not a.freeze_trunk:
        raise MTPError(f"--trunk-cache {a.trunk_cache} keeps a frozen trunk's outputs; it needs --freeze-trunk")
    if a.dtype != "float32":  # frozen weights in bf16/fp16, trained ones fp32: the matmuls need autocast
        autocast = "bfloat16"  # (float16 would need --autocast float16, whose loss scaling does not run yet)
        if a.method != "heads" or not a.freeze_trunk:
            raise MTPError(f"--dtype {a.dtype} is for --freeze-trunk (the frozen weights; trained ones stay fp32); "
                           f"for full fine-tuning keep fp32 weights and use --autocast {autocast}")
        if a.autocast not in ("auto", autocast):
            raise MTPError(f"--dtype {a.dtype} trains under --autocast {autocast}, not {a.autocast}")
        a.autocast = autocast


class _HeadsMethod:
    """--method heads: parallel heads on a shared trunk (`mtp.training.loop.Trainer`)."""

    def load(self, a: _Args, checkpoint: Path | None, dev: torch.device):
        from mtp.models.parallel_heads import MTPModel

        dtype = parse_dtype(a.dtype)
        if checkpoint is not None:  # the trained heads come back in fp32, exactly as saved
            model = MTPModel.from_pretrained(checkpoint, device=dev, dtype=dtype, tensor_dtype=_extra_heads_fp32)
        else:
            model = load_model_for_training(a.model, a.num_heads, a.num_trunk_layers, dev, dtype)
        a.num_heads, a.num_trunk_layers = model.num_heads, model.num_trunk_layers
        return model.frozen_trunk_in(dtype) if dtype != torch.float32 else model

    def answering_model(self, model):
        return model

    def wants_trunk_features(self, a: _Args) -> bool:
        return a.freeze_trunk and a.trunk_cache != "off"

    def default_lr(self, a: _Args) -> float:
        return 1e-3 if a.freeze_trunk else 5e-5

    def trainer(self, model, train_data, held_data, config, a: _Args, out: Path, parallel=None, features=None):
        from mtp.training.draft_vocab import frequent_tokens
        from mtp.training.loop import Trainer

        model.set_draft_vocab(frequent_tokens(train_data, model.config.vocab_size, a.draft_vocab))
        return Trainer(model, train_data, config, output_dir=out, eval_data=held_data, parallel=parallel,
                       feature_store=features)

    def describe(self, model, a: _Args) -> str:
        vocab = f", draft vocabulary {model.draft_vocab.numel():,} tokens" if model.draft_vocab is not None else ""
        return (f"{model.num_heads} heads on {model.num_trunk_layers} trunk layers, "
                f"{'heads only (frozen trunk)' if a.freeze_trunk else 'full fine-tuning'}{vocab}")


def _method(a: _Args):
    if a.method == "selfdistill":
        from mtp.training.selfdistill import SelfDistillMethod

        return SelfDistillMethod()
    return _HeadsMethod()


def load_model_for_training(spec: str | None, num_heads: int | None, num_trunk_layers: int | None,
                            device: torch.device, dtype: torch.dtype = torch.float32):
    """An MTPModel to train (mtp.models.loading), fp32 unless `dtype` (frozen-trunk training): an MTP folder as
    it is, a base model with new heads."""
    from mtp.models.loading import load_mtp_model

    return load_mtp_model(spec, num_heads=num_heads, num_trunk_layers=num_trunk_layers, device=str(device),
                          dtype=dtype)


def _extra_heads_fp32(name: str) -> torch.dtype | None:
    return torch.float32 if name.startswith("extra_heads.") else None


def _check_fresh_output(out: Path) -> None:
    from mtp.training.checkpoints import list_checkpoints

    if (out / "config.json").exists() or list_checkpoints(out / "checkpoints"):
        raise MTPError(f"{out} already holds a trained model or checkpoints; pass --resume to continue that run, "
                       "or choose a new --output")


def _check_same_data(args: dict) -> None:
    """A --data file's size and hash go into the run's arguments; a --resume on a file edited since then would
    train on other rows than the run's seed and held-out split chose, without a word."""
    path = Path(args["data"]).expanduser()
    if not path.is_file():
        return  # the shipped GSM8K or a datasets name
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    now = f"{path.stat().st_size} bytes, sha256 {digest.hexdigest()[:16]}"
    before = args.setdefault("_data_fingerprint", now)
    if before != now:
        raise MTPError(f"--data {path} has changed since the run started ({before}; now {now}); --resume "
                       "continues the run on the same data: restore the file, or start a new --output")


def _read_train_config(out: Path) -> dict:
    path = out / TRAIN_CONFIG
    if not path.is_file():
        raise MTPError(f"--resume: {path} not found (no run was started in {out})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MTPError(f"{path}: not valid JSON ({e})") from None


def _merge_resume_args(args: dict, saved: dict) -> dict:
    """Flags left at their defaults take the run's saved values; an explicit different value is an error."""
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    merged = dict(args)
    clashes = []
    saved_args = current_arguments("train", saved.get("args", {}))  # a run saved under old flag names
    for name, value in saved_args.items():
        if name not in defaults or name in _NOT_RUN_IDENTITY:
            continue
        current = args.get(name)
        if current == defaults[name]:
            merged[name] = value
        elif current != value:
            clashes.append(f"--{name.replace('_', '-')} {current} (the run used {value})")
    if clashes:
        raise MTPError("--resume continues the run as it was started; these flags differ: " + "; ".join(clashes))
    for name, value in saved_args.items():
        if name.startswith("_"):
            merged[name] = value
    return merged


def _write_train_config(out: Path, args: dict, a: _Args) -> None:
    record = {"args": {k: v for k, v in args.items() if k not in ("output",)},
              "resolved": {"num_heads": a.num_heads, "num_trunk_layers": a.num_trunk_layers, "template": a.template}}
    atomic_write_json(out / TRAIN_CONFIG, record)


def _unsharded_copy(method, a: _Args, trained, whole: dict[str, torch.Tensor]):
    """The run's starting model built again on the CPU, holding the trained weights `whole` (gathered from the
    shards): what `save_pretrained` writes, since a sharded model's own tensors are pieces."""
    model = method.load(a, None, torch.device("cpu"))
    missing, unexpected = model.load_state_dict(whole, strict=False)
    if missing or unexpected:
        raise MTPError(f"the gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(trained, "draft_vocab", None) is not None:
        model.set_draft_vocab(trained.draft_vocab.cpu())
    model.tokenizer = trained.tokenizer
    return model


def install_model(model, out: Path) -> None:
    """Save the model into the run folder (which also holds checkpoints and logs): written to a temporary
    folder, then each file renamed into place, config.json last (a config.json marks a complete model)."""
    remove_stale_temporaries(out)  # of writes into the run folder that were killed
    with disk_errors(out / "model.safetensors"):
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out / "model"), dir=out))
        try:
            model.save_pretrained(tmp)
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def peak_memory_gb(dev: torch.device) -> dict[str, float | None]:
    """This process's peak resident memory (what `/usr/bin/time -f %M` reports) and, on a GPU, the peak of
    torch's allocations there, in GB (1e9 bytes); None where the system does not say."""
    from mtp.memory import peak

    host = peak()
    if host is None:
        try:
            import resource
            import sys

            host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        except ImportError:  # Windows
            host = None
    report = {"host": round(host / 1e9, 3) if host is not None else None}
    if dev.type == "cuda":
        report["gpu"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 3)
    return report


def _print_summary(out: Path, result, report: dict) -> None:
    t = report["seconds_this_invocation"]
    memory = ", ".join(f"{where} {gb:.2f} GB" for where, gb in report["peak_memory_gb"].items() if gb is not None)
    print(f"mtp train: done, step {result.step}; {t['total']:.0f} s in all (model {t['load_model']:.0f} s, data and "
          f"targets {t['data_and_targets']:.0f} s, trunk cache + training + eval {t['trunk_cache_train_eval']:.0f} s); "
          f"peak memory {memory or 'not measured'}. Model: {out}", flush=True)
    speed = report["training_speed"]
    if speed["tokens_per_second"] is not None:
        gpu = f", peak GPU memory {speed['peak_gpu_memory_mb']:,.0f} MB" if speed["peak_gpu_memory_mb"] else ""
        print(f"training speed: {speed['tokens_per_second']:,.0f} tokens/s, {1000 * speed['step_seconds_median']:.0f} "
              f"ms a step (median of {speed['steps_timed']}){gpu}; {describe_runtime(report['runtime'])} "
              f"weights, autocast {report['runtime']['autocast']}", flush=True)
    if "heads" in report:
        print("held-out per head:   head  predicts  top-1 acc   loss    tokens")
        for h in report["heads"]:
            print(f"                     {h['head']:>4}  {h['predicts']:>8}  {h['top1_accuracy']:>9.4f}  "
                  f"{h['loss']:>6.3f}  {h['tokens']:>7}")
        print(f"estimated tokens per forward (greedy speculative, teacher-forced): "
              f"{report['tokens_per_forward_estimate']:.3f}")
    if "confadapt" in report:
        print("estimated ConfAdapt tokens per forward (teacher-forced): " + ", ".join(
            f"tau {tau} {v['tokens_per_forward_estimate']:.3f}" for tau, v in report["confadapt"].items()))
    print(f"metrics: {out / 'metrics.jsonl'}, plot: {out / 'loss.png'}, eval: {out / EVAL_NAME}")


# ---------------------------------------------------------------------------------------------- bench-train
def bench_train(
    model: str | None = None,
    num_heads: list[int] | None = None,
    loss_order: list[LossOrder] | None = None,
    seq_len: int = 256,
    batch_size: int = 4,
    steps: int = 3,
    freeze_trunk: bool = False,
    gradient_checkpointing: bool = False,
    output: str = "bench_train.json",
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
) -> int:
    """Step time and peak memory of a training step: n heads vs 1, naive vs memory-efficient loss order.

    Args:
        model: base model (default: the embedded SmolLM2-135M-Instruct), folder, .gguf or hub id
        num_heads: head counts to compare (default: 1 4)
        loss_order: loss orders to compare (default: naive memory-efficient)
        seq_len: tokens per row (every token is a target: the largest logits)
        batch_size: rows per step
        steps: timed steps per configuration (after one warm-up step)
        freeze_trunk: benchmark heads-only training instead of full fine-tuning
        gradient_checkpointing: with gradient checkpointing
        output: JSON file for the results
        device: auto (CUDA when available), cpu, cuda or cuda:N
        threads: torch CPU threads
        seed: seed of the random batch
    """
    from mtp.training.bench import run_bench_train

    heads = num_heads or [1, 4]
    orders = loss_order or ["naive", "memory-efficient"]
    from mtp.training.losses import LOSS_ORDERS

    for order in orders:
        if order not in LOSS_ORDERS:
            raise MTPError(f"unknown loss order {order!r}; choose from {', '.join(LOSS_ORDERS)}")
    if freeze_trunk and min(heads) < 2:
        raise MTPError("--freeze-trunk trains extra heads only; every head count must be >= 2")
    set_threads(threads)
    results = run_bench_train(model, heads, orders, seq_len, batch_size, steps, freeze_trunk,
                              gradient_checkpointing, resolve_device(device, flags=True), seed)
    atomic_write_json(Path(output), results)
    print(results["table"])
    print(f"\n{results['method']}\nresults: {output}")
    return 0

