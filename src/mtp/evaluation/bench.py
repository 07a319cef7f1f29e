"""`mtp bench`: every decoding method on the same prompts in one process, interleaved, one report.

Methods (rows of the report):
    hf-greedy          transformers `generate(do_sample=False)` on the base model: the reference users would run
    hf-prompt-lookup   transformers prompt-lookup decoding (`prompt_lookup_num_tokens`), lossless
    greedy             our engine, one token per forward
    speculative        our lossless self-speculative decoding with the MTP heads
    confadapt-tau*     ConfAdapt at each tau (lossy)
    static-k*          static k (lossy)
    *-fp16             greedy and speculative with fp16-packed weights (fbgemm; lossless: speculative == greedy)
    *-int8             the same on an int8 (dynamic quantisation) copy of the model (speculative may differ)
    llama.cpp          llama-cpp-python greedy on the GGUF, when the package is installed, in a process of its own
                       with torch's thread count (torch's threads idle meanwhile); llama.cpp-inline: the same in
                       the bench process (`--llamacpp-inline`), to see what sharing the cores with torch costs

Schedule: for each prompt, every method runs once, one after the other, and the order of the methods rotates
by one place from prompt to prompt; machine drift (other processes, clock changes) then falls on all methods
alike, and no method always runs first. Every engine is warmed up once, untimed, before the timed calls.
Each call is timed with `time.perf_counter` around the whole call (prefill included); tokens/s of a call is its
new tokens over those seconds. Per method: the median of tokens/s over prompts, and the median over prompts of
the per-prompt speedup against transformers greedy and against our greedy (paired by prompt). Quality, where
GSM8K accuracy is flat (0% for a 135M model): outputs identical to our greedy, and `agreement` with it (the share
of tokens equal to our greedy's before the first difference, token-weighted over prompts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp.errors import MTPError
from mtp.evaluation.evaluate import prompt_key, score, write_json, write_text
from mtp.evaluation.gsm8k import STOP_SEQUENCES, mean_and_stderr
from mtp.evaluation.plots import HF_GREEDY, OUR_GREEDY, plot_speed_accuracy
from mtp.evaluation.prompts import Prompt, pad_id, stop_token_ids, truncate_output
from mtp.io import append_records, atomic_write_lines, input_file, read_complete_records

JOURNAL = "calls.jsonl"  # in the output folder while a bench runs: the calls finished so far


@dataclass
class CallResult:
    tokens: list[int]
    seconds: float
    first_token_seconds: float | None = None
    forward_passes: int | None = None


@dataclass
class Method:
    name: str
    engine: str  # "transformers", "mtp", "mtp-int8", "llama.cpp", ...: methods of one engine share a warm-up
    run: Callable[[Prompt, int], CallResult]  # (prompt, max_new_tokens) -> result
    description: str = ""
    lossless_reference: str | None = None  # the method whose output this one must equal, if lossless
    close: Callable[[], None] | None = None  # frees what the method holds (llama.cpp's model) when the bench ends


@dataclass
class BenchRun:
    methods: list[Method]
    prompts: list[Prompt]
    calls: list[dict] = field(default_factory=list)  # in the order they ran


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


def mtp_method(model, tokenizer, name: str, strategy: str, *, tau: float = 0.9, k: int | None = None,
               engine: str = "mtp", stop_ids: Sequence[int] | None = None, description: str = "",
               tree_size: int | None = None, tree: str = "auto", lookup: int = 0) -> Method:
    from mtp.decoding.generate import generate

    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)

    def run(prompt: Prompt, max_new_tokens: int) -> CallResult:
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=model.device)
        first: list[float] = []

        def on_tokens(row: int, new: list[int]) -> None:
            if not first:
                first.append(time.perf_counter())

        start = time.perf_counter()
        result = generate(model, ids, max_new_tokens=max_new_tokens, strategy=strategy, tau=tau, k=k,
                          stop_token_ids=stop_ids, stop_strings=STOP_SEQUENCES, tokenizer=tokenizer,
                          streamer=on_tokens, tree=tree if tree_size else None, tree_size=tree_size,
                          lookup=lookup)
        seconds = time.perf_counter() - start
        return CallResult(result.tokens[0], seconds, first[0] - start if first else None,
                          result.stats.forward_passes)

    lossless = OUR_GREEDY if strategy == "speculative" and engine == "mtp" else None
    if strategy == "speculative" and engine != "mtp":
        lossless = f"greedy-{engine.removeprefix('mtp-')}"
    return Method(name, engine, run, description or strategy, lossless)


def hf_method(model, tokenizer, name: str, *, prompt_lookup_tokens: int | None = None,
              stop_ids: Sequence[int] | None = None) -> Method:
    """transformers `generate()` on the base model (the MTP heads unused), greedy or prompt lookup."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    base = model.base
    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
    calls = getattr(base, "_mtp_bench_forwards", None)  # one counting hook per model, however many methods
    if calls is None:
        calls = [0]
        base.register_forward_hook(lambda module, args, output: calls.__setitem__(0, calls[0] + 1))
        base._mtp_bench_forwards = calls

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2 and self.at is None:  # the first put is the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    config = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=stop_ids or None,
                              pad_token_id=pad_id(tokenizer), stop_strings=list(STOP_SEQUENCES),
                              prompt_lookup_num_tokens=prompt_lookup_tokens)

    def run(prompt: Prompt, max_new_tokens: int) -> CallResult:
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=model.device)
        config.max_new_tokens = max_new_tokens
        streamer = FirstToken()
        calls[0] = 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = base.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                tokenizer=tokenizer, streamer=streamer)
        seconds = time.perf_counter() - start
        tokens = out[0, ids.shape[1]:].tolist()
        return CallResult(tokens, seconds, streamer.at - start if streamer.at is not None else None, calls[0])

    desc = "transformers generate() greedy" if prompt_lookup_tokens is None else \
        f"transformers prompt lookup ({prompt_lookup_tokens} tokens)"
    return Method(name, "transformers", run, desc, HF_GREEDY if prompt_lookup_tokens is not None else None)


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


def build_methods(model, tokenizer, *, taus: Sequence[float] = (0.9, 0.7, 0.5), static_k: Sequence[int] | None = None,
                  hf: bool = True, prompt_lookup_tokens: int = 10, fp16: bool = True, int8: bool = False,
                  packed_strategies: Sequence[str] = ("greedy", "speculative"), gguf: str | Path | None = None,
                  llamacpp_ctx: int = 2048, llamacpp_inline: bool = False,
                  notes: list[str] | None = None, tree_sizes: Sequence[int] = (), lookup: int = 0,
                  tree_shapes: Sequence[str] = ("auto",)) -> list[Method]:
    """The methods of a benchmark, in report order. Unavailable ones are left out with a line in `notes`.

    `tree_sizes`: speculative rows verifying a draft tree of that many nodes ("auto" shape), on the packed
    weights when there are any (else fp32), so tokens per forward and speed can be read per tree size;
    `tree_shapes`: "auto" (one shape from the heads' measured accuracy) and/or "dynamic" (EAGLE-2, per step).
    `lookup`: the same speculative rows (chain and each tree) again with up to that many prompt-lookup drafts."""
    notes = notes if notes is not None else []
    stop_ids = stop_token_ids(model, tokenizer)
    methods: list[Method] = []
    if hf:
        methods.append(hf_method(model, tokenizer, HF_GREEDY, stop_ids=stop_ids))
        if prompt_lookup_tokens > 0:
            methods.append(hf_method(model, tokenizer, "hf-prompt-lookup", prompt_lookup_tokens=prompt_lookup_tokens,
                                     stop_ids=stop_ids))
    methods.append(mtp_method(model, tokenizer, OUR_GREEDY, "greedy", stop_ids=stop_ids))
    methods += multi_token_methods(model, tokenizer, taus=taus, static_k=static_k, fp16=False, notes=notes,
                                   stop_ids=stop_ids)
    packed = [fmt for fmt, wanted in (("fp16", fp16), ("int8", int8)) if wanted]
    if packed and model.device.type != "cpu":
        notes.append(f"{'/'.join(packed)} rows skipped: packed weights (fbgemm) run on the CPU only")
        packed = []
    for fmt in packed:
        from mtp.models.loading import quantize_model

        q = quantize_model(copy.deepcopy(model), fmt)
        for strategy in packed_strategies:
            if strategy != "greedy" and tokens_per_forward_max(model) == 1:
                continue
            methods.append(mtp_method(q, tokenizer, f"{strategy}-{fmt}", strategy, engine=f"mtp-{fmt}",
                                      stop_ids=stop_ids, description=f"{strategy}, {fmt} weights"))
        methods += tree_methods(q, tokenizer, tree_sizes, stop_ids, fmt, lookup, tree_shapes)
    if not packed:
        methods += tree_methods(model, tokenizer, tree_sizes, stop_ids, None, lookup, tree_shapes)
    if gguf is not None:
        if not llamacpp_installed():
            notes.append("llama.cpp skipped: llama-cpp-python is not installed (make setup-peers, or pip install "
                         "'mtp[llamacpp]'; it builds llama.cpp, about 10 minutes)")
        else:
            input_file(gguf, "GGUF")
            methods.append(llamacpp_method(gguf, tokenizer, stop_ids, llamacpp_ctx))
            notes.append(f"llama.cpp: {methods[-1].description}; the bench process waits on it, its torch "
                         "threads idle")
            if llamacpp_inline:  # the same engine beside torch's threads: what isolating it changes
                methods.append(llamacpp_method(gguf, tokenizer, stop_ids, llamacpp_ctx, name="llama.cpp-inline",
                                               isolated=False))
    return methods


def tree_methods(model, tokenizer, sizes: Sequence[int], stop_ids, fmt: str | None,
                 lookup: int = 0, shapes: Sequence[str] = ("auto",)) -> list[Method]:
    """Speculative rows with a draft tree per size and shape ("auto": row `-treeN`, "dynamic": `-dtreeN`),
    then, with `lookup`, the chain and each tree with up to that many prompt-lookup drafts as one more branch
    (parallel heads only; lookup alone for one head)."""
    if getattr(model, "mask_token_id", None) is not None:
        return []
    sizes = list(sizes) if tokens_per_forward_max(model) > 1 else []
    engine, suffix = (f"mtp-{fmt}", f"-{fmt}") if fmt else ("mtp", "")
    weights = f", {fmt} weights" if fmt else ""
    trees = [(n, shape) for shape in shapes for n in sizes]
    rows = [(n, shape, 0) for n, shape in trees]
    if lookup:
        rows += [(None, "auto", lookup)] + [(n, shape, lookup) for n, shape in trees]
    methods = []
    for n, shape, look in rows:
        kind = "dtree" if shape == "dynamic" else "tree"
        name = f"speculative{suffix}" + (f"-{kind}{n}" if n else "") + (f"-lookup{look}" if look else "")
        what = (f"a {n}-node {'dynamic ' if shape == 'dynamic' else ''}draft tree" if n else "the heads' chain")
        what += f" + {look} lookup drafts" if look else ""
        methods.append(mtp_method(model, tokenizer, name, "speculative", engine=engine, stop_ids=stop_ids,
                                  tree_size=n, tree=shape, lookup=look, description=f"speculative, {what}{weights}"))
    return methods


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
    return model.default_k if getattr(model, "mask_token_id", None) is not None else model.num_heads


def multi_token_methods(model, tokenizer, *, taus: Sequence[float], static_k: Sequence[int] | None, fp16: bool,
                        prefix: str = "", notes: list[str], stop_ids: Sequence[int] | None = None) -> list[Method]:
    """A model's multi-token rows: speculative (lossless), ConfAdapt per tau, static k; named `prefix + name`.

    With a prefix (another model beside the main one) its own greedy row comes too when its answers may differ
    from the main model's (a fully trained mask-token model), and its lossless rows are checked against it."""
    n = tokens_per_forward_max(model)
    if n == 1:
        notes.append(f"{prefix or 'the model'}: a single head: speculative, ConfAdapt and static need MTP heads")
        return []
    stop_ids = list(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
    own_answers = getattr(model, "mask_token_id", None) is not None and model.lora is None
    methods: list[Method] = []
    reference = OUR_GREEDY
    if prefix and own_answers:
        reference = f"{prefix}greedy"
        methods.append(mtp_method(model, tokenizer, reference, "greedy", stop_ids=stop_ids,
                                  description=f"{prefix} greedy (its own weights)"))
    spec = mtp_method(model, tokenizer, f"{prefix}speculative", "speculative", stop_ids=stop_ids)
    spec.lossless_reference = reference
    methods.append(spec)
    for tau in taus:
        if not 0.0 <= tau <= 1.0:
            raise MTPError(f"tau must be in [0, 1], got {tau}")
        methods.append(mtp_method(model, tokenizer, f"{prefix}confadapt-tau{tau:g}", "confadapt", tau=tau,
                                  stop_ids=stop_ids, description=f"{prefix}ConfAdapt tau={tau:g}"))
    for k in (static_k if static_k is not None else sorted({2, n})):
        if not 1 <= k <= n:
            raise MTPError(f"static k must be in [1, {n}] for this model, got {k}")
        methods.append(mtp_method(model, tokenizer, f"{prefix}static-k{k}", "static", k=k, stop_ids=stop_ids,
                                  description=f"{prefix}static k={k}"))
    if fp16 and model.device.type == "cpu":
        from mtp.models.loading import quantize_model

        try:
            q = quantize_model(copy.deepcopy(model), "fp16")
        except MTPError as e:
            notes.append(f"{prefix}speculative-fp16 skipped: {e}")
        else:
            packed = mtp_method(q, tokenizer, f"{prefix}speculative-fp16", "speculative", engine="mtp-fp16",
                                stop_ids=stop_ids, description=f"{prefix} speculative, fp16 weights")
            packed.lossless_reference = None if own_answers else "greedy-fp16"
            methods.append(packed)
            for tau in taus:  # the paper's decoding at the speed fp16 packing gives the lossless rows
                methods.append(mtp_method(q, tokenizer, f"{prefix}confadapt-tau{tau:g}-fp16", "confadapt", tau=tau,
                                          engine="mtp-fp16", stop_ids=stop_ids,
                                          description=f"{prefix}ConfAdapt tau={tau:g}, fp16 weights"))
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
        if warmup:  # one untimed short call per engine: first-call allocations and lazy initialisation
            for engine in dict.fromkeys(m.engine for m in methods):
                engine_methods = [m for m in methods if m.engine == engine]
                if any((p, m.name) not in done for p, _ in enumerate(prompts) for m in engine_methods):
                    engine_methods[0].run(prompts[0], min(4, max_new_tokens))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), initial=len(done), desc="bench", unit="call", dynamic_ncols=True)
        for p, name in order:
            if (p, name) in done:
                run.calls.append(done[(p, name)])
                continue
            if bar is not None:
                bar.set_postfix_str(f"prompt {p + 1}/{len(prompts)} {name}")
            result = by_name[name].run(prompts[p], max_new_tokens)
            call = {"prompt": p, "method": name, "tokens": result.tokens, "seconds": result.seconds,
                    "first_token_seconds": result.first_token_seconds, "forward_passes": result.forward_passes}
            run.calls.append(call)
            if log is not None:
                append_records(log, [{**call, "key": keys[(p, name)]}])
            if bar is not None:
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


# ------------------------------------------------------------------------------------------------ report
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two outputs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[float, float]:
    """Token agreement of outputs with their reference outputs, (output, reference) per prompt, token-weighted
    over the prompts: (prefix, positional).

    prefix: sum of common-prefix lengths / sum of max(len(output), len(reference)) - the share of tokens
    generated exactly as the reference did before the first difference. positional: positions i with
    output[i] == reference[i] over the same total (a run that re-synchronises after a difference counts again).
    The longer of the two lengths is the denominator, so both are 1 exactly when every output equals its
    reference (an output that stops early or runs on is not in full agreement); no tokens at all: 1."""
    total = sum(max(len(out), len(ref)) for out, ref in pairs)
    if total == 0:
        return 1.0, 1.0
    prefix = sum(common_prefix(out, ref) for out, ref in pairs)
    positional = sum(sum(x == y for x, y in zip(out, ref, strict=False)) for out, ref in pairs)
    return prefix / total, positional / total


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def build_report(run: BenchRun, tokenizer, *, settings: dict | None = None, notes: Sequence[str] = ()) -> dict:
    """Per-method figures (see the module docstring) and every call, as a JSON-able dict."""
    calls: dict[tuple[str, int], dict] = {(c["method"], c["prompt"]): c for c in run.calls}
    names = [m.name for m in run.methods]
    n_prompts = len(run.prompts)
    scored = all(p.reference is not None for p in run.prompts)

    def rate(c: dict) -> float:
        return len(c["tokens"]) / c["seconds"] if c["seconds"] > 0 else 0.0

    texts: dict[tuple[str, int], str] = {}
    for key, c in calls.items():
        texts[key] = truncate_output(tokenizer.decode(c["tokens"], skip_special_tokens=True))
    rows = []
    for m in run.methods:
        mine = [calls[(m.name, p)] for p in range(n_prompts)]
        row: dict = {"method": m.name, "engine": m.engine, "description": m.description,
                     "prompts": n_prompts,
                     "tokens_per_second": _rnd(_median([rate(c) for c in mine])),
                     "new_tokens_mean": _rnd(statistics.fmean(len(c["tokens"]) for c in mine), 2),
                     "seconds_total": _rnd(sum(c["seconds"] for c in mine)),
                     "first_token_seconds_median": _rnd(_median([c["first_token_seconds"] for c in mine
                                                                  if c["first_token_seconds"] is not None]))}
        decode = [(len(c["tokens"]) - 1) / (c["seconds"] - c["first_token_seconds"]) for c in mine
                  if c["first_token_seconds"] is not None and len(c["tokens"]) > 1
                  and c["seconds"] > c["first_token_seconds"]]
        row["decode_tokens_per_second"] = _rnd(_median(decode))
        for base, key in ((HF_GREEDY, "speedup_vs_hf_greedy"), (OUR_GREEDY, "speedup_vs_greedy")):
            if base in names:
                ratios = [rate(calls[(m.name, p)]) / rate(calls[(base, p)]) for p in range(n_prompts)
                          if rate(calls[(base, p)]) > 0]
                row[key] = _rnd(_median(ratios))
            else:
                row[key] = None
        forwards = [c["forward_passes"] for c in mine]
        if all(f is not None for f in forwards) and sum(forwards):
            row["tokens_per_forward"] = _rnd(sum(len(c["tokens"]) for c in mine) / sum(forwards))
        else:
            row["tokens_per_forward"] = None
        for base, key in ((OUR_GREEDY, "equal_to_greedy"), (HF_GREEDY, "equal_to_hf_greedy")):
            row[key] = (sum(calls[(m.name, p)]["tokens"] == calls[(base, p)]["tokens"] for p in range(n_prompts))
                        if base in names else None)
        # Quality where accuracy cannot tell the methods apart: how much of our greedy output each reproduces.
        if OUR_GREEDY in names:
            prefix, positional = agreement([(calls[(m.name, p)]["tokens"], calls[(OUR_GREEDY, p)]["tokens"])
                                            for p in range(n_prompts)])
            row["agreement_with_greedy"] = _rnd(prefix, 4)
            row["position_agreement_with_greedy"] = _rnd(positional, 4)
        else:
            row["agreement_with_greedy"] = row["position_agreement_with_greedy"] = None
        if m.lossless_reference in names:
            row["lossless_reference"] = m.lossless_reference
            row["equal_to_lossless_reference"] = sum(
                calls[(m.name, p)]["tokens"] == calls[(m.lossless_reference, p)]["tokens"] for p in range(n_prompts))
        if scored:
            for name in ("strict", "flexible"):
                flags = [bool(score(texts[(m.name, p)], run.prompts[p].reference)[f"{name}_correct"])
                         for p in range(n_prompts)]
                mean, stderr = mean_and_stderr(flags)
                row[f"accuracy_{name}"] = _rnd(mean, 4)
                row[f"accuracy_{name}_stderr"] = _rnd(stderr, 4)
        rows.append(row)
    call_records = []
    for i, c in enumerate(run.calls):
        record = {"order": i, "prompt": c["prompt"], "prompt_id": run.prompts[c["prompt"]].id,
                  "method": c["method"], "new_tokens": len(c["tokens"]), "seconds": round(c["seconds"], 4),
                  "first_token_seconds": _rnd(c["first_token_seconds"], 4),
                  "forward_passes": c["forward_passes"], "tokens": c["tokens"],
                  "output": texts[(c["method"], c["prompt"])]}
        if run.prompts[c["prompt"]].reference is not None:
            record.update(score(record["output"], run.prompts[c["prompt"]].reference))
        call_records.append(record)
    return {"settings": dict(settings or {}), "machine": machine_info(), "notes": list(notes),
            "gsm8k_scored": scored, "methods": rows, "calls": call_records,
            "prompts": [{"index": i, "id": p.id, "prompt_tokens": len(p.token_ids), "reference": p.reference}
                        for i, p in enumerate(run.prompts)]}


def machine_info() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:  # other processes' load at the end of the run: context for the absolute numbers
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def format_table(report: dict) -> str:
    """The per-method table in Markdown (readable as plain text too)."""
    scored = report.get("gsm8k_scored")
    n = report["methods"][0]["prompts"] if report["methods"] else 0
    head = ["method", "tokens/s", "speedup vs HF greedy", "speedup vs our greedy", "tokens/forward",
            "= our greedy", "agreement", "= HF greedy"]
    if scored:
        head += ["GSM8K flexible", "GSM8K strict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in report["methods"]:
        cells = [r["method"], _fmt(r["tokens_per_second"], ".1f"), _fmt(r["speedup_vs_hf_greedy"], ".2f", "x"),
                 _fmt(r["speedup_vs_greedy"], ".2f", "x"), _fmt(r["tokens_per_forward"], ".2f"),
                 "n/a" if r["equal_to_greedy"] is None else f"{r['equal_to_greedy']}/{n}",
                 _fmt(None if r.get("agreement_with_greedy") is None else 100 * r["agreement_with_greedy"],
                      ".0f", "%"),
                 "n/a" if r["equal_to_hf_greedy"] is None else f"{r['equal_to_hf_greedy']}/{n}"]
        if scored:
            cells += [f"{100 * r['accuracy_flexible']:.0f}% ± {100 * r['accuracy_flexible_stderr']:.0f}",
                      f"{100 * r['accuracy_strict']:.0f}% ± {100 * r['accuracy_strict_stderr']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(report: dict, plot_name: str | None = "speed_accuracy.png") -> str:
    s, mc = report["settings"], report["machine"]
    parts = ["# mtp bench", ""]
    desc = [f"model: {s.get('model_description', s.get('model'))}",
            f"prompts: {s.get('prompts_description', s.get('prompts'))}",
            f"max new tokens: {s.get('max_new_tokens')}",
            f"machine: {mc['cpu']}, {mc['threads']} threads, torch {mc['torch']}, transformers {mc['transformers']}, "
            f"{mc['date']}" + (f", load average {mc['load_average_1_5_15min'][1]} (5 min) on {mc.get('cpu_count')} "
                               "CPUs" if mc.get("load_average_1_5_15min") else "")]
    if s.get("command"):
        desc.append(f"command: `{s['command']}`")
    parts += [f"- {d}" for d in desc] + ["", format_table(report), ""]
    parts += ["tokens/s: median over prompts of new tokens / wall seconds of the call (prefill included). "
              "Speedups: median over prompts of the per-prompt ratio (the methods ran interleaved, prompt by "
              "prompt). tokens/forward: new tokens / model forwards (prefill included). \"= our greedy\": "
              "prompts whose output tokens equal our greedy output exactly. agreement: of all generated tokens "
              "(per prompt the longer of the method's and our greedy's output, summed over prompts), the share "
              "equal to our greedy output's token at the same position before the first difference "
              "(`position_agreement_with_greedy` in report.json counts every equal position instead)."]
    if report.get("gsm8k_scored"):
        parts.append("GSM8K: exact match of the strict (\"The answer is N.\") and flexible (last number) "
                     "extractions, ± standard error.")
    if report.get("notes"):
        parts += [""] + [f"Note: {note}" for note in report["notes"]]
    if plot_name:
        parts += ["", f"![speedup vs accuracy]({plot_name})"]
    return "\n".join(parts) + "\n"


def write_report(report: dict, output: str | Path) -> dict[str, Path]:
    """report.json, report.md and speed_accuracy.png in the folder `output`."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise MTPError(f"--output {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "speed_accuracy.png"}
    write_json(paths["json"], report)
    write_text(paths["markdown"], format_markdown(report, paths["plot"].name))
    plot_speed_accuracy(report, paths["plot"])
    return paths
