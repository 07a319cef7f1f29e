"""GSM8K evaluation of an MTP model with any decoding strategy: batched, resumable, one JSONL line per problem.

Output folder:
    eval_config.json   what the run computes (model fingerprint, strategy, prompt format, budget); a resumed run
                       must match it
    samples.jsonl      one line per problem, appended (and fsynced) as soon as its answer ended; a line cut off
                       by a crash is dropped on resume and that problem is run again
    summary.json       accuracy (strict, flexible) with standard errors, tokens per forward, tokens/s, s/sample

Problems are decoded in file order, `--batch-size` rows at a time (left padding), the next problem joining the
batch as soon as a row ends (continuous batching, where the strategy takes joiners). What every prompt starts
with (8-shot: the exemplars, ~830 of ~900 tokens) is fed once, its keys and values copied into each row
(`generate(prefix=...)`). A record's `seconds` is the wall time since the record before it, so they add up to the
run's time and tokens/s is the batched run's throughput.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch

from mtp.decoding.inputs import common_prefix
from mtp.errors import MTPError
from mtp.evaluation.gsm8k import extract_flexible, extract_strict, is_correct, mean_and_stderr
from mtp.evaluation.prompts import Prompt, pad_id, stop_token_ids, truncate_output
from mtp.io import append_records, read_complete_records
from mtp.io import atomic_write_json as write_json
from mtp.io import atomic_write_text as write_text
from mtp.progress import progress_bar

SAMPLES = "samples.jsonl"
CONFIG = "eval_config.json"
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------------ small helpers
def prompt_key(token_ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A cheap hash of every parameter (heads included: lossy strategies depend on them) and the config."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    h.update(json.dumps(getattr(model, "mtp_config", lambda: {})(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1).float()
        h.update(f"{float(flat.sum()):.8e}/{float(flat.abs().sum()):.8e}".encode())
    h.update(str(getattr(model, "quantized", None) or "none").encode())
    return h.hexdigest()[:16]


def strategy_tag(strategy: str, tau: float | None = None, k: int | None = None, tree: str | None = None,
                 tree_size: int | None = None, lookup: int = 0) -> str:
    """A short name of a decoding setting, as `mtp bench` names its rows: greedy, speculative,
    speculative-tree16-lookup6 (-dtreeN: a dynamic tree), confadapt-tau0.9, static-k2."""
    if strategy == "confadapt":
        return f"confadapt-tau{tau:g}"
    if strategy == "static":
        return f"static-k{k}" if k is not None else "static"
    tag = strategy
    if tree is not None or tree_size is not None:
        tag += f"-{'dtree' if tree == 'dynamic' else 'tree'}{tree_size or ''}"
    return tag + (f"-lookup{lookup}" if lookup else "")


def score(output: str, reference: str | None) -> dict:
    """Both extractions of an output and whether each equals the reference (None when not GSM8K)."""
    strict, flexible = extract_strict(output), extract_flexible(output)
    record = {"strict": strict, "flexible": flexible}
    if reference is not None:
        record["strict_correct"] = is_correct(strict, reference)
        record["flexible_correct"] = is_correct(flexible, reference)
    return record


# ------------------------------------------------------------------------------------------------ the JSONL
def read_samples(path: Path) -> list[dict]:
    """Every complete record of a samples file (a line cut off by an interruption, or foreign, is skipped)."""
    return [r for r in read_complete_records(path) if isinstance(r.get("id"), int) and "prompt_key" in r]


def _rewrite_samples(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------------------------------ generation
def decode_records(model, tokenizer, waiting: deque[Prompt], batch_size: int, write: Callable[[dict], None], *,
                   strategy: str, max_new_tokens: int, tau: float = 0.9, k: int | None = None,
                   num_draft: int | None = None, tree: str | None = None, tree_size: int | None = None,
                   lookup: int = 0, graphs: bool | None = None, stop_ids: list[int] | None = None,
                   stop_strings: list[str] | None = None, adaptive_draft: bool = True,
                   prefix: list[int] | None = None, lookup_corpus=None):
    """Decode the prompts `waiting` holds, taken from its left, as one batch of at most `batch_size` rows
    (left-padded) that the next ones join as its rows end (continuous batching, `mtp.decoding.generate.Admission`:
    greedy and speculative decoding with a chain or a fixed tree; a prompt that does not fit the batch's cache
    waits for the next batch). `write(record)` gets each row's record as soon as it ended: output text, tokens,
    forwards, and its `seconds`, the wall time since the record before it (their sum is the run's time). Returns
    when the batch ended, with its `GenerationStats`; the prompts it did not take stay in `waiting`. The decoding options are
    `mtp.decoding.generate.generate`'s (`prefix`: what the prompts start with, fed once: a few-shot prompt's
    examples)."""
    from mtp.decoding.queue import decode_queue
    from mtp.evaluation.gsm8k import STOP_SEQUENCES

    stop_strings = STOP_SEQUENCES if stop_strings is None else stop_strings
    forwards: dict[int, int] = {}  # per prompt (by identity): the forwards its row took part in

    def count(p: Prompt, new: list[int]) -> None:  # one call per forward a row takes part in
        forwards[id(p)] = forwards.get(id(p), 0) + 1

    last = [time.perf_counter()]

    def end(p: Prompt, tokens: list[int], scores, stats) -> None:
        now, n = time.perf_counter(), forwards.get(id(p), 0)
        text = truncate_output(tokenizer.decode(tokens, skip_special_tokens=True))
        write({"id": p.id, "prompt_key": prompt_key(p.token_ids), "reference": p.reference, "output": text,
               **score(text, p.reference), "prompt_tokens": len(p.token_ids), "new_tokens": len(tokens),
               "forward_passes": n, "tokens_per_forward": round(len(tokens) / max(n, 1), 4),
               "seconds": round(now - last[0], 4), "batch_rows": batch_size})
        last[0] = now

    return decode_queue(model, waiting, batch_size, end, ids_of=lambda p: p.token_ids, pad_id=pad_id(tokenizer),
                        max_new_tokens=max_new_tokens, streamer=count, strategy=strategy, tau=tau, k=k,
                        num_draft=num_draft, tree=tree, tree_size=tree_size, lookup=lookup, graphs=graphs,
                        lookup_corpus=lookup_corpus,
                        stop_token_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                        adaptive_draft=adaptive_draft, prefix=prefix).stats


# ------------------------------------------------------------------------------------------------ the run
def check_same_settings(output: str | Path, identity: dict, only: Collection[str] | None = None) -> None:
    """An evaluation in `output` (its eval_config.json) made with other settings than `identity` is an error:
    resuming it would mix answers of two settings. `only`: compare these keys alone (what `mtp eval` knows
    before the model loads; `run_eval` compares them all)."""
    config_path = Path(output).expanduser() / CONFIG
    if not config_path.is_file():
        return
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        raise MTPError(f"{config_path}: not valid JSON; remove it or pass --no-resume") from None
    if not isinstance(saved, dict):
        raise MTPError(f"{config_path}: not an evaluation's settings (a JSON object); remove it or pass --no-resume")
    keys = sorted(set(saved) | set(identity)) if only is None else sorted(only)
    diff = [f"{key} {saved.get(key)!r} -> {identity.get(key)!r}" for key in keys if saved.get(key) != identity.get(key)]
    if diff:
        raise MTPError(f"{Path(output).expanduser()} holds an evaluation with other settings ({'; '.join(diff)}); "
                       "choose another --output, or pass --no-resume to start it again")


def _answered_before(samples_path: Path, prompts: Sequence[Prompt]) -> dict[int, dict]:
    """The records of an earlier run (of the same settings) that answer `prompts` as they are now, by problem id;
    samples.jsonl rewritten without a torn last line or superseded records, ready to be appended to."""
    keys = {p.id: prompt_key(p.token_ids) for p in prompts}
    done: dict[int, dict] = {}
    kept = []
    for r in read_samples(samples_path):
        if isinstance(r.get("output"), str):  # scored again: a record an older mtp scored follows today's rule
            r.update(score(r["output"], r.get("reference")))
        if r["id"] in keys and (keys[r["id"]] != r["prompt_key"] or r["id"] in done):
            continue  # a problem whose text changed since (the data file edited): answered again
        if keys.get(r["id"]) == r["prompt_key"]:
            done[r["id"]] = r
        kept.append(r)  # (problems past this run's --limit stay, for a later run that asks for them)
    _rewrite_samples(samples_path, kept)
    return done


def run_eval(model, tokenizer, prompts: Sequence[Prompt], output: str | Path, identity: dict, *,
             strategy: str = "greedy", tau: float = 0.9, k: int | None = None, num_draft: int | None = None,
             tree: str | None = None, tree_size: int | None = None, lookup: int = 0, graphs: bool | None = None,
             max_new_tokens: int = 256, batch_size: int = 8, resume: bool = True, progress: bool = True,
             runtime: dict | None = None, adaptive_draft: bool = True, lookup_corpus=None) -> dict:
    """Evaluate `prompts` into the folder `output`; returns the summary (also written to summary.json).

    `identity` describes what the run computes (model, strategy, prompt format...); with `resume`, an existing
    folder made with the same identity continues where it stopped, one made with another identity is an error.
    `runtime`: where this run decodes (`mtp.runtime.Runtime.to_dict`), recorded in the summary. The decoding
    options are `mtp.decoding.generate.generate`'s (`lookup_corpus` too: drafts only, the same answers).
    """
    if batch_size < 1:
        raise MTPError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise MTPError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise MTPError("nothing to evaluate: no prompts")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise MTPError(f"--output {out} is a file, not a folder")
    samples_path, config_path = out / SAMPLES, out / CONFIG
    done: dict[int, dict] = {}
    if resume and config_path.is_file():
        check_same_settings(out, identity)
        done = _answered_before(samples_path, prompts)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in (SAMPLES, SUMMARY):
            (out / name).unlink(missing_ok=True)
    write_json(config_path, identity)

    stop_ids = stop_token_ids(model, tokenizer)
    todo = [p for p in prompts if p.id not in done]
    if done and todo:
        print(f"mtp eval: resuming {out}: {len(prompts) - len(todo)} of {len(prompts)} problems already done",
              flush=True)
    tag = strategy_tag(strategy, tau, k, tree, tree_size, lookup)  # (--no-progress: a line every 5 minutes)
    bar = progress_bar(progress, len(prompts), f"gsm8k {tag}", "problem", initial=len(prompts) - len(todo))
    start = time.perf_counter()
    waiting = deque(todo)
    steps = {"forward_passes": 0, "plain_steps": 0}  # this run's batches' forwards, and the gate's plain steps
    prefix = common_prefix([p.token_ids for p in todo])  # (8-shot: the examples, ~830 of ~900 tokens, fed once)
    try:
        with samples_path.open("a", encoding="utf-8") as f:

            def write(record: dict) -> None:
                append_records(f, [record])
                done[record["id"]] = record
                correct = sum(bool(r.get("flexible_correct")) for r in done.values())
                bar.set_postfix_str(f"flexible={correct}/{len(done)}")
                bar.update(1)

            while waiting:  # (one batch, unless the strategy or a long prompt keeps some for the next)
                stats = decode_records(model, tokenizer, waiting, batch_size, write, strategy=strategy,
                                       max_new_tokens=max_new_tokens, tau=tau, k=k, num_draft=num_draft, tree=tree,
                                       tree_size=tree_size, lookup=lookup, graphs=graphs, stop_ids=stop_ids,
                                       adaptive_draft=adaptive_draft, prefix=prefix, lookup_corpus=lookup_corpus)
                steps["forward_passes"] += stats.forward_passes
                steps["plain_steps"] += stats.plain_steps
    except KeyboardInterrupt:
        bar.close()
        print(f"mtp eval: interrupted; {len(done)} of {len(prompts)} problems are kept in {samples_path}: the same "
              "command goes on from them", file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()
    ordered = [done[p.id] for p in prompts]
    summary = summarize(ordered)
    summary.update({"wall_seconds_this_run": round(time.perf_counter() - start, 2), "steps_this_run": steps,
                    "output": str(out),
                    "samples": str(samples_path), "settings": identity, "runtime": runtime})
    write_json(out / SUMMARY, summary)
    return summary


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy (strict, flexible) with standard errors, and the speed figures, over per-sample records."""
    if not records:
        raise MTPError("no results to summarise")
    summary: dict = {"n": len(records)}
    if all(r.get("reference") is not None for r in records):
        for name in ("strict", "flexible"):
            mean, stderr = mean_and_stderr([bool(r[f"{name}_correct"]) for r in records])
            summary[name] = {"accuracy": round(mean, 4), "stderr": round(stderr, 4),
                             "correct": sum(bool(r[f"{name}_correct"]) for r in records)}
    tokens = sum(r["new_tokens"] for r in records)
    forwards = sum(r["forward_passes"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    summary.update({"new_tokens": tokens, "forward_passes": forwards,
                    "tokens_per_forward": round(tokens / forwards, 4) if forwards else 0.0,
                    "generation_seconds": round(seconds, 2),
                    "tokens_per_second": round(tokens / seconds, 3) if seconds > 0 else 0.0,
                    "seconds_per_sample": round(seconds / len(records), 3)})
    return summary


def format_summary(summary: dict, title: str) -> str:
    """The summary as a small two-column table."""
    rows = []
    for name, label in (("strict", "strict-match"), ("flexible", "flexible-extract")):
        if name in summary:
            m = summary[name]
            rows.append((f"accuracy {label}", f"{m['accuracy']:.4f} ± {m['stderr']:.4f}  "
                                              f"({m['correct']}/{summary['n']})"))
    rows += [("tokens per forward", f"{summary['tokens_per_forward']:.3f}")]
    steps = summary.get("steps_this_run") or {}
    if steps.get("plain_steps"):  # (speculative: steps the gate ran without drafts: verify blocks did not pay)
        rows.append(("plain steps", f"{steps['plain_steps']} of {steps['forward_passes']} forwards (drafts did not "
                                    "pay on this machine)"))
    rows += [("tokens/s", f"{summary['tokens_per_second']:.2f}"),
             ("s/sample", f"{summary['seconds_per_sample']:.2f}"),
             ("new tokens", f"{summary['new_tokens']}"),
             ("problems", f"{summary['n']}")]
    width = max(len(r[0]) for r in rows)
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
