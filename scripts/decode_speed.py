"""Time decoding steps of a SmolLM2-135M-shaped model with random weights (no download, no GGUF): ms per step and
tokens/s of mtp's strategies with CUDA graphs on, off or compiled, CUDA kernels per step (eager or replayed) and
each row's warm-up seconds (capturing, compiling). A development tool for the decode step (`mtp bench` measures
the real model); run it on the machine you tune for:

    PYTHONPATH=src python scripts/decode_speed.py --device cuda --dtype bfloat16
    PYTHONPATH=src python scripts/decode_speed.py --device cuda --graphs on --attention grouped matmul
    PYTHONPATH=src python scripts/decode_speed.py --device cpu --dtype float32 --configs greedy --logprobs none 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mtp.decoding.generate as generate_module
from mtp import MTPModel
from mtp.decoding.generate import generate
from mtp.models import fast_llama

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "greedy": {},
    "speculative": {"strategy": "speculative"},
    "tree4+lookup6": {"strategy": "speculative", "tree": "auto", "tree_size": 4, "lookup": 6},
    "dtree4+lookup6": {"strategy": "speculative", "tree": "dynamic", "tree_size": 4, "lookup": 6},
    "dtree16+lookup6": {"strategy": "speculative", "tree": "dynamic", "tree_size": 16, "lookup": 6},
    "static-k4": {"strategy": "static", "k": 4},
}


def kernels_per_step(model, ids, kw, graphs=False) -> int | None:
    """CUDA kernels per forward of a short call: eager steps, or (after the row's warm-up captured them) the
    replayed graphs' kernels, to set beside `scripts/step_kernels.py`'s counts made on a CPU."""
    if ids.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for new_tokens in (9, 33):  # the difference leaves the prompt's step out
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = generate(model, ids, max_new_tokens=new_tokens, stop_token_ids=[], graphs=graphs, **kw)
            torch.cuda.synchronize()
        counts.append((sum(1 for e in prof.events() if e.device_type.name == "CUDA"), out.stats.forward_passes))
    (k1, f1), (k2, f2) = counts
    return round((k2 - k1) / (f2 - f1)) if f2 > f1 else None


def profile_table(model, ids, kw, graphs: bool, path: str, new_tokens: int) -> None:
    """The kernels of one generate() call by total GPU time, into `path` (what a step spends its time on)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = generate(model, ids, max_new_tokens=new_tokens, stop_token_ids=[], graphs=graphs, **kw)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(f"{out.stats.forward_passes} forwards, {out.stats.new_tokens} tokens\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--graphs", nargs="+", default=["on", "off"], choices=["on", "off", "compile"])
    ap.add_argument("--attention", nargs="+", default=[fast_llama.CUDA_ATTENTION], choices=fast_llama.ATTENTION_PATHS,
                    help="CUDA's attention path(s) to time (`mtp.models.fast_llama.CUDA_ATTENTION`)")
    ap.add_argument("--launch-ahead", nargs="+", default=["on"], choices=["on", "off"],
                    help="replaying, launch each step before the host reads the last (`generate.LAUNCH_AHEAD`)")
    ap.add_argument("--logprobs", nargs="+", default=["none"],
                    help="the new tokens' log-probabilities with this many alternatives each (none: not asked)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="folder for a kernel table per configuration (CUDA)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M))
    model = MTPModel(base, num_heads=4).to(a.device, dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.base.parameters())
    print(f"device {a.device} {torch.cuda.get_device_name() if a.device.startswith('cuda') else ''} dtype {a.dtype} "
          f"base weights {weights / 1e6:.0f} MB, torch {torch.__version__}", flush=True)
    rows = []
    for batch in a.batch:
        ids = torch.randint(0, 49152, (batch, a.prompt), device=a.device)
        for name in a.configs:
            for graphs, attention, ahead, logprobs in itertools.product(a.graphs, a.attention, a.launch_ahead,
                                                                        a.logprobs):
                kw = CONFIGS[name] | ({} if logprobs == "none" else {"logprobs": int(logprobs)})
                on = {"on": True, "off": False, "compile": "compile"}[graphs]
                if (on and a.device == "cpu") or (not on and ahead == "off" and len(a.launch_ahead) > 1):
                    continue  # (eager steps never launch ahead: one row of them)
                fast_llama.CUDA_ATTENTION = attention
                generate_module.LAUNCH_AHEAD = ahead == "on"
                model.__dict__.pop("_mtp_decode_sessions", None)  # graphs captured with the other path
                warm = time.perf_counter()
                for _ in range(2):  # warm-up: captures, caches, compiling (`--graphs compile`)
                    generate(model, ids, max_new_tokens=a.new_tokens, stop_token_ids=[], graphs=on, **kw)
                warmup_s = time.perf_counter() - warm
                times, firsts, steps, tokens = [], [], 0, 0
                for _ in range(a.repeat):
                    if a.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    first = []
                    t = time.perf_counter()
                    out = generate(model, ids, max_new_tokens=a.new_tokens, stop_token_ids=[], graphs=on,
                                   streamer=lambda row, new, first=first, **_: first or first.append(time.perf_counter()),
                                   **kw)
                    if a.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                    firsts.append(first[0] - t)
                    steps, tokens = out.stats.forward_passes, out.stats.new_tokens
                best = sorted(times)[len(times) // 2]
                first_ms = 1e3 * sorted(firsts)[len(firsts) // 2]
                row = {"batch": batch, "config": name, "graphs": graphs, "attention": attention, "launch_ahead": ahead,
                       "logprobs": logprobs,
                       "ms_per_step": 1e3 * best / steps, "first_token_ms": first_ms,
                       "ms_per_step_after_first": (1e3 * best - first_ms) / max(steps - 1, 1),
                       "tokens_per_s": tokens / best, "steps": steps, "tokens_per_forward": tokens / batch / steps,
                       "warmup_s": warmup_s,
                       "kernels_per_step": kernels_per_step(model, ids, kw, on)}
                rows.append(row)
                if a.profile and a.device.startswith("cuda"):
                    profile_table(model, ids, kw, on,
                                  f"{a.profile}/profile-b{batch}-{name}-graphs-{graphs}-{attention}.txt", a.new_tokens)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
