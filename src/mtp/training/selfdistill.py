"""Training a mask-token model by self-distillation (Kirchenbauer et al. 2026): a frozen teacher scores the
student's own multi-token predictions.

Each micro-batch: rows are laid out in regions of P real tokens + k-1 masks (`mtp.models.mask_tokens`,
k drawn per step, a random offset per step); the student predicts at every region's k prediction slots; its
argmax at slot j is written into mask j+1's slot (what it guessed for that position); the teacher runs once,
under no_grad, on that sequence with the same layout and scores every prediction slot:

    slot            last real token x_t   mask 1      ...   mask k-1
    student input   x_t                   [mask]            [mask]
    teacher input   x_t                   s_1 (guess)       s_{k-1}
    student target  argmax teacher(. | x_<=t)   argmax teacher(. | x_<=t, s_1)   ...  (hard), or its
                    distribution (soft: KL(teacher || student))

The loss is the plain mean over counted prediction slots (a region counts when its last real token is real and,
answer-only, when the token after it is an answer token), plus `prefix_loss` x the next-token cross-entropy on
the real tokens (the data's next token), plus `entropy_loss` x the student's mean entropy over the counted slots
(minimised: the authors' code has this optional student-entropy term; it sharpens the guesses that ConfAdapt
thresholds by confidence). Held out: per offset 1..k, how often the student's argmax agrees
with the teacher's.

`SelfDistillOptions` are the flags of `mtp train` only this method uses; `SelfDistillMethod` is its piece of the
command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mtp.errors import MTPError
from mtp.training.data import TokenizedData
from mtp.training.distributed import all_sum
from mtp.training.loop import Trainer
from mtp.training.losses import EvalResult

SUPERVISION = ("hard", "soft")
CONFADAPT_TAUS = (0.9, 0.7, 0.5)  # held out: the share of slots ConfAdapt(tau) would emit, per threshold


@dataclass(frozen=True)
class SelfDistillOptions:
    """self-distillation (--method selfdistill)

    Args:
        k: tokens predicted per position (the masks are k-1); default 4
        k_min: draw k per step uniformly from [k-min, k-max] (seeded) instead of a fixed --k
        k_max: see --k-min
        regions: regions per row: each holds --seq-len / --regions real tokens, then k-1 masks (a row is
            --seq-len + regions x (k-1) slots; the paper's S counts the masks too: P = S/M - (k-1))
        supervision: "hard": cross-entropy to the teacher's argmax (the paper's default); "soft": KL to its
            distribution
        prefix_loss: weight of the next-token loss on the real tokens (0: off)
        entropy_loss: weight of the student's entropy at the prediction slots, minimised (0: off): sharper
            guesses, so ConfAdapt's threshold passes more often
        adapter: "full" trains the whole model (teacher: a frozen copy); "gated-lora" trains LoRA adapters active
            at mask tokens only (real tokens stay exactly the base model)
        lora_rank: --adapter gated-lora: rank of the adapters
        lora_layers: --adapter gated-lora: adapters on the top N decoder layers only (default all); the layers
            below need no backward pass, so training is faster
        mask_token: the mask token's string (default <|mtp_mask|>; added to the tokenizer when new)
        mask_token_id: use this existing token id as the mask token (e.g. a checkpoint that ships one)
        per_rank_k: under torchrun, each rank draws its own k per step from [k-min, k-max] (the paper's recipe)
    """

    k: int | None = None
    k_min: int | None = None
    k_max: int | None = None
    regions: int = 5
    supervision: Literal["hard", "soft"] = "hard"
    prefix_loss: float = 0.0
    entropy_loss: float = 0.0
    adapter: Literal["full", "gated-lora"] = "full"
    lora_rank: int = 16
    lora_layers: int | None = None
    mask_token: str | None = None
    mask_token_id: int | None = None
    per_rank_k: bool = False


@dataclass
class SelfDistillConfig:
    k_min: int = 4
    k_max: int = 4
    regions: int = 5
    seq_len: int = 160  # real tokens of a layout, seq_len // regions per region (each followed by k-1 masks)
    supervision: str = "hard"
    prefix_loss: float = 0.0
    entropy_loss: float = 0.0  # weight of the student's mean entropy at the prediction slots (minimised)
    answer_only: bool = True
    per_rank_k: bool = False  # under torchrun each rank draws its own k per step (the paper's recipe)

    def validate(self) -> None:
        if not 2 <= self.k_min <= self.k_max:  # k-1 mask tokens predict the tokens after the next: k=1 has none
            raise MTPError(f"k must satisfy 2 <= k_min <= k_max for self-distillation (--k, or --k-min and --k-max), "
                           f"got {self.k_min}, {self.k_max}")
        if self.regions < 1:
            raise MTPError(f"--regions must be >= 1, got {self.regions}")
        if self.prefix_len < 1:
            raise MTPError(f"--seq-len {self.seq_len} leaves no real token per region with --regions {self.regions}")
        if self.supervision not in SUPERVISION:
            raise MTPError(f"--supervision must be one of {', '.join(SUPERVISION)}, got {self.supervision!r}")
        if self.prefix_loss < 0:
            raise MTPError(f"--prefix-loss must be >= 0, got {self.prefix_loss}")
        if self.entropy_loss < 0:
            raise MTPError(f"--entropy-loss must be >= 0, got {self.entropy_loss}")

    @property
    def prefix_len(self) -> int:
        return self.seq_len // self.regions


def draw(seed: int, step: int, low: int, high: int) -> int:
    """A uniform integer in [low, high] that depends only on (seed, step): resumed runs draw the same."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)  # any seed the CLI takes
    return int(torch.randint(low, high + 1, (1,), generator=gen))


@dataclass
class SlotFigures:
    """Sums over the counted prediction slots, per offset (index j: the token j+1 steps ahead)."""

    loss: torch.Tensor  # (k,)
    agree: torch.Tensor  # (k,)
    count: torch.Tensor  # (k,)
    total: torch.Tensor  # scalar: the objective (mean), with grad when training
    confident: torch.Tensor | None = None  # (len(taus), k): slots whose offsets 0..j all have top-1 prob >= tau


def distill_figures(model, teacher, batch: dict, k: int, cfg: SelfDistillConfig, offset: int,
                    need_grad: bool, always_run: bool = False, taus: tuple[float, ...] = ()) -> SlotFigures:
    """Student and teacher on one batch of rows laid out for k; the loss and per-offset figures.
    `taus`: also count, per threshold, the slots ConfAdapt would emit (`SlotFigures.confident`).

    The layout runs as two passes (`MaskTokenModel.real_pass`, `mask_pass`), which compute what one forward
    of the whole layout does since real tokens never attend to masks. With gated LoRA the real tokens are the
    base model: their pass runs once, without gradients, for student and teacher. `always_run`: run the passes
    even when no region counts (one region kept, weighing nothing), as every rank of a sharded model must.
    """
    from mtp.models.mask_tokens import gather_layout, mask_layout

    layout = mask_layout(cfg.prefix_len, k, cfg.regions)
    lb = gather_layout(batch["input_ids"], batch["attention_mask"], layout, model.mask_token_id, offset,
                       batch["loss_mask"] if cfg.answer_only else None).without_idle_regions(keep_one=always_run)
    b, m = lb.region_weight.shape
    if m == 0:  # no region counts in this batch (e.g. every row is prompt here): nothing to learn from it
        zeros = torch.zeros(k, device=lb.input_ids.device)
        return SlotFigures(zeros, zeros, zeros, torch.zeros((), device=lb.input_ids.device),
                           torch.zeros(len(taus), k, device=lb.input_ids.device) if taus else None)
    order = torch.empty_like(lb.is_mask, dtype=torch.long)  # slot -> index within its pass
    order[~lb.is_mask] = torch.arange(int((~lb.is_mask).sum()), device=order.device)
    order[lb.is_mask] = torch.arange(int(lb.is_mask.sum()), device=order.device)
    last_real, mask_slots = order[lb.predict[:, 0]], order[lb.predict[:, 1:]]  # (M,), (M, k-1)

    def gather(real_h, mask_h):  # hidden at the prediction slots (B, M, k, H)
        return torch.cat([real_h[:, last_real, None], mask_h[:, mask_slots]], 2)

    shared = model.lora is not None  # real tokens compute the base model: one pass for both, no gradient
    with torch.set_grad_enabled(need_grad and not shared):
        real_h, prefix = model.real_pass(lb)  # (B, R, H)
    with torch.set_grad_enabled(need_grad):
        mask_h = model.mask_pass(lb, prefix)  # (B, Q, H)
        student = model.lm_head(gather(real_h, mask_h)).float()  # (B, M, k, V)
    with torch.no_grad():
        guesses = student.argmax(-1)  # (B, M, k)
        filled = lb.input_ids.clone()
        if k > 1:  # mask j of each region holds the student's guess from slot j-1
            filled[:, lb.predict[:, 1:].flatten()] = guesses[:, :, :-1].flatten(1)
        if shared:
            t_real, t_prefix = real_h, prefix
        else:
            t_real, t_prefix = model.real_pass(lb, model=teacher)
        t_mask = model.mask_pass(lb, t_prefix, tokens=filled, model=teacher, adapters=False)
        t_logits = model.without_mask_token(teacher.get_output_embeddings()(gather(t_real, t_mask))).float()
    weight = lb.region_weight[:, :, None].expand(-1, -1, k)  # (B, M, k)
    log_probs = F.log_softmax(student, -1)  # (B, M, k, V)
    per_slot, total = _distill_loss(log_probs, t_logits, weight, cfg, need_grad)
    if cfg.prefix_loss > 0 and need_grad and not shared:
        targets = lb.next_token[:, ~lb.is_mask]  # (B, R) the data's next token after each real token
        if bool((targets >= 0).any()):
            logits = model.lm_head(real_h).float()  # (B, R, V)
            total = total + cfg.prefix_loss * F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                              ignore_index=-100)
    count = weight.sum((0, 1))  # (k,)
    agree = ((guesses == t_logits.argmax(-1)).float() * weight).sum((0, 1))
    confident = None
    if taus:  # ConfAdapt emits offset j when offsets 0..j are all confident (offset 0 always, whatever it is)
        with torch.no_grad():
            top = log_probs.detach().amax(-1).exp()  # (B, M, k): the top-1 probability (log-softmax reused)
            runs = torch.stack([(top >= t).long().cumprod(-1) for t in taus])  # (taus, B, M, k)
            confident = (runs * weight).sum((1, 2))  # (taus, k)
    return SlotFigures((per_slot.detach() * weight).sum((0, 1)), agree, count, total, confident)


def _distill_loss(log_probs: torch.Tensor, t_logits: torch.Tensor, weight: torch.Tensor, cfg: SelfDistillConfig,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's loss against the teacher at each slot (B, M, k) (hard: the teacher's top token; soft: KL to
    its distribution) and their weighted mean, with the optional entropy term."""
    b, m, k = weight.shape
    if cfg.supervision == "hard":
        per_slot = F.nll_loss(log_probs.flatten(0, 2), t_logits.argmax(-1).flatten(), reduction="none")
    else:
        per_slot = F.kl_div(log_probs, F.log_softmax(t_logits, -1), log_target=True,
                            reduction="none").sum(-1).flatten()
    per_slot = per_slot.view(b, m, k)
    total = (per_slot * weight).sum() / weight.sum().clamp_min(1)
    if cfg.entropy_loss > 0 and need_grad:  # the authors' optional student-entropy term, here minimised
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, M, k)
        total = total + cfg.entropy_loss * (entropy * weight).sum() / weight.sum().clamp_min(1)
    return per_slot, total


class SelfDistillTrainer(Trainer):
    """The shared loop (`Trainer`: optimizer, schedule, checkpoints, resume, metrics, Ctrl-C) with the
    self-distillation objective. Metrics per "head" are per offset: index j is the token j+1 steps ahead."""

    FORWARD_METHODS = ("real_pass", "mask_pass", "lm_head")

    def __init__(self, model, train_data: TokenizedData, config, distill: SelfDistillConfig, teacher=None,
                 **kwargs):
        distill.validate()
        self.distill = distill
        self.teacher = teacher
        super().__init__(model, train_data, config, **kwargs)
        if self.precision == "bf16" and self.parallel is None and self.frozen_modules():
            # A separate teacher is frozen and computes in bf16 under autocast anyway: stored in it, its weights
            # are not cast again at every forward, and it takes half the memory (sharded runs do this in
            # `Parallel.wrap`).
            self.teacher.to(torch.bfloat16)

    def _setup(self) -> list[torch.nn.Parameter]:
        model = self.model
        if self.config.freeze_trunk:
            raise MTPError("--freeze-trunk is for parallel heads; self-distillation trains the model "
                           "(--adapter full) or gated LoRA adapters (--adapter gated-lora)")
        model.requires_grad_(False)
        params = model.trainable_parameters()
        for p in params:
            p.requires_grad_(True)
        # eval mode: no dropout, so the student at real tokens computes what the teacher does
        model.eval()
        if self.teacher is None:
            self.teacher = model.make_teacher()
        return params

    def _largest_offset(self) -> int:
        """The largest shift of a step's positions: up to a region's length less one, within the model's positions
        (a row's real slots reach seq_len - 1 + offset, its masks k-1 further: past a learned position table,
        GPT-2's, an IndexError; past RoPE's, positions the model never saw)."""
        from mtp.decoding.generate import context_limit

        d = self.distill
        limit = context_limit(self.model)
        room = d.prefix_len - 1 if limit is None else limit - (d.seq_len + d.k_max - 1)
        return max(0, min(d.prefix_len - 1, room))

    def frozen_modules(self) -> list:
        return [] if self.teacher is self.model.base else [self.teacher]  # gated LoRA: the teacher is the base

    def prepare(self) -> None:  # no trunk features to cache
        return None

    def _k(self, step: int) -> int:
        d = self.distill
        if d.k_min == d.k_max:
            return d.k_min
        # Per rank: a seed of its own (rank 0 draws what a single process draws).
        seed = self.config.seed + (1_000_033 * self.parallel.rank if d.per_rank_k and self.parallel else 0)
        return draw(seed, step, d.k_min, d.k_max)

    def accumulate_gradients(self):
        cfg, d = self.config, self.distill
        k = self._k(self.step)
        k_max = d.k_max
        loss = torch.zeros(k_max)
        agree = torch.zeros(k_max)
        count = torch.zeros(k_max)
        micro = []
        tokens = 0
        for m in range(cfg.grad_accum):
            rows, mine, stand_in = self.micro_rows(self.step * cfg.grad_accum + m)
            tokens += int(self.train_data.lengths[rows].sum())
            micro.append({key: v.to(self.device) for key, v in self.rows_batch(mine, stand_in).items()})
        offset = draw(cfg.seed + 1, self.step, 0, self._largest_offset())
        total = 0.0
        for batch in micro:
            with self.autocast():
                f = distill_figures(self.model, self.teacher, batch, k, d, offset, need_grad=True,
                                    always_run=self.parallel is not None)
            # What the host needs of the micro-batch, in one copy (each read waits for the device)
            figures = torch.cat([f.total.detach().float()[None], f.loss.float(), f.agree.float(), f.count.float()])
            value, *figures = figures.tolist()
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise self._nonfinite(f"the loss is {value}")
            loss[:k] += torch.tensor(figures[:k])
            agree[:k] += torch.tensor(figures[k:2 * k])
            count[:k] += torch.tensor(figures[2 * k:])
            # The loss is a mean over this rank's slots; weighted by its share of the micro-batch's slots on all
            # ranks, the gradients summed over ranks are those of the mean over the whole micro-batch.
            mine = sum(figures[2 * k:])
            everyone = all_sum([mine])[0]
            share = mine / everyone if everyone > 0 else 0.0
            if f.total.requires_grad:
                (f.total * (share / cfg.grad_accum)).backward()
            total += value * share / cfg.grad_accum
        sums = all_sum([total, *loss.tolist(), *agree.tolist(), *count.tolist()])
        total = sums[0]
        loss, agree, count = (torch.tensor(sums[1 + i * k_max: 1 + (i + 1) * k_max]) for i in range(3))
        per_loss = [float(loss[j] / count[j]) if count[j] > 0 else None for j in range(k_max)]
        per_acc = [float(agree[j] / count[j]) if count[j] > 0 else None for j in range(k_max)]
        return total, per_loss, per_acc, tokens

    @torch.no_grad()
    def evaluate(self) -> EvalResult | None:
        """Per offset 1..k_max, agreement of the student's argmax with the teacher's on the held-out rows
        (offset 0, k = k_max)."""
        data = self.eval_data
        if data is None or len(data) == 0:
            return None
        d, k = self.distill, self.distill.k_max
        loss, agree, count = torch.zeros(k), torch.zeros(k), torch.zeros(k)
        confident = torch.zeros(len(CONFADAPT_TAUS), k)
        bs = self.config.eval_batch_size
        for start in range(0, len(data), bs):
            batch = {key: v.to(self.device) for key, v in data.batch(slice(start, start + bs)).items()}
            with self.autocast():
                f = distill_figures(self.model, self.teacher, batch, k, d, 0, need_grad=False,
                                    always_run=self.parallel is not None, taus=CONFADAPT_TAUS)
            loss += f.loss.cpu()
            agree += f.agree.cpu()
            count += f.count.cpu()
            confident += f.confident.cpu()
        acc = (agree / count.clamp_min(1)).tolist()
        # Expected tokens per verified forward if drafts were accepted exactly when they agree (offsets 2..k in
        # a row): 1 + sum over j of the agreement of the first j drafts, approximated by the product of rates.
        run, expected = 1.0, 1.0
        for a in acc[1:]:
            run *= a
            expected += run
        return EvalResult((loss / count.clamp_min(1)).tolist(), acc, [int(c) for c in count], expected,
                          extra={"metric": "student/teacher agreement per offset",
                                 "confadapt": confadapt_estimates(confident, count)})


def confadapt_estimates(confident: torch.Tensor, count: torch.Tensor) -> dict:
    """Teacher-forced ConfAdapt figures per threshold from `SlotFigures.confident` sums (taus, k) over `count`
    (k,) slots: the share of slots where offsets 0..j are all confident (what ConfAdapt would emit at j), and
    its estimate of tokens per forward, 1 + the sum of those shares over j >= 1 (offset 0 is always emitted)."""
    out = {}
    for tau, row in zip(CONFADAPT_TAUS, confident, strict=True):
        share = (row / count.clamp_min(1)).tolist()
        out[f"{tau:g}"] = {"confident_run_share": [round(x, 4) for x in share],
                           "tokens_per_forward_estimate": round(1 + sum(share[1:]), 4)}
    return out


class SelfDistillMethod:
    """--method selfdistill for `mtp train` (`mtp.training.commands`): model, teacher, trainer. `a`: the run's
    flags by name."""

    options = SelfDistillOptions

    def __init__(self):
        self.teacher = None

    @staticmethod
    def distill_config(a) -> SelfDistillConfig:
        if a.k is not None and (a.k_min is not None or a.k_max is not None):
            raise MTPError("give --k, or --k-min and --k-max, not both")
        if (a.k_min is None) != (a.k_max is None):
            raise MTPError("--k-min and --k-max go together")
        k_min, k_max = (a.k_min, a.k_max) if a.k_min is not None else (a.k or 4,) * 2
        if a.prefix_loss > 0 and a.adapter == "gated-lora":
            raise MTPError("--prefix-loss trains the real tokens, which gated LoRA leaves as the base model; "
                           "use it with --adapter full")
        if a.per_rank_k and k_min == k_max:
            raise MTPError("--per-rank-k draws k per rank from [--k-min, --k-max]; give a range")
        return SelfDistillConfig(k_min=k_min, k_max=k_max, regions=a.regions, seq_len=a.seq_len,
                                 supervision=a.supervision, prefix_loss=a.prefix_loss, entropy_loss=a.entropy_loss,
                                 answer_only=a.loss_on == "answer", per_rank_k=a.per_rank_k)

    def start_model(self, a, dev):
        """The model the run starts from: a mask-token folder as it is, any other model with a mask token."""
        from mtp.hub import resolve_model
        from mtp.models.folder_kind import is_mask_token_folder
        from mtp.models.mask_tokens import MaskTokenModel

        cfg = self.distill_config(a)
        source = resolve_model(a.model)
        if source.kind == "mtp_folder" and is_mask_token_folder(source.location):
            model = MaskTokenModel.from_pretrained(source.location, device=dev)
        elif source.kind == "mtp_folder":
            raise MTPError(f"{source.location} is a parallel-heads model; --method selfdistill starts from a base "
                           "model or a mask-token folder")
        else:
            model = MaskTokenModel.from_base(a.model, mask_token=a.mask_token, mask_token_id=a.mask_token_id,
                                             adapter=a.adapter, rank=a.lora_rank, k=cfg.k_max,
                                             lora_layers=a.lora_layers)
            model.to(dev)
        return model

    def check(self, a) -> None:
        """What this method's flags can get wrong together, refused before anything loads; and the positions its
        rows take against the model's context, where its config tells it."""
        self.distill_config(a).validate()
        if not a.resume:  # (a resumed run's model is its own)
            from mtp.hub import check_model_sizes

            check_model_sizes(a.model, seq_len=a.seq_len, masks=self.masks(a))

    def masks(self, a) -> int:
        """Positions a training row takes past its --seq-len tokens: the last region's k-1 masks."""
        return self.distill_config(a).k_max - 1

    def frozen_weights(self, a) -> bool:
        """Whether some weights are kept in --dtype: none (the teacher follows --autocast, `SelfDistillTrainer`)."""
        return False

    def loop_settings(self, a, model) -> dict:
        """The settings of the training loop (`TrainConfig` fields) that this method's flags give: none, its own
        go to `SelfDistillConfig`."""
        return {}

    def resolved(self, a) -> dict:
        return {}

    def load(self, a, checkpoint, dev):
        from mtp.models.mask_tokens import MaskTokenModel

        if checkpoint is None:
            return self.start_model(a, dev)
        model = MaskTokenModel.from_pretrained(checkpoint, device=dev)
        if model.lora is None:  # the teacher is the model the run started from, not the checkpoint
            self.teacher = self.start_model(a, dev).make_teacher()
        return model

    def answering_model(self, model):
        return model.lm  # the base model as a 1-head MTP model, for self-distilled answers

    def wants_trunk_features(self, a) -> bool:
        return False

    def default_lr(self, a) -> float:
        return 1e-3 if a.adapter == "gated-lora" else 5e-5

    def trainer(self, model, train_data, held_data, config, a, out, parallel=None, features=None):
        return SelfDistillTrainer(model, train_data, config, self.distill_config(a), teacher=self.teacher,
                                  output_dir=out, eval_data=held_data, parallel=parallel)

    def describe(self, model, a) -> str:
        cfg = self.distill_config(a)
        ks = f"k {cfg.k_min}" if cfg.k_min == cfg.k_max else \
            f"k {cfg.k_min}-{cfg.k_max} per step{' and rank' if cfg.per_rank_k else ''}"
        adapter = f"gated LoRA rank {model.lora.rank}" if model.lora is not None else "full fine-tuning"
        return (f"mask-token self-distillation ({adapter}, {cfg.supervision} targets), {ks}, {cfg.regions} regions "
                f"of {cfg.prefix_len} tokens + k-1 masks, mask token {model.mask_token!r} (id {model.mask_token_id})")
