"""The options of `mtp train` that both methods use (`TrainOptions`): data, schedule, optimiser, checkpoints,
precision, processes. Each method's own options live with it: `mtp.training.heads.HeadsOptions`,
`mtp.training.selfdistill.SelfDistillOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtp.runtime import DType


@dataclass(frozen=True)
class TrainOptions:
    """shared options

    Args:
        data: "gsm8k" (shipped), a .jsonl/.json of question/answer-style records or of conversations ("messages":
            the last assistant message is the target), a text file, a Hugging Face dataset name
            or a dataset's folder (both need the `datasets` package); a .jsonl or a dataset is read lazily
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
        max_new_tokens: --targets self: longest self-generated answer
        gen_batch_size: --targets self: prompts answered per batch
        answer_minutes: --targets self: answer as many of the (--limit) questions, in order, as fit in about this
            many minutes, measured on the first batch, instead of all of them; the count is kept for --resume
        steps: optimizer steps (or give --epochs; default 1 epoch)
        epochs: passes over the training rows (may be fractional)
        train_minutes: train for about this many minutes: the step count (and the schedule's length) is set from
            the pace of the first steps, at most --steps / --epochs (with neither: as many as fit); kept for --resume
        batch_size: rows per micro-batch (under torchrun: of all processes together, each computes its share)
        grad_accum: micro-batches per optimizer step
        lr: peak learning rate (default 1e-3 with --freeze-trunk or --adapter gated-lora, 5e-5 otherwise)
        min_lr_ratio: the cosine schedule ends at lr * this
        warmup_steps: linear warmup steps (default: 5 percent of the steps)
        weight_decay: AdamW weight decay
        max_grad_norm: gradient clipping (0: off)
        seed: data order, held-out split and initialisation seed
        eval_every: held-out evaluation every N steps (0: at the end only)
        save_every: checkpoint every N steps (0: at the end and on Ctrl-C only)
        keep_checkpoints: keep the last K checkpoints
        autocast: the dtype the forward and backward passes compute in (torch.autocast; the weights that train
            stay float32): auto (bfloat16 on a GPU, float16 where it has no bfloat16; float32 on a CPU), float32
            (no autocast), bfloat16, float16 (GPU only)
        dtype: with --freeze-trunk: the frozen part's weights (bfloat16: half the memory; loaded straight in it);
            the extra heads keep fp32 master weights and train under autocast in this dtype (--autocast auto);
            auto: bfloat16 on a GPU that has it, else float32 (trained weights are always fp32)
        gradient_checkpointing: recompute layer activations in the backward pass (less memory, slower)
        parallel: under torchrun (torchrun --nproc-per-node N -m mtp train ...): "fsdp" shards parameters,
            gradients and optimizer state over the processes (FSDP2), "ddp" replicates them; "none": one process
        device: auto (CUDA when available), cpu, cuda or cuda:N
        threads: torch CPU threads (default: torch's choice)
        progress: progress bars
    """

    # what to train on
    data: str = "gsm8k"
    targets: Literal["data", "self"] = "data"
    data_format: Literal["auto", "gsm8k", "metamathqa", "text", "jsonl"] = "auto"
    question_field: str | None = None
    answer_field: str | None = None
    split: str = "train"
    limit: int | None = None
    template: Literal["auto", "chat", "plain"] = "auto"
    loss_on: Literal["answer", "all"] = "answer"
    pack: bool = False
    seq_len: int = 512
    holdout: float = 0.05
    holdout_max: int = 200
    max_new_tokens: int = 256
    gen_batch_size: int = 16
    answer_minutes: float | None = None
    # schedule and optimiser
    steps: int | None = None
    epochs: float | None = None
    train_minutes: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # evaluation and checkpoints
    eval_every: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    # precision, devices, processes
    autocast: DType = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
