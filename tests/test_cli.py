"""The `mtp` command line: help, info, generate, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import runpy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from mtp.cli import CLI_DOC, command_markdown, main, markdown


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_a_command_seeds_torchs_generator_from_the_system(tiny_mtp_folder, tmp_path, capsys):
    """The library draws an unseeded sampling call's seed from torch's global generator, which starts at the same
    seed in every process: a command seeds it anew, so `mtp generate --do-sample` without --seed samples anew each
    run, and with --seed reproduces its draws."""
    import torch

    torch.manual_seed(123)
    assert run_cli(["info", "--model", str(tiny_mtp_folder)], capsys)[0] == 0
    assert torch.initial_seed() != 123
    base = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "Janet has", "--do-sample", "--json",
            "--max-new-tokens", "12", "--temperature", "1.5"]
    import json

    def tokens(*flags: str) -> tuple[int, ...]:
        code, out, err = run_cli(base + list(flags), capsys)
        assert code == 0, err
        return tuple(json.loads(out.strip().splitlines()[-1])["token_ids"])

    assert tokens("--seed", "5") == tokens("--seed", "5")
    unseeded = {tokens() for _ in range(3)}
    assert len(unseeded) > 1  # (3 runs of 12 draws at temperature 1.5 agreeing by chance: practically never)


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("info", "convert", "generate", "train", "eval", "bench", "demo"):
        assert f"  {command}" in out


def test_help_summaries_read_from_source_equal_the_commands_docstrings():
    """`mtp --help` reads each command's summary from its module's source (no torch import); it must say what the
    command's own --help says."""
    from mtp.cli import COMMANDS, _doc_parts, _load, _summary_from_source

    for target in COMMANDS.values():
        summary = _summary_from_source(target)
        assert summary and summary == _doc_parts(_load(target))[0], target


def test_help_and_the_package_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, mtp, mtp.cli; mtp.cli._help_listing(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "mtp.generate; assert 'torch' in sys.modules; print(mtp.MTPModel.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MTPModel"
    import mtp

    assert sorted(mtp.__all__) == sorted(mtp._EXPORTS) and all(getattr(mtp, name) for name in mtp.__all__)


def test_version(capsys):
    import mtp

    assert run_cli(["--version"], capsys)[:2] == (0, f"mtp {mtp.__version__}\n")


def test_unknown_command(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command" in err


def test_info_on_a_folder(tiny_mtp_folder, tmp_path, capsys):
    code, out, _ = run_cli(["info", "--model", str(tiny_mtp_folder)], capsys)
    assert code == 0
    assert "layers 0..1 (2 layers, shared)" in out
    assert "3 (head 0" in out
    assert "vocabulary" in out and "loaded in" in out
    row = next(line for line in out.splitlines() if line.startswith("device, dtype"))
    assert row.split()[-2:] == ["cpu,", "float32"]  # --device auto, --dtype auto on a machine without a GPU
    assert "next-token input" not in out
    from mtp import MTPModel

    MTPModel.from_pretrained(tiny_mtp_folder).add_next_token_input().save_pretrained(tmp_path / "reading")
    code, out, _ = run_cli(["info", "--model", str(tmp_path / "reading")], capsys)
    assert code == 0 and "next-token input" in out and "1,024 (the extra heads read the next token)" in out


def test_generate_strategies_and_json(tiny_mtp_folder, tmp_path, capsys):
    outputs = {}
    for strategy in ("greedy", "speculative", "confadapt", "static"):
        code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?",
                                  "--chat", "--strategy", strategy, "--max-new-tokens", "12", "--json"], capsys)
        assert code == 0, err
        record = json.loads(out.strip().splitlines()[-1])
        assert set(record) == {"index", "prompt", "text", "token_ids", "new_tokens", "batch"}
        assert record["new_tokens"] == record["batch"]["new_tokens"] == len(record["token_ids"]) <= 12
        outputs[strategy] = record["token_ids"]
    assert outputs["speculative"] == outputs["greedy"]
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--chat",
                              "--strategy", "speculative", "--quantize", "fp16", "--threads", "1",
                              "--max-new-tokens", "12", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == outputs["greedy"]  # fp16 ~ fp32, tiny model


def test_generate_json_records_are_each_prompts_own(tiny_mtp_folder, tmp_path, capsys):
    """Several prompts in one batch: each record counts its own tokens, the batch's figures are labelled as such,
    and what is printed is what --output holds."""
    prompts = tmp_path / "two.txt"
    prompts.write_text("What is 7 + 5?\nHi\n")
    out_file = tmp_path / "o.jsonl"
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--json",
                              "--max-new-tokens", "5", "--output", str(out_file)], capsys)
    assert code == 0, err
    printed = [json.loads(line) for line in out.strip().splitlines()]
    assert printed == [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in printed] == ["What is 7 + 5?", "Hi"]
    assert all(r["new_tokens"] == len(r["token_ids"]) for r in printed)
    assert printed[0]["batch"]["rows"] == 2
    # each record: the decoding's figures as they stood when its answer ended (the last one's: every token)
    assert max(r["batch"]["new_tokens"] for r in printed) == sum(r["new_tokens"] for r in printed)


def test_generate_feeds_what_the_prompts_start_with_once(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """A batch of prompts that start alike (an instruction repeated, a chat template's system turn): the shared
    tokens go to `generate` as its prefix, fed once; the answers are those without it."""
    import mtp.decoding.commands as commands
    import mtp.decoding.queue as queue_module

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["prefix"])
        return generate_tokens(*args, **kwargs)

    generate_tokens = queue_module.generate
    monkeypatch.setattr(queue_module, "generate", spy)
    prompts = tmp_path / "alike.txt"
    prompts.write_text("Answer in one word, please. What is 7 + 5?\nAnswer in one word, please. Hi\n")
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--json", "--max-new-tokens",
            "6", "--no-chat"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    shared = [json.loads(line)["token_ids"] for line in out.strip().splitlines()]
    from mtp import MTPModel
    from mtp.evaluation.prompts import encode_plain

    tok = MTPModel.from_pretrained(str(tiny_mtp_folder)).tokenizer
    first = encode_plain(tok, "Answer in one word, please. What is 7 + 5?")
    assert len(encode_plain(tok, "Answer in one word, please.")) <= len(seen[0]) < len(first)
    assert seen[0] == first[:len(seen[0])]
    monkeypatch.setattr(commands, "common_prefix", lambda rows: [])
    code, out, err = run_cli(args, capsys)
    assert [json.loads(line)["token_ids"] for line in out.strip().splitlines()] == shared and seen[1] == []


def interrupting(generate, after: int):
    """`generate` that raises KeyboardInterrupt (Ctrl-C) once its streamer has had `after` rows' steps."""
    def interrupted(*a, streamer, **kw):
        steps = []

        def step(row, new, **scores):
            streamer(row, new)
            steps.append(row)
            if len(steps) == after:
                raise KeyboardInterrupt

        return generate(*a, streamer=step, **kw)

    return interrupted


def test_generate_prompts_decode_continuously_and_print_in_order(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """Five prompts, two rows at a time: one decoding that the next prompt joins as a row ends (one `generate`
    call), each answer the one it gets alone, the records printed and written in the prompts' order; Ctrl-C
    prints the answers that ended and what the others had, in order."""
    import torch

    import mtp.decoding.queue as queue_module
    from mtp import MTPModel
    from mtp.decoding.generate import generate

    texts = ["What is 7 + 5?", "Hi", "A box holds 12 eggs. How many are in 3 boxes?", "Tom has 3 apples.", "Go"]
    prompts = tmp_path / "five.txt"
    prompts.write_text("\n".join(texts) + "\n")
    real, calls = queue_module.generate, []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("admit") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(queue_module, "generate", spy)
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--json", "--max-new-tokens",
            "7", "--batch-size", "2", "--no-chat", "--strategy", "speculative"]
    code, out, err = run_cli([*args, "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 0, err
    printed = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in printed] == texts and calls == [True]
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == printed
    model = MTPModel.from_pretrained(str(tiny_mtp_folder))
    alone = [generate(model, torch.tensor([model.tokenizer(t).input_ids]), max_new_tokens=7).tokens[0] for t in texts]
    assert [r["token_ids"] for r in printed] == alone

    monkeypatch.setattr(queue_module, "generate", interrupting(real, after=6))  # (row steps streamed)
    code, out, _ = run_cli(args, capsys)
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 130 and [r["prompt"] for r in records] == texts[:len(records)] and len(records) >= 2
    assert all(r["token_ids"] == alone[i][:len(r["token_ids"])] for i, r in enumerate(records))
    assert any(r.get("interrupted") for r in records)


def test_generate_output_goes_on_from_where_a_stopped_run_left(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """`--output F`: each answer goes to F.partial as it ends; Ctrl-C writes F with what there is and says how
    many; the same command goes on from F.partial, decoding only the prompts not answered, and ends with F as an
    uninterrupted run writes it (the journal gone). Records carry their prompt's place and the input's "id"; a
    journal of other settings is set aside (kept); an --output that is the --prompts file is refused."""
    import mtp.decoding.queue as queue_module

    texts = ["What is 7 + 5?", "Hi", "A box holds 12 eggs. How many are in 3 boxes?", "Tom has 3 apples.", "Go",
             "Sam has 4 pens.", "Count to three."]
    prompts = tmp_path / "p.jsonl"
    prompt_text = "".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(texts))
    prompts.write_text(prompt_text)
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-chat", "--no-progress"]
    code, _, err = run_cli([*args, "--output", str(tmp_path / "whole.jsonl")], capsys)
    assert code == 0, err
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in whole] == [(i, f"q{i}") for i in range(len(texts))]

    out = tmp_path / "o.jsonl"
    real = queue_module.generate
    monkeypatch.setattr(queue_module, "generate", interrupting(real, after=14))
    code, _, err = run_cli([*args, "--output", str(out)], capsys)
    journal = [json.loads(line) for line in (tmp_path / "o.jsonl.partial").read_text().splitlines()]
    answered = {r["index"] for r in journal[1:]}
    assert code == 130 and 1 <= len(answered) < len(texts) and journal[0]["format"] == "mtp-generate-journal"
    assert f"{len(answered)} of {len(texts)} answers written to {out}" in err
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["index"] for r in kept if not r.get("interrupted")} == answered

    decoded = []
    monkeypatch.setattr(queue_module, "generate", lambda model, ids, *a, **kw: decoded.append(ids.shape[0]) or
                        real(model, ids, *a, **kw))
    code, _, err = run_cli([*args, "--output", str(out)], capsys)
    assert code == 0, err
    assert f"going on from {out}.partial: {len(answered)} of {len(texts)} prompts answered before" in err
    assert not (tmp_path / "o.jsonl.partial").exists()
    final = [json.loads(line) for line in out.read_text().splitlines()]
    same = ("index", "id", "prompt", "text", "token_ids")
    assert [{k: r[k] for k in same} for r in final] == [{k: r[k] for k in same} for r in whole]

    earlier = json.dumps(journal[0]) + "\n" + json.dumps(journal[1]) + "\n"
    (tmp_path / "o.jsonl.partial").write_text(earlier)
    code, _, err = run_cli([*args, "--max-new-tokens", "5", "--output", str(out)], capsys)
    assert code == 0 and "held the answers of other prompts, settings or weights: set aside as " \
                         "o.jsonl.partial.earlier; starting over" in err
    assert all(r["new_tokens"] <= 5 for r in map(json.loads, out.read_text().splitlines()))
    assert (tmp_path / "o.jsonl.partial.earlier").read_text() == earlier  # (those answers are not lost)
    code, _, err = run_cli([*args, "--output", str(prompts)], capsys)
    assert code == 2 and "the answers would replace the prompts" in err and prompts.read_text() == prompt_text


def test_a_journal_that_cannot_be_made_names_the_output(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """Where no file can be made beside --output (as root, `--output /proc/x.jsonl` passes the permission check),
    the one line names --output and its journal; it said "file not found: x.jsonl.partial"."""
    import mtp.decoding.commands

    def no_file(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(mtp.decoding.commands, "open_append", no_file)
    out = tmp_path / "x.jsonl"
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--max-new-tokens", "2",
                            "--output", str(out), "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write --output {out}: its journal x.jsonl.partial cannot be made beside it (No such file" in err


def test_generate_with_a_draft_tree(tiny_mtp_folder, capsys):
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "12",
            "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    greedy = json.loads(out.strip().splitlines()[-1])["token_ids"]
    for tree in (["--tree", "auto", "--tree-size", "6"], ["--tree", "[[0], [1], [0, 0]]"], ["--tree-size", "3"],
                 ["--lookup", "4"], ["--tree-size", "4", "--lookup", "3"], ["--tree", "dynamic", "--tree-size", "5"]):
        code, out, err = run_cli(args + ["--strategy", "speculative"] + tree, capsys)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["token_ids"] == greedy
    for bad, says in ((["--strategy", "speculative", "--tree", "[[0], [1, 0"], "not valid JSON"),
                      (["--strategy", "speculative", "--tree-size", "0"], "tree-size"),
                      (["--tree", "auto"], "speculative"), (["--lookup", "3"], "speculative"),
                      (["--strategy", "speculative", "--lookup", "-1"], "lookup")):
        code, _, err = run_cli(args + bad, capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_generate_json_records_carry_the_tokens_log_probabilities(tiny_mtp_folder, capsys):
    """--logprobs K: each record's tokens with the model's log-probabilities (speculative's are greedy's) and K
    alternatives; refused where nothing would show them or the strategy does not verify, before loading."""
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "6",
            "--json", "--logprobs", "2"]
    records = []
    for strategy in ("greedy", "speculative"):
        code, out, err = run_cli(args + ["--strategy", strategy], capsys)
        assert code == 0, err
        records.append(json.loads(out.strip().splitlines()[-1]))
    for record in records:
        scores = record["logprobs"]
        assert [s["token_id"] for s in scores] == record["token_ids"]
        assert all(len(s["top_logprobs"]) == 2 and s["top_logprobs"][0]["logprob"] == s["logprob"] <= 0
                   for s in scores)
    assert [s["logprob"] for s in records[0]["logprobs"]] == pytest.approx(
        [s["logprob"] for s in records[1]["logprobs"]], abs=1e-5)
    for bad, says in ((["--strategy", "confadapt"], "--logprobs: the model's log-probabilities"),
                      (["--logprobs", "30"], "--logprobs must be in [0, 20], got 30")):
        code, _, err = run_cli(args + bad, capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--logprobs", "1"],
                           capsys)
    assert code == 2 and "--logprobs go into the JSON records: add --output FILE or --json" in err
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--logprobs", "1",
                            "--stream"], capsys)  # (--stream prints text: --json would be refused)
    assert code == 2 and err.strip().endswith("--logprobs go into the JSON records: add --output FILE")


def test_generate_with_penalties(tiny_mtp_folder, capsys):
    """--repetition-penalty, --presence-penalty, --frequency-penalty: speculative decoding gives what greedy decoding
    with them gives; out of range, or with a strategy that does not verify, a one-line error before loading."""
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "8",
            "--json", "--repetition-penalty", "1.5", "--presence-penalty", "0.5", "--frequency-penalty", "1",
            "--min-new-tokens", "4"]
    tokens = []
    for strategy in ("greedy", "speculative"):
        code, out, err = run_cli(args + ["--strategy", strategy], capsys)
        assert code == 0, err
        tokens.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert tokens[0] == tokens[1]
    code, out, err = run_cli(args + ["--do-sample", "--min-p", "1", "--strategy", "speculative"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["token_ids"] == tokens[0], err  # (the top token)
    code, _, err = run_cli(args + ["--min-p", "0.5"], capsys)
    assert code == 2 and "--min-p shapes sampling; greedy decoding ignores it" in err, err
    for bad, says in ((["--strategy", "static"], "--repetition-penalty changes the logits greedy or "
                       "speculative decoding verifies"), (["--frequency-penalty", "3"],
                                                          "--frequency-penalty must be in [-2, 2], got 3")):
        code, _, err = run_cli(args + bad, capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_generate_with_a_logit_bias(tiny_mtp_folder, capsys):
    """--logit-bias TOKEN_ID:BIAS: -100 bans the token greedy decoding emitted first (speculative decoding gives the
    same tokens); a malformed pair, a bias out of range, or an id beyond the vocabulary is a one-line error."""
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "6",
            "--json"]
    code, out, err = run_cli(args, capsys)
    plain = json.loads(out.strip().splitlines()[-1])["token_ids"]
    biased = []
    for strategy in ("greedy", "speculative"):
        code, out, err = run_cli(args + ["--strategy", strategy, "--logit-bias", f"{plain[0]}:-100", "1:0.5"], capsys)
        assert code == 0, err
        biased.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert biased[0] == biased[1] and plain[0] not in biased[0]
    for bad, says in ((["--logit-bias", "7"], "--logit-bias takes TOKEN_ID:BIAS pairs (e.g. 198:-100), got '7'"),
                      (["--logit-bias", "7:101"], "--logit-bias: the bias of token 7 must be in [-100, 100]"),
                      (["--logit-bias", "99999999:1"], "--logit-bias: 99999999 is not a token id of this model")):
        code, _, err = run_cli(args + bad, capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_generate_prompts_to_jsonl(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Janet has 3 eggs"}\n\n{"question": "What is 7 + 5?"}\n')
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts),
                              "--output", str(out_file), "--max-new-tokens", "5", "--batch-size", "2",
                              "--strategy", "speculative"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["Janet has 3 eggs", "What is 7 + 5?"]
    assert "tokens per forward pass; cpu, float32" in err


def test_generate_prompts_with_settings_of_their_own(tiny_mtp_folder, tmp_path, capsys):
    """JSON records of --prompts may set their own max_new_tokens, penalties, sampling and stop strings: decoded
    together (two rows, the others joining as rows end, a sampled one in a batch of its own), each record's answer
    is the one `mtp generate --prompt` gives it with those flags; a bad setting names its line, before loading."""
    base = ["generate", "--model", str(tiny_mtp_folder), "--json", "--max-new-tokens", "8", "--strategy",
            "speculative", "--no-progress"]

    def alone(prompt: str, *flags: str) -> dict:
        code, out, err = run_cli(base + ["--prompt", prompt, *flags], capsys)
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    a, b = "Janet has 3 eggs", "What is 7 + 5?"
    plain = alone(a)
    stop = plain["text"][len(plain["text"]) // 2:][:3]
    records = [{"prompt": a, "max_new_tokens": 3, "id": 7}, {"prompt": b, "repetition_penalty": 100.0, "answer": "4"},
               {"prompt": a, "stop": stop}, {"prompt": b, "do_sample": True, "top_k": 1, "temperature": 0.7},
               {"prompt": b}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = run_cli(base + ["--prompts", str(prompts), "--batch-size", "2"], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    expected = [alone(a, "--max-new-tokens", "3"), alone(b, "--repetition-penalty", "100"), plain,
                alone(b, "--do-sample", "--top-k", "1", "--temperature", "0.7"), alone(b)]
    assert [g["token_ids"] for g in got[:2] + got[3:]] == [e["token_ids"] for e in expected[:2] + expected[3:]]
    assert got[3]["token_ids"] == got[4]["token_ids"] and got[1]["token_ids"] != got[4]["token_ids"]
    assert stop in plain["text"] and got[2]["text"] == plain["text"][:plain["text"].index(stop)]
    assert got[2]["token_ids"] == plain["token_ids"][:len(got[2]["token_ids"])] and got[2]["new_tokens"] < 8
    for record, says in (({"prompt": "x", "temperature": 0.5}, ":2: temperature shapes sampling"),
                         ({"prompt": "x", "max_new_tokens": "5"}, ":2: 'max_new_tokens' must be a whole number"),
                         ({"prompt": "x", "stop": 3}, ":2: 'stop' must be a string or a list of strings"),
                         ({"prompt": "x", "top_p": 2.0, "do_sample": True}, ":2: top_p must be in"),
                         ({"prompt": "x", "max_tokens": 5}, ":2: 'max_tokens' is not a record's field here: write it as 'max_new_tokens'"),
                         ({"prompt": "x", "n": 2}, ":2: 'n' is the run's setting, not a record's"),
                         ({"prompt": "x", "maxnewtokens": 5}, ":2: unknown field 'maxnewtokens': did you mean "
                                                              "'max_new_tokens'?")):
        prompts.write_text('{"prompt": "hi"}\n' + json.dumps(record) + "\n")
        code, _, err = run_cli(["generate", "--model", str(tmp_path / "missing"), "--prompts", str(prompts)], capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_sampled_records_take_the_runs_seed(tiny_mtp_folder, tmp_path, capsys):
    """Records that sample draw from --seed (the same tokens twice) and take the command line's sampling flags as
    their defaults; where no record samples and --do-sample is not given those flags are an error, and so is a
    record's own seed (one generator draws for a batch)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Janet has 3 eggs", "do_sample": true}\n{"prompt": "What is 7 + 5?"}\n')
    base = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--json", "--no-progress",
            "--max-new-tokens", "6", "--temperature", "1.5"]
    runs = []
    for _ in range(2):
        code, out, err = run_cli(base + ["--seed", "7"], capsys)
        assert code == 0, err
        runs.append([json.loads(line)["token_ids"] for line in out.splitlines()])
    assert runs[0] == runs[1]
    prompts.write_text('{"prompt": "Janet has 3 eggs"}\n{"question": "What is 7 + 5?"}\n')
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "--temperature shapes sampling; greedy decoding ignores it" in err, err
    prompts.write_text('{"prompt": "Janet has 3 eggs", "do_sample": true, "seed": 3}\n')
    code, _, err = run_cli(base, capsys)
    assert code == 2 and ":1: a record cannot have a seed of its own" in err, err


def test_generate_prompts_from_standard_input(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """`--prompts -`: the lines of stdin, read as a prompts file's (a line that starts with "{" is a record);
    a bad record names <stdin> and its line."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO('Janet has 3 eggs\n\n{"question": "What is 7 + 5?"}\n'))
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", "-", "--json",
                              "--max-new-tokens", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Janet has 3 eggs", "What is 7 + 5?"]
    monkeypatch.setattr("sys.stdin", io.StringIO('hi\n{"answer": "12"}\n'))
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", "-"], capsys)
    assert code == 2 and "<stdin>:2: expected a string field 'prompt' or 'question'" in err


def test_prompts_that_are_not_utf8_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    """Bytes of another encoding on the command line or standard input (which Python hands over as lone
    surrogates) are named where they are, before the model loads: the tokenizer raised a TypeError after it."""
    import io

    class Strict(io.StringIO):  # a strict decoder's standard input (PYTHONIOENCODING=utf-8:strict)
        def read(self, *args):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    bad = "hello \udcff"  # (b"hello \xff" as Python decodes it with surrogateescape)
    model = ["--model", str(tmp_path / "no-such-model")]  # (a command that went on to load would fail on it)
    for args, stdin, says in ((["--prompt", bad], None, "--prompt: not UTF-8 text (a byte that is no character's, "
                                                        "at character 7)"),
                              (["--prompts", "-"], io.StringIO("fine\n" + bad + "\n"), "<stdin>:2: not UTF-8 text"),
                              (["--prompts", "-"], Strict(), "<stdin>: not UTF-8 text (invalid start byte)")):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", stdin)
        code, _, err = run_cli(["generate", *model, *args], capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompts", "/no/such/file.txt"], "prompts file not found"),
    (["generate"], "exactly one of --prompt or --prompts"),
    (["info", "--model", "./no/such/folder"], "not found"),
    (["generate", "--prompt", "hi", "--threads", "0"], "--threads must be >= 1"),
    (["train", "--output", "x", "--targets", "self", "--answer-minutes", "0"], "--answer-minutes must be > 0"),
    (["demo", "--budget-minutes", "-1"], "--budget-minutes must be > 0"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_prompts_line_has_its_number(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts)], capsys)
    assert code == 2 and f"{prompts}:2: not valid JSON" in err


# --- one table of argument rules, applied to every command before it runs ----------------------------------


def _numeric_parameters():
    from mtp.cli import COMMANDS, _load, command_flags

    for command, target in COMMANDS.items():
        for f in command_flags(_load(target)):
            if f.type in (int, float):
                yield command, f.name


def test_every_numeric_flag_of_every_command_has_a_rule():
    from mtp.arguments import RULES

    found = list(_numeric_parameters())
    assert len(found) > 40
    assert [f"{c} {n}" for c, n in found if n not in RULES] == []


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--tau", "1.5"], "--tau must be in [0, 1], got 1.5"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--do-sample", "--temperature", "0"],
     "--temperature must be > 0 when sampling (--do-sample)"),
    (["generate", "--prompt", "hi", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--prompt", "hi", "--tau", "nan"], "--tau must be a finite number, got nan"),
    (["generate", "--prompt", "hi", "--do-sample", "--temperature", "inf"], "--temperature must be a finite number"),
    (["train", "--output", "o", "--train-minutes", "inf"], "--train-minutes must be a finite number, got inf"),
    (["info", "--num-heads", "0"], "--num-heads must be >= 1"),
    (["train", "--output", "o", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["train", "--output", "o", "--holdout", "1"], "--holdout must be in [0, 1), got 1.0"),
    (["train", "--output", "o", "--epochs", "0"], "--epochs must be > 0"),
    (["train", "--output", "o", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--output", "o", "--seq-len", "1"], "--seq-len must be >= 2"),
    (["train", "--output", "o", "--threads", "0"], "--threads must be >= 1"),
    (["bench-train", "--num-heads", "2", "0"], "--num-heads must be >= 1, got 0"),
    (["eval", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["eval", "--shots", "9"], "--shots must be in [0, 8], got 9"),
    (["bench", "--tau", "0.9", "1.2"], "--tau must be in [0, 1], got 1.2"),
    (["bench", "--k", "0"], "--k must be >= 1"),
    (["demo", "--train-limit", "1"], "--train-limit must be >= 2"),
    (["convert", "--input", "x", "--output", "y", "--num-trunk-layers", "-1"], "--num-trunk-layers must be >= 0"),
    # an int too large for a float is a number like any other (math.isfinite overflowed on it: a traceback)
    (["eval", "--shots", "1" + "0" * 400], "--shots must be in [0, 8], got 1000"),
    (["generate", "--prompt", "hi", "--seed", "1" + "0" * 400], "--seed must be in [0, 18446744073709551615]"),
])
def test_every_command_checks_its_flags_before_any_work(args, message, capsys, monkeypatch):
    # A model that does not exist: a command that started working would fail on it, not on the flag.
    monkeypatch.setattr("sys.argv", ["mtp"])
    if args[0] not in ("convert", "demo"):
        args = [*args, "--model", "/no/such/model"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command, kind", [
    (["generate", "--prompt", "hi"], "file"), (["bench-train"], "file"), (["train"], "folder"),
    (["eval"], "folder"), (["bench"], "folder"), (["demo"], "folder"), (["convert", "--input", "x"], "folder"),
])
def test_output_paths_of_the_wrong_kind_or_unwritable_fail_first(command, kind, tmp_path, capsys):
    a_file, a_folder = tmp_path / "a-file", tmp_path / "a-folder"
    a_file.write_text("x")
    a_folder.mkdir()
    model = [] if command[0] in ("convert", "demo") else ["--model", "/no/such/model"]
    wrong = a_folder if kind == "file" else a_file
    code, _, err = run_cli([*command, *model, "--output", str(wrong)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"{wrong} is a folder; give the name of a file" if kind == "file" else f"{wrong} is a file, not a folder") in err
    code, _, err = run_cli([*command, *model, "--output", str(a_file / "sub" / "out")], capsys)
    assert code == 2 and f"cannot be created: {a_file} is a file, not a folder" in err
    code, _, err = run_cli([*command, *model, "--output", "/proc/1/out"], capsys)  # not writable, even by root
    assert code == 2 and "cannot be written: no permission to write in /proc/1" in err
    assert "not found" not in err


def test_generate_output_folder_is_refused_before_decoding(tiny_mtp_folder, tmp_path, capsys):
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "hi", "--output",
                              str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err and out == ""


def test_generate_truncate_prompt(tiny_mtp_folder, capsys):
    long_prompt = "Janet has 3 eggs and 4 ducks. " * 60  # longer than the tiny model's 256-token context
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", long_prompt, "--max-new-tokens", "8", "--json"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "exceeds the model's context of 256" in err and "--truncate-prompt" in err
    code, out, err = run_cli([*args, "--truncate-prompt"], capsys)
    assert code == 0, err
    assert 1 <= len(json.loads(out.strip().splitlines()[-1])["token_ids"]) <= 8


def test_streamed_text_is_the_text(tiny_mtp_folder, capsys):
    """--stream prints the pieces as they are decoded (`IncrementalText`); together they are the answer's text."""
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "16",
            "--strategy", "speculative", "--no-chat"]  # (the tiny model answers the chat prompt with spaces)
    code, whole, _ = run_cli(args, capsys)
    code_streamed, streamed, _ = run_cli([*args, "--stream"], capsys)
    assert code == code_streamed == 0 and whole.strip() and streamed.strip() == whole.strip()


def test_streamed_text_ends_before_the_stop_string(tiny_mtp_folder, tmp_path, capsys):
    """A prompt record's "stop" ends the streamed text where it ends the record's text: --stream printed the stop
    string and what the same step emitted after it."""
    prompts = tmp_path / "p.jsonl"
    args = ["generate", "--model", str(tiny_mtp_folder), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--strategy", "speculative", "--no-chat"]
    prompts.write_text(json.dumps({"prompt": "What is 7 + 5?"}) + "\n")
    code, whole, err = run_cli(args, capsys)
    text = whole.strip()
    assert code == 0 and len(text) > 6, err
    stop = text[len(text) // 2:len(text) // 2 + 2]
    prompts.write_text(json.dumps({"prompt": "What is 7 + 5?", "stop": stop}) + "\n")
    code, cut, _ = run_cli(args, capsys)
    code_streamed, streamed, _ = run_cli([*args, "--stream"], capsys)
    assert code == code_streamed == 0 and stop not in cut and text.startswith(cut.strip())
    assert streamed.strip() == cut.strip()


def test_generate_uses_the_chat_template_unless_told_not_to(tiny_mtp_folder, capsys, monkeypatch):
    """An instruct model's prompt goes through its chat template by default (as `mtp eval`, `bench` and `chat` do:
    the default model, fed the bare question, ended its answer at once); --no-chat feeds the text as it is."""
    from mtp import MTPModel
    from mtp.decoding import queue as queue_module

    tok = MTPModel.from_pretrained(tiny_mtp_folder).tokenizer
    question = "What is 7 + 5?"
    fed = []
    real = queue_module.generate
    monkeypatch.setattr(queue_module, "generate",
                        lambda model, ids, *a, **kw: fed.append(ids[0].tolist()) or real(model, ids, *a, **kw))
    for flags in ([], ["--chat"], ["--no-chat"]):
        code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", question,
                                "--max-new-tokens", "2", *flags], capsys)
        assert code == 0, err
    templated = tok(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=False), add_special_tokens=False).input_ids
    assert fed == [templated, templated, tok(question).input_ids]


def test_generate_answers_conversations_after_their_last_user_turn(tiny_mtp_folder, tmp_path, capsys):
    """--prompts with "messages" records (a chat dataset): each conversation goes through the chat template up to
    its last user turn (a reference answer after it is left out), the same tokens as that conversation asked with
    the template by hand; a conversation without a user turn to answer says where."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [*turns, {"role": "assistant", "content": "12"}]}) + "\n"
                    + json.dumps({"messages": turns}) + "\n")
    code, out, _ = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(path), "--json",
                            "--max-new-tokens", "6"], capsys)
    first, second = (json.loads(line) for line in out.strip().splitlines())
    assert code == 0 and first["prompt"] == second["prompt"] == turns and first["token_ids"] == second["token_ids"]
    from mtp.decoding.generate import generate
    from mtp.models.loading import load_mtp_model

    model = load_mtp_model(str(tiny_mtp_folder))
    text = model.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert first["token_ids"] == generate(model, ids, max_new_tokens=6).tokens[0]
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts", str(path)], capsys)
    assert code == 2 and f"{path}:1: a conversation to answer ends with a user message (its roles: system)" in err


def test_ctrl_c_during_generate_prints_and_keeps_what_was_generated(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    from mtp.decoding import queue as queue_module

    args = ["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--max-new-tokens", "12",
            "--json", "--no-chat"]  # (the tiny model answers the chat prompt with spaces: printed, they strip away)
    code, out, _ = run_cli(args, capsys)
    full = json.loads(out.strip().splitlines()[-1])["token_ids"]
    assert code == 0 and len(full) > 3
    real = queue_module.generate

    monkeypatch.setattr(queue_module, "generate", interrupting(real, after=3))
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_cli([*args, "--output", str(out_file)], capsys)
    assert code == 130 and "interrupted" in err
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["token_ids"] == full[:3] and printed["interrupted"] is True
    assert [json.loads(line)["token_ids"] for line in out_file.read_text().splitlines()] == [full[:3]]
    code, out, _ = run_cli([a for a in args if a != "--json"], capsys)  # as text, too
    assert code == 130 and out.strip()


def _write_denied(output: str = "x") -> int:
    raise PermissionError(13, "Permission denied", output)


def test_a_path_that_turns_out_unwritable_is_one_line_not_file_not_found(monkeypatch, capsys):
    from mtp import cli

    monkeypatch.setitem(cli.COMMANDS, "denied", "test_cli:_write_denied")
    code, _, err = run_cli(["denied", "--output", "somewhere"], capsys)
    assert code == 2 and err.strip() == "mtp: error: cannot use somewhere: Permission denied"


def test_docs_cli_md_is_current():
    """docs/cli.md is what `python -m mtp.cli --markdown docs/cli.md` writes from today's command signatures."""
    written = (Path(__file__).parents[1] / CLI_DOC).read_text()
    assert written == markdown(), f"{CLI_DOC} is not current: run `python -m mtp.cli --markdown {CLI_DOC}`"


def test_decoding_md_lists_every_parameter_of_generate():
    """docs/decoding.md gives `generate`'s whole signature in one paragraph: every parameter, in order (it had
    fallen behind by four)."""
    import inspect
    import re

    from mtp.decoding.generate import generate

    text = (Path(__file__).parents[1] / "docs" / "decoding.md").read_text()
    match = re.search(r"`generate\(model, input_ids, attention_mask=None, \*, (.*?)\)` takes", text, re.S)
    assert match, "decoding.md's generate signature is gone"
    documented = ["model", "input_ids", "attention_mask"] + [p.strip() for p in match.group(1).split(",")]
    assert documented == list(inspect.signature(generate).parameters)


def _documented(name: str, count: int = 3, mode: Literal["a", "b"] = "a", sizes: list[int] | None = None,
                fast: bool = True, task: str = "x"):
    """Do the thing.

    Args:
        name: who | what
        count: how many,
            on two lines;
            auto: still the count's
        sizes: one or more
    """


def test_the_reference_renders_every_kind_of_flag():
    rows = command_markdown("thing", _documented, ["task"]).splitlines()
    assert rows[:3] == ["## mtp thing", "", "Do the thing."]
    assert rows[6:] == [
        "| `--name` | str | required | who \\| what |",
        "| `--count` | int | `3` | how many, on two lines; auto: still the count's |",
        "| `--mode` | {a,b} | `a` |  |",
        "| `--sizes` | int ... |  | one or more |",
        "| `--fast`, `--no-fast` |  | on |  |",
        "| `[task]` (a word after the command) | str | `x` |  |",
    ]


@dataclass(frozen=True)
class _Extras:
    """extra options

    Args:
        depth: how deep
        loud: say it
    """

    depth: int = 2
    loud: bool = False


_grouped_calls: list[dict] = []


def _grouped(name: str, extras: _Extras | None = None) -> int:
    """Do the grouped thing.

    Args:
        name: who
    """
    _grouped_calls.append({"name": name, "extras": extras})
    return 0


def test_a_dataclass_parameter_is_a_group_of_flags(monkeypatch, capsys):
    from mtp import cli

    assert [(f.flag, f.default, f.help, f.group) for f in cli.command_flags(_grouped)] == [
        ("--name", None, "who", ""), ("--depth", 2, "how deep", "extra options"),
        ("--loud", False, "say it", "extra options")]
    rows = command_markdown("grouped", _grouped).splitlines()
    assert rows[rows.index("| `--name` | str | required | who |") + 2:] == [
        "### extra options", "", "| flag | value | default | what it does |", "|---|---|---|---|",
        "| `--depth` | int | `2` | how deep |", "| `--loud`, `--no-loud` |  | off | say it |"]
    monkeypatch.setitem(cli.COMMANDS, "grouped", "test_cli:_grouped")
    code, out, _ = run_cli(["grouped", "--help"], capsys)
    assert code == 0 and "\nextra options:\n  --depth DEPTH" in out
    _grouped_calls.clear()
    code, _, err = run_cli(["grouped", "--name", "x", "--loud"], capsys)
    assert code == 0, err
    assert _grouped_calls == [{"name": "x", "extras": _Extras(depth=2, loud=True)}]


def test_python_m_mtp_cli_markdown_writes_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["mtp.cli", "--markdown", str(tmp_path / "cli.md")])
    with warnings.catch_warnings():  # runpy warns that mtp.cli is imported already
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("mtp.cli", run_name="__main__")
    assert (tmp_path / "cli.md").read_text() == markdown()


def test_every_flag_says_what_it_does():
    """`mtp COMMAND --help` and docs/cli.md: no flag without a line of its own in its command's docstring."""
    from mtp.cli import COMMANDS, POSITIONAL, _load, command_flags

    silent = [f"{command} {f.flag}" for command, target in COMMANDS.items()
              for f in command_flags(_load(target), POSITIONAL.get(command, [])) if not f.help.strip()]
    assert silent == []


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--temprature", "0.5"],
     "mtp generate: error: unrecognized arguments: --temprature 0.5; did you mean --temperature? "
     "(see `mtp generate --help`)"),
    (["bench", "--max-tokens=8"], "unrecognized arguments: --max-tokens=8; did you mean --max-new-tokens?"),
    (["eval", "gsm8k", "mmlu"], "mtp eval: error: unrecognized arguments: mmlu (see `mtp eval --help`)"),
])
def test_an_unknown_flag_points_to_the_command_and_the_closest_flag(args, message, capsys):
    code, _, err = run_cli([*args, "--model", "/no/such/model"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_info_counts_a_padded_vocabulary_s_tokens(tmp_path, capsys):
    """Real models pad the embedding past the tokenizer's tokens: `mtp info` says how many rows are tokens."""
    from conftest import tiny_mtp, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok) + 11)
    model.tokenizer = tok
    code, out, _ = run_cli(["info", "--model", str(model.save_pretrained(tmp_path / "padded"))], capsys)
    row = next(line for line in out.splitlines() if line.startswith("vocabulary"))
    assert code == 0 and f"{len(tok)} tokens + 11 padding rows" in row, row
