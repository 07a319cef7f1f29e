"""`mtp bench-train`: step time and peak memory of one training step, n heads vs 1, naive vs memory-efficient.

Memory is measured two ways on the CPU (one way on CUDA):

- peak live tensor bytes (the figure compared): a `TorchDispatchMode` sees every tensor an operator creates during
  the step (activations, saved tensors, logits, gradients, optimizer temporaries), adds its storage's size when
  it is created and subtracts it when the storage is freed, and keeps the maximum. Added to it: the bytes that
  were live before the step (weights, optimizer state). It does not see allocator overhead or a math library's
  private scratch space. On CUDA, `torch.cuda.max_memory_allocated` is used instead.
- peak RSS increase (CPU, a cross-check): the process's resident-set high-water mark is reset through
  /proc/self/clear_refs before the step and read from /proc/self/status after it, minus the RSS before the step.
  It includes allocator behaviour (freed memory the C library keeps), so it is noisier.
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mtp.runtime import Runtime, peak_memory, synchronize
from mtp.training.losses import LOSS_ORDERS

METHOD = ("peak memory = bytes of tensors live before the step (weights, optimizer state) + the maximum of the "
          "bytes of tensors created and still alive during one step (activations, logits, gradients), counted "
          "per storage by a TorchDispatchMode (torch.cuda.max_memory_allocated on CUDA); 'RSS +' is the rise of "
          "the process's resident-set high-water mark during the step (reset via /proc/self/clear_refs), which "
          "also counts allocator overhead. Step time: median of the timed steps after one warm-up step "
          "(forward, backward, AdamW), timed round-robin across the configurations so that load changes hit "
          "all of them alike. Every token of the batch is a target (the largest logits).")


class LiveTensorPeak(TorchDispatchMode):
    """Tracks bytes of storages created by operators while active; `peak` is their maximum simultaneous size."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            # In-place and view results share an input's storage: not a new allocation.
            if id(storage) in inputs or storage in self._seen:
                continue
            self._seen.add(storage)
            nbytes = storage.nbytes()
            self.current += nbytes
            weakref.finalize(storage, self._release, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def live_bytes(model, optimizer) -> int:
    """Bytes of the distinct storages held by the model (parameters, buffers, gradients) and the optimizer."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config_step(model, optimizer, loss_fn, batch, weights, freeze_trunk: bool):
    def step():
        trunk = None
        if freeze_trunk:
            with torch.no_grad():
                trunk = model.trunk_forward(batch["input_ids"], batch["attention_mask"])
        out = loss_fn(model, batch, weights, trunk=trunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out
    return step


def build(base, num_heads: int, order: str, batch: dict, freeze_trunk: bool, gradient_checkpointing: bool):
    """(model, optimizer, step function) of one configuration; the model shares `base` with the others."""
    from mtp.models.parallel_heads import MTPModel
    from mtp.training.loop import configure_trainable, enable_gradient_checkpointing

    model = MTPModel(base, num_heads=num_heads)
    params = configure_trainable(model, freeze_trunk)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    weights = ([0.0] + [1.0] * (num_heads - 1)) if freeze_trunk else [1.0] * num_heads
    return model, optimizer, _config_step(model, optimizer, LOSS_ORDERS[order], batch, weights, freeze_trunk)


def measure_memory(model, optimizer, step, device: torch.device) -> dict:
    """Peak memory of one step (after a warm-up step has allocated the optimizer state)."""
    gc.collect()
    if device.type == "cuda":
        with peak_memory(device) as peak:
            step()
        return {"peak_mb": peak["peak_mb"], "step_alloc_mb": peak["extra_bytes"] / 2**20, "rss_increase_mb": None}
    before = live_bytes(model, optimizer)
    with LiveTensorPeak() as tracker:
        step()
    gc.collect()
    result = {"peak_mb": (before + tracker.peak) / 2**20, "step_alloc_mb": tracker.peak / 2**20,
              "rss_increase_mb": None}
    rss_before = _proc_status_kb("VmRSS")
    if rss_before is not None and _reset_rss_peak():
        step()
        hwm = _proc_status_kb("VmHWM")
        if hwm is not None:
            result["rss_increase_mb"] = (hwm - rss_before) / 1024
    return result


def _timed(step, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - t0


def run_bench_train(spec, heads, orders, seq_len, batch_size, steps, freeze_trunk, gradient_checkpointing,
                    device: torch.device, seed: int = 0) -> dict:
    from mtp.hub import load_base_model
    from mtp.models.loading import check_seq_len

    runtime = Runtime(device, torch.float32)  # trained weights are fp32
    base, tokenizer, source = load_base_model(spec, device, runtime.dtype)
    check_seq_len(base, seq_len)
    g = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool),
             "attention_mask": torch.ones_like(ids)}
    keys = [(n, order) for n in heads for order in orders]
    built = {}
    rows = []
    for n, order in keys:
        print(f"bench-train: {n} heads, {order}: warm-up and memory ...", flush=True)
        model, optimizer, step = built[(n, order)] = build(base, n, order, batch, freeze_trunk,
                                                            gradient_checkpointing)
        step()  # warm-up: AdamW allocates its state here
        rows.append({"num_heads": n, "order": order, **measure_memory(model, optimizer, step, device),
                     "step_seconds_all": []})
    # Timed steps round-robin over the configurations, so load changes on a shared machine hit all alike.
    for r in range(steps):
        print(f"bench-train: timed round {r + 1}/{steps} ...", flush=True)
        for row, key in zip(rows, keys, strict=True):
            row["step_seconds_all"].append(round(_timed(built[key][2], device), 4))
    for row in rows:
        row["step_seconds"] = statistics.median(row["step_seconds_all"])
    built.clear()
    gc.collect()
    by = {(r["num_heads"], r["order"]): r for r in rows}
    ratios = {}
    lo, hi = min(heads), max(heads)
    for order in orders:
        if lo != hi:
            a, b = by[(lo, order)], by[(hi, order)]
            ratios[order] = {"peak": b["peak_mb"] / a["peak_mb"], "step_alloc": b["step_alloc_mb"] / a["step_alloc_mb"],
                             "time": b["step_seconds"] / a["step_seconds"]}
    lines = [f"model: {source.description}; batch {batch_size} x {seq_len} tokens; "
             f"{'heads only (frozen trunk)' if freeze_trunk else 'full fine-tuning'}"
             f"{', gradient checkpointing' if gradient_checkpointing else ''}; {runtime.describe()}, "
             f"{torch.get_num_threads()} threads",
             "",
             f"{'heads':>5}  {'loss order':<17} {'step s':>8}  {'peak MB':>9}  {'step alloc MB':>13}  {'RSS + MB':>9}"]
    for r in rows:
        rss = f"{r['rss_increase_mb']:9.0f}" if r.get("rss_increase_mb") is not None else f"{'-':>9}"
        lines.append(f"{r['num_heads']:>5}  {r['order']:<17} {r['step_seconds']:8.2f}  {r['peak_mb']:9.0f}  "
                     f"{r['step_alloc_mb']:13.0f}  {rss}")
    if ratios:
        lines.append("")
        for order, rt in ratios.items():
            lines.append(f"{order}: n={hi} / n={lo}: peak {rt['peak']:.3f}x, step allocations "
                         f"{rt['step_alloc']:.3f}x, step time {rt['time']:.2f}x")
    return {"model": source.description, "batch_size": batch_size, "seq_len": seq_len, "freeze_trunk": freeze_trunk,
            "gradient_checkpointing": gradient_checkpointing, **runtime.to_dict(),
            "threads": torch.get_num_threads(), "results": rows, "ratios": ratios, "method": METHOD,
            "table": "\n".join(lines)}
