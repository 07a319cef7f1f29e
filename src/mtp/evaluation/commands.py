"""`mtp eval`, `mtp bench` and `mtp demo`."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mtp.arguments import check_values
from mtp.decoding.corpus import finish_corpus
from mtp.decoding.options import DraftOptions, WeightOptions
from mtp.errors import MTPError
from mtp.hub import resolve_model
from mtp.io import input_file
from mtp.options import with_flat_keywords
from mtp.process import output_lock
from mtp.runtime import (
    CoreWait,
    DType,
    Graphs,
    Runtime,
    default_batch_rows,
    dtype_name,
    graphs_option,
    resolve_runtime,
    set_threads,
)

Strategy = Literal["greedy", "speculative", "confadapt", "static"]


def _model_name(model: str | None) -> str:
    if model is None:
        return "smollm2-135m"
    return Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"


def _command_line() -> str:
    argv = sys.argv[:]
    if argv and argv[0].endswith("mtp"):
        argv[0] = "mtp"
    return " ".join(shlex.quote(a) for a in argv)


def _load(model: str | None, runtime: Runtime, quantize: str = "none", mask_token_id: int | None = None,
          mask_token: str | None = None, decode_only: bool = False):
    from mtp.models.loading import describe_source, load_mtp_model

    print(f"mtp: loading {model or 'the embedded default model (SmolLM2-135M-Instruct)'} on {runtime.describe()}"
          f"{'' if quantize == 'none' else f', {quantize}-packed'} ...", flush=True)
    m = load_mtp_model(model, device=runtime.device, dtype=runtime.dtype, quantize=quantize,  # type: ignore[arg-type]
                       mask_token_id=mask_token_id, mask_token=mask_token, decode_only=decode_only)
    if m.tokenizer is None:
        raise MTPError(f"{model}: the model has no tokenizer files")
    print(f"mtp: {describe_source(getattr(m, 'source', None))}; {_kind(m)}", flush=True)
    return m


def _kind(m) -> str:
    if m.kind == "mask_tokens":
        adapter = "gated LoRA" if m.lora is not None else "full"
        return f"mask-token model ({adapter}, k={m.default_k}, mask id {m.mask_token_id})"
    from mtp.decoding.options import untrained_heads_note

    return f"{m.num_heads} heads" + (" (the extra ones new, not trained)" if untrained_heads_note(m, "speculative")
                                     else "")


# ------------------------------------------------------------------------------------------------ eval
def eval_(
    task: Literal["gsm8k"] = "gsm8k",
    model: str | None = None,
    strategy: Strategy = "greedy",
    limit: int | None = None,
    shots: int = 8,
    chat: bool | None = None,
    max_new_tokens: int = 256,
    batch_size: int | None = None,
    data: str | None = None,
    split: Literal["test", "train"] = "test",
    output: str | None = None,
    resume: bool = True,
    progress: bool = True,
    drafts: DraftOptions | None = None,
    weights: WeightOptions | None = None,
    **flat: object,
) -> int:
    """Evaluate a model on GSM8K (lm-eval gsm8k_cot: 8 fixed exemplars, strict and flexible exact match).

    What every prompt starts with (the exemplars) is fed to the model once, not once per problem.

    The options of `drafts` and `weights` may also be given by name in Python, as on the command line:
    `eval_(strategy="speculative", lookup=6, device="cpu")`.

    Args:
        task: the benchmark (gsm8k)
        model: the embedded default (omit), an MTP or Hugging Face folder, a .gguf, a Meta checkpoint or a hub id
        strategy: greedy | speculative (lossless) | confadapt (lossy, --tau) | static (lossy, --k)
        limit: the first N problems (file order)
        shots: fixed chain-of-thought exemplars (0 to 8)
        chat: exemplars as chat turns (lm-eval --apply_chat_template --fewshot_as_multiturn); default: if the model has a template
        max_new_tokens: longest answer (lm-eval: 256)
        batch_size: problems decoded together (left padding), the next joining as a row ends (greedy and
            speculative decoding with a chain or a fixed tree); a sample's seconds are the time since the one
            before it (default: 64 on a GPU, which decodes a batch in about the time of one problem, 8 on the CPU)
        data: a GSM8K-format .jsonl ("question", "answer" with "#### N") instead of the shipped split
        split: the shipped GSM8K split
        output: result folder: samples.jsonl, summary.json, eval_config.json (default: eval/gsm8k-MODEL-STRATEGY)
        resume: continue an interrupted evaluation in --output (--no-resume: start again)
        progress: progress bar
    """
    from mtp.evaluation.evaluate import (
        check_same_settings,
        format_summary,
        model_fingerprint,
        run_eval,
        strategy_tag,
    )
    from mtp.evaluation.gsm8k import load_gsm8k
    from mtp.evaluation.prompts import gsm8k_prompts, resolve_chat

    drafts, weights = with_flat_keywords("eval_", {"drafts": drafts or DraftOptions(),
                                                   "weights": weights or WeightOptions()}, flat).values()
    if task != "gsm8k":
        raise MTPError(f"unknown task {task!r}; available: gsm8k")
    if limit is not None and limit < 1:
        raise MTPError(f"--limit must be >= 1, got {limit}")
    if data is not None and not load_gsm8k(path=input_file(data, "GSM8K"), limit=limit):  # before the model loads
        raise MTPError(f"{data}: no problems")
    drafts.check()
    source = resolve_model(model)  # a model that is not there: one line before anything else
    runtime, use_graphs = weights.runtime()
    batch_size = default_batch_rows(runtime.device) if batch_size is None else batch_size
    decode = drafts.generate_kwargs()
    tag = strategy_tag(strategy, drafts.tau, drafts.k, decode["tree"], drafts.tree_size, drafts.lookup)
    out = Path(output).expanduser() if output is not None else Path("eval") / f"gsm8k-{_model_name(model)}-{tag}"
    # a local model by where it is, however it was spelt ("runs/x" from one folder, "x" from another)
    local = source.kind in ("mtp_folder", "hf_folder", "gguf", "meta")
    named = str(Path(source.location).resolve()) if local else model
    settings = _eval_settings(named, strategy, decode, shots, max_new_tokens, data, split, weights.quantize, runtime)
    if resume:  # an evaluation of other settings in --output: an error before the model loads
        check_same_settings(out, settings, only=settings)
    with output_lock(out):  # one evaluation per folder at a time
        start = time.perf_counter()
        m = _load(model, runtime, weights.quantize, weights.mask_token_id, weights.mask_token, decode_only=True)
        tok = m.tokenizer
        use_chat = resolve_chat(tok, chat)
        prompts = gsm8k_prompts(tok, path=data, split=split, limit=limit, shots=shots, chat=use_chat)
        _check_context(m, prompts, shots, max_new_tokens, strategy, decode)  # before anything is written
        identity = {**settings, "fingerprint": model_fingerprint(m), "chat": use_chat}
        wait = CoreWait()
        corpus = drafts.corpus(m)
        try:
            summary = run_eval(m, tok, prompts, out, identity, strategy=strategy, graphs=use_graphs,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, resume=resume,
                               progress=progress, runtime={**runtime.to_dict(), "batch_size": batch_size},
                               lookup_corpus=corpus, **decode)
        finally:
            finish_corpus(corpus)
        title = (f"GSM8K gsm8k_cot, {shots}-shot, {'chat' if use_chat else 'plain'} prompts, {tag}, "
                 f"{summary['n']} problem{'s' if summary['n'] != 1 else ''}, "
                 f"batch {min(batch_size, max(summary['n'], 1))}, {runtime.describe()}")
        print(format_summary(summary, title))
        print(f"samples: {out / 'samples.jsonl'}\nsummary: {out / 'summary.json'}\n"
              f"wall time: {time.perf_counter() - start:.0f} s (model load included)")
        if (note := wait.note()) is not None:
            print(note, file=sys.stderr)
        return 0


# ------------------------------------------------------------------------------------------------ bench
def bench(
    model: str | None = None,
    prompts: str = "gsm8k",
    limit: int = 10,
    max_new_tokens: int = 128,
    output: str = "bench",
    shots: int = 0,
    chat: bool | None = None,
    strategy: list[Strategy] | None = None,
    tau: list[float] | None = None,
    k: list[int] | None = None,
    fp16: bool = True,
    int8: bool = False,
    hf: bool = True,
    hf_lookup: int = 10,
    gguf: str | None = None,
    llamacpp: bool = True,
    llamacpp_inline: bool = False,
    rotate: bool = True,
    threads: int | None = None,
    progress: bool = True,
    also: list[str] | None = None,
    tree: list[Literal["auto", "dynamic"]] | None = None,
    tree_size: list[int] | None = None,
    lookup: int = 0,
    lookup_corpus: str = "none",
    device: str = "auto",
    dtype: DType = "auto",
    hf_static: bool | None = None,
    batch_size: list[int] | None = None,
    bandwidth_gbs: float | None = None,
    graphs: Graphs = "auto",
    sample_temperature: float | None = None,
) -> int:
    """Benchmark every decoding method on the same prompts, interleaved: speed, equality with greedy, accuracy.

    The decoding flags are `mtp generate`'s; where a bench takes several values (--strategy, --tau, --k, --tree,
    --tree-size, --batch-size) it runs rows for each. --fp16/--int8 add rows on a packed copy of the model beside
    the rows in --dtype (greedy there is every lossless row's reference), so they are switches for rows, not the
    weight format that --quantize sets in the other commands.

    Args:
        model: the embedded default (omit), an MTP or Hugging Face folder, a .gguf, a Meta checkpoint or a hub id
        prompts: "gsm8k" (shipped test split, scored), a GSM8K .jsonl (scored), a "prompt" .jsonl, or a text file
        limit: the first N prompts
        max_new_tokens: new tokens per prompt at most
        output: folder for report.json, report.md and speed_accuracy.png
        shots: GSM8K exemplars per prompt (0: the question alone, as heads are trained; 8: eval's ~900-token prompt)
        chat: the tokenizer's chat template (default: on when it has one)
        strategy: mtp's strategies to run rows of (default: all); greedy runs always, as every lossless row's
            reference
        tau: ConfAdapt thresholds, a row each (default: 0.9 0.7 0.5)
        k: static strategy's tokens per forward, a row each (default: 2 and the number of heads)
        fp16: also run greedy and speculative with fp16-packed weights (lossless, faster on CPUs; fp32 on the CPU only)
        int8: also run greedy and speculative on an int8-quantised copy of the model (lossy; slow here; CPU only)
        hf: run transformers generate() greedy and prompt lookup (the reference)
        hf_lookup: tokens of transformers' prompt lookup (prompt_lookup_num_tokens; 0: leave that row out)
        gguf: the GGUF llama.cpp runs (default: the embedded default's, when --model is the default)
        llamacpp: run llama.cpp when llama-cpp-python is installed (pip install llama-cpp-python, or make
            setup-peers), in a process of its own with as many threads as torch, torch's threads idle meanwhile
        llamacpp_inline: also run llama.cpp in the bench process, beside torch's threads (row llama.cpp-inline)
        rotate: rotate the order of the methods from prompt to prompt
        threads: torch CPU threads (default: torch's choice); llama.cpp uses the same number
        progress: progress bar
        also: more MTP or mask-token folders of the same base model: their multi-token methods run in the same
            interleaved benchmark, named "FOLDER:method" (e.g. parallel heads beside self-distilled mask tokens)
        tree: shapes of the draft-tree rows: "auto" (one shape from the heads' measured accuracy per rank; rows
            -treeN) and/or "dynamic" (a new shape every step from the drafts' probabilities, EAGLE-2; rows -dtreeN);
            default auto
        tree_size: also speculative with a draft tree of each size, e.g. 4 8 16 32: tokens per forward and speed
            per tree size (default with --tree: 16)
        lookup: also the speculative chain and each tree with up to this many prompt-lookup drafts (tokens
            copied from earlier in the prompt and answer) verified in the same forward; 0: none
        lookup_corpus: with --lookup, those rows again with lookup drafts from a corpus of earlier answers (rows
            -corpus): auto (the model folder's lookup_corpus.safetensors, written by `mtp train --targets self`)
            or such a file; none: no such rows
        device: auto (CUDA when available), cpu, cuda or cuda:N
        dtype: the weights' dtype: auto (bfloat16 on CUDA; float32 on the CPU, plus the fp16-packed rows), float32,
            bfloat16 or float16
        hf_static: also transformers greedy with a static cache, which makes generate() compile its decoding step
            (the fast transformers path on a GPU; compiled during an untimed warm-up); default: on CUDA
        batch_size: also decode the prompts in batches of each size (e.g. 1 16 64) with greedy and the fastest
            lossless speculative row: total tokens/s (GSM8K problems past --limit fill the larger batches)
        bandwidth_gbs: memory bandwidth in GB/s for the weight-streaming floor of a step (default: measured)
        graphs: mtp's decoding steps replayed as CUDA graphs: auto (on CUDA), on, off (eager steps), compile
            (graphs of the step torch.compile fused, gpt-fast's way: faster; compiling takes tens of seconds
            for each of the first few step shapes)
        sample_temperature: also sampled rows at this temperature: transformers' generate(do_sample=True)
            (hf-sampled), mtp sampling a token a step (sampled) and exact speculative sampling (speculative-sampled:
            the chain, then -tree/-dtree rows for each --tree-size and --tree shape, with --lookup's drafts), seed 0
            every call: their tokens/s and tokens per forward (draws,
            not greedy's answers)
    """
    from mtp.decoding.corpus import check_corpus_choice
    from mtp.decoding.tree import DEFAULT_TREE_SIZE

    resolve_model(model)  # a model that is not there: one line before anything else
    _check_bench_inputs(prompts, limit, batch_size, gguf, also, shots)
    check_corpus_choice(lookup_corpus)
    check_values({"sample_temperature": sample_temperature})
    out = Path(output).expanduser()
    set_threads(threads)
    runtime = resolve_runtime(device, dtype)
    use_graphs = graphs_option(graphs, runtime.device)
    with output_lock(out):  # one benchmark per folder at a time: they would share its journal
        m = _load(model, runtime)
        extra = [(Path(x.rstrip("/")).name, _load(x, runtime)) for x in (also or [])]
        for x, (_, other) in zip(also or [], extra, strict=True):
            check_same_base(m, other, f"--also {x}")
        setup = BenchSetup(
            prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, shots=shots, chat=chat,
            strategy=strategy, tau=tuple(BenchSetup.tau if tau is None else tau), k=k, tree=tuple(tree or ["auto"]),
            tree_size=tuple(tree_size or ([DEFAULT_TREE_SIZE] if tree else [])), lookup=lookup,
            lookup_corpus=lookup_corpus, fp16=fp16,
            int8=int8, graphs=use_graphs, hf=hf, hf_lookup=hf_lookup,
            hf_static=runtime.device.type == "cuda" if hf_static is None else hf_static,
            **_llamacpp_row(llamacpp, gguf, model),
            llamacpp_inline=llamacpp_inline, rotate=rotate, progress=progress, batch_size=tuple(batch_size or ()),
            bandwidth_gbs=bandwidth_gbs, sample_temperature=sample_temperature)
        return run_bench_command(m, setup, model_label=model or "SmolLM2-135M-Instruct (embedded default)",
                                 output=out, extra_models=extra)


def _eval_settings(model, strategy, decode: dict, shots, max_new_tokens, data, split, quantize,
                   runtime: Runtime) -> dict:
    """What an evaluation computes, as far as is known before the model loads (its fingerprint and the chat
    template's use are added once it has): what a resumed --output must match. `decode`: the drafts' options as
    `generate` takes them (`DraftOptions.generate_kwargs`; the draft length's adaptation changes no answer)."""
    return {"task": "gsm8k_cot", "model": model or "default",
            "strategy": strategy, "tau": decode["tau"] if strategy == "confadapt" else None,
            "k": decode["k"] if strategy == "static" else None,
            "num_draft": decode["num_draft"] if strategy == "speculative" else None,
            "tree": decode["tree"], "tree_size": decode["tree_size"], "lookup": decode["lookup"] or None,
            "shots": shots, "max_new_tokens": max_new_tokens,
            "data": str(Path(data).resolve()) if data else f"shipped:{split}", "quantize": quantize,
            "dtype": dtype_name(runtime.dtype)}


def _check_context(model, prompts, shots: int, max_new_tokens: int, strategy: str, decode: dict) -> None:
    """Every prompt with its new tokens fits the model's context (a GPT-2's 1,024 tokens hold few 8-shot prompts):
    one MTPError naming what to change, before the evaluation writes anything (it failed at its first batch)."""
    from mtp.decoding.generate import context_room

    room = context_room(model, strategy, **decode)
    longest = max((len(p.token_ids) for p in prompts), default=0)
    if room is not None and longest + max_new_tokens > room:
        raise MTPError(f"the longest {shots}-shot prompt has {longest} tokens: with --max-new-tokens {max_new_tokens} "
                       f"it does not fit this model's context ({room} tokens for prompt and answer with these "
                       "drafts); use fewer --shots or a lower --max-new-tokens")


def _check_bench_inputs(prompts: str, limit: int, batch_size, gguf: str | None, also, shots: int) -> None:
    """The files and folders a bench reads besides --model, checked before any model loads."""
    from mtp.evaluation.prompts import file_prompt_texts

    if prompts != "gsm8k":
        free = file_prompt_texts(prompts, limit=max([limit, *(batch_size or [])]), settings=False)
        if free is not None and shots:
            raise MTPError(f"--shots {shots}: {prompts} holds prompts of its own, not GSM8K problems (exemplars go "
                           "before GSM8K questions only)")
    if gguf is not None:
        _check_gguf(gguf)
    for x in also or []:  # a missing or damaged folder is an error before --model loads, not after
        _check_model(x, f"--also {x}")


def _check_gguf(path: str) -> None:
    """--gguf names a GGUF file (its magic bytes), checked before any model loads."""
    with input_file(path, "GGUF").open("rb") as f:
        if f.read(4) != b"GGUF":
            raise MTPError(f"--gguf {path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _check_model(spec: str, label: str) -> None:
    """What `spec` names is a model, and a folder's files are intact (`check_model_folder`), without loading it."""
    from mtp.hub import check_model_folder, resolve_model

    try:
        source = resolve_model(spec)
        if source.kind in ("mtp_folder", "hf_folder"):
            check_model_folder(source.location)
    except MTPError as e:
        raise MTPError(f"{label}: {e}") from None


@contextlib.contextmanager
def _saying_what_is_kept(journal: Path):
    """Ctrl-C or SIGTERM during the bench: say how many finished calls the journal keeps and how to go on, then
    stop as asked."""
    try:
        yield
    except KeyboardInterrupt:
        from mtp.io import read_complete_records

        kept = len(read_complete_records(journal))
        if kept:
            print(f"mtp bench: interrupted; {kept} finished calls are kept in {journal}: run the same command "
                  "again to measure only the rest", file=sys.stderr, flush=True)
        raise


def _bandwidth(device: torch.device, gbs: float | None) -> dict:
    """The memory bandwidth of the floors in the bench report: given, or measured on the device."""
    from mtp.runtime import measure_bandwidth

    if gbs is not None:
        return {"bytes_per_second": gbs * 1e9, "source": "--bandwidth-gbs"}
    return {"bytes_per_second": measure_bandwidth(device), "source": f"measured: a large copy on {device}"}


# What makes two checkpoints the same base model (fine-tuned weights aside), as a config spells it.
# (the context too: a shorter one's rows fail once a prompt outgrows it, some calls into the benchmark)
_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")


def check_same_base(model, other, label: str) -> None:
    """`other` decodes `model`'s prompts beside it (`bench --also`): its rows mean something only when it is the
    same base model with the same tokenizer; a mask-token model may add tokens after the vocabulary."""
    arch = {k: getattr(model.config, k, None) for k in _ARCHITECTURE}
    theirs = {k: getattr(other.config, k, None) for k in _ARCHITECTURE}
    if arch != theirs:
        diff = ", ".join(f"{k} {theirs[k]} (not {arch[k]})" for k in _ARCHITECTURE if arch[k] != theirs[k])
        raise MTPError(f"{label} is another base model than --model: {diff}; --also compares models trained from "
                       "the same one")
    ours, their_vocab = model.tokenizer.get_vocab(), other.tokenizer.get_vocab()
    differ = sorted(t for t, i in ours.items() if their_vocab.get(t) != i)
    if differ or other.config.vocab_size < model.config.vocab_size:
        example = f" (e.g. token {differ[0]!r})" if differ else ""
        raise MTPError(f"{label} has another tokenizer or vocabulary than --model: {len(differ)} of {len(ours)} "
                       f"tokens differ{example}; --also compares models of the same base model")


def _llamacpp_row(llamacpp: bool, gguf: str | None, model: str | None) -> dict:
    """The GGUF of the llama.cpp row (--gguf, or the embedded default's for the default model; None: no row) and,
    where a model of the user's has none, the note that says so."""
    if not llamacpp:
        return {"gguf": None, "gguf_note": None}
    if gguf is not None or model is None:
        return {"gguf": gguf if gguf is not None else _default_gguf(), "gguf_note": None}
    return {"gguf": None, "gguf_note": "llama.cpp skipped: pass --gguf FILE with the same model as GGUF"}


def _default_gguf() -> str | None:
    from mtp.hub import default_gguf_path

    try:
        return str(default_gguf_path())
    except MTPError:
        return None


@dataclass(frozen=True)
class BenchSetup:
    """What one `mtp bench` measures, its flags resolved (`bench` builds it from the command line, `mtp demo` from
    its plan)."""

    # the prompts
    prompts: str = "gsm8k"  # "gsm8k" (the shipped test split) or a file of prompts
    limit: int = 10  # the table's prompts: the first N
    max_new_tokens: int = 128
    shots: int = 0
    chat: bool | None = None  # None: the chat template where the tokenizer has one
    # mtp's rows
    strategy: Sequence[str] | None = None  # None: every strategy (greedy always: each lossless row's reference)
    tau: Sequence[float] = (0.9, 0.7, 0.5)  # a ConfAdapt row each
    k: Sequence[int] | None = None  # a static row each (None: 2 and the most a forward makes)
    tree: Sequence[str] = ("auto",)  # the draft-tree rows' shapes
    tree_size: Sequence[int] = ()  # a draft-tree row each
    lookup: int = 0  # also the chain and each tree with up to this many prompt-lookup drafts
    lookup_corpus: str = "none"  # and again with a lookup corpus: "auto" (the model folder's) or a file
    fp16: bool = True  # rows on fp16-packed weights (a CPU's)
    int8: bool = False  # rows on int8-quantised weights (a CPU's)
    graphs: bool | str | None = None  # mtp's steps replayed as CUDA graphs (None: on CUDA)
    # the peers
    hf: bool = True  # transformers' greedy (and its prompt lookup, `hf_lookup` > 0)
    hf_lookup: int = 10
    hf_static: bool = False  # transformers greedy with a static cache (its compiled step)
    gguf: str | None = None  # the GGUF llama.cpp runs (None: no llama.cpp row)
    gguf_note: str | None = None  # why there is no llama.cpp row, for the report's notes
    llamacpp_inline: bool = False  # llama.cpp also in the bench's process
    # how it runs
    rotate: bool = True  # the methods' order rotates from prompt to prompt
    progress: bool = True
    batch_size: Sequence[int] = ()  # batch rows: greedy and the fastest lossless row per batch size
    bandwidth_gbs: float | None = None  # for the weight-streaming floor (None: measured)
    sample_temperature: float | None = None  # sampled rows at this temperature (None: none)


def run_bench_command(m, setup: BenchSetup, *, model_label: str, output: Path,
                      extra_models: Sequence[tuple[str, object]] = ()) -> int:
    """`mtp bench` with the model loaded (and `extra_models`, `--also`'s, labelled): the methods, their calls
    interleaved (resumed from the journal of an interrupted run), the report with its batch rows, printed and
    written to `output`."""
    from mtp.evaluation.bench import JOURNAL, fastest_lossless, run_batch_rows, run_bench
    from mtp.evaluation.bench_report import build_report, write_report
    from mtp.evaluation.prompts import resolve_chat
    from mtp.training.targets import model_fingerprint

    tok, runtime = m.tokenizer, Runtime(m.device, m.dtype)
    chat = resolve_chat(tok, setup.chat)
    pool, prompts_desc = _bench_prompts(tok, setup, chat)  # the batch rows' prompts: the table's, then more
    items = pool[:setup.limit]
    notes = [setup.gguf_note] if setup.gguf_note else []
    methods = _bench_methods(m, setup, extra_models, max(len(p.token_ids) for p in items), notes)
    bandwidth = _bandwidth(runtime.device, setup.bandwidth_gbs)
    print(f"mtp bench: {len(methods)} methods x {len(items)} prompts ({prompts_desc}), up to {setup.max_new_tokens} "
          f"new tokens, {runtime.describe()}, {torch.get_num_threads()} threads: "
          f"{', '.join(x.name for x in methods)}; memory bandwidth {bandwidth['bytes_per_second'] / 1e9:,.1f} GB/s "
          f"({bandwidth['source']})", flush=True)
    for note in notes:
        print(f"mtp bench: note: {note}", flush=True)
    journal = output / JOURNAL  # each finished call, so that an interrupted bench resumes
    identity = {"model": model_fingerprint(m, with_heads=True), "draft_vocab": m.draft_vocab is not None,
                "also": [model_fingerprint(x, with_heads=True) for _, x in extra_models],
                "threads": torch.get_num_threads(), "gguf": setup.gguf, "runtime": runtime.to_dict(),
                "graphs": setup.graphs}
    output.mkdir(parents=True, exist_ok=True)
    with _saying_what_is_kept(journal):
        run = run_bench(methods, items, setup.max_new_tokens, rotate=setup.rotate, progress=setup.progress,
                        journal=journal, identity=identity)
    resumed = sum("key" in c for c in run.calls)
    if resumed:
        notes.append(f"{resumed} of {len(run.calls)} calls were measured by an earlier, interrupted run of this bench")
    settings = {"model": model_label, "model_description": _describe(m, model_label), "prompts": setup.prompts,
                "prompts_description": prompts_desc, "limit": setup.limit, "shots": setup.shots, "chat": chat,
                "max_new_tokens": setup.max_new_tokens, "num_heads": m.num_heads, "rotate": setup.rotate,
                "hf_lookup": setup.hf_lookup, "gguf": setup.gguf, "hf_static": setup.hf_static,
                "sample_temperature": setup.sample_temperature,
                "batch_size": list(setup.batch_size), "command": _command_line()}
    report = build_report(run, tok, settings=settings, notes=notes, runtime=runtime.to_dict(), bandwidth=bandwidth)
    if setup.batch_size:
        pair = fastest_lossless(report["methods"], methods)
        if pair is None:
            report["notes"].append("batch rows skipped: no lossless speculative row equalled its greedy on every "
                                   "prompt")
        else:
            report["batch_rows"] = run_batch_rows(pair, pool, setup.batch_size, setup.max_new_tokens, len(items),
                                                  setup.progress)
    paths = write_report(report, output)
    journal.unlink()  # the report holds every call; a new run measures afresh
    _print_report(report, paths)
    return 0


def _bench_methods(m, setup: BenchSetup, extra_models: Sequence[tuple[str, object]], longest_prompt: int,
                   notes: list[str]) -> list:
    """The bench's rows: the peers and mtp's methods on `m`, then the multi-token rows of each extra model, kept to
    `setup.strategy`'s (greedy rows stay: every lossless row is checked against one)."""
    from mtp.evaluation.bench import build_methods, multi_token_methods

    s = setup
    methods = build_methods(m, m.tokenizer, tau=s.tau, k=s.k, hf=s.hf, hf_lookup=s.hf_lookup, fp16=s.fp16,
                            int8=s.int8, gguf=s.gguf, llamacpp_ctx=longest_prompt + s.max_new_tokens + 16,
                            llamacpp_inline=s.llamacpp_inline, notes=notes, tree_size=s.tree_size, lookup=s.lookup,
                            tree=s.tree, hf_static=s.hf_static, graphs=s.graphs,
                            sample_temperature=s.sample_temperature, lookup_corpus=s.lookup_corpus)
    for label, other in extra_models:
        methods += multi_token_methods(other, m.tokenizer, tau=s.tau, k=s.k, fp16=s.fp16, prefix=f"{label}:",
                                       notes=notes, graphs=s.graphs)
    if s.strategy is not None:
        methods = [x for x in methods if x.strategy in (None, "greedy", *s.strategy)]
    return methods


def _print_report(report: dict, paths: dict) -> None:
    from mtp.evaluation.bench_report import format_batch_table, format_table

    print()
    print(format_table(report))
    if report.get("batch_rows"):
        print()
        print(format_batch_table(report))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nreport: {paths['markdown']} (and {paths['json'].name})\nplot: {paths['plot']}")


def _bench_prompts(tok, setup: BenchSetup, chat: bool) -> tuple[list, str]:
    """The prompts (GSM8K's test set or a file's), as many as the table and the largest batch row want, and the
    description of the table's first `setup.limit`."""
    from mtp.evaluation.prompts import file_prompts, gsm8k_prompts

    style = "chat" if chat else "plain"
    pool_size = max([setup.limit, *setup.batch_size])
    if setup.prompts == "gsm8k":
        pool = gsm8k_prompts(tok, limit=pool_size, shots=setup.shots, chat=chat)
        shown = min(setup.limit, len(pool))
        which = "problem 0" if shown == 1 else f"problems 0-{shown - 1}"
        return pool, f"GSM8K test {which}, {setup.shots}-shot, {style}"
    pool = file_prompts(tok, setup.prompts, limit=pool_size, shots=setup.shots, chat=chat)
    return pool, f"{min(setup.limit, len(pool))} prompts from {setup.prompts}, {style}"


def _describe(m, label: str) -> str:
    from mtp.models.loading import describe_source

    source = getattr(m, "source", None)
    return f"{label}: {describe_source(source)}, {_kind(m)}" if source is not None else label
