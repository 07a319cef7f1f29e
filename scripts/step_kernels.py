"""Count the ops of one decoding step as a GPU runs it, on any machine: the GPU's path (fused layers, CUDA's
attention layout, static shapes, the replayed step's in-place state) forced on the CPU, a SmolLM2-135M-shaped
model with random weights and 4 heads (reading the next token, as `mtp train` makes them). A replayed GPU step
costs per kernel, not per byte (docs/benchmarks.md), and every op counted here is a kernel there (views and casts
to the same dtype are not counted). A development
tool for the decode step where no GPU is at hand; `scripts/decode_speed.py` times the step on one.

    PYTHONPATH=src python scripts/step_kernels.py                      # ops a step, 2 and 3 layers, each config
    PYTHONPATH=src python scripts/step_kernels.py --list tree4+lookup6 # one step's ops, each with its source line
    PYTHONPATH=src python scripts/step_kernels.py --compiled           # kernels of the compiled step (graphs="compile")

`--compiled` counts the kernel calls in the code inductor generates for the step (`graphs="compile"`): its fused
kernels and the library calls (matmuls, attention). It generates C++ on a CPU where a GPU gets Triton kernels, and
the two partition a graph about alike (the fused elementwise groups around each matmul), not identically: a CPU
count is an estimate of a GPU's. `--list` then shows each call as inductor wrote it.

A step of L layers costs about (2-layer count) + (L - 2) x (3-layer count - 2-layer count).
"""

from __future__ import annotations

import argparse
import re
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

import mtp.decoding.generate as generate_module
from mtp import MTPModel
from mtp.decoding import graphs
from mtp.decoding.generate import generate
from mtp.models import fast_llama

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "greedy": {},
    "chain": {"strategy": "speculative"},
    "tree4+lookup6": {"strategy": "speculative", "tree": "auto", "tree_size": 4, "lookup": 6},
    "dtree16+lookup6": {"strategy": "speculative", "tree": "dynamic", "tree_size": 16, "lookup": 6},
    "chain-sampled": {"strategy": "speculative", "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 0},
}
# ops that launch no kernel: views, allocations without a fill
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
             "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "diagonal", "_reshape_alias",
             "unfold", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "view_as", "expand_as",
             "narrow", "chunk", "flatten", "unflatten", "movedim", "reshape", "numpy_T"}


class OpLog(TorchDispatchMode):
    """Every op that launches a kernel, with the innermost mtp source line that called it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in NO_KERNEL or (name == "to" and out is args[0]):  # a cast to the same dtype returns its input
            return out
        frames = [f for f in traceback.extract_stack() if "/mtp/" in f.filename]
        where = f"{frames[-1].filename.split('/mtp/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.ops.append((name, where))
        return out


def compiled_kernels(paths: list[str]) -> list[tuple[str, str]]:
    """The kernel calls of inductor's output code (the `call` function of each module in `paths`): (kernel, the
    ops it computes, as inductor names them)."""
    calls = []
    for path in paths:
        with open(path) as f:
            body = f.read().split("def call(self, args):", 1)[-1].split("\nrunner = ", 1)[0]
        for line in body.splitlines():
            found = re.match(r"\s+(?:\w+ = )?((?:cpp_fused|triton)\w*|extern_kernels\.\w+|torch\.ops\.[\w.]+)\(", line)
            if found:
                name = found.group(1)
                fused = re.match(r"(?:cpp_fused|triton_\w+?_fused)_(.*?)_\d+$", name)
                library = name.split(".")[-2 if name.startswith("torch.ops") else -1]  # mm, or aten's op name
                calls.append(("fused", fused.group(1)) if fused else (library, "library"))
    return calls


def step_ops(layers: int, config: str, stop_ids: list[int], next_token: bool = True,
             step: int = 3, compiled: bool = False) -> list[tuple[str, str]]:
    """The ops of the `step`-th replayed step (after the prompt's) of a 24-token generate() call; `compiled`: the
    kernel calls of the code inductor generated for that step (`compiled_kernels`)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M))
    model = MTPModel(base, num_heads=4, num_trunk_layers=layers - 1)
    if next_token:
        model.add_next_token_input()
    model = model.eval().to(torch.bfloat16)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, 40))
    kw = dict(stop_token_ids=stop_ids, graphs="compile" if compiled else True, **CONFIGS[config])
    if compiled:
        return _compiled_step_kernels(model, ids, kw, step)
    generate(model, ids, max_new_tokens=12, **kw)  # the session: its buffers and "graphs" (in-place eager steps)
    replay, calls, logs = graphs.GraphedSteps.__call__, [0], []

    def logged(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != step:
            return replay(self, *args, **kwargs)
        with OpLog() as log:
            result = replay(self, *args, **kwargs)
        logs.append(log.ops)
        return result

    graphs.GraphedSteps.__call__ = logged
    try:
        generate(model, ids, max_new_tokens=24, **kw)
    finally:
        graphs.GraphedSteps.__call__ = replay
    return logs[0]


def _compiled_step_kernels(model, ids: torch.Tensor, kw: dict, step: int) -> list[tuple[str, str]]:
    """The kernels of the `step`-th replayed step's compiled code: the modules inductor wrote while that step's
    shape was first compiled."""
    from torch._inductor.graph import GraphLowering

    written, by_shape, calls, found = [], {}, [0], []
    compile_to_module, replay = GraphLowering.compile_to_module, graphs.GraphedSteps.__call__

    def recorded(self):
        module = compile_to_module(self)
        written.append(module.__file__)
        return module

    def logged(self, state, *args, **kwargs):
        calls[0] += 1
        key = (state.pending.shape[0], *args, *kwargs.values())
        before = len(written)
        result = replay(self, state, *args, **kwargs)
        by_shape.setdefault(key, written[before:])
        if calls[0] == step:
            found.extend(by_shape[key])
        return result

    GraphLowering.compile_to_module, graphs.GraphedSteps.__call__ = recorded, logged
    torch._inductor.config.fx_graph_cache = False  # compile afresh: a module found in a cache is not written again
    torch._functorch.config.enable_autograd_cache = False
    try:
        torch._dynamo.reset()
        generate(model, ids, max_new_tokens=24, **kw)
    finally:
        GraphLowering.compile_to_module, graphs.GraphedSteps.__call__ = compile_to_module, replay
    return compiled_kernels(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)} (default: all)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--stop-ids", type=int, nargs="*", default=[2], help="end tokens (a chat's: one or two)")
    ap.add_argument("--next-token", action=argparse.BooleanOptionalAction, default=True,
                    help="extra heads that read the next token (what `mtp train` makes by default)")
    ap.add_argument("--list", action="store_true", help="list one step's ops and their source lines")
    ap.add_argument("--compiled", action="store_true",
                    help="count the kernels of the compiled step (graphs=\"compile\"; an estimate of a GPU's)")
    a = ap.parse_args()
    if unknown := [c for c in a.configs if c not in CONFIGS]:
        ap.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    fast_llama.FUSED_DEVICES = {"cpu"}  # the GPU's fused layers and grouped attention, on the CPU
    fast_llama._attention_path = lambda batch, block, device_type="cpu": "grouped"
    generate_module._use_graphs = lambda graphs, device, proposer: graphs  # the replayed step's buffers
    for config in a.configs:
        counts = []
        for layers in a.layers:
            ops = step_ops(layers, config, a.stop_ids, a.next_token, compiled=a.compiled)
            counts.append(len(ops))
            if a.list:
                print(f"== {config}, {layers} layers")
                for i, (name, where) in enumerate(ops, 1):
                    print(f"{i:4d} {name:28s} {where}")
        line = ", ".join(f"{n} layers {c}" for n, c in zip(a.layers, counts, strict=True))
        if len(counts) >= 2:
            per_layer = (counts[-1] - counts[0]) / (a.layers[-1] - a.layers[0])
            line += f"; 30 layers ~{counts[0] + (30 - a.layers[0]) * per_layer:.0f}"
        print(f"{config}: {line}", flush=True)


if __name__ == "__main__":
    main()
