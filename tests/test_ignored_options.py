"""An option the command would ignore, as given, is an error (one line, exit code 2, before any work), not a silent
no-op: a sampling setting without --do-sample, a ConfAdapt threshold without confadapt, `mtp info`'s measurement
options without --memory, answering options without --targets self. Its default, or the option with what reads it,
is fine."""

from __future__ import annotations

import pytest

from test_damaged_inputs import assert_one_line_error, run_cli

NO_MODEL = ["--model", "/no/such/model"]  # a command that got past the checks would fail on this instead


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--temperature", "0.7"],
     "--temperature shapes sampling; greedy decoding ignores it (add --do-sample, or drop --temperature)"),
    (["generate", "--prompt", "hi", "--top-p", "0.9"], "--top-p shapes sampling"),
    (["generate", "--prompt", "hi", "--top-k", "20", "--strategy", "speculative"], "--top-k shapes sampling"),
    (["generate", "--prompt", "hi", "--seed", "3"], "--seed shapes sampling"),
    (["generate", "--prompt", "hi", "--tau", "0.5"],
     "--tau: the confidence threshold of ConfAdapt; use it with --strategy confadapt (or drop --tau)"),
    (["generate", "--prompt", "hi", "--tau", "0.5", "--strategy", "speculative"], "--tau: the confidence threshold"),
    (["eval", "--tau", "0.5", "--strategy", "static"], "--tau: the confidence threshold of ConfAdapt"),
    (["bench", "--tau", "0.5", "--strategy", "greedy", "speculative"], "--tau: the confidence threshold"),
    (["generate", "--prompt", "hi", "--strategy", "speculative", "--lookup-corpus", "auto"],
     "--lookup-corpus drafts where --lookup's do not: give --lookup N too (or drop --lookup-corpus)"),
    (["bench", "--lookup-corpus", "auto"], "--lookup-corpus drafts where --lookup's do not"),
    (["info", "--quantize", "fp16"], "--quantize: with --memory only; without it nothing decodes"),
    (["info", "--tree-size", "4"], "--tree-size: with --memory only"),
    (["info", "--lookup", "4"], "--lookup: with --memory only"),
    (["info", "--max-new-tokens", "4"], "--max-new-tokens: with --memory only"),
    (["train", "--output", "o", "--max-new-tokens", "64"],
     "--max-new-tokens: for the model's own answers (--targets self); this run trains on the data's answers"),
    (["train", "--output", "o", "--gen-batch-size", "4", "--targets", "data"], "--gen-batch-size: for the model's"),
    (["generate", "--prompt", "hi", "--strategy", "speculative", "--tree", "chain", "--tree-size", "4"],
     "--tree-size: the node count of an auto or dynamic tree; use it with --tree auto or dynamic"),
    (["eval", "--strategy", "speculative", "--tree", "tree.json", "--tree-size", "4"], "--tree-size: the node count"),
    (["generate", "--prompt", "hi", "--do-sample", "--strategy", "static"],
     "--do-sample: sampling is available with --strategy greedy or speculative"),
    (["generate", "--prompt", "hi", "--do-sample", "--strategy", "confadapt"], "--do-sample: sampling is available"),
    # a split of a data file (it has none: the flag went unread)
    (["train", "--output", "o", "--data", __file__, "--split", "test"],
     "--split chooses a dataset's split (GSM8K's train or test); --data names a file, which has none (drop --split)"),
    (["eval", "--data", __file__, "--split", "train"], "--split chooses a dataset's split"),
    # both spellings of a renamed flag: the last would win without a word
    (["bench", "--taus", "0.9", "--tau", "0.5", "--strategy", "confadapt"],
     "--taus and --tau are two spellings of one flag (--taus is deprecated); give --tau only"),
    (["generate", "--prompts-file", "a.txt", "--prompts=b.txt"], "--prompts-file and --prompts are two spellings"),
])
def test_an_option_that_would_be_ignored_is_an_error(args, message, capsys):
    code, err = run_cli([*args, *NO_MODEL], capsys)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("args", [
    ["generate", "--prompt", "hi", "--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
     "--seed", "1"],
    ["generate", "--prompt", "hi", "--temperature", "1.0", "--tau", "0.9"],  # the defaults, typed
    ["generate", "--prompt", "hi", "--strategy", "confadapt", "--tau", "0.5"],
    ["bench", "--tau", "0.5"],  # every strategy
    ["bench", "--tau", "0.5", "--strategy", "confadapt"],
    ["generate", "--prompt", "hi", "--strategy", "speculative", "--tree", "dynamic", "--tree-size", "4"],
    ["bench", "--tree", "auto", "dynamic", "--tree-size", "4", "16"],
    ["generate", "--prompt", "hi", "--do-sample", "--strategy", "speculative"],
    ["info", "--memory", "--quantize", "fp16", "--max-new-tokens", "4"],
    ["train", "--output", "o", "--targets", "self", "--max-new-tokens", "64", "--gen-batch-size", "4"],
    ["train", "--output", "o", "--resume", "--gen-batch-size", "4"],  # the run's own --targets decides
    ["train", "--output", "o", "--split", "test"],  # (the shipped GSM8K's)
    ["eval", "--split", "train"],
])
def test_an_option_with_what_reads_it_passes_the_checks(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli([*args, *NO_MODEL], capsys)
    assert code == 2 and "/no/such/model" in err or "train_config.json not found" in err, err
