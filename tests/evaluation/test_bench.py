"""`mtp bench`: the interleaved schedule, the report's figures, the files it writes, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import make_model

from conftest import tiny_mtp
from mtp.errors import MTPError
from mtp.evaluation.bench import (
    BenchRun,
    CallResult,
    Method,
    build_methods,
    llamacpp_installed,
    mtp_method,
    run_bench,
    schedule,
)
from mtp.evaluation.bench_report import agreement, build_report, format_markdown, format_table, write_report
from mtp.evaluation.commands import bench
from mtp.evaluation.prompts import Prompt, file_prompts, gsm8k_prompts

PNG = b"\x89PNG\r\n\x1a\n"

pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_is_prompt_major_and_rotates():
    order = schedule(4, ["a", "b", "c"])
    assert order == [(0, "a"), (0, "b"), (0, "c"),
                     (1, "b"), (1, "c"), (1, "a"),
                     (2, "c"), (2, "a"), (2, "b"),
                     (3, "a"), (3, "b"), (3, "c")]
    assert schedule(2, ["a", "b"], rotate=False) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    # every (prompt, method) pair exactly once
    assert sorted(schedule(5, list("abcd"))) == sorted((p, m) for p in range(5) for m in "abcd")


def _fake(name, engine, log, tokens_of):
    def run(prompt, max_new_tokens):
        log.append((prompt.id, name, max_new_tokens))
        return CallResult(tokens_of(prompt), seconds=1.0, first_token_seconds=0.1, forward_passes=2)
    return Method(name, engine, run)


def test_run_bench_interleaves_calls_after_one_warmup_per_engine():
    log: list = []
    methods = [_fake("hf-greedy", "transformers", log, lambda p: [1, 2]),
               _fake("greedy", "mtp", log, lambda p: [1, 2]),
               _fake("speculative", "mtp", log, lambda p: [1, 2])]
    prompts = [Prompt(i, f"q{i}", [5, 6]) for i in range(3)]
    run = run_bench(methods, prompts, max_new_tokens=16, progress=False)
    warm, timed = log[:2], log[2:]
    assert warm == [(0, "hf-greedy", 4), (0, "greedy", 4)]  # one short untimed call per engine
    assert [(p, m) for p, m, _ in timed] == [(prompts[p].id, m) for p, m in schedule(3, [m.name for m in methods])]
    assert [(c["prompt"], c["method"]) for c in run.calls] == schedule(3, [m.name for m in methods])
    with pytest.raises(MTPError, match="unique"):
        run_bench(methods + methods[:1], prompts, 4, progress=False)
    with pytest.raises(MTPError, match="no prompts"):
        run_bench(methods, [], 4, progress=False)


def test_methods_with_a_warmup_of_their_own_warm_up_each(tmp_path):
    """Replaying CUDA graphs, each mtp method captures its own steps: every method with a warm-up runs it (the
    engine's short call is then not needed); an engine whose first method has none gets the short call."""
    log: list = []
    methods = [_fake("hf-greedy", "transformers", log, lambda p: [1, 2]),
               _fake("greedy", "mtp", log, lambda p: [1, 2]), _fake("speculative", "mtp", log, lambda p: [1, 2])]
    for m in methods[1:]:
        m.warmup = lambda prompts, n, m=m: log.append(("warm-up", m.name, len(prompts), n))
    prompts = [Prompt(i, f"q{i}", [5, 6]) for i in range(3)]
    run_bench(methods, prompts, max_new_tokens=16, progress=False)
    assert log[:3] == [(0, "hf-greedy", 4), ("warm-up", "greedy", 3, 16), ("warm-up", "speculative", 3, 16)]
    assert len(log) == 3 + 9


def test_the_report_says_what_each_methods_warm_up_took(monkeypatch, tiny_tokenizer):
    """A method's own warm-up (a compiled step: tens of seconds) is untimed; the report gives its seconds, and the
    markdown names those of a second or more."""
    import mtp.evaluation.bench as bench_module

    now = [0.0]
    monkeypatch.setattr(bench_module.time, "perf_counter", lambda: now[0])
    log: list = []
    methods = [_fake("greedy", "mtp", log, lambda p: [1, 2]), _fake("speculative", "mtp", log, lambda p: [1, 2])]
    methods[0].warmup = lambda prompts, n: now.__setitem__(0, now[0] + 0.2)
    methods[1].warmup = lambda prompts, n: now.__setitem__(0, now[0] + 42.0)
    run = run_bench(methods, [Prompt(0, "q0", [5, 6])], max_new_tokens=4, progress=False)
    report = build_report(run, tiny_tokenizer, settings={"max_new_tokens": 4})
    assert report["warmup_seconds"] == {"greedy": 0.2, "speculative": 42.0}
    assert "Untimed warm-ups (graph captures, compiling): speculative 42 s." in format_markdown(report)


def test_mtp_rows_capture_their_steps_before_the_timed_calls_only_where_they_replay(monkeypatch):
    model = tiny_mtp("llama", num_heads=2, seed=1, vocab_size=40)
    assert mtp_method(model, None, "greedy", "greedy", stop_ids=[]).warmup is None  # a CPU: nothing is captured
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))  # as on a GPU
    assert mtp_method(model, None, "greedy", "greedy", stop_ids=[]).warmup is not None
    assert mtp_method(model, None, "greedy", "greedy", stop_ids=[], graphs=False).warmup is None  # eager steps


def test_the_warm_up_captures_one_prompt_of_each_padded_width():
    """Replaying, a prompt's step is captured per prompt width padded to PROMPT_BUCKET (which also sets the cache
    size): the warm-up decodes one prompt of each such width, so no timed call captures."""
    from mtp.decoding.generate import PROMPT_BUCKET
    from mtp.evaluation.bench import prompts_to_capture

    lengths = [3, PROMPT_BUCKET, PROMPT_BUCKET + 1, 2 * PROMPT_BUCKET - 5, 7, 3 * PROMPT_BUCKET]
    prompts = [Prompt(i, f"q{i}", [1] * n) for i, n in enumerate(lengths)]
    assert [p.id for p in prompts_to_capture(prompts)] == [0, 2, 5]


def test_an_interrupted_bench_resumes_from_its_journal(tmp_path):
    log: list = []
    methods = [_fake("hf-greedy", "transformers", log, lambda p: [1, 2]),
               _fake("greedy", "mtp", log, lambda p: [3, p.id])]
    prompts = [Prompt(i, f"q{i}", [5, i]) for i in range(3)]
    order = schedule(3, ["hf-greedy", "greedy"])
    journal = tmp_path / "calls.jsonl"
    real = methods[1].run

    def dies_on_its_second_timed_call(prompt, max_new_tokens):
        if max_new_tokens == 16 and sum(1 for _, m, n in log if m == "greedy" and n == 16) == 1:
            raise KeyboardInterrupt
        return real(prompt, max_new_tokens)

    methods[1].run = dies_on_its_second_timed_call
    with pytest.raises(KeyboardInterrupt):
        run_bench(methods, prompts, 16, progress=False, journal=journal, identity={"model": "a"})
    finished = [(r["prompt"], r["method"]) for r in map(json.loads, journal.read_text().splitlines())]
    assert finished == order[:2]  # (0, hf-greedy), (0, greedy); (1, greedy) was killed
    with journal.open("a") as f:
        f.write('{"prompt": 2, "method": "gre')  # a line cut off by the kill
    methods[1].run = real
    log.clear()
    run = run_bench(methods, prompts, 16, progress=False, journal=journal, identity={"model": "a"})
    assert [(p, m) for p, m, n in log if n == 16] == order[2:]  # prompt ids are their indices here
    assert [(c["prompt"], c["method"]) for c in run.calls] == order
    assert [c["tokens"] for c in run.calls if c["method"] == "greedy"] == [[3, 0], [3, 1], [3, 2]]
    assert len(journal.read_text().splitlines()) == len(order)
    log.clear()
    run_bench(methods, prompts, 16, progress=False, journal=journal, identity={"model": "b"})  # another model
    assert len([1 for _, _, n in log if n == 16]) == len(order)  # nothing reused


# ------------------------------------------------------------------------------------------------ report figures
class _Tok:
    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens)


def _call(p, method, tokens, seconds, forwards):
    return {"prompt": p, "method": method, "tokens": tokens, "seconds": seconds, "first_token_seconds": 0.5,
            "forward_passes": forwards}


def test_report_figures_by_hand():
    prompts = [Prompt(0, "q0", [1], reference="7"), Prompt(1, "q1", [1], reference="8")]
    methods = [Method("hf-greedy", "transformers", None), Method("greedy", "mtp", None),
               Method("speculative", "mtp", None, lossless_reference="greedy"),
               Method("static-k2", "mtp", None)]
    calls = [
        # prompt 0: 4 tokens each; hf 2 s, ours 1 s, spec 0.5 s, static 0.25 s
        _call(0, "hf-greedy", [1, 2, 3, 7], 2.0, 4), _call(0, "greedy", [1, 2, 3, 7], 1.0, 4),
        _call(0, "speculative", [1, 2, 3, 7], 0.5, 2), _call(0, "static-k2", [1, 2, 3, 9], 0.25, 2),
        # prompt 1: hf differs from ours; spec equal to ours
        _call(1, "hf-greedy", [8, 1], 1.0, 2), _call(1, "greedy", [8, 2], 1.0, 2),
        _call(1, "speculative", [8, 2], 0.5, 1), _call(1, "static-k2", [8, 2, 8], 0.5, 2),
    ]
    report = build_report(BenchRun(methods, prompts, calls), _Tok(), settings={"model": "m", "max_new_tokens": 4})
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["hf-greedy"]["tokens_per_second"] == 2.0  # median of 2 and 2
    assert rows["greedy"]["tokens_per_second"] == 3.0  # median of 4 and 2
    assert rows["greedy"]["speedup_vs_hf_greedy"] == 1.5  # median of 2.0 and 1.0
    assert rows["speculative"]["speedup_vs_greedy"] == 2.0
    assert rows["static-k2"]["speedup_vs_greedy"] == 3.5  # median of 4 and 3
    assert rows["speculative"]["tokens_per_forward"] == 2.0  # 6 tokens / 3 forwards
    assert rows["greedy"]["tokens_per_forward"] == 1.0
    assert rows["speculative"]["equal_to_greedy"] == 2 and rows["speculative"]["equal_to_hf_greedy"] == 1
    assert rows["speculative"]["equal_to_lossless_reference"] == 2
    assert rows["static-k2"]["equal_to_greedy"] == 0
    # flexible takes the last number: "1 2 3 7" -> 7 (right), "8 2" -> 2 (wrong); static: 9 and 8
    assert rows["greedy"]["accuracy_flexible"] == 0.5 and rows["static-k2"]["accuracy_flexible"] == 0.5
    assert rows["hf-greedy"]["accuracy_flexible"] == 0.5
    assert rows["greedy"]["decode_tokens_per_second"] == 4.0  # median of 3/0.5 and 1/0.5
    assert [c["order"] for c in report["calls"]] == list(range(8))
    table = format_table(report)
    assert table.splitlines()[0].startswith("| method | tokens/s | speedup vs HF greedy")
    assert "| speculative | 6.0 | 3.00x | 2.00x | 2.00 | 2/2 | 100% | 1/2 | 50% ± 50 | 0% ± 0 |" in table
    # agreement with our greedy, token-weighted: static-k2 keeps 3 of 4 tokens, then 2 of 3 (it runs on)
    assert rows["static-k2"]["agreement_with_greedy"] == round(5 / 7, 4)
    assert rows["hf-greedy"]["agreement_with_greedy"] == round(5 / 6, 4)  # [8, 1] against [8, 2]
    assert rows["greedy"]["agreement_with_greedy"] == 1.0 and rows["speculative"]["agreement_with_greedy"] == 1.0
    assert "| static-k2 | 11.0 | 5.50x | 3.50x | 1.75 | 0/2 | 71% | 0/2 |" in table


def test_calls_that_other_processes_slowed_are_named():
    """Each call records how long this process's threads waited for a core (`CoreWait`); the report gives the
    median and the largest share beside the machine, and a note naming the methods of calls that waited
    CONTENDED or more (those timings are the machine's under load, not its own)."""
    prompts = [Prompt(0, "q0", [1]), Prompt(1, "q1", [1])]
    methods = [Method("greedy", "mtp", None), Method("speculative", "mtp", None, lossless_reference="greedy")]
    calls = [_call(0, "greedy", [1, 2], 1.0, 2), _call(0, "speculative", [1, 2], 0.5, 1),
             _call(1, "greedy", [1, 2], 1.0, 2), _call(1, "speculative", [1, 2], 0.5, 1)]
    for call, wait in zip(calls, [0.01, 0.02, 0.03, 0.35], strict=True):
        call["core_wait"] = wait
    report = build_report(BenchRun(methods, prompts, calls), _Tok(), settings={"max_new_tokens": 2})
    assert report["machine"]["core_wait_median_max"] == [0.025, 0.35]
    assert [c["core_wait"] for c in report["calls"]] == [0.01, 0.02, 0.03, 0.35]
    assert any(n.startswith("other processes took this process's CPU cores during calls of speculative (its "
                            "threads waited for a core up to 35% of a call)") for n in report["notes"])
    assert "threads waited for a core 2.5% of a call (median), at most 35.0%" in format_markdown(report, None)
    for call in calls:
        call["core_wait"] = 0.01
    quiet = build_report(BenchRun(methods, prompts, calls), _Tok(), settings={"max_new_tokens": 2})
    assert not any("other processes" in n for n in quiet["notes"])


def test_agreement_by_hand():
    assert agreement([([1, 2, 3], [1, 2, 3])]) == (1.0, 1.0)
    assert agreement([([1, 9, 3, 4], [1, 2, 3, 4])]) == (0.25, 0.75)  # positional counts the re-synchronised tail
    assert agreement([([1, 2], [1, 2, 3, 4])]) == (0.5, 0.5)  # stopped early
    assert agreement([([1, 2, 3, 4, 5, 6], [1, 2, 3, 4])]) == (4 / 6, 4 / 6)  # ran on past the reference's end
    assert agreement([([5], [6, 7, 8])]) == (0.0, 0.0)
    assert agreement([([1, 2], [1, 2]), ([5], [6, 7, 8])]) == (0.4, 0.4)  # weighted by tokens, not by prompts
    assert agreement([([], [])]) == (1.0, 1.0) and agreement([([], [1])]) == (0.0, 0.0)


def _plotted(report, tmp_path, monkeypatch):
    """(x label, x of every point) of the speed-accuracy plot drawn for `report`."""
    import matplotlib.axes

    from mtp.evaluation.plots import plot_speed_accuracy

    seen = {"xs": []}
    scatter, set_xlabel = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.set_xlabel

    def spy_scatter(self, x, y, *args, **kwargs):
        seen["xs"] += list(x)
        return scatter(self, x, y, *args, **kwargs)

    def spy_xlabel(self, label, *args, **kwargs):
        seen["label"] = label
        return set_xlabel(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy_scatter)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", spy_xlabel)
    assert plot_speed_accuracy(report, tmp_path / "p.png").read_bytes()[:8] == PNG
    return seen["label"], seen["xs"]


def test_plot_uses_agreement_when_every_accuracy_is_zero(tmp_path, monkeypatch):
    from mtp.evaluation.plots import quality_axis

    def row(name, accuracy, agreement_):
        return {"method": name, "engine": "mtp", "prompts": 2, "speedup_vs_greedy": 1.5,
                "accuracy_flexible": accuracy, "agreement_with_greedy": agreement_, "equal_to_greedy": 0}

    flat = {"gsm8k_scored": True, "methods": [row("greedy", 0.0, 1.0), row("static-k2", 0.0, 0.25)]}
    assert quality_axis(flat)[0] == "agreement_with_greedy"
    label, xs = _plotted(flat, tmp_path, monkeypatch)
    assert "greedy output" in label and "0% for every method" in label and xs == [100.0, 25.0]
    scored = {"gsm8k_scored": True, "methods": [row("greedy", 0.5, 1.0), row("static-k2", 0.0, 0.25)]}
    assert quality_axis(scored)[0] == "accuracy_flexible"
    label, xs = _plotted(scored, tmp_path, monkeypatch)
    assert label.startswith("GSM8K accuracy") and xs[-2:] == [50.0, 0.0]
    free = {"gsm8k_scored": False, "methods": [row("greedy", None, 1.0), row("static-k2", None, 0.5)]}
    assert quality_axis(free)[0] == "agreement_with_greedy"


# ------------------------------------------------------------------------------------------------ on a tiny model
def test_bench_command_on_tiny_model(tiny_model_dir, gsm8k_file, tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench(model=str(tiny_model_dir), prompts=str(gsm8k_file), limit=2, max_new_tokens=5, output=str(out),
                 shots=1, tau=[0.5], int8=True, progress=False)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"settings", "machine", "notes", "methods", "calls", "prompts", "gsm8k_scored"}
    assert report["runtime"] == {"device": "cpu", "gpu": None, "dtype": "float32"}
    assert report["bandwidth"]["bytes_per_second"] > 0 and "measured" in report["bandwidth"]["source"]
    names = [r["method"] for r in report["methods"]]
    assert names == ["hf-greedy", "hf-prompt-lookup", "greedy", "speculative", "confadapt-tau0.5", "static-k2",
                     "static-k3", "greedy-fp16", "speculative-fp16", "greedy-int8", "speculative-int8"]
    assert report["gsm8k_scored"] is True
    row_keys = {"tokens_per_second", "speedup_vs_hf_greedy", "speedup_vs_greedy", "tokens_per_forward",
                "equal_to_greedy", "equal_to_hf_greedy", "accuracy_flexible", "accuracy_strict",
                "accuracy_flexible_stderr", "accuracy_strict_stderr", "decode_tokens_per_second"}
    rows = {r["method"]: r for r in report["methods"]}
    for r in report["methods"]:
        assert row_keys <= set(r)
    # lossless methods reproduce their greedy reference token for token
    assert rows["speculative"]["equal_to_greedy"] == 2
    assert rows["speculative-fp16"]["equal_to_lossless_reference"] == 2
    assert rows["speculative-int8"]["equal_to_lossless_reference"] == 2
    assert rows["hf-prompt-lookup"]["equal_to_hf_greedy"] == 2
    assert rows["hf-greedy"]["equal_to_greedy"] == 2  # transformers and our engine agree on the same weights
    assert rows["greedy"]["tokens_per_forward"] == 1.0 and rows["hf-greedy"]["tokens_per_forward"] == 1.0
    assert rows["static-k3"]["tokens_per_forward"] > 1.0
    for name in ("greedy", "speculative", "greedy-fp16"):  # a step's time beside the weight-streaming floor
        assert rows[name]["ms_per_step"] > 0 and rows[name]["floor_ms"] > 0
    assert rows["greedy-fp16"]["floor_ms"] < rows["greedy"]["floor_ms"]  # fp16 weights: fewer bytes a step
    assert all(r["peak_memory_mb"] is None for r in report["methods"])  # a GPU figure
    assert len(report["calls"]) == 2 * len(names)
    assert [(c["prompt"], c["method"]) for c in report["calls"]] == schedule(2, names)
    assert any("llama.cpp skipped" in n for n in report["notes"])  # no GGUF for a non-default model
    md = (out / "report.md").read_text()
    assert "- device: cpu, float32" in md and "memory bandwidth:" in md
    assert "| ms to 1st token | ms/step | floor ms |" in md
    greedy_row = next(line for line in md.splitlines() if line.startswith("| greedy |"))
    assert f"| {1000 * rows['greedy']['first_token_seconds_median']:.1f} |" in greedy_row
    assert "| method | tokens/s | speedup vs HF greedy | speedup vs our greedy | tokens/forward |" in md
    assert "| speculative-int8 |" in md and "speed_accuracy.png" in md
    assert (out / "speed_accuracy.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "| greedy |" in printed and "plot:" in printed
    assert not (out / "calls.jsonl").exists()  # the journal of finished calls goes once the report is written


def test_report_on_free_prompts_without_hf(tiny_tokenizer, tmp_path):
    model = make_model(tiny_tokenizer, num_heads=2)
    path = tmp_path / "prompts.txt"
    path.write_text("Tom has 3 apples\n\nA box holds 12 eggs\n", encoding="utf-8")
    prompts = file_prompts(tiny_tokenizer, path, chat=False)
    assert [p.text for p in prompts] == ["Tom has 3 apples", "A box holds 12 eggs"]
    methods = build_methods(model, tiny_tokenizer, tau=[0.9], hf=False, fp16=False, int8=False)
    assert [m.name for m in methods] == ["greedy", "speculative", "confadapt-tau0.9", "static-k2"]
    run = run_bench(methods, prompts, 4, progress=False)
    report = build_report(run, tiny_tokenizer, settings={"max_new_tokens": 4})
    assert report["gsm8k_scored"] is False and "accuracy_flexible" not in report["methods"][0]
    assert report["methods"][0]["speedup_vs_hf_greedy"] is None
    paths = write_report(report, tmp_path / "r")
    assert paths["plot"].read_bytes()[:8] == PNG
    assert "GSM8K" not in format_table(report)


def test_a_report_of_another_model_is_set_aside_not_replaced(tiny_tokenizer, tmp_path, capsys):
    """bench/ (the default --output) holding an earlier bench of another model: its report moves into
    bench/earlier (then earlier-2); a re-run of the same model replaces its own."""
    model = make_model(tiny_tokenizer, num_heads=2)
    prompts = file_prompts(tiny_tokenizer, _prompts_file(tmp_path), chat=False)
    methods = build_methods(model, tiny_tokenizer, tau=[], hf=False, fp16=False, int8=False)[:1]
    report = build_report(run_bench(methods, prompts, 2, progress=False), tiny_tokenizer,
                          settings={"max_new_tokens": 2})
    out = tmp_path / "bench"
    for name in ("runs/a", "runs/b", "runs/b", "runs/a"):
        write_report({**report, "settings": {"model": name, "max_new_tokens": 2}}, out)
    models = {d.name: json.loads((d / "report.json").read_text())["settings"]["model"]
              for d in (out, out / "earlier", out / "earlier-2")}
    assert models == {"bench": "runs/a", "earlier": "runs/a", "earlier-2": "runs/b"}
    assert sorted(p.name for p in (out / "earlier").iterdir()) == ["report.json", "report.md", "speed_accuracy.png"]
    assert not (out / "earlier-3").exists()
    assert f"{out} held the report of another model (runs/b): moved to {out / 'earlier-2'}" in capsys.readouterr().err


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tom has 3 apples\n", encoding="utf-8")
    return path


def test_strategy_picks_the_rows_greedy_always_runs(tiny_model_dir, gsm8k_file, tmp_path):
    """--strategy, as `mtp generate` spells it, takes several: the rows of those strategies, and greedy, the
    reference of every lossless row."""
    out = tmp_path / "bench"
    assert bench(model=str(tiny_model_dir), prompts=str(gsm8k_file), limit=1, max_new_tokens=3, output=str(out),
                 strategy=["speculative", "static"], tau=[0.5], k=[2], tree_size=[3], hf=False, fp16=False,
                 llamacpp=False, progress=False) == 0
    report = json.loads((out / "report.json").read_text())
    names = [r["method"] for r in report["methods"]]
    assert names == ["greedy", "speculative", "static-k2", "speculative-tree3"]
    waits = [c["core_wait"] for c in report["calls"]]  # (each call's: how long its threads waited for a core)
    assert all(w is None or 0 <= w <= 1 for w in waits) and len(waits) == 4


def test_tree_and_lookup_rows_are_lossless(tiny_tokenizer, tmp_path):
    """--tree-size, --tree auto dynamic and --lookup: one row per tree size and shape, then the chain and each
    tree with lookup drafts."""
    model = make_model(tiny_tokenizer, num_heads=3)
    path = tmp_path / "prompts.txt"
    path.write_text("Tom has 3 apples and 3 apples\n\nA box holds 12 eggs\n", encoding="utf-8")
    prompts = file_prompts(tiny_tokenizer, path, chat=False)
    methods = build_methods(model, tiny_tokenizer, tau=[], k=[], hf=False, fp16=True, int8=False,
                            tree_size=[3], lookup=4, tree=("auto", "dynamic"))
    names = [m.name for m in methods]
    assert names == ["greedy", "speculative", "greedy-fp16", "speculative-fp16", "speculative-fp16-tree3",
                     "speculative-fp16-dtree3", "speculative-fp16-lookup4", "speculative-fp16-tree3-lookup4",
                     "speculative-fp16-dtree3-lookup4"]
    report = build_report(run_bench(methods, prompts, 12, progress=False), tiny_tokenizer,
                          settings={"max_new_tokens": 12})
    rows = {r["method"]: r for r in report["methods"]}
    for name in names[4:]:
        assert rows[name]["equal_to_lossless_reference"] == 2, name
    assert "lookup drafts" in methods[-1].description and "dynamic draft tree" in methods[-1].description


def test_jsonl_prompt_files(tiny_tokenizer, gsm8k_file, tmp_path):
    scored = file_prompts(tiny_tokenizer, gsm8k_file, limit=2, shots=0)
    assert [p.reference for p in scored] == ["5", "24"]
    assert scored[0].token_ids == gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=1, shots=0)[0].token_ids
    free = tmp_path / "p.jsonl"
    free.write_text('{"prompt": "hello"}\n{"text": "world"}\n', encoding="utf-8")
    assert [p.text for p in file_prompts(tiny_tokenizer, free)] == ["hello", "world"]
    free.write_text('{"prompt": "hello"}\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(MTPError, match="p.jsonl:2"):
        file_prompts(tiny_tokenizer, free)


def test_bench_bad_inputs(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(MTPError, match="not found"):
        bench(model=str(tiny_model_dir), prompts=str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(MTPError, match="GGUF file not found"):
        bench(model=str(tiny_model_dir), gguf=str(tmp_path / "x.gguf"), progress=False)
    with pytest.raises(MTPError, match="limit"):
        bench(model=str(tiny_model_dir), limit=0, progress=False)
    with pytest.raises(MTPError, match="--sample-temperature must be > 0, got -1"):
        bench(model=str(tiny_model_dir), sample_temperature=-1.0, output=str(tmp_path / "never"), progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(MTPError, match="is a file"):
        bench(model=str(tiny_model_dir), output=str(tmp_path / "f"), progress=False)
    model = make_model(tiny_tokenizer, num_heads=2)
    with pytest.raises(MTPError, match="static k"):
        build_methods(model, tiny_tokenizer, k=[3], hf=False, int8=False)
    with pytest.raises(MTPError, match="tau"):
        build_methods(model, tiny_tokenizer, tau=[1.5], hf=False, int8=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(MTPError, match="no prompts"):
        file_prompts(tiny_tokenizer, empty)


def mask_token_folders(tokenizer, where, adapters=("gated-lora", "full")) -> list[str]:
    """Mask-token folders of `make_model`'s base, named "lora" and "full", with weights moved off their start."""
    import copy

    import torch

    from mtp.models.mask_tokens import MaskTokenModel

    folders = []
    for adapter in adapters:
        m = MaskTokenModel.from_base(make_model(tokenizer).base, adapter=adapter, rank=4, k=3,
                                     tokenizer=copy.deepcopy(tokenizer))
        with torch.no_grad():  # trained-looking: the masks draft something
            params = m.lora.B.values() if m.lora is not None else [m.base.get_input_embeddings().weight]
            for p in params:
                p.add_(torch.randn(p.shape) * 0.1)
        folders.append(str(m.save_pretrained(where / ("lora" if m.lora is not None else "full"))))
    return folders


def bench_beside_mask_folders(model_dir, tokenizer, prompts, where, static_k: int, fp16: bool) -> dict:
    """`mtp bench` of the tiny heads model with a gated-LoRA and a full mask-token folder `--also`: its rows."""
    out = where / "bench"
    assert bench(model=str(model_dir), prompts=str(prompts), limit=2, max_new_tokens=6, output=str(out), shots=1,
                 tau=[0.5], k=[static_k], hf=False, fp16=fp16, also=mask_token_folders(tokenizer, where),
                 progress=False) == 0
    return {r["method"]: r for r in json.loads((out / "report.json").read_text())["methods"]}


def test_mask_token_models_beside_the_heads(tiny_model_dir, tiny_tokenizer, gsm8k_file, tmp_path):
    """`--also`: self-distilled mask-token folders of the same base run in the same interleaved benchmark."""
    rows = bench_beside_mask_folders(tiny_model_dir, tiny_tokenizer, gsm8k_file, tmp_path, static_k=2, fp16=False)
    assert list(rows) == ["greedy", "speculative", "confadapt-tau0.5", "static-k2",
                          "lora:speculative", "lora:confadapt-tau0.5", "lora:static-k2",
                          "full:greedy", "full:speculative", "full:confadapt-tau0.5", "full:static-k2"]
    assert rows["lora:speculative"]["equal_to_greedy"] == 2  # gated LoRA: exactly the base model's answers
    assert rows["full:speculative"]["equal_to_lossless_reference"] == 2  # its own greedy answers
    assert rows["lora:static-k2"]["tokens_per_forward"] > 1.0


def test_fully_trained_mask_model_also_decodes_fp16_packed(tiny_model_dir, tiny_tokenizer, gsm8k_file, tmp_path,
                                                           capsys):
    """With fp16 packing, a full-adapter mask-token folder gets packed speculative and ConfAdapt rows; gated LoRA
    (hooked projections) cannot be packed and says so in one note."""
    rows = bench_beside_mask_folders(tiny_model_dir, tiny_tokenizer, gsm8k_file, tmp_path, static_k=3, fp16=True)
    assert [m for m in rows if m.endswith("-fp16")] == ["greedy-fp16", "speculative-fp16", "full:speculative-fp16",
                                                         "full:confadapt-tau0.5-fp16"]
    assert "lora:speculative-fp16 skipped" in capsys.readouterr().out
    packed = rows["full:confadapt-tau0.5-fp16"]
    assert packed["tokens_per_forward"] >= 1.0 and packed["new_tokens_mean"] > 0


# ------------------------------------------------------------------------------------------------ llama.cpp
def test_llamacpp_is_left_out_with_one_note_without_the_package(tiny_tokenizer, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError now
    assert not llamacpp_installed()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    notes: list[str] = []
    methods = build_methods(make_model(tiny_tokenizer, num_heads=2), tiny_tokenizer, tau=[], hf=False, fp16=False,
                            gguf=gguf, llamacpp_inline=True, notes=notes)
    assert [m.name for m in methods] == ["greedy", "speculative", "static-k2"]
    assert len(notes) == 1 and notes[0].startswith("llama.cpp skipped: llama-cpp-python is not installed")


def _sharp_tiny_llama():
    """The GGUF tests' tiny Llama (untied unembedding) with weights of unit-scale outputs instead of the 0.02
    initialisation, whose near-empty layers and tied unembedding just repeat the last token: its greedy text
    depends on the context, and its logits are far enough apart that llama.cpp's float32 arithmetic (another
    summation order) picks the same argmax as ours."""
    import torch

    from gguf_helpers import tiny_model

    model = tiny_model(tie=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # embeddings: unit entries; projections: unit-variance outputs
                scale = 1.0 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.mark.llamacpp
@pytest.mark.skipif(not llamacpp_installed(), reason="llama-cpp-python is not installed (make setup-peers)")
def test_llamacpp_rows_decode_like_our_greedy_on_a_tiny_gguf(tmp_path):
    from gguf_helpers import tiny_tokenizer, write_tiny_gguf
    from mtp import MTPModel

    base = _sharp_tiny_llama()
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", base)
    tok = tiny_tokenizer()
    model = MTPModel.from_base(base, num_heads=2).eval()
    model.tokenizer = tok
    notes: list[str] = []
    methods = build_methods(model, tok, tau=[], k=[], hf=False, fp16=False, gguf=gguf, llamacpp_ctx=64,
                            llamacpp_inline=True, notes=notes)
    assert [m.name for m in methods] == ["greedy", "speculative", "llama.cpp", "llama.cpp-inline"]
    assert "in a process of its own" in methods[2].description and "in the bench process" in methods[3].description
    assert any(n.startswith("llama.cpp: ") for n in notes)
    texts = ["hi there", "she sat on the mat", "the thin hen", "quiet night"]
    prompts = [Prompt(i, "", tok(text)["input_ids"]) for i, text in enumerate(texts)]
    run = run_bench(methods, prompts, 12, progress=False)
    rows = {r["method"]: r for r in build_report(run, tok)["methods"]}
    greedy = [c["tokens"] for c in run.calls if c["method"] == "greedy"]
    assert all(len(t) == 12 for t in greedy)  # no end token in the way: 12 tokens to compare
    assert all(len(set(t)) > 3 for t in greedy)  # a text, not one token repeated
    assert rows["llama.cpp"]["equal_to_greedy"] == 4 and rows["llama.cpp-inline"]["equal_to_greedy"] == 4
    assert all(c["seconds"] > 0 and c["first_token_seconds"] is not None for c in run.calls)


def test_batch_rows_on_the_cpu(tiny_model_dir, gsm8k_file, tmp_path):
    """--batch-size on a CPU: greedy and the fastest lossless row on batches of each size, with the share of the
    speculative row's steps that verified no drafts (`SpeculationGate`); lossless rows equal greedy."""
    out = tmp_path / "bench"
    assert bench(model=str(tiny_model_dir), prompts=str(gsm8k_file), limit=2, max_new_tokens=6, output=str(out),
                 tau=[0.5], k=[2], hf=False, fp16=False, batch_size=[1, 3], progress=False) == 0
    report = json.loads((out / "report.json").read_text())
    batches = report["batch_rows"]
    # the table's prompts are described; the batch of 3 reads one more
    assert report["settings"]["prompts_description"].startswith(f"2 prompts from {gsm8k_file}")
    assert [(r["batch_size"], r["method"]) for r in batches] == [(1, "greedy"), (1, "speculative"),
                                                                 (3, "greedy"), (3, "speculative")]
    assert all(r["equal_to_greedy"] == r["prompts"] for r in batches)
    assert batches[0]["plain_step_share"] == batches[1]["plain_step_share"] == 0  # one prompt: no gate
    assert 0 <= batches[3]["plain_step_share"] <= 1
    assert "| batch | method | prompts | tokens/s (total) | tokens/forward | ms/forward | = greedy | plain steps |" \
        in (out / "report.md").read_text()


def test_sampled_rows_draw_from_the_rows_models(tiny_tokenizer, tmp_path):
    """--sample-temperature: transformers' sampling, mtp's and exact speculative sampling, as a chain and through
    each --tree-size's tree (on the fp16-packed copy, the CPU's fast rows), seed 0 every call: at a temperature
    near 0 each draws its greedy row's tokens, and at 1 the same tokens in two benches."""
    model = make_model(tiny_tokenizer, num_heads=3)
    path = tmp_path / "prompts.txt"
    path.write_text("Tom has 3 apples and 3 apples\n\nA box holds 12 eggs\n", encoding="utf-8")
    prompts = file_prompts(tiny_tokenizer, path, chat=False)

    def calls(temperature: float) -> dict:
        methods = build_methods(model, tiny_tokenizer, tau=[], k=[], hf=True, hf_lookup=0, fp16=True, int8=False,
                                lookup=2, sample_temperature=temperature, tree_size=[3], tree=["auto", "dynamic"])
        assert [m.name for m in methods][-5:] == ["hf-sampled", "sampled", "speculative-sampled",
                                                  "speculative-sampled-tree3", "speculative-sampled-dtree3"]
        assert methods[-1].engine == "mtp-fp16" and "3-node dynamic draft tree + 2 lookup drafts" in \
            methods[-1].description
        assert all(m.lossless_reference is None for m in methods[-5:])
        report = build_report(run_bench(methods, prompts, 10, progress=False), tiny_tokenizer,
                              settings={"max_new_tokens": 10})
        return {(c["method"], c["prompt"]): c["tokens"] for c in report["calls"]}

    cold = calls(1e-4)
    for p in range(2):
        assert cold[("hf-sampled", p)] == cold[("hf-greedy", p)]
        assert cold[("sampled", p)] == cold[("speculative-sampled", p)] == cold[("greedy-fp16", p)]
        assert cold[("speculative-sampled-tree3", p)] == cold[("speculative-sampled-dtree3", p)] == cold[("sampled", p)]
    first, again = calls(1.0), calls(1.0)
    names = ("hf-sampled", "sampled", "speculative-sampled", "speculative-sampled-tree3", "speculative-sampled-dtree3")
    assert all(first[(name, p)] == again[(name, p)] for name in names for p in range(2))
    with pytest.raises(MTPError, match="--sample-temperature must be > 0"):
        build_methods(model, tiny_tokenizer, tau=[], k=[], hf=False, fp16=False, sample_temperature=0.0)


def test_the_static_cache_peer_decodes_as_transformers_greedy_on_a_cpu(tiny_tokenizer, tmp_path):
    """The GPU table's transformers peer (`--hf-static`: a static cache, which transformers compiles on a GPU)
    runs on a CPU too, where the API calls it makes are checked against the installed transformers: it warms up
    outside the timing and emits transformers' eager greedy tokens, one a forward."""
    model = make_model(tiny_tokenizer, num_heads=2)
    path = tmp_path / "prompts.txt"
    path.write_text("Tom has 3 apples\n\nA box holds 12 eggs and more\n", encoding="utf-8")
    prompts = file_prompts(tiny_tokenizer, path, chat=False)
    methods = build_methods(model, tiny_tokenizer, tau=[], k=[], hf=True, hf_lookup=0, fp16=False, int8=False,
                            hf_static=True, llamacpp_ctx=64)
    assert [m.name for m in methods][:2] == ["hf-greedy", "hf-static"]
    static = methods[1]
    assert static.warmup is not None and "static cache (64 tokens)" in static.description
    report = build_report(run_bench(methods, prompts, 10, progress=False), tiny_tokenizer,
                          settings={"max_new_tokens": 10})
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["hf-static"]["equal_to_hf_greedy"] == 2
    assert rows["hf-static"]["tokens_per_forward"] == 1.0
    assert all(c["method"] != "hf-static" or c["new_tokens"] > 0 for c in report["calls"])


def test_the_llamacpp_row_runs_the_given_or_the_default_gguf_and_says_when_there_is_none(monkeypatch):
    from mtp.evaluation import commands

    monkeypatch.setattr(commands, "_default_gguf", lambda: "/default.gguf")
    row = commands._llamacpp_row
    assert row(True, None, None) == {"gguf": "/default.gguf", "gguf_note": None}  # the embedded default model
    assert row(True, "/mine.gguf", "folder") == {"gguf": "/mine.gguf", "gguf_note": None}
    assert row(True, None, "folder")["gguf"] is None and "pass --gguf" in row(True, None, "folder")["gguf_note"]
    assert row(False, "/mine.gguf", None) == {"gguf": None, "gguf_note": None}  # --no-llamacpp: no row, no note


def test_a_single_head_model_gets_greedy_rows_and_says_what_it_left_out(tiny_tokenizer, gsm8k_file, tmp_path):
    """One head: no multi-token rows (said), no lossless row to batch (said); bf16 weights: no fp16-packed rows
    (said): each row left out is a note, not a failure."""
    folder = tmp_path / "one-head"
    make_model(tiny_tokenizer, num_heads=1).save_pretrained(folder, tokenizer=tiny_tokenizer)
    out = tmp_path / "bench"
    assert bench(model=str(folder), prompts=str(gsm8k_file), limit=2, max_new_tokens=4, output=str(out), hf=False,
                 dtype="bfloat16", batch_size=[2], progress=False) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["greedy"] and "batch_rows" not in report
    notes = report["notes"]
    assert any("a single head: speculative, ConfAdapt and static need MTP heads" in n for n in notes)
    assert any(n.startswith("fp16 rows skipped: packed weights (fbgemm) are for fp32 models") for n in notes)
    assert any(n.startswith("batch rows skipped: no lossless speculative row") for n in notes)
