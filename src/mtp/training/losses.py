"""The multi-head loss: k-ahead targets, the naive and the memory-efficient order, held-out accuracy.

`shift_targets` is the one place that decides which token each head is trained to predict; everything else in
training (loss, accuracy, evaluation) goes through it.

Memory-efficient order (Gloeckle et al. 2024, Fig. 2): the trunk runs once; each head in turn runs forward, loss
and backward into a detached copy of the trunk output (accumulating its gradient) and frees its vocabulary-size
logits; the trunk backward runs last with the accumulated gradient. Peak memory holds one head's logits instead of
n of them, and the gradients equal the naive all-heads-at-once loss (tested).

Only positions with a target pass through the unembedding (the prompt and padding never do), and an extra head
with a draft vocabulary (`MTPModel.set_draft_vocab`) scores only its K tokens: together they shrink the largest
matmul of a step and its memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mtp.errors import MTPError

Batch = dict[str, torch.Tensor]  # input_ids (B, T) long, loss_mask (B, T) bool, attention_mask (B, T)


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of head `head` at every position: head i at position t predicts token t+1+i.

    `loss_mask[t]` says token t is a target (an answer token, never padding). Returns `(targets, mask)`, both
    (B, T): `targets[:, t] = input_ids[:, t+1+i]` and `mask[:, t] = loss_mask[:, t+1+i]`; positions whose
    target would lie past the end have mask False and target 0.

    Example, T = 5, tokens a..e, all of them targets:

        position t       0   1   2   3   4
        input token      a   b   c   d   e
        head 0 target    b   c   d   e   -      (next token, the original model)
        head 1 target    c   d   e   -   -
        head 2 target    d   e   -   -   -
        head 3 target    e   -   -   -   -

    With a prompt "a b" and answer "c d e" (loss_mask F F T T T), head 0 is trained at positions 1..3 and
    head 1 at positions 0..2: a head learns every answer token it can see coming, even from inside the prompt.
    """
    if head < 0:
        raise MTPError(f"head must be >= 0, got {head}")
    shift = head + 1
    targets = torch.zeros_like(input_ids)
    mask = torch.zeros_like(loss_mask, dtype=torch.bool)
    if shift < input_ids.shape[1]:
        targets[:, :-shift] = input_ids[:, shift:]
        mask[:, :-shift] = loss_mask[:, shift:].bool()
    return targets, mask


def head_weights(spec: str | Sequence[float], num_heads: int) -> list[float]:
    """Per-head loss weights: "equal" (1 each), "medusa" (1 for head 0, 0.2 * 0.8**(i-1) for head i >= 1,
    Medusa-2's decay), or explicit numbers ("1,0.5,0.25,0.125" or a list)."""
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "equal":
            return [1.0] * num_heads
        if name == "medusa":
            return [1.0] + [0.2 * 0.8 ** (i - 1) for i in range(1, num_heads)]
        try:
            values = [float(x) for x in name.split(",") if x.strip()]
        except ValueError:
            raise MTPError(f"head weights must be 'equal', 'medusa' or comma-separated numbers, got {spec!r}") from None
    else:
        values = [float(x) for x in spec]
    if len(values) != num_heads:
        raise MTPError(f"{len(values)} head weights given for {num_heads} heads")
    if any(not (v >= 0.0) or v == float("inf") for v in values):
        raise MTPError(f"head weights must be finite and >= 0, got {values}")
    if not any(values):
        raise MTPError("at least one head weight must be > 0")
    return values


@dataclass
class LossOutput:
    """Per-head results of one batch. Heads that were not computed (weight 0) have None."""

    loss: float  # sum over heads of weight * loss (the scalar that was back-propagated, before normalizers)
    head_losses: list[float | None]
    head_correct: list[int | None]  # top-1 hits on target positions
    head_tokens: list[int]  # target positions of each head in this batch
    nonfinite_head: int | None = None  # first head whose loss was NaN/inf (no backward was run for it)


TARGET_POSITIONS = "target_positions"  # a batch's optional (N, 2) `loss_mask.nonzero()`, made where the rows are


def target_positions(batch: Batch) -> torch.Tensor:
    """(N, 2) row and position of every target token: the batch's own (the Trainer computes it on the host with
    the rows, so the loss needs no device-to-host copy), else `loss_mask.nonzero()` (one sync on a GPU)."""
    given = batch.get(TARGET_POSITIONS)
    return given if given is not None else batch["loss_mask"].nonzero()


def head_counts(positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(n,) how many target positions each head has, on the device of `positions` (`target_positions`): head j
    predicts the target at column s from column s - 1 - j, so it has those with s >= j + 1 (`shift_targets`)."""
    heads = torch.arange(num_heads, device=positions.device)
    return (positions[None, :, 1] > heads[:, None]).sum(-1)


def target_counts(batch: Batch, num_heads: int) -> list[int]:
    """Number of target positions of each head in a batch (for normalizing over accumulated micro-batches)."""
    return head_counts(target_positions(batch), num_heads).tolist()


def head_picks(batch: Batch, j: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where head j is trained, as fixed-length index tensors (no boolean indexing, so no host sync): (rows,
    columns, targets), each (N,) for the N target tokens of `positions` (`target_positions`). The target token at
    column s is head j's goal at column s - 1 - j (`shift_targets`' rule); a target with s <= j has no such column:
    it is picked at column 0 with target -1, which the loss ignores and accuracy never counts."""
    rows, cols = positions[:, 0], positions[:, 1]  # (N,), (N,)
    targets = batch["input_ids"][rows, cols]
    at = cols - (j + 1)
    seen = at >= 0
    return rows, at.clamp_min(0), torch.where(seen, targets, -1)


def next_ids(model, input_ids: torch.Tensor, j: int) -> torch.Tensor | None:
    """What extra head j reads besides the trunk when the model reads the next token: the row's own next tokens
    (teacher forcing: at decoding time head 0 has verified that token before the heads draft)."""
    if j == 0 or not model.reads_next_token:
        return None
    from mtp.models.parallel_heads import next_token_ids

    return next_token_ids(input_ids)


def head_logits_and_goals(model, j: int, hidden: torch.Tensor, targets: torch.Tensor):
    """Logits of head j at the picked positions, hidden (N, H), and the column each target is (N,).

    Head 0 scores the whole vocabulary. An extra head of a model with a draft vocabulary scores only those K
    tokens (the largest matmul of a training step shrinks by V/K); a target outside them gets goal -1: ignored
    by the loss, counted as a miss by accuracy (decoding could never propose it). A target -1 stays -1.
    """
    if j == 0:
        return model.lm_head(hidden).float(), targets  # (N, V), (N,)
    goals = model.draft_targets(targets.clamp_min(0))
    return model.draft_logits(hidden).float(), torch.where(targets >= 0, goals, -1)  # (N, K), (N,)


def _head_loss(model, j: int, trunk: torch.Tensor, ctx, batch: Batch, positions: torch.Tensor,
               denom: int | torch.Tensor):
    """(sum CE / denom, correct count) of head j, both device tensors (nothing is copied to the host here); the
    unembedding runs on target positions only."""
    rows, cols, targets = head_picks(batch, j, positions)
    hidden = model.head_forward(j, trunk, ctx, next_ids(model, batch["input_ids"], j))  # (B, T, H)
    logits, goal = head_logits_and_goals(model, j, hidden[rows, cols], targets)  # (N, V or K), (N,)
    denom = denom.clamp_min(1) if isinstance(denom, torch.Tensor) else max(denom, 1)
    loss = F.cross_entropy(logits, goal, reduction="sum", ignore_index=-1) / denom
    with torch.no_grad():
        correct = (logits.argmax(-1) == goal).sum()
    return loss, correct


def _check(model, weights: Sequence[float], normalizers: Sequence[int] | None) -> None:
    if len(weights) != model.num_heads:
        raise MTPError(f"{len(weights)} head weights for a {model.num_heads}-head model")
    if normalizers is not None and len(normalizers) != model.num_heads:
        raise MTPError(f"{len(normalizers)} normalizers for a {model.num_heads}-head model")


class _HeadValues:
    """A batch's per-head loss, hits and targets, kept on the device until `read` copies them all at once: one
    device-to-host copy a batch instead of four a head."""

    def __init__(self, num_heads: int, positions: torch.Tensor):
        self.counts = head_counts(positions, num_heads).float()  # (n,) every head's, those not computed too
        self.values = [self.counts]
        self.heads: list[int] = []

    def add(self, j: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.heads.append(j)
        self.values.append(torch.stack([loss.detach().float(), correct.float()]))

    def read(self, weights: Sequence[float]) -> LossOutput:
        n = len(weights)
        values = torch.cat(self.values).tolist()
        out = LossOutput(0.0, [None] * n, [None] * n, [int(c) for c in values[:n]])
        for i, j in enumerate(self.heads):
            loss, correct = values[n + 2 * i: n + 2 * i + 2]
            out.head_losses[j], out.head_correct[j] = loss, int(correct)
            out.loss += weights[j] * loss
            if not math.isfinite(loss) and out.nonfinite_head is None:
                out.nonfinite_head = j
        return out


def mtp_loss_naive(model, batch: Batch, weights: Sequence[float], *, normalizers: Sequence[int] | None = None,
                   trunk=None, backward: bool = True, grad_scale: float = 1.0) -> LossOutput:
    """All heads at once: one graph, sum of weighted losses, one backward. Holds every head's logits at once.

    Each head's loss is the summed cross-entropy over its target positions divided by `normalizers[j]` (default:
    its target count in this batch, i.e. the mean), so micro-batches of an accumulated step can share one
    denominator. `trunk=(hidden, ctx)` skips the trunk (a cached frozen-trunk output). `grad_scale` multiplies
    what is back-propagated (a GradScaler's scale with fp16), not the reported losses. A NaN/inf loss: no
    backward, `nonfinite_head` names the first such head.
    """
    _check(model, weights, normalizers)
    hidden, ctx = trunk if trunk is not None else model.trunk_forward(batch["input_ids"], batch["attention_mask"])
    positions = target_positions(batch)
    values = _HeadValues(model.num_heads, positions)
    denoms = normalizers if normalizers is not None else values.counts  # default: each head's mean
    total = None
    for j, w in enumerate(weights):
        if w == 0:
            continue
        loss, correct = _head_loss(model, j, hidden, ctx, batch, positions, denoms[j])
        values.add(j, loss, correct)
        total = w * loss if total is None else total + w * loss
    out = values.read(weights)
    if backward and total is not None and out.nonfinite_head is None and total.requires_grad:
        (total * grad_scale if grad_scale != 1.0 else total).backward()
    return out


def mtp_loss_memory_efficient(model, batch: Batch, weights: Sequence[float], *,
                              normalizers: Sequence[int] | None = None, trunk=None,
                              backward: bool = True, grad_scale: float = 1.0) -> LossOutput:
    """Trunk once; per head forward -> loss -> backward into the trunk output; trunk backward last.

    Same arguments and gradients as `mtp_loss_naive`. With `backward=False` it is a plain evaluation (call it
    under `torch.no_grad()`). The losses are read once, after the heads' backwards (a check per head would wait
    for the device each time): a head whose loss is NaN/inf is named by `nonfinite_head`, the trunk backward does
    not run, and the caller must discard the step's gradients (the heads' hold NaN/inf).
    """
    _check(model, weights, normalizers)
    hidden, ctx = trunk if trunk is not None else model.trunk_forward(batch["input_ids"], batch["attention_mask"])
    needs_trunk_grad = backward and hidden.requires_grad
    # A leaf cut from the trunk graph: each head's backward stops here and accumulates leaf.grad.
    leaf = hidden.detach().requires_grad_(needs_trunk_grad)
    positions = target_positions(batch)
    values = _HeadValues(model.num_heads, positions)
    denoms = normalizers if normalizers is not None else values.counts  # default: each head's mean
    for j, w in enumerate(weights):
        if w == 0:
            continue
        loss, correct = _head_loss(model, j, leaf, ctx, batch, positions, denoms[j])
        values.add(j, loss, correct)
        if backward and loss.requires_grad:
            (loss * (w * grad_scale)).backward()
        del loss  # frees this head's logits and graph before the next head runs
    out = values.read(weights)
    if needs_trunk_grad and leaf.grad is not None and out.nonfinite_head is None:
        hidden.backward(leaf.grad)
    return out


LOSS_ORDERS = {"naive": mtp_loss_naive, "memory-efficient": mtp_loss_memory_efficient}


@dataclass
class EvalResult:
    """Held-out per-head figures over every target position."""

    head_loss: list[float]
    head_accuracy: list[float]
    head_tokens: list[int]
    tokens_per_forward: float  # estimate: 1 + mean run of consecutive correct heads 1..n-1 (see evaluate_heads)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"head_loss": [round(x, 6) for x in self.head_loss],
                "head_accuracy": [round(x, 6) for x in self.head_accuracy],
                "head_tokens": self.head_tokens, "tokens_per_forward_estimate": round(self.tokens_per_forward, 4),
                **self.extra}


RANKS_MEASURED = 8  # candidate ranks 0..7 whose accuracy held-out evaluation records for draft trees


@torch.no_grad()
def evaluate_heads(model, data, batch_size: int = 8, autocast=None, trunk_features: torch.Tensor | None = None,
                   progress: bool = False) -> EvalResult:
    """Per-head mean cross-entropy and top-1 accuracy on `data` (a TokenizedData), every head evaluated.

    Accuracy is over every target position; with a draft vocabulary, a target outside it is a miss (decoding
    could not propose it) and adds nothing to the loss.

    `tokens_per_forward` estimates greedy self-speculative decoding under teacher forcing: at each position with
    a head-0 target, 1 + the number of leading heads 1, 2, ... whose top-1 equals its target (a missing target
    ends the run). With self-distilled targets (the model's own greedy continuation) this approximates what
    `mtp generate --strategy speculative` accepts on such texts. `trunk_features` (N, L, H): cached trunk
    outputs of the rows of `data` (frozen trunk; a tensor or `StoredFeatures`), used instead of running the trunk.

    For draft trees (`mtp.decoding.tree.build_tree`), each extra head's accuracy per candidate rank 0..7 (how
    often the target is its r-th most likely token) goes into `extra` under `TREE_STATS_KEY`.
    """
    totals = _HeadTotals(model.num_heads)
    modes = [(m, m.training) for m in model.modules()]  # restored per module (a frozen trunk stays in eval)
    model.eval()
    device = model.device
    starts = range(0, len(data), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False)
    try:
        for start in starts:
            rows = slice(start, start + batch_size)
            batch = data.batch(rows)
            ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            with autocast() if autocast is not None else nullcontext():
                if trunk_features is not None:
                    hidden = trunk_features[rows, : ids.shape[1]].to(device, model.activation_dtype)
                    ctx = forward_context(model, ids, attention_mask, hidden)
                else:
                    hidden, ctx = model.trunk_forward(ids, attention_mask)
                totals.add_batch(model, ids, batch["loss_mask"].to(device), hidden, ctx)
    finally:
        for module, mode in modes:
            module.training = mode
    return totals.result()


class _HeadTotals:
    """What `evaluate_heads` sums over the batches, per head: loss, hits, targets, hits per candidate rank; and the
    runs of leading correct heads behind its tokens-per-forward estimate."""

    def __init__(self, n: int):
        self.loss = [0.0] * n
        self.correct = [0] * n
        self.tokens = [0] * n
        self.rank_hits = torch.zeros(n, RANKS_MEASURED, dtype=torch.long)
        self.run_sum = 0.0
        self.run_positions = 0

    def add_batch(self, model, ids: torch.Tensor, loss_mask: torch.Tensor, hidden: torch.Tensor, ctx) -> None:
        """Score every head on one batch of rows, given the trunk's output `hidden`."""
        base = alive = run = None
        for j in range(len(self.loss)):
            targets, mask = shift_targets(ids, loss_mask, j)
            head_out = model.head_forward(j, hidden, ctx, next_ids(model, ids, j))  # (B, T, H)
            logits, goal = head_logits_and_goals(model, j, head_out[mask], targets[mask])  # (N, V or K), (N,)
            self.loss[j] += float(F.cross_entropy(logits, goal, reduction="sum", ignore_index=-1))
            hit = torch.zeros_like(mask)
            hit[mask] = logits.argmax(-1) == goal
            if j > 0:  # rank of the target among the head's candidates (a missing target: none)
                known = goal >= 0
                rank = (logits[known] > logits[known, goal[known]][:, None]).sum(-1)  # (N,)
                self.rank_hits[j] += torch.bincount(rank[rank < RANKS_MEASURED], minlength=RANKS_MEASURED).cpu()
            self.correct[j] += int(hit.sum())
            self.tokens[j] += int(mask.sum())
            if j == 0:
                base, alive = mask, mask.clone()
                run = torch.ones_like(mask, dtype=torch.long)
            else:
                alive &= hit
                run += alive.long()
            del logits
        self.run_sum += float(run[base].sum())
        self.run_positions += int(base.sum())

    def result(self) -> EvalResult:
        from mtp.decoding.tree import TREE_STATS_KEY

        tokens = self.tokens
        return EvalResult(
            head_loss=[s / t if t else float("nan") for s, t in zip(self.loss, tokens, strict=True)],
            head_accuracy=[c / t if t else float("nan") for c, t in zip(self.correct, tokens, strict=True)],
            head_tokens=tokens,
            tokens_per_forward=self.run_sum / self.run_positions if self.run_positions else float("nan"),
            extra={TREE_STATS_KEY: [[round(int(h) / t, 6) if t else 0.0 for h in self.rank_hits[j].tolist()]
                                    for j, t in zip(range(1, len(tokens)), tokens[1:], strict=True)]},
        )


def forward_context(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hidden: torch.Tensor):
    """The `ForwardContext` that `model.trunk_forward(input_ids, attention_mask)` builds (no cache), without running
    the trunk: for heads trained on cached trunk outputs. `hidden` only supplies dtype and device."""
    from mtp.models.parallel_heads import ForwardContext, _uncached_mask

    b, t = input_ids.shape
    valid = (torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if attention_mask is None
             else attention_mask.bool())
    dtype = model.base.get_input_embeddings().weight.dtype  # as trunk_forward: the activations' dtype
    mask, position_ids = _uncached_mask(valid, dtype, model.config)
    shared = model.backbone.layer_inputs(hidden, position_ids)
    return ForwardContext(mask, valid, position_ids, shared, None)
