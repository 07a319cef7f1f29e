"""`mtp bench`: every decoding method on the same prompts in one process, interleaved, one report.

Methods (rows of the report):
    hf-greedy          transformers `generate(do_sample=False)` on the base model: the reference users would run
    hf-static          transformers greedy with a static cache, which makes `generate()` compile its decoding step
                       (torch.compile, CUDA graphs): the fast transformers path on a GPU, on its own copy of the
                       base model, warmed up (compiled) before the timed calls; on CUDA by default
    hf-prompt-lookup   transformers prompt-lookup decoding (`prompt_lookup_num_tokens`), lossless
    greedy             our engine, one token per forward
    speculative        our lossless self-speculative decoding with the MTP heads
    confadapt-tau*     ConfAdapt at each tau (lossy)
    static-k*          static k (lossy)
    *-fp16             greedy and speculative with fp16-packed weights (fbgemm; lossless: speculative == greedy;
                       CPU only, as is the next row)
    *-int8             the same on an int8 (dynamic quantisation) copy of the model (speculative may differ)
    hf-sampled, sampled, speculative-sampled (`--sample-temperature T`): transformers `generate(do_sample=True)`,
                       mtp sampling one token a step, and mtp's exact speculative sampling (the chain, with
                       `--lookup`'s drafts), at temperature T, seed 0 every call (mtp's rows on the fp16-packed
                       weights where there are some): draws, not greedy's answers; their tokens/s and tokens per
                       forward
    llama.cpp          llama-cpp-python greedy on the GGUF, when the package is installed, in a process of its own
                       with torch's thread count (torch's threads idle meanwhile); llama.cpp-inline: the same in
                       the bench process (`--llamacpp-inline`), to see what sharing the cores with torch costs

Schedule: for each prompt, every method runs once, one after the other, and the order of the methods rotates
by one place from prompt to prompt; machine drift (other processes, clock changes) then falls on all methods
alike, and no method always runs first. Every engine is warmed up once, untimed, before the timed calls, and a
method with a compiled or captured step of its own (transformers' static cache, mtp replaying CUDA graphs) too.
Each call is timed with `time.perf_counter` around the whole call (prefill included); tokens/s of a call is its
new tokens over those seconds. Per method: the median of tokens/s over prompts, and the median over prompts of
the per-prompt speedup against transformers greedy and against our greedy (paired by prompt). Quality, where
GSM8K accuracy is flat (0% for a 135M model): outputs identical to our greedy, and `agreement` with it (the share
of tokens equal to our greedy's before the first difference, token-weighted over prompts).

The report, its tables and figures: `mtp.evaluation.bench_report`, which reads this module's runs (never the
other way round).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.errors import MTPError
from mtp.evaluation.evaluate import prompt_key
from mtp.evaluation.gsm8k import STOP_SEQUENCES
from mtp.evaluation.plots import HF_GREEDY, OUR_GREEDY
from mtp.evaluation.prompts import Prompt, left_pad, pad_id, stop_token_ids
from mtp.io import append_records, atomic_write_lines, input_file, read_complete_records
from mtp.progress import progress_bar
from mtp.runtime import MB, CoreWait, peak_memory, synchronize

JOURNAL = "calls.jsonl"  # in the output folder while a bench runs: the calls finished so far


def rounded(x: float | None, digits: int = 3) -> float | None:
    """A figure of the report, rounded (None stays None)."""
    return None if x is None else round(x, digits)


@dataclass
class CallResult:
    tokens: list[int]
    seconds: float
    first_token_seconds: float | None = None
    forward_passes: int | None = None
    peak_memory_bytes: int | None = None  # GPU: the peak allocated above what was allocated before the call


@dataclass
class BatchResult:
    tokens: list[list[int]]  # new tokens per row
    seconds: float
    forward_passes: int  # batched forwards, prefill included
    row_forwards: int  # sum over rows of the forwards each took part in
    peak_memory_bytes: int | None = None
    plain_steps: int = 0  # speculative: steps that verified no drafts, being faster (`SpeculationGate`)


@dataclass
class Method:
    name: str
    engine: str  # "transformers", "mtp", "mtp-int8", "llama.cpp", ...: methods of one engine share a warm-up
    run: Callable[[Prompt, int], CallResult]  # (prompt, max_new_tokens) -> result
    description: str = ""
    lossless_reference: str | None = None  # the method whose output this one must equal, if lossless
    close: Callable[[], None] | None = None  # frees what the method holds (llama.cpp's model) when the bench ends
    weight_bytes: int | None = None  # of the model it decodes with (its memory per row)
    streamed_bytes: int | None = None  # of those, what a decoding step reads (the weight-streaming floor)
    warmup: Callable[[Sequence[Prompt], int], None] | None = None  # its own warm-up (default: the engine's short call)
    run_batch: Callable[[Sequence[Prompt], int], BatchResult] | None = None  # a left-padded batch of prompts
    strategy: str | None = None  # mtp's decoding strategy (None: a peer's row)


@dataclass
class BenchRun:
    methods: list[Method]
    prompts: list[Prompt]
    calls: list[dict] = field(default_factory=list)  # in the order they ran
    warmup_seconds: dict[str, float] = field(default_factory=dict)  # a method's own untimed warm-up (compiling)


# ------------------------------------------------------------------------------------------------ schedule
def schedule(num_prompts: int, method_names: Sequence[str], rotate: bool = True) -> list[tuple[int, str]]:
    """(prompt index, method) in run order: prompt by prompt, every method in turn, the order rotating."""
    names = list(method_names)
    order = []
    for p in range(num_prompts):
        shift = p % len(names) if rotate and names else 0
        order += [(p, name) for name in names[shift:] + names[:shift]]
    return order


# ------------------------------------------------------------------------------------------------ methods
class _Stopper:
    """The stop rule every engine shares: an end token, or decoded new text containing a stop sequence."""

    def __init__(self, tokenizer, stop_ids: Sequence[int], stop_strings: Sequence[str] = STOP_SEQUENCES):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, set(stop_ids), list(stop_strings)
        self.window = max((len(s) for s in self.stop_strings), default=0) + 8

    def done(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] in self.stop_ids:
            return True
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:])
        return any(s in tail for s in self.stop_strings)


def _measured(device: torch.device, call: Callable[[], object]) -> tuple[object, float, float, int | None]:
    """`call()` timed to the end of the device's queued work, and on a GPU the peak of the memory allocated
    above what was allocated before it: (result, start time, seconds, peak bytes or None)."""
    with peak_memory(device) as peak:
        start = time.perf_counter()
        result = call()
        synchronize(device)
        seconds = time.perf_counter() - start
    return result, start, seconds, peak["extra_bytes"]


def weight_sizes(model) -> dict:
    """`Method` fields of a model: its weights' bytes, and the bytes a decoding step reads: the weights less the
    input embedding table (a step gathers a few of its rows) unless the unembedding shares it; with fp16-packed
    weights the packed ones (2 bytes a value; the fp32 copies they stand in for are not read). int8: none."""
    from mtp.memory import tensor_bytes

    packed = getattr(getattr(model, "lm", model), "quantized", None)
    if packed == "int8":  # its weights are torch's packed params, not counted here
        return {}
    total = tensor_bytes(model)
    if packed == "fp16":
        own = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
        return {"weight_bytes": tensor_bytes(model, padded=True), "streamed_bytes": total - sum(own.values())}
    base = getattr(model, "base", model)
    table = base.get_input_embeddings().weight
    tied = getattr(base.get_output_embeddings(), "weight", None) is table
    return {"weight_bytes": total, "streamed_bytes": total - (0 if tied else table.numel() * table.element_size())}


def prompts_to_capture(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Replaying, each (cache size, block width) a call reaches, and the prompt's step of each padded prompt width,
    is captured on first use: one prompt of each padded width (`PROMPT_BUCKET`, which also decides the cache size),
    decoded in full before the timed calls, captures what they will replay."""
    from mtp.decoding.generate import PROMPT_BUCKET

    by_width: dict[int, Prompt] = {}
    for prompt in prompts:
        by_width.setdefault(-(-len(prompt.token_ids) // PROMPT_BUCKET), prompt)
    return list(by_width.values())


def mtp_method(model, tokenizer, name: str, strategy: str, *, tau: float = 0.9, k: int | None = None,
               engine: str = "mtp", stop_ids: Sequence[int] | None = None, description: str = "",
               tree_size: int | None = None, tree: str = "auto", lookup: int = 0,
               graphs: bool | str | None = None, temperature: float | None = None,
               lookup_corpus=None) -> Method:
    """One of mtp's decoding methods as a bench row (`graphs`: CUDA graphs, None: on for CUDA; `temperature`:
    sampling at it, seed 0 every call; `lookup_corpus`: with `lookup`, `mtp.decoding.corpus`)."""
    sampling = {} if temperature is None else {"do_sample": True, "temperature": temperature, "seed": 0}
    from mtp.decoding.generate import generate

    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
    device = model.device

    def decode(ids, mask, max_new_tokens, streamer=None):
        return generate(model, ids, mask, max_new_tokens=max_new_tokens, strategy=strategy, tau=tau, k=k,
                        stop_token_ids=stop_ids, stop_strings=STOP_SEQUENCES, tokenizer=tokenizer, streamer=streamer,
                        tree=tree if tree_size else None, tree_size=tree_size, lookup=lookup, graphs=graphs,
                        lookup_corpus=lookup_corpus, **sampling)

    def run(prompt: Prompt, max_new_tokens: int) -> CallResult:
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=device)
        first: list[float] = []

        def on_tokens(row: int, new: list[int]) -> None:
            if not first:
                first.append(time.perf_counter())

        result, start, seconds, peak = _measured(device, lambda: decode(ids, None, max_new_tokens, on_tokens))
        return CallResult(result.tokens[0], seconds, first[0] - start if first else None,
                          result.stats.forward_passes, peak)

    def run_batch(prompts: Sequence[Prompt], max_new_tokens: int) -> BatchResult:
        ids, mask = left_pad([p.token_ids for p in prompts], pad_id(tokenizer))
        result, _, seconds, peak = _measured(device, lambda: decode(ids.to(device), mask.to(device), max_new_tokens))
        return BatchResult(result.tokens, seconds, result.stats.forward_passes, result.stats.row_forwards, peak,
                           result.stats.plain_steps)

    def capture(prompts: Sequence[Prompt], max_new_tokens: int) -> None:
        for prompt in prompts_to_capture(prompts):
            run(prompt, max_new_tokens)

    lossless = OUR_GREEDY if strategy == "speculative" and engine == "mtp" else None
    if strategy == "speculative" and engine != "mtp":
        lossless = f"greedy-{engine.removeprefix('mtp-')}"
    lossless = None if sampling else lossless  # (draws: no greedy answer to equal)
    replays = device.type == "cuda" and graphs is not False
    return Method(name, engine, run, description or strategy, lossless, run_batch=run_batch, strategy=strategy,
                  warmup=capture if replays else None, **weight_sizes(model))


def hf_method(model, tokenizer, name: str, *, lookup: int | None = None,
              stop_ids: Sequence[int] | None = None, static_cache_len: int | None = None,
              temperature: float | None = None) -> Method:
    """transformers `generate()` on the base model (the MTP heads unused), greedy or prompt lookup; with
    `static_cache_len`, greedy with a static cache of that many tokens, which makes `generate()` compile its
    decoding step, on a copy of the base model (compiling leaves state on the module: the eager rows keep
    theirs). Its warm-up decodes the longest prompt in full twice: a static cache sized for every call and its
    compiled step are ready before the timed calls. `temperature`: sampling at it (no top-k, no top-p; torch's
    seed 0 every call)."""
    static = static_cache_len is not None
    base = model.base
    if static:
        base = copy.deepcopy(base)
        base._forward_hooks.clear()  # the eager rows' forward counter, copied along
        base.__dict__.pop("_mtp_bench_forwards", None)
    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
    calls = None if static else _forward_counter(base)  # (a hook would be traced into the compiled step)
    config = _hf_config(tokenizer, stop_ids, lookup, static_cache_len)
    if temperature is not None:
        config.do_sample, config.temperature, config.top_k, config.top_p = True, temperature, 0, 1.0

    def run(prompt: Prompt, max_new_tokens: int) -> CallResult:
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=model.device)
        config.max_new_tokens = max_new_tokens
        streamer = _first_token_streamer()
        if calls is not None:
            calls[0] = 0

        def call():
            if temperature is not None:
                torch.manual_seed(0)
            with torch.inference_mode():
                return base.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                     tokenizer=tokenizer, streamer=streamer)

        out, start, seconds, peak = _measured(model.device, call)
        tokens = out[0, ids.shape[1]:].tolist()
        return CallResult(tokens, seconds, streamer.at - start if streamer.at is not None else None,
                          len(tokens) if static else calls[0], peak)

    def warmup(prompts: Sequence[Prompt], max_new_tokens: int) -> None:
        longest = max(prompts, key=lambda p: len(p.token_ids))
        for _ in range(2):
            run(longest, max_new_tokens)

    description = _hf_description(lookup, static_cache_len, model.device)
    if temperature is not None:
        description = f"transformers generate() sampling, temperature {temperature:g}"
    return Method(name, "transformers-static" if static else "transformers", run,
                  description, HF_GREEDY if lookup is not None else None,
                  warmup=warmup if static else None, **weight_sizes(base))


def _forward_counter(base) -> list[int]:
    """A one-item list the base model's forwards count into: one hook per model, however many methods."""
    calls = getattr(base, "_mtp_bench_forwards", None)
    if calls is None:
        calls = [0]
        base.register_forward_hook(lambda module, args, output: calls.__setitem__(0, calls[0] + 1))
        base._mtp_bench_forwards = calls
    return calls


def _hf_config(tokenizer, stop_ids: list[int], lookup: int | None, static_cache_len: int | None):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=stop_ids or None,
                              pad_token_id=pad_id(tokenizer), stop_strings=list(STOP_SEQUENCES),
                              prompt_lookup_num_tokens=lookup)
    if static_cache_len is not None:
        config.cache_implementation = "static"
        if hasattr(config, "max_cache_len"):  # newer transformers: one cache size for every call (else the warm-up's
            config.max_cache_len = static_cache_len  # longest call sets the size the later calls reuse)
    return config


def _hf_description(lookup: int | None, static_cache_len: int | None, device: torch.device) -> str:
    if static_cache_len is not None:
        compiled = ", its compiled step" if device.type != "cpu" else ""  # transformers compiles on GPUs
        return f"transformers generate() greedy, static cache ({static_cache_len} tokens){compiled}"
    return "transformers generate() greedy" if lookup is None else f"transformers prompt lookup ({lookup} tokens)"


def _first_token_streamer():  # (made on first use: transformers is imported only where its rows run)
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """When the first new token came (the first put is the prompt)."""

        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2 and self.at is None:
                self.at = time.perf_counter()

        def end(self):
            pass

    return FirstToken()


def llamacpp_method(gguf: str | Path, tokenizer, stop_ids: Sequence[int], n_ctx: int, name: str = "llama.cpp",
                    threads: int | None = None, isolated: bool = True) -> Method:
    """llama-cpp-python greedy decoding of the same prompt tokens on a GGUF (its own quantised weights), with as
    many threads as torch has (prefill too). `isolated`: in a process of its own (`llamacpp_worker.py`), so that
    torch's threads, idle in the bench process while it decodes, do not share its cores (see there); otherwise
    in the bench process, beside them."""
    threads = threads or torch.get_num_threads()
    where = "in a process of its own" if isolated else "in the bench process"
    description = f"llama-cpp-python greedy on {Path(gguf).name}, {threads} threads, {where}"
    if isolated:
        worker = _LlamaCppProcess(gguf, n_ctx, threads, stop_ids, STOP_SEQUENCES)
        return Method(name, name, worker.run, description, close=worker.close)
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    stopper = _Stopper(tokenizer, stop_ids)

    def run(prompt: Prompt, max_new_tokens: int) -> CallResult:
        tokens: list[int] = []
        first = None
        llm.reset()  # forget the previous call: no reuse of a cached prompt prefix, every call pays its prefill
        start = time.perf_counter()
        if max_new_tokens > 0:
            for tok in llm.generate(prompt.token_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                    repeat_penalty=1.0, reset=True):
                if first is None:
                    first = time.perf_counter()
                tokens.append(int(tok))
                if len(tokens) >= max_new_tokens or stopper.done(tokens):
                    break
        seconds = time.perf_counter() - start
        return CallResult(tokens, seconds, first - start if first is not None else None, None)

    return Method(name, name, run, description, close=llm.close)


class _LlamaCppProcess:
    """The llama.cpp worker process: started with the model loaded, one JSON line per call each way."""

    def __init__(self, gguf: str | Path, n_ctx: int, threads: int, stop_ids: Sequence[int],
                 stop_strings: Sequence[str]):
        import subprocess
        import sys
        import tempfile

        script = Path(__file__).with_name("llamacpp_worker.py")
        options = json.dumps({"stop_ids": list(stop_ids), "stop_strings": list(stop_strings)})
        self.stderr = tempfile.TemporaryFile()  # llama.cpp's own messages: read only when it fails
        self.proc = subprocess.Popen([sys.executable, str(script), str(gguf), str(n_ctx), str(threads), options],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise MTPError(f"llama.cpp could not load {gguf}: {ready.get('error', 'no reason given')}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            last = (self.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise MTPError(f"the llama.cpp worker process ended (exit code {self.proc.poll()}): {last}")
        return json.loads(line)

    def run(self, prompt: Prompt, max_new_tokens: int) -> CallResult:
        self.proc.stdin.write(json.dumps({"tokens": list(prompt.token_ids), "max_new_tokens": max_new_tokens})
                              + "\n")
        self.proc.stdin.flush()
        reply = self._read()  # the bench process blocks here: its torch threads sleep while llama.cpp decodes
        return CallResult(reply["tokens"], reply["seconds"], reply["first_token_seconds"], None)

    def close(self) -> None:
        import subprocess

        try:
            self.proc.stdin.close()  # end of input: the worker frees the model and exits
            self.proc.wait(timeout=30)
        except BrokenPipeError:  # it had already ended
            pass
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def build_methods(model, tokenizer, *, tau: Sequence[float] = (0.9, 0.7, 0.5), k: Sequence[int] | None = None,
                  hf: bool = True, hf_lookup: int = 10, fp16: bool = True, int8: bool = False,
                  packed_strategies: Sequence[str] = ("greedy", "speculative"), gguf: str | Path | None = None,
                  llamacpp_ctx: int = 2048, llamacpp_inline: bool = False,
                  notes: list[str] | None = None, tree_size: Sequence[int] = (), lookup: int = 0,
                  tree: Sequence[str] = ("auto",), hf_static: bool = False,
                  graphs: bool | str | None = None, sample_temperature: float | None = None,
                  lookup_corpus: str = "none") -> list[Method]:
    """The methods of a benchmark, in report order. Unavailable ones are left out with a line in `notes`.

    `hf_static`: transformers greedy with a static cache (its compiled step), the fast transformers path on a GPU;
    its cache holds `llamacpp_ctx` tokens (the longest prompt and budget, as llama.cpp's context).

    `tau`, `k`: a ConfAdapt row per threshold, a static row per k (default: 2 and the most a forward makes).
    `hf_lookup`: transformers' prompt lookup row with that many tokens (0: none).
    `tree_size`: speculative rows verifying a draft tree of each size, on the packed weights when there are
    any (else fp32), so tokens per forward and speed can be read per tree size; `tree`: their shapes, "auto"
    (one shape from the heads' measured accuracy) and/or "dynamic" (EAGLE-2, per step).
    `lookup`: the same speculative rows (chain and each tree) again with up to that many prompt-lookup drafts,
    and with `lookup_corpus` ("auto": the model folder's, or a file; `mtp.decoding.corpus`) again with its drafts.
    `graphs`: mtp's rows replay CUDA graphs (None: on CUDA).
    `sample_temperature`: also sampled rows at it (`sampled_methods`)."""
    notes = notes if notes is not None else []
    method = functools.partial(mtp_method, graphs=graphs)  # every mtp row of this bench
    stop_ids = stop_token_ids(model, tokenizer)
    methods: list[Method] = []
    if hf:
        methods.append(hf_method(model, tokenizer, HF_GREEDY, stop_ids=stop_ids))
        if hf_static:
            methods.append(hf_method(model, tokenizer, "hf-static", stop_ids=stop_ids, static_cache_len=llamacpp_ctx))
        if hf_lookup > 0:
            methods.append(hf_method(model, tokenizer, "hf-prompt-lookup", lookup=hf_lookup, stop_ids=stop_ids))
    methods.append(method(model, tokenizer, OUR_GREEDY, "greedy", stop_ids=stop_ids))
    methods += multi_token_methods(model, tokenizer, tau=tau, k=k, fp16=False, notes=notes, stop_ids=stop_ids,
                                   graphs=graphs)
    packed = [fmt for fmt, wanted in (("fp16", fp16), ("int8", int8)) if wanted]
    if packed and not packable(model):
        notes.append(f"{'/'.join(packed)} rows skipped: packed weights (fbgemm) are for fp32 models on the CPU")
        packed = []
    from mtp.decoding.corpus import chosen_corpus

    corpus = chosen_corpus(lookup_corpus, model) if lookup else None  # (rows beside those without it)
    if lookup and lookup_corpus == "auto" and corpus is None:
        notes.append("-corpus rows skipped: the model folder has no lookup_corpus.safetensors (`mtp train "
                     "--targets self` writes one)")
    copies = {}  # the packed copies, by format
    for fmt in packed:
        from mtp.models.loading import quantize_model

        q = copies[fmt] = quantize_model(copy.deepcopy(model), fmt)
        for strategy in packed_strategies:
            if strategy != "greedy" and tokens_per_forward_max(model) == 1:
                continue
            methods.append(method(q, tokenizer, f"{strategy}-{fmt}", strategy, engine=f"mtp-{fmt}",
                                      stop_ids=stop_ids, description=f"{strategy}, {fmt} weights"))
        methods += tree_methods(q, tokenizer, tree_size, stop_ids, fmt, lookup, tree, graphs, corpus)
    if not packed:
        methods += tree_methods(model, tokenizer, tree_size, stop_ids, None, lookup, tree, graphs, corpus)
    if sample_temperature is not None:
        methods += sampled_methods(model, copies.get("fp16"), tokenizer, sample_temperature, stop_ids, lookup, hf,
                                   graphs, [(n, shape) for shape in tree for n in tree_size])
    if gguf is not None:
        if not llamacpp_installed():
            notes.append("llama.cpp skipped: llama-cpp-python is not installed (make setup-peers, or pip install "
                         "llama-cpp-python; it builds llama.cpp, about 10 minutes)")
        else:
            input_file(gguf, "GGUF")
            methods.append(llamacpp_method(gguf, tokenizer, stop_ids, llamacpp_ctx))
            notes.append(f"llama.cpp: {methods[-1].description}; the bench process waits on it, its torch "
                         "threads idle")
            if llamacpp_inline:  # the same engine beside torch's threads: what isolating it changes
                methods.append(llamacpp_method(gguf, tokenizer, stop_ids, llamacpp_ctx, name="llama.cpp-inline",
                                               isolated=False))
    return methods


def sampled_methods(model, fp16_model, tokenizer, temperature: float, stop_ids, lookup: int, hf: bool,
                    graphs: bool | str | None, trees: Sequence[tuple[int, str]] = ()) -> list[Method]:
    """Sampling at `temperature`: transformers' on `model` (`hf`), mtp's one token a step and mtp's exact
    speculative sampling (the chain, then each (size, shape) of `trees`, each with up to `lookup` prompt-lookup
    drafts) on `fp16_model` where there is one (fp16-packed: the CPU's fast rows), else on `model`."""
    if not temperature > 0:
        raise MTPError(f"--sample-temperature must be > 0, got {temperature}")
    methods = [hf_method(model, tokenizer, "hf-sampled", stop_ids=stop_ids, temperature=temperature)] if hf else []
    weights, engine = (", fp16 weights", "mtp-fp16") if fp16_model is not None else ("", "mtp")
    model = fp16_model if fp16_model is not None else model
    methods.append(mtp_method(model, tokenizer, "sampled", "greedy", engine=engine, stop_ids=stop_ids,
                              graphs=graphs, temperature=temperature,
                              description=f"sampling, temperature {temperature:g}{weights}"))
    if tokens_per_forward_max(model) > 1:
        extra = f" + {lookup} lookup drafts" if lookup else ""
        methods.append(mtp_method(model, tokenizer, "speculative-sampled", "speculative", engine=engine,
                                  stop_ids=stop_ids, graphs=graphs, temperature=temperature, lookup=lookup,
                                  description=f"speculative sampling{extra}, temperature {temperature:g}{weights}"))
        for n, shape in trees if model.kind != "mask_tokens" else ():
            kind = "dtree" if shape == "dynamic" else "tree"
            what = f"a {n}-node {'dynamic ' if shape == 'dynamic' else ''}draft tree{extra}"
            methods.append(mtp_method(model, tokenizer, f"speculative-sampled-{kind}{n}", "speculative",
                                      engine=engine, stop_ids=stop_ids, graphs=graphs, temperature=temperature,
                                      lookup=lookup, tree_size=n, tree=shape,
                                      description=f"speculative sampling, {what}, temperature {temperature:g}"
                                                  f"{weights}"))
    return methods


def tree_methods(model, tokenizer, sizes: Sequence[int], stop_ids, fmt: str | None,
                 lookup: int = 0, shapes: Sequence[str] = ("auto",), graphs: bool | str | None = None,
                 corpus=None) -> list[Method]:
    """Speculative rows with a draft tree per size and shape ("auto": row `-treeN`, "dynamic": `-dtreeN`),
    then, with `lookup`, the chain and each tree with up to that many prompt-lookup drafts as one more branch
    (parallel heads only; lookup alone for one head), and with a `corpus` (`mtp.decoding.corpus`) those again
    with its drafts too (rows `-corpus`)."""
    if model.kind == "mask_tokens":
        return []
    sizes = list(sizes) if tokens_per_forward_max(model) > 1 else []
    engine, suffix = (f"mtp-{fmt}", f"-{fmt}") if fmt else ("mtp", "")
    weights = f", {fmt} weights" if fmt else ""
    trees = [(n, shape) for shape in shapes for n in sizes]
    rows = [(n, shape, 0, None) for n, shape in trees]
    if lookup:
        looked = [(None, "auto")] + trees
        rows += [(n, shape, lookup, None) for n, shape in looked]
        rows += [(n, shape, lookup, corpus) for n, shape in looked] if corpus is not None else []
    methods = []
    for n, shape, look, with_corpus in rows:
        kind = "dtree" if shape == "dynamic" else "tree"
        name = f"speculative{suffix}" + (f"-{kind}{n}" if n else "") + (f"-lookup{look}" if look else "")
        what = (f"a {n}-node {'dynamic ' if shape == 'dynamic' else ''}draft tree" if n else "the heads' chain")
        what += f" + {look} lookup drafts" if look else ""
        if with_corpus is not None:
            name, what = f"{name}-corpus", f"{what} (and from the folder's {len(with_corpus):,}-sequence corpus)"
        methods.append(mtp_method(model, tokenizer, name, "speculative", engine=engine, stop_ids=stop_ids,
                                   tree_size=n, tree=shape, lookup=look, description=f"speculative, {what}{weights}",
                                   graphs=graphs, lookup_corpus=with_corpus))
    return methods


def packable(model) -> bool:
    """Whether the fp16/int8 rows apply: packed weights replace fp32 weights for the CPU's fbgemm kernels."""
    return model.device.type == "cpu" and model.dtype == torch.float32


def llamacpp_installed() -> bool:
    """Whether llama-cpp-python can be imported, found without importing it: the bench runs it in a process of
    its own and need not load llama.cpp's libraries beside torch's (None in sys.modules blocks it, as for import)."""
    import importlib.util
    import sys

    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"] is not None
    return importlib.util.find_spec("llama_cpp") is not None


def tokens_per_forward_max(model) -> int:
    """Tokens one forward can propose: the heads of a parallel-heads model, k of a mask-token model."""
    return 1 + model.draft_depth()


def multi_token_methods(model, tokenizer, *, tau: Sequence[float], k: Sequence[int] | None, fp16: bool,
                        prefix: str = "", notes: list[str], stop_ids: Sequence[int] | None = None,
                        graphs: bool | str | None = None) -> list[Method]:
    """A model's multi-token rows: speculative (lossless), ConfAdapt per tau, static k; named `prefix + name`.

    With a prefix (another model beside the main one) its own greedy row comes too when its answers may differ
    from the main model's (a fully trained mask-token model), and its lossless rows are checked against it."""
    n = tokens_per_forward_max(model)
    if n == 1:
        notes.append(f"{prefix or 'the model'}: a single head: speculative, ConfAdapt and static need MTP heads")
        return []
    method = functools.partial(mtp_method, graphs=graphs)  # every mtp row of this bench
    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
    own_answers = model.kind == "mask_tokens" and model.lora is None
    methods: list[Method] = []
    reference = OUR_GREEDY
    if prefix and own_answers:
        reference = f"{prefix}greedy"
        methods.append(method(model, tokenizer, reference, "greedy", stop_ids=stop_ids,
                                  description=f"{prefix} greedy (its own weights)"))
    spec = method(model, tokenizer, f"{prefix}speculative", "speculative", stop_ids=stop_ids)
    spec.lossless_reference = reference
    methods.append(spec)
    for t in tau:
        if not 0.0 <= t <= 1.0:
            raise MTPError(f"tau must be in [0, 1], got {t}")
        methods.append(method(model, tokenizer, f"{prefix}confadapt-tau{t:g}", "confadapt", tau=t,
                                  stop_ids=stop_ids, description=f"{prefix}ConfAdapt tau={t:g}"))
    for each in (k if k is not None else sorted({2, n})):
        if not 1 <= each <= n:
            raise MTPError(f"static k must be in [1, {n}] for this model, got {each}")
        methods.append(method(model, tokenizer, f"{prefix}static-k{each}", "static", k=each, stop_ids=stop_ids,
                                  description=f"{prefix}static k={each}"))
    if fp16 and packable(model):
        from mtp.models.loading import quantize_model

        try:
            q = quantize_model(copy.deepcopy(model), "fp16")
        except MTPError as e:
            notes.append(f"{prefix}speculative-fp16 skipped: {e}")
        else:
            packed = method(q, tokenizer, f"{prefix}speculative-fp16", "speculative", engine="mtp-fp16",
                                stop_ids=stop_ids, description=f"{prefix} speculative, fp16 weights")
            packed.lossless_reference = None if own_answers else "greedy-fp16"
            methods.append(packed)
            for t in tau:  # the paper's decoding at the speed fp16 packing gives the lossless rows
                methods.append(method(q, tokenizer, f"{prefix}confadapt-tau{t:g}-fp16", "confadapt", tau=t,
                                          engine="mtp-fp16", stop_ids=stop_ids,
                                          description=f"{prefix}ConfAdapt tau={t:g}, fp16 weights"))
    return methods


# ------------------------------------------------------------------------------------------------ running
def call_key(identity: dict, method: Method, prompt: Prompt, max_new_tokens: int) -> str:
    """What a call computes and under which conditions: a finished call is reused only when all of it matches."""
    what = {**identity, "method": method.name, "description": method.description, "max_new_tokens": max_new_tokens,
            "prompt": prompt_key(prompt.token_ids)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_bench(methods: Sequence[Method], prompts: Sequence[Prompt], max_new_tokens: int, *, rotate: bool = True,
              warmup: bool = True, progress: bool = True, journal: str | Path | None = None,
              identity: dict | None = None) -> BenchRun:
    """Run every method on every prompt in `schedule` order; returns the calls in the order they ran.

    With a `journal` (a JSONL file) each call is appended to it as it finishes, and calls already there with the
    same `call_key` (same `identity`, method, prompt and budget) are taken from it instead of being run again: an
    interrupted bench resumes where it stopped."""
    if not methods:
        raise MTPError("no methods to benchmark")
    if not prompts:
        raise MTPError("no prompts to benchmark")
    if max_new_tokens < 1:
        raise MTPError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    by_name = {m.name: m for m in methods}
    if len(by_name) != len(methods):
        raise MTPError("method names must be unique")
    run = BenchRun(list(methods), list(prompts))
    order = schedule(len(prompts), [m.name for m in methods], rotate)
    keys = {(p, name): call_key(identity or {}, by_name[name], prompts[p], max_new_tokens) for p, name in order}
    done: dict[tuple[int, str], dict] = {}
    if journal is not None:
        journal = Path(journal)
        by_key = {key: call for call, key in keys.items()}
        for record in read_complete_records(journal):
            if record.get("key") in by_key:
                p, name = by_key[record["key"]]
                done[(p, name)] = {**record, "prompt": p, "method": name}
        atomic_write_lines(journal, (json.dumps(c) for c in done.values()))  # drops a torn line and other runs'
        if done:
            print(f"mtp bench: resuming: {len(done)} of {len(order)} calls already done ({journal})", flush=True)
    bar = None
    log = journal.open("a", encoding="utf-8") if journal is not None else None
    try:
        if warmup:  # untimed: first-call allocations, lazy initialisation, compilation, graph captures
            for engine in dict.fromkeys(m.engine for m in methods):
                engine_methods = [m for m in methods if m.engine == engine]
                if any((p, m.name) not in done for p, _ in enumerate(prompts) for m in engine_methods):
                    if engine_methods[0].warmup is None:  # once per engine: one short call
                        engine_methods[0].run(prompts[0], min(4, max_new_tokens))
                    for m in engine_methods:  # a method's own warm-up (a compiled or captured step)
                        if m.warmup is not None:
                            start = time.perf_counter()
                            m.warmup(prompts, max_new_tokens)
                            run.warmup_seconds[m.name] = round(time.perf_counter() - start, 1)
        bar = progress_bar(progress, len(order), "bench", "call", initial=len(done))  # or a line every 5 minutes
        for p, name in order:
            if (p, name) in done:
                run.calls.append(done[(p, name)])
                continue
            bar.set_postfix_str(f"prompt {p + 1}/{len(prompts)} {name}")
            wait = CoreWait()  # (other processes taking the cores slow a call: the report says where they did)
            result = by_name[name].run(prompts[p], max_new_tokens)
            call = {"prompt": p, "method": name, "tokens": result.tokens, "seconds": result.seconds,
                    "first_token_seconds": result.first_token_seconds, "forward_passes": result.forward_passes,
                    "peak_memory_bytes": result.peak_memory_bytes, "core_wait": rounded(wait.fraction(), 4)}
            run.calls.append(call)
            if log is not None:
                append_records(log, [{**call, "key": keys[(p, name)]}])
            bar.update(1)
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
        for m in methods:
            if m.close is not None:
                m.close()
    return run


def fastest_lossless(rows: Sequence[dict], methods: Sequence[Method]) -> tuple[Method, Method] | None:
    """(its greedy reference, the method) of the fastest lossless row of a report (`build_report`'s rows) that
    equalled its reference on every prompt and can decode batches; None when there is none."""
    by_name = {m.name: m for m in methods}
    fine = [r for r in rows if r.get("lossless_reference") in by_name and r["tokens_per_second"]
            and r.get("equal_to_lossless_reference") == r["prompts"]
            and by_name[r["method"]].run_batch is not None and by_name[r["lossless_reference"]].run_batch is not None]
    if not fine:
        return None
    best = max(fine, key=lambda r: r["tokens_per_second"])
    return by_name[best["lossless_reference"]], by_name[best["method"]]


def run_batch_rows(pair: tuple[Method, Method], pool: Sequence[Prompt], batch_sizes: Sequence[int],
                   max_new_tokens: int, min_prompts: int, progress: bool = True) -> list[dict]:
    """Greedy and a speculative method (`fastest_lossless`) on left-padded batches of each size: whole batches
    of at least `min_prompts` prompts (the pool repeated when it is shorter), one untimed batch of each first,
    then the two alternating batch by batch. Per (size, method): total new tokens / total seconds."""
    plan = []
    for b in batch_sizes:
        count = b * math.ceil(max(min_prompts, b) / b)
        chosen = [pool[i % len(pool)] for i in range(count)]
        plan.append((b, [chosen[i:i + b] for i in range(0, count, b)]))
    bar = progress_bar(progress, 2 * sum(len(batches) for _, batches in plan), "bench batches", "batch")
    rows = []
    try:
        for b, batches in plan:
            for m in pair:  # warm-up at this batch size, in full: replaying, each (batch size, block width) the
                # shrinking batch and the adaptive draft length reach is captured once, outside the timed calls
                m.run_batch(batches[0], max_new_tokens)
            results: dict[str, list[BatchResult]] = {m.name: [] for m in pair}
            for i, batch in enumerate(batches):
                for m in pair if i % 2 == 0 else pair[::-1]:
                    bar.set_postfix_str(f"batch size {b}, {m.name}")
                    results[m.name].append(m.run_batch(batch, max_new_tokens))
                    bar.update(1)
            greedy = [t for r in results[pair[0].name] for t in r.tokens]
            for m in pair:
                done = results[m.name]
                tokens = [t for r in done for t in r.tokens]
                new, seconds = sum(map(len, tokens)), sum(r.seconds for r in done)
                peaks = [r.peak_memory_bytes for r in done if r.peak_memory_bytes is not None]
                rows.append({"batch_size": b, "method": m.name, "prompts": len(tokens), "new_tokens": new,
                             "seconds": round(seconds, 3), "tokens_per_second": rounded(new / seconds if seconds else None, 1),
                             "tokens_per_forward": rounded(new / max(sum(r.row_forwards for r in done), 1)),
                             "ms_per_forward": rounded(1000 * seconds / max(sum(r.forward_passes for r in done), 1)),
                             "equal_to_greedy": sum(a == g for a, g in zip(tokens, greedy, strict=True)),
                             "plain_step_share": rounded(sum(r.plain_steps for r in done)
                                                         / max(sum(r.forward_passes - 1 for r in done), 1)),
                             "peak_memory_mb": rounded((m.weight_bytes + max(peaks)) / MB, 1)
                             if peaks and m.weight_bytes is not None else None})
    finally:
        bar.close()
    return rows

