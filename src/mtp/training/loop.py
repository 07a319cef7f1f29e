"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation and clipping, mixed precision,
gradient checkpointing, frozen-trunk feature caching, checkpoints, resume, metrics, Ctrl-C and NaN handling.

One optimizer step = `grad_accum` micro-batches. Micro-batch m of the run holds the rows `batch_rows(len(data),
batch_size, seed, m)` (under torchrun each rank takes its share: `Trainer.micro_rows`), a pure function of (seed, m),
so a resumed run sees exactly the batches an uninterrupted run would.

Frozen trunk (`freeze_trunk`): the trunk layers, head 0, embeddings, final norm and unembedding do not train;
only `model.extra_heads` do. The trunk output then does not depend on anything trainable, so it runs under
`no_grad`, and with `trunk_cache` it is computed once per training row and reused every epoch: in memory on the
device, or in a `mtp.training.features.FeatureStore` on disk (half precision, read per batch), where it also
outlives the run for a resumed one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtp.arguments import check_values
from mtp.errors import MTPError
from mtp.io import atomic_write_lines, disk_errors
from mtp.process import interrupt_for
from mtp.progress import progress_bar
from mtp.runtime import synchronize
from mtp.training.checkpoints import (
    SHARDED_DIR,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from mtp.training.data import TokenizedData, batch_rows, batches_per_epoch
from mtp.training.distributed import Parallel, all_sum, as_float
from mtp.training.features import (
    TRUNK_CACHE,
    FeatureStore,
    complete_features,
    compute_trunk_features,
    features_home,
)
from mtp.training.losses import (
    LOSS_ORDERS,
    TARGET_POSITIONS,
    EvalResult,
    evaluate_heads,
    forward_context,
    target_counts,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# What a stopped run tells the user to do next: `mtp train`'s --resume, unless a command that trains through it
# (`mtp demo`) says how it goes on.
RESUME_HINT: ContextVar[str] = ContextVar("RESUME_HINT", default="continue with --resume")


class NonFiniteLossError(MTPError):
    """The loss or the gradient norm became NaN/inf; the run stops without saving the bad state."""


@dataclass
class TrainConfig:
    steps: int  # with `minutes`: at most this many
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0  # None or <= 0: no clipping
    head_weights: list[float] | None = None  # default: 1 for every head
    loss_order: str = "memory-efficient"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    freeze_trunk: bool = False
    trunk_cache: str = "auto"  # frozen trunk: "device", "disk" (needs a feature store), "off"; "auto": `features_home`
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 8
    save_every: int = 0  # 0: checkpoint only at the end, on Ctrl-C
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    minutes: float | None = None  # about this long: `steps` set from the pace of the first steps (`Trainer._pace`)
    warmup_share: float | None = None  # with `minutes`: warmup_steps follow the paced steps at this share

    def validate(self) -> None:
        # the rules the CLI applies to the same names (mtp.arguments), wrong types included
        check_values({name: getattr(self, name) for name in (
            "steps", "batch_size", "grad_accum", "eval_batch_size", "warmup_steps", "eval_every", "save_every",
            "keep_checkpoints", "lr", "min_lr_ratio", "weight_decay", "seed")}, flags=False)
        if not math.isfinite(self.lr):
            raise MTPError(f"lr must be a finite number, got {self.lr}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise MTPError(f"minutes must be > 0, got {self.minutes}")
        if self.loss_order not in LOSS_ORDERS:
            raise MTPError(f"loss order must be one of {', '.join(LOSS_ORDERS)}, got {self.loss_order!r}")
        if self.precision not in PRECISIONS:
            raise MTPError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.trunk_cache not in TRUNK_CACHE:
            raise MTPError(f"trunk cache must be one of {', '.join(TRUNK_CACHE)}, got {self.trunk_cache!r}")


# ------------------------------------------------------------------------------------------------ model set-up
def configure_trainable(model, freeze_trunk: bool) -> list[torch.nn.Parameter]:
    """Set requires_grad and train/eval modes; return the trainable parameters (tied weights once)."""
    if freeze_trunk:
        if model.num_heads < 2:
            raise MTPError("--freeze-trunk trains the extra heads only, and a 1-head model has none; "
                           "use --num-heads 2 or more")
        model.requires_grad_(False)
        model.eval()  # the frozen part is deterministic (no dropout), so its output can be cached
        for module in model.head_modules():
            module.requires_grad_(True)
            module.train()
    else:
        model.requires_grad_(True)
        model.train()
    return [p for p in model.parameters() if p.requires_grad]


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    transformers' layers check the flag inside their own forward, so this works although MTPModel calls the
    layers directly. The extra heads are copies made before the flag was set, so they get it here too.
    """
    base = model.base
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise MTPError(f"{type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    func = next((m._gradient_checkpointing_func for m in base.modules()
                 if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")),
                None)
    if func is None:
        raise MTPError(f"{type(base).__name__}: gradient checkpointing did not switch on for any layer")
    for module in model.extra_heads.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = func
            module.gradient_checkpointing = True


_DTYPE_NAME = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> the precision a device trains in; an MTPError for one it cannot."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"  # CPU: bf16 matmuls are slower than fp32 without AVX-512 BF16
    # The messages name mtp train's --autocast values (bfloat16, float16, float32) for these precisions.
    if precision in ("bf16", "fp16") and device.type not in ("cuda", "cpu", "xpu", "mps"):
        raise MTPError(f"autocast {_DTYPE_NAME[precision]} is not available on {device.type}")
    if precision == "fp16" and device.type == "cpu":  # torch's GradScaler, which fp16 needs, does not run there
        raise MTPError("--autocast float16 needs a GPU (its loss scaling does not run on a CPU); on a CPU use "
                       "--autocast bfloat16 or float32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MTPError("this GPU does not support bfloat16; use --autocast float16")
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable:
    """A zero-argument function returning the autocast context for a precision ("fp32": no autocast)."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _fused_adamw(params: list, device: torch.device, parallel) -> bool | None:
    """AdamW's fused kernel (one pass over each tensor, ~4.5x faster than the per-tensor loop for the default
    model's 135M parameters on 2 CPU cores) where it runs: CPU or CUDA, floating-point parameters, one process
    (sharded DTensor parameters keep torch's default). None: torch's default choice."""
    if parallel is not None or device.type not in ("cpu", "cuda"):
        return None
    return all(p.is_floating_point() for p in params) or None


# --train-minutes: the first PACE_SKIP steps of a process (allocations, autotuning, compiled kernels) are not
# timed, the next PACE_STEPS are; under torchrun every process paces at that step, so the count they agree on
# stays in step. One process paces sooner when its timed steps took PACE_SHARE of the budget (slow steps), and
# stops at once when the budget is spent before its pace is known.
PACE_SKIP, PACE_STEPS, PACE_SHARE = 2, 8, 0.1


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over `warmup` steps, then cosine decay to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class StepMetrics:
    step: int
    lr: float
    loss: float
    head_loss: list[float | None]
    head_acc: list[float | None]
    tokens: int
    tokens_per_s: float
    grad_norm: float
    elapsed: float
    seconds: float = 0.0  # this step's wall time

    def to_dict(self) -> dict:
        r = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {"step": self.step, "lr": self.lr, "loss": r(self.loss), "head_loss": [r(x) for x in self.head_loss],
                "head_acc": [r(x) for x in self.head_acc], "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 1), "grad_norm": r(self.grad_norm),
                "elapsed": round(self.elapsed, 2), "seconds": round(self.seconds, 4)}


@dataclass
class TrainResult:
    step: int
    evaluation: EvalResult | None
    history: list[StepMetrics] = field(default_factory=list)
    seconds: float = 0.0


class _StopRequest:
    """SIGINT or SIGTERM sets a flag the loop checks between optimizer steps (a step is never cut in half); a
    second signal interrupts at once. `interrupt()` is what the loop raises once the checkpoint is saved."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise interrupt_for(signum)
        self.requested, self.signum = True, signum
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nmtp: {what}: saving a checkpoint after this step (again to quit at once)", flush=True)

    def interrupt(self) -> KeyboardInterrupt:
        return interrupt_for(self.signum)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False


class Trainer:
    """Trains `model` on `train_data`; evaluates on `eval_data`; writes checkpoints and metrics under `output_dir`.

    Files (when `output_dir` is set): checkpoints/step-NNNNNN/, metrics.jsonl (one line per step, plus eval lines),
    loss.png (loss per head). `feature_store`: where a frozen trunk's outputs are kept and found
    (`mtp.training.features`); without one they are computed into memory.
    """

    # The model methods the training step and evaluation call: under FSDP each runs the hooks that gather
    # the parameters it reads (`Parallel.wrap`).
    FORWARD_METHODS: tuple[str, ...] = ("trunk_forward", "head_forward", "lm_head", "draft_logits")

    def __init__(self, model, train_data: TokenizedData, config: TrainConfig, output_dir: str | os.PathLike | None = None,
                 eval_data: TokenizedData | None = None, extra_state: dict | None = None,
                 parallel: Parallel | None = None, feature_store: FeatureStore | None = None):
        config.validate()
        if config.freeze_trunk and config.trunk_cache == "disk" and feature_store is None:
            raise MTPError("trunk cache 'disk' needs a feature store (mtp.training.features.FeatureStore)")
        self.model = model
        self.config = config
        self.train_data = train_data
        self.eval_data = eval_data
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.extra_state = extra_state or {}  # saved in trainer_state.pt (e.g. the run's arguments)
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main  # only rank 0 prints and writes metrics and plots
        self.device = model.device
        self.feature_store = feature_store
        # What a frozen trunk outputs, to which its stored (half precision) outputs are cast back.
        self.trunk_dtype = model.activation_dtype if config.freeze_trunk else None
        self.params = self._setup()
        if not self.params:
            raise MTPError("nothing to train: no parameter requires a gradient")
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.precision = resolve_precision(config.precision, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        if parallel is not None:
            parallel.wrap(model, self.FORWARD_METHODS, self.frozen_modules(), self.precision)
            # fully_shard replaced the parameters by sharded ones; the trainable ones are still the ones that
            # require a gradient, and only they get optimizer state
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay,
                                           fused=_fused_adamw(self.params, self.device, parallel))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, config.steps, config.warmup_steps, config.min_lr_ratio))
        # a model handed over with gradients (a backward of the caller's own) would add them to the first step
        model.zero_grad(set_to_none=True)
        self.step = 0
        # Frozen trunk's outputs: (N, L, H) tensors on the device, or `StoredFeatures` read from disk per batch.
        self.features = None
        self.eval_features = None
        self.trunk_cache = "off"  # where they ended up: "device", "disk" or "off"
        self.last_checkpoint: Path | None = None
        self.history: list[StepMetrics] = []
        self._elapsed_before = 0.0  # training seconds of the run before a resume
        self._stop = _StopRequest()
        self.paced = config.minutes is None  # with `minutes`: whether `steps` has been set from the pace yet
        self.clock = time.perf_counter  # what the run's time and pace are read from (tests replace it)

    def _setup(self) -> list[torch.nn.Parameter]:
        """What the method trains (here: the parallel heads' loss); returns the trainable parameters.
        Other methods (`mtp.training.selfdistill`) override this, `train_step`, `prepare` and `evaluate`."""
        config, model = self.config, self.model
        n = model.num_heads
        weights = list(config.head_weights) if config.head_weights is not None else [1.0] * n
        if len(weights) != n:
            raise MTPError(f"{len(weights)} head weights for a {n}-head model")
        if config.freeze_trunk:
            if n < 2:
                raise MTPError("--freeze-trunk trains the extra heads only, and a 1-head model has none; "
                               "use --num-heads 2 or more")
            weights[0] = 0.0  # head 0 is frozen: its loss has no trainable parameter to move
            if not any(weights[1:]):
                raise MTPError("with --freeze-trunk at least one extra head needs a weight > 0")
        self.weights = weights
        self.loss_fn = LOSS_ORDERS[config.loss_order]
        return configure_trainable(model, config.freeze_trunk)

    def frozen_modules(self) -> list:
        """Modules besides the model that the step runs (without gradients): none here; a teacher elsewhere."""
        return []

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(), "config": asdict(self.config), "elapsed": self._elapsed(),
                "paced": self._paced_steps(), **self.extra_state}

    def _paced_steps(self) -> dict | None:
        cfg = self.config
        if cfg.minutes is None or not self.paced:
            return None
        return {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore optimizer, scheduler, scaler, RNG and step (the weights come with the checkpoint folder)."""
        try:
            if "optimizer" in state:  # a sharded checkpoint's optimizer comes with its shards (`resume_sharded`)
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self._elapsed_before = float(state.get("elapsed", 0.0))
            paced = state.get("paced")
            if paced is not None and self.config.minutes is not None:  # the budget's step count, set once a run
                self.config.steps, self.config.warmup_steps = int(paced["steps"]), int(paced["warmup_steps"])
                self.paced = True
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited or foreign trainer state
            raise MTPError(f"the trainer state does not fit this run ({type(e).__name__}: {e})") from None

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Load weights and trainer state from a checkpoint folder into this trainer's model."""
        from mtp.models.safetensors_io import FolderWeights

        folder = Path(checkpoint)
        state = load_trainer_state(folder)
        with FolderWeights(folder) as weights, torch.no_grad():
            self.model.load_checkpoint_state_dict({k: weights.read(k) for k in weights.tensors}, source=str(folder))
        self.load_state_dict(state)
        self.last_checkpoint = folder

    def resume_sharded(self, checkpoint: str | os.PathLike) -> None:
        """Load a sharded checkpoint (written by a torchrun run of any world size) into this trainer: the model's
        and optimizer's shards, then step, schedule and RNG from its JSON state."""
        from mtp.training.distributed import load_sharded

        folder = Path(checkpoint)
        state = load_trainer_state(folder)
        try:
            groups = state.pop("optimizer_param_groups")
        except KeyError:
            raise MTPError(f"{folder}: a sharded checkpoint without the optimizer's parameter groups") from None
        load_sharded(folder / SHARDED_DIR, self.model, self.optimizer, groups)
        self.load_state_dict(state)
        self.last_checkpoint = folder

    def load_whole_optimizer_state(self, state: dict) -> None:
        """A single process's optimizer state (whole tensors, keyed by parameter index) into this run's sharded
        optimizer: the indices are the trainable parameters in model order, named here for the planner."""
        from mtp.training.distributed import load_whole_optimizer_state

        try:
            load_whole_optimizer_state(self.model, self.optimizer, state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise MTPError(f"the trainer state's optimizer does not fit this run ({type(e).__name__}: {e})") from None

    def _elapsed(self) -> float:
        started = getattr(self, "_started", None)
        return self._elapsed_before + (self.clock() - started if started is not None else 0.0)

    # -------------------------------------------------------------------------------------- batches
    def micro_rows(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Row indices of a micro-batch: (the global batch, this rank's share, whether the share is a stand-in
        row that must count nothing; see `Parallel.share`). One process: the share is the batch."""
        cfg = self.config
        rows = batch_rows(len(self.train_data), cfg.batch_size, cfg.seed, micro_step)
        if self.parallel is None:
            return rows, rows, False
        mine, stand_in = self.parallel.share(rows)
        return rows, mine, stand_in

    def rows_batch(self, rows: torch.Tensor, stand_in: bool = False) -> dict:
        """Training rows as a batch padded to its longest row (a stand-in row has no target)."""
        batch = self.train_data.batch(rows)
        if stand_in:
            batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
        return batch

    def _micro_batch(self, micro_step: int) -> tuple[dict, tuple | None, list[int], int]:
        """This rank's share of micro-batch `micro_step` on the device, its trunk output when the trunk is frozen,
        and over the global micro-batch the target count of each head (the loss's denominators) and the tokens."""
        rows, mine, stand_in = self.micro_rows(micro_step)
        whole = self.rows_batch(rows)
        counts, tokens = target_counts(whole, self.model.num_heads), int(whole["attention_mask"].sum())
        batch = self.rows_batch(mine, stand_in)
        batch[TARGET_POSITIONS] = batch["loss_mask"].nonzero()  # on the host: the loss needs no copy back of it
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        rows = mine
        trunk = None
        if self.features is not None:
            hidden = self.features[rows, : batch["input_ids"].shape[1]].to(self.device, self.trunk_dtype)
            trunk = (hidden, forward_context(self.model, batch["input_ids"], batch["attention_mask"], hidden))
        elif self.config.freeze_trunk:
            with torch.no_grad(), self.autocast():
                trunk = self.model.trunk_forward(batch["input_ids"], batch["attention_mask"])
        return batch, trunk, counts, tokens

    def prepare(self) -> None:
        """Cache frozen-trunk features of the training and held-out rows (when configured)."""
        cfg = self.config
        if not (cfg.freeze_trunk and cfg.trunk_cache != "off"):
            return
        with torch.no_grad():
            if self.features is None:
                self.features = self._trunk_features(self.train_data, "train")
            if self.eval_data is not None and self.eval_features is None:
                self.eval_features = self._trunk_features(self.eval_data, "held-out")

    def _trunk_features(self, data: TokenizedData, which: str):
        """The trunk outputs of `data`'s rows: those that came with the data (recorded while the frozen model
        wrote self-distilled answers) as they are; else the feature store's (computing the missing ones), read
        from disk per batch or loaded onto the device (`features_home`); without a store, computed into memory."""
        cfg = self.config
        progress, desc = cfg.progress and self.is_main, f"trunk cache ({which})"
        if data.trunk_features is not None:
            features = data.trunk_features
        elif self.feature_store is None:
            features = compute_trunk_features(self.model, data, cfg.eval_batch_size, self.autocast, progress, desc)
        else:
            features = complete_features(self.feature_store, self.model, data, cfg.eval_batch_size, self.autocast,
                                         progress, desc, write=self.is_main)
            width = int(data.lengths.max())
            nbytes = len(data) * width * self.feature_store.hidden_size * self.feature_store.dtype.itemsize
            if features_home(cfg.trunk_cache, nbytes, self.device) == "device":
                features = features.load(width, self.device)
        self.trunk_cache = "device" if isinstance(features, torch.Tensor) else "disk"
        return features

    # -------------------------------------------------------------------------------------- one step
    def train_step(self) -> StepMetrics:
        t0 = time.perf_counter()
        total, losses, accuracies, tokens = self.accumulate_gradients()
        grad_norm, lr = self._optimizer_step()
        synchronize(self.device)  # the step's GPU work is done before its time is taken
        seconds = time.perf_counter() - t0
        return StepMetrics(step=self.step, lr=lr, loss=total, head_loss=losses, head_acc=accuracies, tokens=tokens,
                           tokens_per_s=tokens / seconds if seconds > 0 else 0.0, grad_norm=grad_norm,
                           elapsed=self._elapsed(), seconds=seconds)

    def accumulate_gradients(self) -> tuple[float, list[float | None], list[float | None], int]:
        """Forward and backward over the step's micro-batches: (loss, loss per head, top-1 accuracy per head,
        tokens). The method-specific half of a step; `_optimizer_step` is the shared half."""
        cfg = self.config
        n = self.model.num_heads
        micro = [self._micro_batch(self.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        # One denominator per head over the whole accumulated step and every rank: the gradient (summed over
        # ranks) equals that of one big batch, whatever the world size.
        norms = [sum(c) for c in zip(*(counts for _, _, counts, _ in micro), strict=True)]
        tokens = sum(t for *_, t in micro)
        head_loss: list[float | None] = [None] * n
        head_correct = [0] * n
        total = 0.0
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        for batch, trunk, _, _ in micro:
            with self.autocast():
                out = self.loss_fn(self.model, batch, self.weights, normalizers=norms, trunk=trunk,
                                   grad_scale=scale)
            if out.nonfinite_head is not None:
                self.optimizer.zero_grad(set_to_none=True)
                raise self._nonfinite(f"the loss of head {out.nonfinite_head} is "
                                      f"{out.head_losses[out.nonfinite_head]}")
            total += out.loss
            for j in range(n):
                if out.head_losses[j] is not None:
                    head_loss[j] = (head_loss[j] or 0.0) + out.head_losses[j]
                    head_correct[j] += out.head_correct[j]
        # Each rank's losses are its part of the global sums (global denominators): summed, they are the step's.
        computed = [j for j in range(n) if head_loss[j] is not None]
        sums = all_sum([total, *(head_loss[j] for j in computed), *(head_correct[j] for j in computed)])
        total = sums[0]
        for i, j in enumerate(computed):
            head_loss[j], head_correct[j] = sums[1 + i], sums[1 + len(computed) + i]
        accuracy = [None if head_loss[j] is None or norms[j] == 0 else head_correct[j] / norms[j] for j in range(n)]
        return total, head_loss, accuracy, tokens

    def _optimizer_step(self) -> tuple[float, float]:
        """Unscale, clip, step optimizer and schedule, clear gradients: (gradient norm, lr used)."""
        cfg = self.config
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(grad_norm) and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise self._nonfinite(f"the gradient norm is {grad_norm}")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        # The fused AdamW kernel writes the weights without bumping their version counters, which is how copies
        # made from them (`mtp.models.weight_state.kept_copy`: the blocked unembedding of a held-out evaluation,
        # the draft vocabulary's rows) see a change; without this, later evaluations scored the old weights.
        if self.optimizer.defaults.get("fused"):
            torch.autograd.graph.increment_version(self.params)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm, lr

    def _nonfinite(self, what: str) -> NonFiniteLossError:
        keep = (f"the last good checkpoint is {self.last_checkpoint} (continue with --resume, e.g. with a lower --lr)"
                if self.last_checkpoint is not None else "no checkpoint was saved yet")
        return NonFiniteLossError(f"step {self.step + 1}: {what}; stopping. Nothing from this step was applied; {keep}")

    # -------------------------------------------------------------------------------------- run
    def evaluate(self) -> EvalResult | None:
        if self.eval_data is None or len(self.eval_data) == 0:
            return None
        return evaluate_heads(self.model, self.eval_data, self.config.eval_batch_size, self.autocast,
                              trunk_features=self.eval_features, progress=self.config.progress and self.is_main)

    def save(self) -> Path | None:
        if self.output_dir is None:
            return None
        if self.parallel is not None:
            state = self.state_dict()
            del state["optimizer"]  # its tensors go to the shards, its parameter groups to the JSON state
            self.last_checkpoint = save_sharded_checkpoint(self.output_dir / "checkpoints", self.step, self.model,
                                                           self.optimizer, state, keep=self.config.keep_checkpoints)
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(self.output_dir / "checkpoints", self.step, self.model,
                                               self.state_dict(), keep=self.config.keep_checkpoints,
                                               link_from=self.last_checkpoint)
        return self.last_checkpoint

    def train(self, on_step: Callable[[Trainer, StepMetrics], None] | None = None) -> TrainResult:
        """Run from `self.step` to `config.steps`. Ctrl-C (or `request_stop`) saves a checkpoint, then raises
        KeyboardInterrupt. NaN/inf raises NonFiniteLossError, leaving the last checkpoint as it was."""
        cfg = self.config
        self._started = self.clock()
        self.prepare()
        self._started = self.clock()  # the cache is a one-off cost, not training time
        metrics = MetricsLog(self.output_dir / "metrics.jsonl" if self.output_dir and self.is_main else None,
                             self.step, cfg.steps)
        bar = None
        if self.is_main:
            bar = progress_bar(cfg.progress, cfg.steps if self.paced else None, "train", "step", self.step,
                               mininterval=1.0)
        self._stop.requested = False
        saved_at = self.step if self.last_checkpoint is not None else None
        first, timed_from = self.step, None  # --train-minutes: this process's first step, when timing began
        try:
            with self._stop:
                while self.step < cfg.steps:
                    m = self.train_step()
                    self.history.append(m)
                    metrics.write(m.to_dict())
                    if not self.paced:
                        timed_from = self._pace_after_step(self.step - first, timed_from, bar)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(_postfix(m), refresh=False)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        ev = self.evaluate()
                        if ev is not None:
                            metrics.write({"step": self.step, "eval": ev.to_dict()})
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
                        saved_at = self.step
                        self.plot()
                    if on_step is not None:
                        on_step(self, m)
                    if self._stop_requested():
                        if saved_at != self.step:
                            self.save()
                        if bar is not None:
                            bar.close()
                        where = f" to {self.last_checkpoint}" if self.last_checkpoint else ""
                        if self.is_main:
                            print(f"mtp: stopped at step {self.step}; checkpoint saved{where}; "
                                  f"{RESUME_HINT.get()}", flush=True)
                        raise self._stop.interrupt()
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        evaluation = self.evaluate()
        if evaluation is not None:
            metrics.append_line({"step": self.step, "eval": evaluation.to_dict()})
        if saved_at != self.step:
            self.save()
        self.plot()
        return TrainResult(self.step, evaluation, self.history, self._elapsed())

    def _pace_after_step(self, done: int, timed_from: float | None, bar) -> float | None:
        """--train-minutes, after this process's `done`-th step: start timing, or pace (`PACE_SKIP`); returns
        when timing began."""
        now, budget = self.clock(), self.config.minutes * 60
        if done == PACE_SKIP:
            return now
        timed = done - PACE_SKIP
        if self.parallel is None and self._elapsed() >= budget:  # spent before the pace is known: stop here
            self._pace(float("inf"), bar)
        elif timed == PACE_STEPS or (self.parallel is None and timed > 0 and now - timed_from >= PACE_SHARE * budget):
            self._pace((now - timed_from) / timed, bar)
        return timed_from

    def _pace(self, seconds_a_step: float, bar) -> None:
        """--train-minutes: the step count that fits the budget at this pace (the processes' mean under torchrun,
        so that all stop at the same step), at most the configured one; warmup follows it (`warmup_share`)."""
        cfg, elapsed = self.config, self._elapsed()
        if self.parallel is not None:  # every process computes the count from the same two numbers
            seconds_a_step, elapsed = (x / self.parallel.world_size for x in all_sum([seconds_a_step, elapsed]))
        left = cfg.minutes * 60 - elapsed
        cfg.steps = min(cfg.steps, self.step + max(0, math.floor(left / max(seconds_a_step, 1e-9))))
        if cfg.warmup_share is not None:
            cfg.warmup_steps = round(cfg.warmup_share * cfg.steps)
        self.paced = True
        if bar is not None:
            bar.total = cfg.steps
            bar.refresh()
        if self.is_main:
            pace = f"{seconds_a_step:.3g} s a step" if math.isfinite(seconds_a_step) else "the budget is spent"
            print(f"mtp train: {pace} after step {self.step}: {cfg.steps:,} step{'s' if cfg.steps != 1 else ''} "
                  f"in about {cfg.minutes:g} min "
                  f"(--train-minutes), warmup {cfg.warmup_steps}", flush=True)

    def request_stop(self) -> None:
        """What Ctrl-C does: finish the current step, save a checkpoint, raise KeyboardInterrupt."""
        self._stop.requested = True

    def _stop_requested(self) -> bool:
        """Whether any process of the run was asked to stop: under torchrun every rank gets the signal, but
        not necessarily in the same step, and the checkpoint they save together needs them all."""
        if self.parallel is None:
            return self._stop.requested
        return all_sum([float(self._stop.requested)])[0] > 0

    def plot(self) -> Path | None:
        if self.output_dir is None or not self.is_main:
            return None
        from mtp.training.plots import plot_losses

        return plot_losses(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")


def _postfix(m: StepMetrics) -> str:
    losses = " ".join(f"h{j}={x:.3f}" for j, x in enumerate(m.head_loss) if x is not None)
    return f"{losses} | {m.tokens_per_s:,.0f} tok/s"


class MetricsLog:
    """metrics.jsonl, appended one line per step. On resume, lines after the resumed step are dropped first
    (they belong to steps that will be run again), and so is the final evaluation of a run resumed at its last
    step (killed after its last checkpoint: the evaluation is made again)."""

    def __init__(self, path: Path | None, resume_step: int, last_step: int | None = None):
        self.path = path
        self._file = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut off by a crash
                    continue
                step = record.get("step") if isinstance(record, dict) else None
                final = last_step is not None and step == last_step and "eval" in record
                if isinstance(step, int | float) and not isinstance(step, bool) and step <= resume_step and not final:
                    kept.append(line)  # (a line that is no record of a step, an edit's: dropped as well)
            atomic_write_lines(path, kept)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is not None:
            with disk_errors(self.path):  # a line cut short is skipped when the log is read again
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()

    def append_line(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def steps_for_epochs(data: TokenizedData, epochs: float, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch(data, batch_size) / grad_accum))
