"""Does every decoding configuration compile (`graphs="compile"`) under the installed torch, and decode as the
uncompiled static step? The GPU's path forced on the CPU, SmolLM2-shaped random models in bf16: heads of two
layers that read the next token, with a draft vocabulary (as the GPU demo trains them), and a full mask-token
model; one prompt, then a left-padded batch of two. A step that fails to compile is replayed uncompiled with a
RuntimeWarning: this names those. A development tool for torch versions a GPU machine runs (`make
test-gpu-image` runs the tests; this the configurations at the model's width, ~15-45 s of compiling each here).

    PYTHONPATH=src python scripts/compile_check.py                    # every configuration
    PYTHONPATH=src python scripts/compile_check.py greedy confadapt   # some
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from step_kernels import SMOLLM2_135M
from transformers import AutoModelForCausalLM, LlamaConfig

import mtp.decoding.generate as generate_module
from mtp import MaskTokenModel, MTPModel
from mtp.decoding.generate import generate, left_pad
from mtp.models import fast_llama

CONFIGS = {  # name -> (model kind, generate's options)
    "greedy": ("heads", {}),
    "chain": ("heads", {"strategy": "speculative"}),
    "tree4+lookup6": ("heads", {"strategy": "speculative", "tree": "auto", "tree_size": 4, "lookup": 6}),
    "dtree8+lookup6": ("heads", {"strategy": "speculative", "tree": "dynamic", "tree_size": 8, "lookup": 6}),
    "tree4+logprobs5": ("heads", {"strategy": "speculative", "tree": "auto", "tree_size": 4, "logprobs": 5}),
    "static-k4": ("heads", {"strategy": "static", "k": 4}),
    "confadapt": ("heads", {"strategy": "confadapt", "tau": 0.5}),
    "masks-confadapt": ("masks", {"strategy": "confadapt", "tau": 0.5}),
    "masks-speculative+lookup6": ("masks", {"strategy": "speculative", "lookup": 6}),
}


def models(layers: int) -> dict[str, torch.nn.Module]:
    config = LlamaConfig(**SMOLLM2_135M, num_hidden_layers=layers)
    torch.manual_seed(0)
    heads = MTPModel(AutoModelForCausalLM.from_config(config), num_heads=4, num_trunk_layers=layers - 2)
    heads.add_next_token_input()
    heads.set_draft_vocab(torch.arange(0, config.vocab_size, 6))
    masks = MaskTokenModel.from_base(AutoModelForCausalLM.from_config(config), adapter="full", k=4)
    return {"heads": heads.to(torch.bfloat16).eval(), "masks": masks.to(torch.bfloat16).eval()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help=f"of {', '.join(CONFIGS)} (default: all)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the last two are the heads')")
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration {unknown[0]!r}")
    fast_llama.FUSED_DEVICES = {"cpu"}  # the GPU's fused layers and grouped attention, on the CPU
    fast_llama._attention_path = lambda batch, block, device_type="cpu": "grouped"
    generate_module._use_graphs = lambda graphs, device, proposer: graphs  # the replayed step's buffers
    built = models(a.layers)
    print(f"torch {torch.__version__}, {a.layers} layers, bf16", flush=True)
    rows = [torch.randint(0, 49152, (40,)).tolist(), torch.randint(0, 49152, (23,)).tolist()]
    failed = 0
    for name in a.configs or CONFIGS:
        kind, kw = CONFIGS[name]
        for batch in ([rows[0]], rows):
            ids, mask = left_pad(batch)
            args = dict(max_new_tokens=a.new_tokens, stop_token_ids=[], adaptive_draft=False, **kw)
            static = generate(built[kind], ids, mask, graphs=True, **args)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                compiled = generate(built[kind], ids, mask, graphs="compile", **args)
            fell = [str(w.message) for w in caught if "compiling the decoding step failed" in str(w.message)]
            same = compiled.tokens == static.tokens
            failed += bool(fell) or not same
            print(f"{name}, batch {len(batch)}: {'= static step' if same else 'DIFFERS from the static step'}, "
                  f"{time.perf_counter() - start:.0f} s" + (f"; FELL BACK: {fell[0][:200]}" if fell else ""),
                  flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
