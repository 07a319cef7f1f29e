"""Peak resident memory of loading and decoding a model, against the size of its weights (`mtp info --memory`).

Resident memory is read from /proc/self/status (VmRSS now, VmHWM the peak); writing "5" to /proc/self/clear_refs
resets the peak, so each phase (load, packing, decode) gets its own. Linux only; elsewhere the report says so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MB = 1e6


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident() -> int | None:
    return _status("VmRSS")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> int | None:
    """This process's peak resident memory in bytes since start or the last `reset_peak` (what `/usr/bin/time -f
    %M` reports); without /proc, getrusage's maximum (never reset); None where neither exists."""
    found = _status("VmHWM")
    if found is not None:
        return found
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@dataclass
class Phase:
    name: str
    before: int
    peak: int
    after: int
    seconds: float


def tensor_bytes(model, padded: bool = False) -> int:
    """Bytes of the model's distinct parameters and buffers, plus packed weights: fp16-packed ones at 2 bytes a
    value, or (`padded`) what fbgemm's packed layout really takes (`mtp.models.packed.packed_bytes`); blocked fp32
    ones (decode-only, `BlockedLinear`) at 4."""
    from mtp.models.packed import BlockedLinear, PackedLinear, packed_bytes

    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    linears = {id(m): m for m in model.modules() if isinstance(m, (PackedLinear, BlockedLinear))}
    heads = getattr(model, "lm", model)  # a mask-token model decodes with its base as a 1-head model
    fast = getattr(getattr(heads, "backbone", None), "fast_layers", None) or {}  # (a plain HF model: none)
    for step in fast.values():
        for projection in step.packed or []:
            linears[id(projection.linear)] = projection.linear
    if getattr(heads, "packed_draft_head", None) is not None:
        linears[id(heads.packed_draft_head)] = heads.packed_draft_head
    size = packed_bytes if padded else (lambda k, n: 2 * k * n)
    return sum(seen.values()) + sum(m.nbytes if isinstance(m, BlockedLinear) else size(m.in_features, m.out_features)
                                    for m in linears.values())


class Meter:
    def __init__(self):
        self.phases: list[Phase] = []
        self.ok = resident() is not None and reset_peak()
        self.baseline = resident() or 0

    def run(self, name: str, fn):
        before = resident() or 0
        reset_peak()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.phases.append(Phase(name, before, peak() or 0, resident() or 0, seconds))
        return result


def memory_report(spec: str | None, dtype: str = "float32", quantize: str = "none", device: str = "cpu",
                  max_new_tokens: int = 16, tree_size: int | None = None, lookup: int = 0) -> list[str]:
    """Load `spec` as the decoding commands do (decode-only: packed with `quantize`, or fp32 weights blocked for
    oneDNN on a CPU), decode `max_new_tokens` greedily and then speculatively (when the model drafts: extra heads
    or masks, or `lookup`; with `tree_size` an "auto" draft tree); one line per phase, and the speculative
    decode's peak against the greedy one's."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 - imports count as the baseline, not the load
    import transformers.models.llama.modeling_llama  # noqa: F401

    from mtp.models.loading import load_mtp_model
    from mtp.runtime import dtype_name, resolve_runtime

    runtime = resolve_runtime(device, dtype, quantize)
    device, dtype = runtime.device, dtype_name(runtime.dtype)
    meter = Meter()
    if not meter.ok:
        return ["memory: /proc/self/status or /proc/self/clear_refs is not available here (Linux only)"]
    name = "load" if quantize == "none" else f"load + pack {quantize}"
    model = meter.run(name, lambda: load_mtp_model(spec, device=device, dtype=dtype, quantize=quantize,
                                                   decode_only=True))
    nominal = tensor_bytes(model)
    weights = tensor_bytes(model, padded=True)  # what the ratios below compare against: the weights' real bytes
    tok = model.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = torch.arange(1, 9)[None] % model.config.vocab_size
    ids = ids.to(model.device)
    meter.run(f"decode {max_new_tokens} (greedy)",
              lambda: model.generate(ids, max_new_tokens=max_new_tokens, strategy="greedy", stop_token_ids=[]))
    drafts = model.draft_depth() > 0
    if drafts or lookup:
        kind = ", ".join(["speculative"] + ([f"tree {tree_size}"] if tree_size else [])
                         + ([f"lookup {lookup}"] if lookup else []))
        meter.run(f"decode {max_new_tokens} ({kind})",
                  lambda: model.generate(ids, max_new_tokens=max_new_tokens, strategy="speculative", stop_token_ids=[],
                                         tree="auto" if tree_size and drafts else None,
                                         tree_size=tree_size if drafts else None, lookup=lookup))
    how = f"{quantize}-packed for decoding, the rest {dtype}" if quantize != "none" else dtype
    if getattr(getattr(model, "lm", model), "fast_decoding", None) == "blocked":
        how = f"{dtype}, the layers' and unembedding's blocked for oneDNN as `mtp generate` keeps them"
    lines = [f"imports and start-up: {meter.baseline / MB:,.0f} MB resident (the baseline below)",
             f"weights in memory: {weights / MB:,.0f} MB ({how}"
             + (f"; {nominal / MB:,.0f} MB at 2 bytes a packed value, fbgemm pads them)" if nominal != weights
                else ")")]
    width = max(len(p.name) for p in meter.phases)
    for p in meter.phases:
        above = p.peak - meter.baseline
        lines.append(f"{p.name:<{width}} peak {p.peak / MB:8,.0f} MB = baseline + {above / MB:7,.0f} MB "
                     f"({above / weights:.2f}x the weights); after {p.after / MB:,.0f} MB; {p.seconds:.1f} s")
    if len(meter.phases) == 3:
        greedy, spec = meter.phases[1:]
        lines.append(f"speculative decoding's peak is {spec.peak / greedy.peak:.3f}x greedy decoding's "
                     f"(+{(spec.peak - greedy.peak) / MB:,.0f} MB)")
    top = max(p.peak for p in meter.phases)
    lines.append(f"peak of the run: {top / MB:,.0f} MB = baseline + {(top - meter.baseline) / MB:,.0f} MB")
    lines.append(f"device: {runtime.describe()} (the figures above are the process's resident memory)")
    return lines

