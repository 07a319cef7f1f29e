"""The `mtp` command line: help, info, generate, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from mtp.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("info", "convert", "generate", "train", "eval", "bench", "demo"):
        assert f"  {command}" in out


def test_unknown_command(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command" in err


def test_info_on_a_folder(tiny_mtp_folder, capsys):
    code, out, _ = run_cli(["info", "--model", str(tiny_mtp_folder)], capsys)
    assert code == 0
    assert "layers 0..1 (2 layers, shared)" in out
    assert "3 (head 0" in out
    assert "vocabulary" in out and "loaded in" in out


def test_generate_strategies_and_json(tiny_mtp_folder, tmp_path, capsys):
    outputs = {}
    for strategy in ("greedy", "speculative", "confadapt", "static"):
        code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?",
                                  "--chat", "--strategy", strategy, "--max-new-tokens", "12", "--json"], capsys)
        assert code == 0, err
        record = json.loads(out.strip().splitlines()[-1])
        assert set(record) == {"text", "token_ids", "stats"}
        assert record["stats"]["new_tokens"] == len(record["token_ids"]) <= 12
        outputs[strategy] = record["token_ids"]
    assert outputs["speculative"] == outputs["greedy"]
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompt", "What is 7 + 5?", "--chat",
                              "--strategy", "speculative", "--quantize", "fp16", "--threads", "1",
                              "--max-new-tokens", "12", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == outputs["greedy"]  # fp16 ~ fp32, tiny model


def test_generate_prompts_file_to_jsonl(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Janet has 3 eggs"}\n\n{"question": "What is 7 + 5?"}\n')
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts-file", str(prompts),
                              "--output", str(out_file), "--max-new-tokens", "5", "--batch-size", "2",
                              "--strategy", "speculative"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["Janet has 3 eggs", "What is 7 + 5?"]
    assert "tokens per forward pass" in err


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompts-file", "/no/such/file.txt"], "prompts file not found"),
    (["generate"], "exactly one of --prompt or --prompts-file"),
    (["info", "--model", "./no/such/folder"], "not found"),
    (["generate", "--prompt", "hi", "--threads", "0"], "--threads must be >= 1"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_prompts_line_has_its_number(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    code, _, err = run_cli(["generate", "--model", str(tiny_mtp_folder), "--prompts-file", str(prompts)], capsys)
    assert code == 2 and f"{prompts}:2: not valid JSON" in err
