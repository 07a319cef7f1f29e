"""`mtp eval gsm8k` on a tiny random model: records, summary, batching, resume, bad input."""

from __future__ import annotations

import json

import pytest
from eval_helpers import QUESTIONS, make_model

import mtp.evaluation.evaluate as evaluate
from mtp.cli import run as cli_run
from mtp.errors import MTPError
from mtp.evaluation.commands import eval_
from mtp.evaluation.evaluate import prompt_key, read_samples, run_eval, summarize
from mtp.evaluation.prompts import gsm8k_prompts

FAST = {"shots": 1, "max_new_tokens": 6, "progress": False}

pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_takes_the_draft_options_generate_and_chat_take(tiny_model_dir, gsm8k_file, tmp_path, monkeypatch):
    """The drafts' and weights' options are the decoding commands' groups: each reaches `generate` (the draft
    length's adaptation too: it changes no answer, so a resumed folder does not record it)."""
    import mtp.decoding.queue as queue_module

    seen = []
    real = queue_module.generate

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(queue_module, "generate", recording)
    out = tmp_path / "ev"
    assert eval_(model=str(tiny_model_dir), data=str(gsm8k_file), limit=2, output=str(out), strategy="speculative",
                 lookup=3, num_draft=1, adaptive_draft=False, device="cpu", **FAST) == 0
    assert seen and all(kw["adaptive_draft"] is False and kw["lookup"] == 3 and kw["num_draft"] == 1 for kw in seen)
    config = json.loads((out / "eval_config.json").read_text())
    assert config["lookup"] == 3 and config["num_draft"] == 1 and "adaptive_draft" not in config
    with pytest.raises(TypeError, match="unexpected keyword argument 'lookahead'"):
        eval_(model=str(tiny_model_dir), lookahead=3)


def summary_seconds(out) -> float:
    return json.loads((out / "summary.json").read_text())["generation_seconds"]


def test_eval_command_writes_samples_and_summary(tiny_model_dir, gsm8k_file, tmp_path, capsys):
    out = tmp_path / "ev"
    assert eval_(model=str(tiny_model_dir), data=str(gsm8k_file), limit=4, batch_size=3, output=str(out), **FAST) == 0
    records = sorted(_lines(out / "samples.jsonl"), key=lambda r: r["id"])  # (written as each answer ends)
    assert [r["id"] for r in records] == [0, 1, 2, 3]  # the first N of the file
    assert [r["reference"] for r in records] == ["5", "24", "13", "16"]
    for r in records:
        assert set(r) >= {"id", "output", "strict", "flexible", "strict_correct", "flexible_correct",
                          "new_tokens", "forward_passes", "seconds", "prompt_key"}
        assert 1 <= r["new_tokens"] <= 6
        assert r["forward_passes"] == r["new_tokens"]  # greedy: one token per forward
    # The 4th problem joined the batch of 3 as a row ended; each record's seconds are the time since the one
    # before it, so they add up to the decoding's time.
    assert [r["batch_rows"] for r in records] == [3, 3, 3, 3]
    assert summary_seconds(out) == pytest.approx(sum(r["seconds"] for r in records), abs=0.02)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["tokens_per_forward"] == 1.0
    assert set(summary["strict"]) == {"accuracy", "stderr", "correct"}
    assert summary["new_tokens"] == sum(r["new_tokens"] for r in records)
    assert summary["settings"]["chat"] is True  # the tokenizer has a chat template
    assert summary["settings"]["dtype"] == "float32"  # what --dtype auto resolved to on the CPU
    assert summary["runtime"] == {"device": "cpu", "gpu": None, "dtype": "float32", "batch_size": 3}
    printed = capsys.readouterr().out
    assert "accuracy strict-match" in printed and "accuracy flexible-extract" in printed
    assert "tokens per forward" in printed and "s/sample" in printed


def test_cli_positional_task(tiny_model_dir, gsm8k_file, tmp_path):
    out = tmp_path / "cli"
    code = cli_run(["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(gsm8k_file), "--limit", "2",
                    "--shots", "0", "--max-new-tokens", "3", "--no-progress", "--no-chat", "--output", str(out)])
    assert code == 0
    assert len(_lines(out / "samples.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["settings"]["chat"] is False


def test_eval_keeps_its_grown_lookup_corpus(tiny_model_dir, gsm8k_file, tmp_path):
    """--grow-corpus --save-corpus: the answers to every problem, written as the evaluation ends."""
    from mtp.decoding.corpus import LookupCorpus

    saved = tmp_path / "corpus.safetensors"
    assert cli_run(["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(gsm8k_file), "--limit", "3",
                    "--shots", "0", "--max-new-tokens", "3", "--no-progress", "--strategy", "speculative",
                    "--lookup", "2", "--grow-corpus", "--save-corpus", str(saved),
                    "--output", str(tmp_path / "e")]) == 0
    assert LookupCorpus.load(saved).answers == 3  # (the last rebuild, at 2 answers: the third went in at the end)


def test_eval_bench_and_generate_with_no_progress_log_plain_lines(tiny_model_dir, gsm8k_file, tmp_path, capsys,
                                                         monkeypatch):
    """--no-progress (a batch job's log): no bar, but a plain line every few minutes with what the bar shows."""
    import mtp.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line every update
    common = ["--model", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    assert cli_run(["eval", "gsm8k", *common, "--data", str(gsm8k_file), "--shots", "0", "--batch-size", "1",
                    "--output", str(tmp_path / "e")]) == 0
    assert cli_run(["bench", *common, "--prompts", str(gsm8k_file), "--no-hf", "--no-fp16", "--strategy", "greedy",
                    "--output", str(tmp_path / "b")]) == 0
    (tmp_path / "p.txt").write_text("hi\nhello\n")
    assert cli_run(["generate", *common[:2], "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "2",
                    "--no-progress", "--json"]) == 0
    err = capsys.readouterr().err
    assert "mtp gsm8k greedy: 2 of 2 problems (100%)" in err and "; flexible=" in err, err
    assert "mtp bench: 2 of 2 calls (100%)" in err, err
    assert "generate (greedy): 2 of 2 prompts (100%)" in err, err
    assert "%|" not in err and "\r" not in err, err


def test_speculative_eval_equals_greedy(tiny_tokenizer, gsm8k_file, tmp_path):
    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, shots=1, chat=True)
    greedy = run_eval(model, tiny_tokenizer, prompts, tmp_path / "g", {"s": "greedy"}, strategy="greedy",
                      max_new_tokens=8, batch_size=2, progress=False)
    g = read_samples(tmp_path / "g" / "samples.jsonl")
    # the chain, an "auto" tree with lookup drafts, a dynamic tree: `mtp generate`'s decoding options
    for name, options in (("s", {}), ("t", {"tree": "auto", "tree_size": 4, "lookup": 3}),
                          ("d", {"tree": "dynamic", "tree_size": 3})):
        spec = run_eval(model, tiny_tokenizer, prompts, tmp_path / name, {"s": name}, strategy="speculative",
                        max_new_tokens=8, batch_size=2, progress=False, **options)
        s = read_samples(tmp_path / name / "samples.jsonl")
        assert [r["output"] for r in g] == [r["output"] for r in s], options
        assert greedy["new_tokens"] == spec["new_tokens"]
        assert spec["forward_passes"] <= greedy["forward_passes"]


def test_eval_takes_the_decoding_flags_of_generate(tiny_model_dir, gsm8k_file, tmp_path):
    """--tree, --tree-size, --lookup, --graphs and --mask-token, as `mtp generate` spells them; the default output
    folder is named as `mtp bench` names the row."""
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(gsm8k_file), "--limit", "2", "--shots", "0",
            "--max-new-tokens", "4", "--no-progress", "--strategy", "speculative"]
    chain = tmp_path / "chain"
    assert cli_run([*args, "--output", str(chain)]) == 0
    tree = tmp_path / "tree"
    assert cli_run([*args, "--tree", "dynamic", "--tree-size", "3", "--lookup", "2", "--graphs", "off",
                    "--output", str(tree)]) == 0
    assert [r["output"] for r in _lines(chain / "samples.jsonl")] == [r["output"] for r in _lines(tree / "samples.jsonl")]
    settings = json.loads((tree / "summary.json").read_text())["settings"]
    assert (settings["tree"], settings["tree_size"], settings["lookup"]) == ("dynamic", 3, 2)
    assert evaluate.strategy_tag("speculative", tree="dynamic", tree_size=3, lookup=2) == "speculative-dtree3-lookup2"
    assert evaluate.strategy_tag("speculative", tree="auto") == "speculative-tree"
    with pytest.raises(MTPError, match="a mask token applies to a plain model"):  # --mask-token reaches the loader
        eval_(model=str(tiny_model_dir), data=str(gsm8k_file), mask_token="<m>", output=str(tmp_path / "m"), **FAST)


def test_resume_continues_from_partial_jsonl(tiny_tokenizer, gsm8k_file, tmp_path, monkeypatch):
    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, shots=1, chat=True)
    out = tmp_path / "run"
    identity = {"model": "tiny", "strategy": "greedy"}
    run_eval(model, tiny_tokenizer, prompts, out, identity, max_new_tokens=5, batch_size=2, progress=False)
    full = (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(full) == 5
    # An interruption: two complete lines survive, the third was cut off mid-write.
    (out / "samples.jsonl").write_text("\n".join(full[:2]) + "\n" + full[2][:25], encoding="utf-8")

    ran: list[int] = []
    real = evaluate.append_records

    def spy(f, records):
        ran.extend(r["id"] for r in records)
        return real(f, records)

    monkeypatch.setattr(evaluate, "append_records", spy)
    summary = run_eval(model, tiny_tokenizer, prompts, out, identity, max_new_tokens=5, batch_size=2, progress=False)
    assert ran == [2, 3, 4]  # only the problems without a complete record
    records = _lines(out / "samples.jsonl")  # every line parses again: the torn one was dropped
    assert sorted(r["id"] for r in records) == [0, 1, 2, 3, 4]
    assert [json.dumps(r) for r in records[:2]] == full[:2]
    assert [r["output"] for r in sorted(records, key=lambda r: r["id"])] == [json.loads(x)["output"] for x in full]
    assert summary["n"] == 5

    ran.clear()  # a finished run resumed: nothing to do, same summary
    again = run_eval(model, tiny_tokenizer, prompts, out, identity, max_new_tokens=5, batch_size=2, progress=False)
    assert ran == [] and again["strict"] == summary["strict"]


def test_resume_scores_kept_records_again(tiny_tokenizer, gsm8k_file, tmp_path):
    """A record kept from an earlier run (an older mtp counted "5.0" as 5) is scored by today's rule, as
    lm-eval's exact_match: the summary and the rewritten samples say strict and flexible are wrong."""
    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, shots=1, chat=True, limit=2)
    out, identity = tmp_path / "run", {"model": "tiny", "strategy": "greedy"}
    run_eval(model, tiny_tokenizer, prompts, out, identity, max_new_tokens=3, batch_size=2, progress=False)
    records = _lines(out / "samples.jsonl")
    for r in records:
        r.update(output="The answer is 5.0.\n\n", reference="5", strict="5.0", flexible="5.0.",
                 strict_correct=True, flexible_correct=True)
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = run_eval(model, tiny_tokenizer, prompts, out, identity, max_new_tokens=3, batch_size=2, progress=False)
    assert summary["strict"]["correct"] == 0 and summary["flexible"]["correct"] == 0
    assert not any(r["strict_correct"] or r["flexible_correct"] for r in _lines(out / "samples.jsonl"))


def test_an_interrupted_evaluation_says_what_it_kept(tiny_tokenizer, gsm8k_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C during an evaluation: how many problems are kept, where, and that the same command goes on."""
    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, shots=0, chat=False)
    real, written = evaluate.append_records, []

    def then_ctrl_c(f, records):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.extend(records)
        return real(f, records)

    monkeypatch.setattr(evaluate, "append_records", then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, tiny_tokenizer, prompts, tmp_path / "run", {"strategy": "greedy"}, max_new_tokens=4,
                 batch_size=1, progress=False)
    assert (f"mtp eval: interrupted; 2 of {len(prompts)} problems are kept in {tmp_path / 'run' / 'samples.jsonl'}: "
            "the same command goes on from them") in capsys.readouterr().err


def test_resume_refuses_other_settings_and_no_resume_restarts(tiny_tokenizer, gsm8k_file, tmp_path):
    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=2, shots=0, chat=False)
    out = tmp_path / "run"
    run_eval(model, tiny_tokenizer, prompts, out, {"strategy": "greedy"}, max_new_tokens=3, progress=False)
    with pytest.raises(MTPError, match="other settings.*strategy"):
        run_eval(model, tiny_tokenizer, prompts, out, {"strategy": "static"}, strategy="static",
                 max_new_tokens=3, progress=False)
    run_eval(model, tiny_tokenizer, prompts, out, {"strategy": "static"}, strategy="static", max_new_tokens=3,
             resume=False, progress=False)
    assert len(_lines(out / "samples.jsonl")) == 2
    assert json.loads((out / "eval_config.json").read_text()) == {"strategy": "static"}


def test_larger_limit_on_resume_adds_problems(tiny_tokenizer, gsm8k_file, tmp_path):
    model = make_model(tiny_tokenizer)
    out = tmp_path / "run"
    for limit in (2, 4):
        prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=limit, shots=0, chat=True)
        summary = run_eval(model, tiny_tokenizer, prompts, out, {"x": 1}, max_new_tokens=3, progress=False)
    assert summary["n"] == 4
    assert [r["id"] for r in _lines(out / "samples.jsonl")] == [0, 1, 2, 3]


def test_a_problem_whose_text_changed_is_answered_again_once(tiny_tokenizer, gsm8k_file, tmp_path):
    """The data file edited between runs (same path, same settings): the changed problem's old record is dropped
    and it is answered again (samples.jsonl held both, id 2 twice, against a summary of 4); a smaller --limit
    keeps the records past it, for a later run that asks for them."""
    import json

    model = make_model(tiny_tokenizer)
    out = tmp_path / "run"
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=4, shots=0, chat=True)
    run_eval(model, tiny_tokenizer, prompts, out, {"x": 1}, max_new_tokens=3, progress=False)
    records = [json.loads(line) for line in gsm8k_file.read_text().splitlines()]
    records[2]["question"] = "What is 100 plus 1?"
    gsm8k_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=4, shots=0, chat=True)
    summary = run_eval(model, tiny_tokenizer, prompts, out, {"x": 1}, max_new_tokens=3, progress=False)
    samples = _lines(out / "samples.jsonl")
    assert summary["n"] == 4 and sorted(r["id"] for r in samples) == [0, 1, 2, 3]
    assert next(r for r in samples if r["id"] == 2)["prompt_key"] == prompt_key(prompts[2].token_ids)
    summary = run_eval(model, tiny_tokenizer, prompts[:2], out, {"x": 1}, max_new_tokens=3, progress=False)
    assert summary["n"] == 2 and sorted(r["id"] for r in _lines(out / "samples.jsonl")) == [0, 1, 2, 3]


def test_summary_figures():
    records = [{"reference": "1", "strict_correct": True, "flexible_correct": True, "new_tokens": 10,
                "forward_passes": 5, "seconds": 1.0},
               {"reference": "2", "strict_correct": False, "flexible_correct": True, "new_tokens": 6,
                "forward_passes": 3, "seconds": 3.0}]
    s = summarize(records)
    assert s["strict"] == {"accuracy": 0.5, "stderr": 0.5, "correct": 1}
    assert s["flexible"] == {"accuracy": 1.0, "stderr": 0.0, "correct": 2}
    assert s["tokens_per_forward"] == 2.0 and s["tokens_per_second"] == 4.0 and s["seconds_per_sample"] == 2.0


def test_bad_inputs(tiny_model_dir, gsm8k_file, tmp_path):
    with pytest.raises(MTPError, match="not found"):
        eval_(model=str(tiny_model_dir), data=str(tmp_path / "missing.jsonl"), **FAST)
    with pytest.raises(MTPError, match="model not found"):
        eval_(model=str(tmp_path / "no-model"), data=str(gsm8k_file), **FAST)
    with pytest.raises(MTPError, match="limit"):
        eval_(model=str(tiny_model_dir), data=str(gsm8k_file), limit=0, **FAST)
    with pytest.raises(MTPError, match="unknown task"):
        eval_(task="mmlu", model=str(tiny_model_dir), **FAST)  # type: ignore[arg-type]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final line"}\n', encoding="utf-8")
    with pytest.raises(MTPError, match="bad.jsonl:1"):
        eval_(model=str(tiny_model_dir), data=str(bad), output=str(tmp_path / "o"), **FAST)
    with pytest.raises(MTPError, match="shots"):
        eval_(model=str(tiny_model_dir), data=str(gsm8k_file), output=str(tmp_path / "o2"),
              **{**FAST, "shots": 9})
    with pytest.raises(MTPError, match="does not fit this model's context .* use fewer --shots or a lower "
                                       "--max-new-tokens"):  # (its context: 4,096 tokens)
        eval_(model=str(tiny_model_dir), data=str(gsm8k_file), output=str(tmp_path / "deep" / "o3"),
              **{**FAST, "max_new_tokens": 4090})
    assert not (tmp_path / "deep").exists()  # checked before anything was written: no folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(MTPError, match="is a file"):
        eval_(model=str(tiny_model_dir), data=str(gsm8k_file), output=str(tmp_path / "file"), **FAST)
    assert len(QUESTIONS) == 5


@pytest.mark.parametrize("strategy, calls", [("greedy", 1), ("speculative", 1), ("confadapt", 3)])
def test_problems_join_the_batch_as_rows_end(tiny_tokenizer, gsm8k_file, tmp_path, monkeypatch, strategy, calls):
    """Continuous batching in an evaluation: 5 problems, 2 rows at a time, decode in one batch that the next
    problem joins as a row ends (greedy, speculative); a strategy that takes no joiners (ConfAdapt) decodes a
    batch after another. Each answer is the one it gets alone."""
    import mtp.decoding.queue as queue_module

    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=5, shots=0, chat=False)
    real, seen = queue_module.generate, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("admit") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(queue_module, "generate", spy)
    kw = dict(strategy=strategy, max_new_tokens=6, progress=False) | ({"k": 2} if strategy == "confadapt" else {})
    run_eval(model, tiny_tokenizer, prompts, tmp_path / "two", {"s": strategy}, batch_size=2, **kw)
    assert len(seen) == calls and seen[0]
    seen.clear()
    run_eval(model, tiny_tokenizer, prompts, tmp_path / "one", {"s": strategy}, batch_size=1, **kw)
    two, one = ({r["id"]: r["output"] for r in read_samples(tmp_path / name / "samples.jsonl")} for name in ("two", "one"))
    assert two == one and len(two) == 5


def test_resume_knows_a_local_model_however_it_is_spelt(tiny_model_dir, gsm8k_file, tmp_path, monkeypatch):
    """`--resume` of an evaluation from another working folder, the model's path spelt another way: the same
    model, so it goes on (it was refused: "model 'tiny-mtp' -> '/.../tiny-mtp'")."""
    out = tmp_path / "ev"
    monkeypatch.chdir(tiny_model_dir.parent)
    assert eval_(model=tiny_model_dir.name, data=str(gsm8k_file), output=str(out), limit=1, **FAST) == 0
    monkeypatch.chdir(tmp_path)
    assert eval_(model=str(tiny_model_dir), data=str(gsm8k_file), output=str(out), limit=2, resume=True, **FAST) == 0
    assert len(_lines(out / "samples.jsonl")) == 2


def test_the_summary_says_when_the_gate_took_plain_steps(tiny_tokenizer, gsm8k_file, tmp_path):
    """`steps_this_run`: the run's forwards and the speculation gate's plain steps (tokens per forward near 1 in a
    speculative evaluation is the gate finding drafts did not pay); the table names them only where there are."""
    from mtp.evaluation.evaluate import format_summary

    model = make_model(tiny_tokenizer)
    prompts = gsm8k_prompts(tiny_tokenizer, path=gsm8k_file, limit=3, shots=0, chat=False)
    summary = run_eval(model, tiny_tokenizer, prompts, tmp_path / "run", {"strategy": "speculative"},
                       strategy="speculative", max_new_tokens=4, batch_size=3, progress=False)
    steps = summary["steps_this_run"]
    assert steps["forward_passes"] >= 4 and 0 <= steps["plain_steps"] < steps["forward_passes"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_this_run"] == steps
    shown = format_summary({**summary, "steps_this_run": {"forward_passes": 9, "plain_steps": 7}}, "t")
    assert "plain steps" in shown and "7 of 9 forwards" in shown
    assert "plain steps" not in format_summary({**summary, "steps_this_run": {"forward_passes": 9,
                                                                             "plain_steps": 0}}, "t")
