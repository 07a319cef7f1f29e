"""The report of `mtp bench` (`mtp.evaluation.bench` runs the calls): per-method figures, the tables, the markdown
and the files.

Per method, besides the speeds and the quality figures the bench's schedule is for (`mtp.evaluation.bench`):
ms a decoding step (median over prompts of the call's time after its first token over its
forwards after the prefill: greedy's step, or a speculative method's draft-and-verify step), beside the
weight-streaming floor of its model (the bytes of weights a step reads over the memory bandwidth, measured with
a large copy on the device or given), and on a GPU the peak of allocated memory (the model's weights plus the
largest allocation above them during a call). Batch rows (`--batch-sizes`): greedy and the fastest lossless
speculative method decode the prompts in batches of each size; their total new tokens over total seconds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mtp.errors import MTPError
from mtp.evaluation.bench import BenchRun, Method, rounded
from mtp.evaluation.evaluate import score, write_json, write_text
from mtp.evaluation.gsm8k import mean_and_stderr
from mtp.evaluation.plots import HF_GREEDY, OUR_GREEDY, plot_speed_accuracy
from mtp.evaluation.prompts import truncate_output
from mtp.io import unused_path
from mtp.runtime import CONTENDED, MB, describe_runtime


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


def median_or_none(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def build_report(run: BenchRun, tokenizer, *, settings: dict | None = None, notes: Sequence[str] = (),
                 runtime: dict | None = None, bandwidth: dict | None = None) -> dict:
    """Per-method figures (see the module docstring) and every call, as a JSON-able dict. `runtime`: where the
    bench ran (`mtp.runtime.Runtime.to_dict`); `bandwidth`: {"bytes_per_second", "source"} for the floors."""
    calls: dict[tuple[str, int], dict] = {(c["method"], c["prompt"]): c for c in run.calls}
    texts = {key: truncate_output(tokenizer.decode(c["tokens"], skip_special_tokens=True))
             for key, c in calls.items()}
    scored = all(p.reference is not None for p in run.prompts)
    rows = []
    for m in run.methods:
        mine = [calls[(m.name, p)] for p in range(len(run.prompts))]
        row = {"method": m.name, "engine": m.engine, "description": m.description, "prompts": len(run.prompts),
               **_speed_figures(mine), **_step_figures(m, mine, bandwidth), **_comparisons(m, run, calls)}
        if scored:
            for name in ("strict", "flexible"):
                flags = [bool(score(texts[(m.name, p)], prompt.reference)[f"{name}_correct"])
                         for p, prompt in enumerate(run.prompts)]
                mean, stderr = mean_and_stderr(flags)
                row[f"accuracy_{name}"] = rounded(mean, 4)
                row[f"accuracy_{name}_stderr"] = rounded(stderr, 4)
        rows.append(row)
    call_records = []
    for i, c in enumerate(run.calls):
        record = {"order": i, "prompt": c["prompt"], "prompt_id": run.prompts[c["prompt"]].id,
                  "method": c["method"], "new_tokens": len(c["tokens"]), "seconds": round(c["seconds"], 4),
                  "first_token_seconds": rounded(c["first_token_seconds"], 4),
                  "forward_passes": c["forward_passes"], "core_wait": c.get("core_wait"), "tokens": c["tokens"],
                  "output": texts[(c["method"], c["prompt"])]}
        if run.prompts[c["prompt"]].reference is not None:
            record.update(score(record["output"], run.prompts[c["prompt"]].reference))
        call_records.append(record)
    machine, notes = machine_info(), list(notes)
    waits = [c["core_wait"] for c in run.calls if c.get("core_wait") is not None]
    if waits:  # (this process's threads; llama.cpp in a process of its own is not counted)
        machine["core_wait_median_max"] = [rounded(statistics.median(waits), 4), rounded(max(waits), 4)]
        slowed = sorted({c["method"] for c in run.calls if (c.get("core_wait") or 0) >= CONTENDED})
        if slowed:
            notes.append(f"other processes took this process's CPU cores during calls of {', '.join(slowed)} (its "
                         f"threads waited for a core up to {max(waits):.0%} of a call): those calls ran slower than "
                         "this machine runs them alone; bench on a quiet machine")
    return {"settings": dict(settings or {}), "machine": machine, "runtime": runtime, "bandwidth": bandwidth,
            "notes": notes, "gsm8k_scored": scored, "methods": rows, "calls": call_records,
            "warmup_seconds": dict(run.warmup_seconds),
            "prompts": [{"index": i, "id": p.id, "prompt_tokens": len(p.token_ids), "reference": p.reference}
                        for i, p in enumerate(run.prompts)]}


def _rate(call: dict) -> float:
    return len(call["tokens"]) / call["seconds"] if call["seconds"] > 0 else 0.0


def _speed_figures(calls: Sequence[dict]) -> dict:
    """A method's speed over its calls (one per prompt): medians of tokens/s, of the time to the first token and
    of the tokens/s after it; tokens per forward over all calls (None where a method counts no forwards)."""
    decode = [(len(c["tokens"]) - 1) / (c["seconds"] - c["first_token_seconds"]) for c in calls
              if c["first_token_seconds"] is not None and len(c["tokens"]) > 1
              and c["seconds"] > c["first_token_seconds"]]
    forwards = [c["forward_passes"] for c in calls]
    per_forward = None
    if all(f is not None for f in forwards) and sum(forwards):
        per_forward = rounded(sum(len(c["tokens"]) for c in calls) / sum(forwards))
    return {"tokens_per_second": rounded(median_or_none([_rate(c) for c in calls])),
            "new_tokens_mean": rounded(statistics.fmean(len(c["tokens"]) for c in calls), 2),
            "seconds_total": rounded(sum(c["seconds"] for c in calls)),
            "first_token_seconds_median": rounded(median_or_none([c["first_token_seconds"] for c in calls
                                                         if c["first_token_seconds"] is not None])),
            "decode_tokens_per_second": rounded(median_or_none(decode)), "tokens_per_forward": per_forward}


def _comparisons(method: Method, run: BenchRun, calls: dict[tuple[str, int], dict]) -> dict:
    """A method against the greedy rows, prompt by prompt: median speed-ups, outputs equal (to our greedy, to
    transformers' greedy, to its lossless reference) and how much of our greedy output it reproduces (quality
    where accuracy cannot tell methods apart). None where the bench has no such row."""
    names = [m.name for m in run.methods]
    prompts = range(len(run.prompts))
    mine = [calls[(method.name, p)] for p in prompts]
    row: dict = {}
    for base, key in ((HF_GREEDY, "speedup_vs_hf_greedy"), (OUR_GREEDY, "speedup_vs_greedy")):
        ratios = [_rate(c) / _rate(calls[(base, p)]) for p, c in zip(prompts, mine, strict=True)
                  if _rate(calls[(base, p)]) > 0] if base in names else None
        row[key] = None if ratios is None else rounded(median_or_none(ratios))
    for base, key in ((OUR_GREEDY, "equal_to_greedy"), (HF_GREEDY, "equal_to_hf_greedy")):
        row[key] = sum(c["tokens"] == calls[(base, p)]["tokens"] for p, c in zip(prompts, mine, strict=True)) \
            if base in names else None
    row["agreement_with_greedy"] = row["position_agreement_with_greedy"] = None
    if OUR_GREEDY in names:
        prefix, positional = agreement([(c["tokens"], calls[(OUR_GREEDY, p)]["tokens"])
                                        for p, c in zip(prompts, mine, strict=True)])
        row["agreement_with_greedy"] = rounded(prefix, 4)
        row["position_agreement_with_greedy"] = rounded(positional, 4)
    if method.lossless_reference in names:
        row["lossless_reference"] = method.lossless_reference
        row["equal_to_lossless_reference"] = sum(c["tokens"] == calls[(method.lossless_reference, p)]["tokens"]
                                                 for p, c in zip(prompts, mine, strict=True))
    return row


def _step_figures(method: Method, calls: Sequence[dict], bandwidth: dict | None) -> dict:
    """ms a decoding step (median over the calls of the time after the first token over the forwards after the
    prefill), the weight-streaming floor of the method's model, and its peak GPU memory (weights + the largest
    allocation above them in a call; None on the CPU)."""
    steps = [1000 * (c["seconds"] - c["first_token_seconds"]) / (c["forward_passes"] - 1) for c in calls
             if c["first_token_seconds"] is not None and (c["forward_passes"] or 0) > 1
             and c["seconds"] > c["first_token_seconds"]]
    peaks = [c["peak_memory_bytes"] for c in calls if c.get("peak_memory_bytes") is not None]
    floor = None
    if bandwidth is not None and method.streamed_bytes is not None:
        floor = 1000 * method.streamed_bytes / bandwidth["bytes_per_second"]
    # The floor to 3 significant digits: a small model's is a few microseconds (rounded to places it was 0).
    return {"ms_per_step": rounded(median_or_none(steps)), "floor_ms": float(f"{floor:.3g}") if floor is not None else None,
            "peak_memory_mb": rounded((method.weight_bytes + max(peaks)) / MB, 1)
            if peaks and method.weight_bytes is not None else None}


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
    # ms a step, the weight-streaming floor, GPU memory: where any row has them
    for r in report["methods"]:  # (reports written before the column have the seconds only)
        r.setdefault("first_token_ms", None if r.get("first_token_seconds_median") is None
                     else 1000 * r["first_token_seconds_median"])
    extra = [(key, label, spec) for key, label, spec in (("first_token_ms", "ms to 1st token", ".1f"),
                                                         ("ms_per_step", "ms/step", ".2f"),
                                                         ("floor_ms", "floor ms", ".3f"),
                                                         ("peak_memory_mb", "peak MB", ",.0f"))
             if any(r.get(key) is not None for r in report["methods"])]
    if scored:
        head += ["GSM8K flexible", "GSM8K strict"]
    head += [label for _, label, _ in extra]
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
        cells += [_fmt(r.get(key), spec) for key, _, spec in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_batch_table(report: dict) -> str:
    """The batch rows (`run_batch_rows`) in Markdown; "" without them."""
    rows = report.get("batch_rows") or []
    if not rows:
        return ""
    memory = any(r["peak_memory_mb"] is not None for r in rows)
    head = ["batch", "method", "prompts", "tokens/s (total)", "tokens/forward", "ms/forward", "= greedy",
            "plain steps"]
    head += ["peak MB"] if memory else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [str(r["batch_size"]), r["method"], str(r["prompts"]), _fmt(r["tokens_per_second"], ".1f"),
                 _fmt(r["tokens_per_forward"], ".2f"), _fmt(r["ms_per_forward"], ".2f"),
                 f"{r['equal_to_greedy']}/{r['prompts']}", _fmt(100 * (r.get("plain_step_share") or 0), ".0f") + "%"]
        cells += [_fmt(r["peak_memory_mb"], ",.0f")] if memory else []
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
                               "CPUs" if mc.get("load_average_1_5_15min") else "")
            + (f"; threads waited for a core {mc['core_wait_median_max'][0]:.1%} of a call (median), at most "
               f"{mc['core_wait_median_max'][1]:.1%}" if mc.get("core_wait_median_max") else "")]
    if report.get("runtime"):
        desc.append(f"device: {describe_runtime(report['runtime'])}")
    if report.get("bandwidth"):
        desc.append(f"memory bandwidth: {report['bandwidth']['bytes_per_second'] / 1e9:,.1f} GB/s "
                    f"({report['bandwidth']['source']})")
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
    parts.append("ms to 1st token: median over prompts of the time from the call to its first new token (the "
                 "prompt's forward and the call's setup). "
                 "ms/step: median over prompts of the call's time after its first token / its forwards after the "
                 "prefill (greedy: one token's step; speculative: drafting and verifying). floor ms: the bytes "
                 "of weights a step reads / the memory bandwidth, the least a step streaming its weights can "
                 "take. peak MB (GPU): the model's weights + the largest allocation above them during a call.")
    if report.get("batch_rows"):
        parts += ["", "Batches: greedy and the fastest lossless speculative row on left-padded batches of each "
                      "size (whole batches of at least as many prompts as the table; the two alternate batch by "
                      "batch after an untimed warm-up batch). tokens/s: all new tokens / all seconds; tokens/"
                      "forward: per row; ms/forward: seconds / batched forwards (prefill included); plain steps: "
                      "the speculative row's steps that verified no drafts, plain steps being faster there.", "",
                  format_batch_table(report)]
    if report.get("notes"):
        parts += [""] + [f"Note: {note}" for note in report["notes"]]
    warmups = {name: s for name, s in (report.get("warmup_seconds") or {}).items() if s >= 1}
    if warmups:  # what compiling and capturing cost before the timed calls (`--graphs compile`: tens of seconds)
        parts += ["", "Untimed warm-ups (graph captures, compiling): "
                  + ", ".join(f"{name} {s:.0f} s" for name, s in warmups.items()) + "."]
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
    _set_aside_another_models(out, paths, report["settings"].get("model"))
    write_json(paths["json"], report)
    write_text(paths["markdown"], format_markdown(report, paths["plot"].name))
    plot_speed_accuracy(report, paths["plot"])
    return paths


def _set_aside_another_models(out: Path, paths: dict[str, Path], model: object) -> None:
    """A report of another model in `out` (the default bench/ of an earlier bench) is moved into a folder of its
    own, `out/earlier` (then earlier-2, ...), not replaced: a re-run of the same model replaces its own."""
    try:
        earlier = json.loads(paths["json"].read_text(encoding="utf-8"))["settings"]["model"]
    except (OSError, ValueError, TypeError, KeyError):  # (none, or not a report of ours: replaced as before)
        return
    if earlier == model:
        return
    aside = unused_path(out / "earlier")
    aside.mkdir()
    for path in paths.values():
        if path.is_file():
            os.replace(path, aside / path.name)
    print(f"mtp bench: {out} held the report of another model ({earlier}): moved to {aside}", file=sys.stderr)
