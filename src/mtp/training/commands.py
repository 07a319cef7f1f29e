"""`mtp train` and `mtp bench-train`.

`train` takes its options in dataclasses (`TrainOptions` for both methods, each method's own with it) and works on
them flat, by flag name (`_Args`): what train_config.json records and `--resume` reads back. A method
(`METHODS`) loads its model, checks its flags and builds its trainer; the rest of a run is the same for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from mtp.arguments import check_output, check_values, current_arguments, spelled, typed_flags
from mtp.errors import MTPError
from mtp.io import (
    atomic_write_json,
    disk_errors,
    read_json_object,
    remove_stale_temporaries,
    temporary_prefix,
)
from mtp.options import changed_fields, flat_defaults, with_flat_keywords
from mtp.process import output_lock
from mtp.runtime import (
    Runtime,
    auto_dtype,
    describe_runtime,
    parse_dtype,
    peak_memory,
    resolve_device,
    set_threads,
)
from mtp.training.distributed import Parallel
from mtp.training.heads import HeadsMethod, HeadsOptions, LossOrder
from mtp.training.options import TrainOptions
from mtp.training.selfdistill import SelfDistillMethod, SelfDistillOptions

TRAIN_CONFIG = "train_config.json"
EVAL_NAME = "eval.json"
# Flags that do not change what a run computes, free to differ when resuming: those of this invocation (never taken
# from the run), and those the run's own value stands for unless given again.
_THIS_INVOCATION = {"output", "resume", "device", "threads", "progress", "parallel"}
_MAY_CHANGE = {"save_every", "keep_checkpoints", "eval_every", "gen_batch_size", "trunk_cache",
               "gradient_checkpointing"}
# An --autocast dtype -> the name the training loop gives that precision (`mtp.training.loop.TrainConfig`).
_PRECISION = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_AUTOCAST = {precision: dtype for dtype, precision in _PRECISION.items()}
# --method -> the class that loads its model and builds its trainer; its `options` are the flags only it uses.
METHODS = {"heads": HeadsMethod, "selfdistill": SelfDistillMethod}


def train(
    output: str,
    model: str | None = None,
    method: Literal["heads", "selfdistill"] = "heads",
    resume: bool = False,
    options: TrainOptions | None = None,
    heads: HeadsOptions | None = None,
    selfdistill: SelfDistillOptions | None = None,
    **flat: object,
) -> int:
    """Train MTP heads (or the whole model) on question/answer data or text; the output folder is an MTP model.

    The options come in three groups: `options` for both methods, `heads` and `selfdistill` for one method each
    (an option of the other method, set away from its default, is refused). In Python any option may also be
    given by its name, as on the command line: `train(output="run", num_heads=2, lr=1e-3)`.

    Args:
        output: run folder: the trained model, checkpoints/, metrics.jsonl, loss.png, eval.json, self_targets.jsonl
            and lookup_corpus.safetensors (with --targets self)
        model: base model (default: embedded SmolLM2-135M-Instruct), HF folder, .gguf, hub id, or an MTP folder
        method: "heads": parallel MTP heads on a shared trunk; "selfdistill": a mask token trained by
            self-distillation from a frozen teacher (Kirchenbauer et al. 2026)
        resume: continue the run in --output from its last checkpoint (flags default to the run's own)
    """
    groups = with_flat_keywords("train", {"options": options or TrainOptions(), "heads": heads or HeadsOptions(),
                                          "selfdistill": selfdistill or SelfDistillOptions()}, flat)
    # The run's flags by name, as the command line spells them: what train_config.json records and --resume reads.
    args = {"output": output, "model": model, "method": method, "resume": resume,
            **{name: value for group in groups.values() for name, value in asdict(group).items()}}
    t_start = time.perf_counter()
    check_output(output, "folder", "output")  # (the CLI checked --output; a call from Python, e.g. "", not yet)
    out = Path(output).expanduser()
    set_threads(args["threads"])
    from mtp.training.distributed import torchrun_env

    env = torchrun_env()
    # One run per folder: under torchrun its rank 0 holds the folder for the whole job.
    with output_lock(out) if env is None or env[0] == 0 else contextlib.nullcontext():
        return _start(args, out, t_start)


def train_defaults() -> dict[str, object]:
    """Every flag of `mtp train` -> its default."""
    return flat_defaults(train)


def _start(args: dict, out: Path, t_start: float) -> int:
    """`train` once this process holds the run folder: the arguments checked, the torchrun job joined."""
    from mtp.training.checkpoints import newest_intact_checkpoint

    _check_data_outside_run(args["data"], out)
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():  # (else: the first save's traceback)
        raise MTPError(f"{out / 'checkpoints'} is a file; the run keeps its checkpoints in a folder of that name: "
                       "move the file, or choose another --output")
    checkpoint = None
    if args["resume"]:
        saved = _read_train_config(out)
        args = _merge_resume_args(args, saved)
        checkpoint = newest_intact_checkpoint(out / "checkpoints")
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
    main = par is None or par.is_main
    timings: dict[str, float] = {}
    dev = par.device if par is not None else resolve_device(a.device, flags=True)
    torch.manual_seed(a.seed)  # the same on every rank: new weights start alike everywhere
    method = _method(a)
    examples = _open_data(a)  # a data file that cannot be used is an error before the model loads
    mtp_model, state = _load_model(a, method, checkpoint, dev)
    timings["load_model"] = time.perf_counter() - t_start
    train_data, held_data, store = _training_data(a, args, out, method, mtp_model, par, examples)
    timings["data_and_targets"] = time.perf_counter() - t_start - timings["load_model"]
    config = _train_config(a, method, mtp_model, train_data)
    trainer = method.trainer(mtp_model, train_data, held_data, config, a, out, parallel=par, features=store)
    if checkpoint is not None:
        _restore(trainer, checkpoint, state, par)
    if main:
        _print_plan(a, method, mtp_model, trainer, train_data, held_data, par, resumed=checkpoint is not None)
    start = time.perf_counter()
    gpu_before_training = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None  # answering's
    with peak_memory(dev) as memory:
        result = trainer.train()
    timings["trunk_cache_train_eval"] = time.perf_counter() - start
    speed = {**training_speed(result.history), "peak_gpu_memory_mb": memory["peak_mb"]}
    runtime = {**Runtime(dev, parse_dtype(a.dtype)).to_dict(), "autocast": _AUTOCAST[trainer.precision]}
    if par is None:
        install_model(mtp_model, out, link_from=trainer.last_checkpoint)
    else:  # the ordinary model folder, written by rank 0 from the gathered weights
        from mtp.training.distributed import full_state_on_main

        whole = full_state_on_main(mtp_model)
        if not main:
            return 0
        install_model(_unsharded_copy(method, a, mtp_model, whole), out)
    timings["total"] = time.perf_counter() - t_start
    _write_report(out, a, result, held_data, timings, speed, runtime, trainer,
                  peak_memory_gb(dev, gpu_before_training))
    return 0


def _load_model(a: _Args, method, checkpoint: Path | None, dev: torch.device):
    """The model to train: the run's starting model, or the checkpoint's; and the checkpoint's trainer state
    (None without one). Settles --template auto from the tokenizer."""
    from mtp.hub import check_model_folder
    from mtp.models.loading import check_seq_len
    from mtp.training.checkpoints import is_sharded, load_trainer_state

    state = None
    sharded = checkpoint is not None and is_sharded(checkpoint)
    if checkpoint is not None:
        if not sharded:
            check_model_folder(checkpoint)
        state = load_trainer_state(checkpoint)  # before any work: a damaged state must not cost the data stage
    # A sharded checkpoint holds no model folder: the run's starting model is built again and the shards are
    # read into it once it is wrapped.
    model = method.load(a, None if sharded else checkpoint, dev)
    if checkpoint is not None and model.tokenizer is None:
        raise MTPError(f"{checkpoint} has no tokenizer files")
    if model.tokenizer is None:
        raise MTPError("the model has no tokenizer; give a --model folder with tokenizer files")
    check_seq_len(model, a.seq_len, method.masks(a))
    if a.template == "auto":
        a.template = "chat" if getattr(model.tokenizer, "chat_template", None) else "plain"
    return model, state


UNBOUNDED_STEPS = 10**9  # --train-minutes without --steps or --epochs: the budget alone ends the run


def _train_config(a: _Args, method, model, train_data):
    """The loop's settings (`TrainConfig`): the flags, with the step count, learning rate and warmup that were
    left to their defaults worked out, and those of the method's own flags."""
    from mtp.training.loop import TrainConfig, steps_for_epochs

    if a.steps is not None:
        steps = a.steps
    elif a.epochs is None and a.train_minutes is not None:  # as many as fit (`Trainer._pace` sets the count)
        steps = UNBOUNDED_STEPS
    else:
        steps = steps_for_epochs(train_data, a.epochs or 1.0, a.batch_size, a.grad_accum)
    warmup_share = 0.05 if a.warmup_steps is None else None
    return TrainConfig(
        steps=steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
        lr=a.lr if a.lr is not None else method.default_lr(a), min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup_steps if a.warmup_steps is not None else round(warmup_share * steps),
        minutes=a.train_minutes, warmup_share=warmup_share if a.train_minutes is not None else None,
        weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, precision=_PRECISION[a.autocast],
        gradient_checkpointing=a.gradient_checkpointing, eval_every=a.eval_every, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, seed=a.seed, progress=a.progress, **method.loop_settings(a, model))


def _restore(trainer, checkpoint: Path, state: dict | None, par: Parallel | None) -> None:
    """The trainer's state (optimizer, step, schedule, ...) as `checkpoint` left it."""
    from mtp.training.checkpoints import is_sharded

    if is_sharded(checkpoint):
        trainer.resume_sharded(checkpoint)
        return
    # a single process's checkpoint: its weights were loaded with the model
    if par is not None:
        trainer.load_whole_optimizer_state(state.pop("optimizer"))
    trainer.load_state_dict(state)
    trainer.last_checkpoint = checkpoint


def _print_plan(a: _Args, method, model, trainer, train_data, held_data, par: Parallel | None,
                resumed: bool) -> None:
    """One line before training: the model, the rows, the steps and the precision."""
    from mtp.training.data import batches_per_epoch

    config = trainer.config
    where = f"; {par.world_size} processes, --parallel {par.mode}, {par.device.type}" if par is not None else ""
    rows = config.batch_size * config.grad_accum
    steps = f"{config.steps} step{'s' if config.steps != 1 else ''}"
    if config.minutes is not None and not trainer.paced:
        steps = f"as many steps as fit in {config.minutes:g} min" + \
            ("" if config.steps == UNBOUNDED_STEPS else f" (at most {config.steps})")
    epochs = "" if config.steps == UNBOUNDED_STEPS else f"~{config.steps * rows / len(train_data):.2f} epochs, "
    print(f"mtp train: {method.describe(model, a)}{where}; "
          f"{len(train_data)} training rows ({train_data.target_count():,} target tokens), "
          f"{len(held_data) if held_data is not None else 0} held-out rows; {steps} of "
          f"{config.batch_size}x{config.grad_accum} rows ({epochs}"
          f"{batches_per_epoch(train_data, config.batch_size)} batches per epoch); lr {config.lr:g}, "
          f"autocast {_AUTOCAST[trainer.precision]}" + (f"; resuming at step {trainer.step}" if resumed else ""),
          flush=True)


def _feature_store(a: _Args, out: Path, method, model, par: Parallel | None):
    """Where a frozen-trunk run keeps its trunk outputs (`mtp.training.features`, in the run folder); None when
    it keeps none."""
    if not method.wants_trunk_features(a):
        return None
    from mtp.training.features import FeatureStore
    from mtp.training.targets import model_fingerprint

    return FeatureStore.for_model(out, model, model_fingerprint(model), f"rank{par.rank}" if par is not None else "")


def _open_data(a: _Args):
    """The run's examples (`open_examples`: a JSONL file is read through and checked once), and what can be told
    of them without the model: that there are some, and that --targets self has prompts to answer."""
    from mtp.training.data import Examples, open_examples

    examples = open_examples(a.data, format=a.data_format, question_field=a.question_field,
                             answer_field=a.answer_field, split=a.split, limit=a.limit)
    if not len(examples):
        raise MTPError(f"{a.data}: no examples")
    asked = examples.fields[0] is not None if isinstance(examples, Examples) else any(ex.prompt for ex in examples)
    if a.targets == "self" and not asked:
        raise MTPError(_NO_PROMPTS.format(data=a.data))
    return examples


_NO_PROMPTS = ("{data}: --targets self needs prompts for the model to answer (question/answer data); plain text "
               "has none, use --targets data")


def _training_data(a: _Args, args: dict, out: Path, method, mtp_model, par: Parallel | None, examples):
    """The training and held-out rows of `examples` (`_open_data`): the data's answers, or the model's own
    (`--targets self`, cached in the run folder), and the run's feature store (or None). Writes train_config.json
    (rank 0) once the run's question count is settled."""
    from mtp.training.data import held_out, tokenize_split

    out.mkdir(parents=True, exist_ok=True)
    store = _feature_store(a, out, method, mtp_model, par)
    if a.targets == "self":
        return *_self_answered_data(a, args, out, method, mtp_model, par, store, examples), store
    held = held_out(len(examples), a.holdout, a.seed, max_items=a.holdout_max)
    _check_train_left(a, len(examples) - len(held), len(held))
    rows = tokenize_split(examples, held, mtp_model.tokenizer, a.template, a.seq_len, a.loss_on, a.pack)
    if par is None or par.is_main:  # (after: rows that leave nothing to train on leave no run folder behind)
        _write_train_config(out, args, a, method)
    return *rows, store


def _self_answered_data(a: _Args, args: dict, out: Path, method, mtp_model, par: Parallel | None, store, examples):
    """--targets self: rows of the model's own answers to the examples' prompts, with the trunk outputs computed
    while answering recorded into `store`."""
    from mtp.decoding.corpus import CORPUS_NAME
    from mtp.training.data import held_out
    from mtp.training.targets import (
        CACHE_NAME,
        model_fingerprint,
        prompts_token_ids,
        self_distilled_rows,
    )

    asked = False

    def noting_prompts():  # (a file's records are read once: whether any has a prompt is seen on the way)
        nonlocal asked
        for ex in examples:
            asked = asked or bool(ex.prompt)
            yield ex

    tokenizer = mtp_model.tokenizer
    prompts = prompts_token_ids(tokenizer, noting_prompts(), a.template)
    if not asked:
        raise MTPError(_NO_PROMPTS.format(data=a.data))
    answering = method.answering_model(mtp_model)
    fingerprint = store.model_key if store is not None else model_fingerprint(answering)  # the same model's
    # The answers must come from the model the run started from; after full fine-tuning they cannot be
    # produced again, so only a cache hit is accepted then.
    key = args.get("_answers_model_key") or fingerprint
    args["_answers_model_key"] = key
    if par is None or par.is_main:
        _write_train_config(out, args, a, method)
    recording = store if store is not None and fingerprint == key and not a.pack else None
    if a.answer_minutes is not None:  # the examples that fit the budget, decided once per run
        if par is not None:
            raise MTPError("--answer-minutes measures one process's answering speed; under torchrun give "
                           "--limit instead")
        if "_answer_count" not in args:
            args["_answer_count"] = _count_within_budget(answering, tokenizer, prompts, a, out / CACHE_NAME, key,
                                                         recording)
            _write_train_config(out, args, a, method)
        prompts = prompts.take(range(args["_answer_count"]))
    held = held_out(len(prompts), a.holdout, a.seed, max_items=a.holdout_max)
    _check_train_left(a, len(prompts) - len(held), len(held))
    groups = [[i for i in range(len(prompts)) if i not in held], sorted(held)]
    return self_distilled_rows(
        answering, tokenizer, prompts, groups, seq_len=a.seq_len, max_new_tokens=a.max_new_tokens,
        loss_on=a.loss_on, pack=a.pack, features=recording,
        ids=groups if a.answer_minutes is not None else None,  # the measured batch's ids: positions in the examples
        cache_path=out / CACHE_NAME, batch_size=a.gen_batch_size, model_key=key, generate_missing=fingerprint == key,
        corpus_path=out / CORPUS_NAME if par is None or par.is_main else None,
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
                  runtime: dict, trainer, peak_gb: dict[str, float | None]) -> None:
    """eval.json (what the run measured, held-out figures included) and the printed summary."""
    report = {"step": result.step, "targets": a.targets,
              "held_out_rows": len(held_data) if held_data is not None else 0,
              "train_loop_seconds": round(result.seconds, 1),  # optimizer steps only, summed over resumes
              "seconds_this_invocation": {k: round(v, 1) for k, v in timings.items()},
              "runtime": runtime, "training_speed": speed,
              "trunk_cache": getattr(trainer, "trunk_cache", "off"), "peak_memory_gb": peak_gb}
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
    """The run's flags as attributes (`a.seq_len`), both methods' and the other method's at their defaults."""

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
    print(f"mtp train: {n} of {len(prompts)} questions fit in --answer-minutes {a.answer_minutes:.3g} "
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
    _check_method_options(a)
    method = _method(a)
    method.check(a)
    if a.answer_minutes is not None and a.targets != "self":
        raise MTPError("--answer-minutes budgets the model's own answers; it needs --targets self")
    dev = resolve_device(a.device, flags=True)  # before anything loads
    from mtp.training.loop import resolve_precision

    resolve_precision(_PRECISION[a.autocast], dev)  # what the training loop would refuse, refused before any work
    _settle_dtype(a, method.frozen_weights(a), dev)


def _settle_dtype(a: _Args, frozen: bool, dev: torch.device) -> None:
    """--dtype is the dtype of the weights that do not train (`frozen`: the method keeps some): auto resolved,
    and a dtype other than float32 checked against --autocast, which it sets."""
    if a.dtype == "auto":  # frozen weights in bf16 where the GPU computes in it anyway (autocast); else fp32
        bf16 = auto_dtype(dev) == torch.bfloat16 and a.autocast in ("auto", "bfloat16")
        a.dtype = "bfloat16" if bf16 and frozen else "float32"
    if a.dtype != "float32":  # frozen weights in bf16/fp16, trained ones fp32: the matmuls need autocast
        autocast = "bfloat16"  # (float16 would need --autocast float16, whose loss scaling does not run yet)
        if not frozen:
            raise MTPError(f"--dtype {a.dtype} is for --freeze-trunk (the frozen weights; trained ones stay fp32); "
                           f"for full fine-tuning keep fp32 weights and use --autocast {autocast}")
        if a.autocast not in ("auto", autocast):
            raise MTPError(f"--dtype {a.dtype} trains under --autocast {autocast}, not {a.autocast}")
        a.autocast = autocast


def _check_method_options(a: _Args) -> None:
    """The other method's options would be ignored without a word: one set away from its default is refused."""
    for name, method in METHODS.items():
        given = changed_fields(method.options, vars(a)) if name != a.method else []
        if given:
            raise MTPError(f"{', '.join(spelled(g, True) for g in given)}: for --method {name} only; this run "
                           f"trains --method {a.method}")


def _method(a: _Args):
    return METHODS[a.method]()


def _check_fresh_output(out: Path) -> None:
    from mtp.training.checkpoints import list_checkpoints

    if (out / "config.json").exists() or list_checkpoints(out / "checkpoints"):
        raise MTPError(f"{out} already holds a trained model or checkpoints; pass --resume to continue that run, "
                       "or choose a new --output")


# What a run writes into its folder besides the model: a --data file there under one of these names was appended to
# (metrics.jsonl), replaced (the answers' cache, self_targets.jsonl) or pruned with a checkpoint (checkpoints/).
_RUN_FILES = (TRAIN_CONFIG, EVAL_NAME, "metrics.jsonl", "loss.png")


def _check_data_outside_run(data: str, out: Path) -> None:
    from mtp.decoding.corpus import CORPUS_NAME
    from mtp.training.features import FEATURES_NAME
    from mtp.training.targets import CACHE_NAME

    path = Path(data).expanduser()
    if not path.is_file():
        return  # the shipped GSM8K or a datasets name
    path, run = path.resolve(), out.expanduser().resolve()
    prefixes = tuple(Path(name).stem + "." for name in (CACHE_NAME, FEATURES_NAME, CORPUS_NAME))  # (shards too)
    if (path.parent == run and (path.name in _RUN_FILES or path.name.startswith(prefixes))) \
            or run / "checkpoints" in path.parents:
        raise MTPError(f"--data {data} is a file the run writes in --output {out}: move the data out of the run "
                       "folder first")


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
    saved = read_json_object(path, "a training run's config")
    args = saved.get("args", {})
    if not isinstance(args, dict):
        raise MTPError(f"{path}: \"args\" must be an object of the run's flags; the file was edited or damaged")
    defaults = train_defaults()
    for name, value in args.items():  # (a value of another type failed deep inside the run, as a traceback)
        default = defaults.get(name)
        if value is None or default is None:
            continue
        kind = float if isinstance(default, float) else type(default)
        fine = isinstance(value, int | float) if kind is float else isinstance(value, kind)
        if not fine or (isinstance(value, bool) and kind is not bool):
            raise MTPError(f"{path}: \"{name}\" is {value!r}, not a {kind.__name__} as its flag's values are; the file "
                           "was edited or damaged")
    try:
        check_values({k: v for k, v in args.items() if k in defaults})
    except MTPError as e:
        raise MTPError(f"{path}: {e} (the file was edited or damaged)") from None
    return saved


def _merge_resume_args(args: dict, saved: dict) -> dict:
    """Flags not given take the run's saved values; a given different value is an error. Given: typed on the
    command line (`typed_flags`), or, for a call from Python, away from its default."""
    defaults = train_defaults()
    typed = typed_flags("train")
    merged = dict(args)
    clashes = []
    saved_args = current_arguments("train", saved.get("args", {}))  # a run saved under old flag names
    for name, value in saved_args.items():
        if name not in defaults or name in _THIS_INVOCATION:
            continue
        current = args.get(name)
        if (name not in typed) if typed is not None else current == defaults[name]:
            merged[name] = value
        elif current != value and name not in _MAY_CHANGE:
            used = "left it to its default" if value is None else f"used {value}"
            clashes.append(f"--{name.replace('_', '-')} {current} (the run {used})")
    if clashes:
        raise MTPError("--resume continues the run as it was started; these flags differ: " + "; ".join(clashes))
    for name, value in saved_args.items():
        if name.startswith("_"):
            merged[name] = value
    return merged


def _write_train_config(out: Path, args: dict, a: _Args, method) -> None:
    """The run's flags by name (what --resume reads back), and what some of them resolved to."""
    record = {"args": {k: v for k, v in args.items() if k not in ("output",)},
              "resolved": {**method.resolved(a), "template": a.template}}
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
    frozen = {name for name, p in trained.named_parameters() if not p.requires_grad}
    for name, p in model.named_parameters():  # what the run did not train is saved apart, as one process saves it
        p.requires_grad_(name not in frozen)
    return model


def install_model(model, out: Path, link_from: Path | None = None) -> None:
    """Save the model into the run folder (which also holds checkpoints and logs): written to a temporary
    folder, then each file renamed into place, config.json last (a config.json marks a complete model). The
    weights the run did not train are a shard of their own, `link_from`'s (the last checkpoint) where it has them;
    the other layout's files, left by an earlier run in the folder, go."""
    from mtp.models.safetensors_io import INDEX_NAME, SHARD_NAMES, WEIGHTS_NAME

    remove_stale_temporaries(out)  # of writes into the run folder that were killed
    with disk_errors(out / WEIGHTS_NAME):
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out / "model"), dir=out))
        try:
            model.save_pretrained(tmp, frozen_apart=True, link_from=link_from)
            written = {f.name for f in tmp.iterdir()}
            (out / "config.json").unlink(missing_ok=True)  # the folder is not a complete model while it changes
            for name in (WEIGHTS_NAME, INDEX_NAME, *SHARD_NAMES):
                if name not in written:
                    (out / name).unlink(missing_ok=True)
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def peak_memory_gb(dev: torch.device, gpu_before_training: int | None) -> dict[str, float | None]:
    """This process's peak resident memory (`mtp.memory.peak`) and, on a GPU, the peak of torch's allocations
    there over the whole run, in GB (1e9 bytes); None where the system does not say. `gpu_before_training`: the
    GPU peak up to the training phase, whose own measurement (`peak_memory`) resets torch's counter."""
    from mtp.memory import peak

    host = peak()
    report = {"host": round(host / 1e9, 3) if host is not None else None}
    if dev.type == "cuda":
        report["gpu"] = round(max(gpu_before_training or 0, torch.cuda.max_memory_allocated(dev)) / 1e9, 3)
    return report


def _print_summary(out: Path, result, report: dict) -> None:
    t = report["seconds_this_invocation"]
    memory = ", ".join(f"{where} {gb:.2f} GB" for where, gb in report["peak_memory_gb"].items() if gb is not None)
    training = "trunk cache + training + eval" if report.get("trunk_cache") not in (None, "off") else "training + eval"
    print(f"mtp train: done, step {result.step}; {t['total']:.0f} s in all (model {t['load_model']:.0f} s, data and "
          f"targets {t['data_and_targets']:.0f} s, {training} {t['trunk_cache_train_eval']:.0f} s); "
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
    from mtp.hub import resolve_model

    if resolve_model(model).kind in ("mtp_folder", "meta"):  # (one load_base_model refuses, in its words)
        raise MTPError(f"--model {model} is a multi-token model already; bench-train times training new heads on a "
                       "plain model: give the one it was made from (a Hugging Face folder, a GGUF file, a hub id)")
    set_threads(threads)
    results = run_bench_train(model, heads, orders, seq_len, batch_size, steps, freeze_trunk,
                              gradient_checkpointing, resolve_device(device, flags=True), seed)
    atomic_write_json(Path(output).expanduser(), results)
    print(results["table"])
    print(f"\n{results['method']}\nresults: {output}")
    return 0

