"""Process-wide runtime settings shared by the commands: torch's threads, and the one device and dtype rule.

Every command takes `--device auto|cpu|cuda|cuda:N` (auto: the first CUDA device when torch sees one, else the
CPU) and, where it loads weights, `--dtype auto|float32|bfloat16|float16` (auto: bfloat16 on CUDA, float16 on a GPU
without bf16, float32 on the CPU, where fp16-packed weights are the fast lossless format instead). Both are
resolved and checked here, before anything is loaded, and every report records what they resolved to
(`Runtime.to_dict`: device, GPU name, dtype).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from mtp.errors import MTPError

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
DEVICES = "auto, cpu, cuda or cuda:N"
Graphs = Literal["auto", "on", "off", "compile"]  # replay decoding steps as CUDA graphs (auto: on CUDA)


def graphs_option(flag: Graphs, device: torch.device) -> bool | str | None:
    """A --graphs value for `generate(graphs=...)`: None (auto), True, False or "compile" (graphs of the step
    torch.compile made); "on" or "compile" off CUDA is an error."""
    if flag in ("on", "compile") and device.type != "cuda":
        raise MTPError(f"--graphs {flag} needs a CUDA device, not {device}")
    return {"auto": None, "on": True, "off": False, "compile": "compile"}[flag]
MB = 2**20


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: torch's choice). Decoding a small model is bound by memory and per-op overhead;
    on a busy machine fewer threads than cores can be faster, so every command takes --threads."""
    if threads is None:
        return
    if threads < 1:
        raise MTPError(f"--threads must be >= 1, got {threads}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and threads > cores:  # oversubscribed threads wait on each other: often far slower, never faster
        print(f"mtp: warning: --threads {threads} is more than the {cores} cores this process may use: using "
              f"{cores}", file=sys.stderr)
        threads = cores
    torch.set_num_threads(threads)


CONTENDED = 0.1  # threads that waited this share of their time for a core: other processes slowed this one


def _thread_times() -> dict[str, tuple[int, int]] | None:
    """Each thread of this process: (ns it ran on a core, ns it waited for one while runnable), from Linux's
    per-thread schedstat; None where the kernel does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    times = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                ran, waited = f.read().split()[:2]
            times[task] = (int(ran), int(waited))
        except (OSError, ValueError):  # (a thread that ended meanwhile)
            continue
    return times or None


class CoreWait:
    """The share of their time this process's threads waited for a CPU core, from now until `fraction()`: about 0
    on a machine of its own. Torch's threads meet after every parallel op, so one that waits holds up the others:
    decoding at 2 threads beside one busy process on 2 cores waited ~37% of the time and ran 3-4x slower than
    at 1 thread, which did not wait (docs/benchmarks.md); `note` says so. Threads that do not run count for
    nothing; a process that mostly slept (waiting for another one's work) has no share (None)."""

    def __init__(self):
        self.start, self.started = _thread_times(), time.perf_counter()

    def fraction(self) -> float | None:
        end, wall = _thread_times(), time.perf_counter() - self.started
        if self.start is None or end is None:
            return None
        ran = waited = 0
        for task, (r, w) in end.items():
            r0, w0 = self.start.get(task, (0, 0))
            ran, waited = ran + r - r0, waited + w - w0
        return waited / (ran + waited) if ran + waited > 0.25 * wall * 1e9 else None

    def note(self) -> str | None:
        """One line for a command to print where other processes took this one's cores, else None."""
        share = self.fraction()
        threads = torch.get_num_threads()
        if share is None or share < CONTENDED or threads == 1:
            return None
        return (f"mtp: note: this process's {threads} threads waited for a CPU core {share:.0%} of the time (other "
                f"processes are using the cores): while they do, --threads 1 is often several times faster")


def _name(flags: bool, name: str) -> str:
    return f"--{name}" if flags else name


def resolve_device(spec: str | torch.device | None = "auto", flags: bool = False) -> torch.device:
    """The device `spec` names (None or "auto": CUDA when torch sees a GPU, else the CPU), or an MTPError when
    this torch cannot use it: an unknown name, CUDA on a CPU-only build or machine, `cuda:N` past the last GPU.
    "cuda" becomes the current CUDA device's index, so devices compare equal to a model's `.device`."""
    if spec is None or spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = spec if isinstance(spec, torch.device) else torch.device(spec)
    except (RuntimeError, TypeError):
        raise MTPError(f"{_name(flags, 'device')} {spec!r}: unknown device; choose {DEVICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise MTPError(f"{_name(flags, 'device')} {spec}: not supported; choose {DEVICES}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device here"
        raise MTPError(f"{_name(flags, 'device')} {spec}: {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise MTPError(f"{_name(flags, 'device')} {spec}: this machine has {count} CUDA device(s), "
                       f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def auto_dtype(device: torch.device) -> torch.dtype:
    """What --dtype auto means on `device`: bfloat16 on a GPU that has it (float16 on one that does not), float32
    on the CPU (bf16 matmuls are slower than fp32 there without AVX-512 BF16; fp16 packing is the CPU's format)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_batch_rows(device: torch.device) -> int:
    """Rows decoded together by default (`mtp eval`, `mtp serve`): a GPU runs a batch of 64 in about the time of
    one row (a step reads the weights once for all its rows); on a few CPU cores batches past ~8 rows stop paying."""
    return 64 if device.type == "cuda" else 8


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise MTPError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@dataclass(frozen=True)
class Runtime:
    """Where a command computes and in which dtype its weights are."""

    device: torch.device
    dtype: torch.dtype

    def to_dict(self) -> dict:
        return {"device": str(self.device), "gpu": gpu_name(self.device), "dtype": dtype_name(self.dtype)}

    def describe(self) -> str:
        return describe_runtime(self.to_dict())


def describe_runtime(record: dict) -> str:
    """A report's runtime record (`Runtime.to_dict`) in words: "cuda:0 (NVIDIA H200), bfloat16"."""
    gpu = f" ({record['gpu']})" if record.get("gpu") else ""
    return f"{record['device']}{gpu}, {record['dtype']}"


def resolve_runtime(device: str | torch.device | None = "auto", dtype: str | torch.dtype = "auto",
                    quantize: str = "none", flags: bool = False) -> Runtime:
    """The device and weight dtype of a command (see the module docstring), checked before anything loads.
    `quantize` (fp16, int8): decode-only weight packing, which runs on the CPU only (fbgemm)."""
    dev = resolve_device(device, flags)
    resolved = auto_dtype(dev) if dtype == "auto" else parse_dtype(dtype)
    if quantize != "none" and dev.type != "cpu":
        raise MTPError(f"{_name(flags, 'quantize')} {quantize} packs weights for CPUs (fbgemm); on {dev} decode "
                       f"in {dtype_name(auto_dtype(dev))} (--dtype auto) instead")
    return Runtime(dev, resolved)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must not stop before it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device):
    """The peak of allocated GPU memory while the block runs: the yielded dict holds, once it ends, "peak_mb"
    (everything allocated, weights included) and "extra_bytes" (the peak above what was allocated on entry).
    None on the CPU, where torch keeps no such count."""
    box: dict = {"peak_mb": None, "extra_bytes": None}
    if device.type != "cuda":
        yield box
        return
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield box
    finally:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        box.update(peak_mb=round(peak / MB, 1), extra_bytes=peak - before)


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: bytes read plus bytes written by the fastest of a few copies of a buffer
    larger than any cache (1 GiB on a GPU, 256 MiB on the CPU), about the best a decoding step that streams its
    weights from memory can reach."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):  # the first copy (page faults, lazy initialisation) is not counted
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best
