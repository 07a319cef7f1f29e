"""What a user sees while a command runs: --no-progress means no bar on stderr at all (transformers' own included),
and an interrupted bench says what it kept."""

from __future__ import annotations

import pytest

from test_damaged_inputs import run_cli


@pytest.fixture
def _restore_transformers_bars():
    from transformers.utils import logging as hf_logging

    yield
    hf_logging.enable_progress_bar()


def _tiny_train_args(tmp_path, steps: int) -> list:
    """`mtp train --no-progress` of a tiny plain model folder on a small text file, written under tmp_path."""
    from conftest import tiny_base, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_base("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text("\n\n".join(f"Janet has {i} eggs and {i + 1} ducks." for i in range(8)))
    return ["train", "--model", tmp_path / "hf", "--data", tmp_path / "text.txt", "--output", tmp_path / "run",
            "--steps", str(steps), "--seq-len", "32", "--holdout", "0", "--no-progress"]


def test_no_progress_silences_the_loading_bars_too(tmp_path, capsys, _restore_transformers_bars):
    """--no-progress (logs of batch jobs): transformers' "Loading weights" bar of a plain model folder goes too."""
    code, err = run_cli(_tiny_train_args(tmp_path, steps=1), capsys)
    assert code == 0, err
    assert "%|" not in err, err


def test_no_progress_silences_the_gguf_conversion_bar_and_restores_the_bars(tmp_path, capsys, monkeypatch):
    """transformers' GGUF conversion draws a tqdm bar of its own that transformers' switch does not reach;
    --no-progress silences it too, and a later command in the same process has its bars back."""
    from transformers.utils import logging as hf_logging

    from gguf_helpers import tiny_model, write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model())
    args = ["generate", "--model", gguf, "--prompt", "the cat", "--max-new-tokens", "1"]
    for home, quiet in (("quiet", True), ("bars", False)):  # a new home each: the conversion runs each time
        monkeypatch.setenv("MTP_HOME", str(tmp_path / home))
        code, err = run_cli([*args, "--no-progress"] if quiet else args, capsys)
        assert code == 0 and "converting tiny.gguf" in err, err
        assert ("%|" in err) != quiet, err
        assert hf_logging.is_progress_bar_enabled()


def test_no_progress_logs_a_line_every_few_minutes(capsys):
    """--no-progress (a batch job's log): long work still says how far it got, as a plain line at most every
    LOG_EVERY_S seconds (none for work that ends sooner), with what the bar would have shown."""
    import mtp.progress as progress

    now = [0.0]
    lines = progress.LogLines(400, "train", "step", initial=100, clock=lambda: now[0])
    for _ in range(50):
        now[0] += 1.0
        lines.update()
    assert capsys.readouterr().err == ""  # 50 s: nothing yet
    now[0] = progress.LOG_EVERY_S
    lines.set_postfix_str("loss 2.31", refresh=False)
    lines.update(50)
    err = capsys.readouterr().err
    # 100 steps in 300 s, 200 to go: 10 minutes left
    assert err == "mtp train: 200 of 400 steps (50%), 5.0 min, ~10.0 min left; loss 2.31\n", err
    lines.update()  # a second later: no new line
    assert capsys.readouterr().err == ""
    assert isinstance(progress.progress_bar(False, 3, "x", "answer"), progress.LogLines)


def test_train_with_no_progress_logs_plain_lines(tmp_path, capsys, monkeypatch, _restore_transformers_bars):
    import mtp.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line every step
    code, err = run_cli(_tiny_train_args(tmp_path, steps=2), capsys)
    assert code == 0, err
    assert "mtp train: 1 of 2 steps (50%)" in err and "mtp train: 2 of 2 steps (100%)" in err, err
    assert "%|" not in err and "\r" not in err, err


def test_generate_takes_no_progress(tiny_mtp_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Janet has 3 eggs\nWhat is 7 + 5?\n")
    args = ["generate", "--model", tiny_mtp_folder, "--prompts", prompts, "--max-new-tokens", "2"]
    code, err = run_cli(args, capsys)
    assert code == 0 and "%|" in err, err  # the bar of several prompts
    code, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 0 and "%|" not in err, err


def test_an_interrupted_bench_says_what_it_kept(tiny_mtp_folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) during `mtp bench`: the finished calls stay in calls.jsonl, and the user is told so and
    how to continue (the same command runs only the missing calls)."""
    import json

    import mtp.evaluation.bench as bench

    def interrupted(methods, items, *args, journal=None, **kwargs):
        journal.write_text("".join(json.dumps({"prompt": i, "method": "greedy"}) + "\n" for i in range(2)))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", interrupted)
    out = tmp_path / "b"
    prompts = tmp_path / "p.txt"
    prompts.write_text("Janet has 3 eggs\nWhat is 7 + 5?\n")
    code, err = run_cli(["bench", "--model", tiny_mtp_folder, "--prompts", prompts, "--output", out,
                         "--no-progress", "--no-hf", "--no-fp16", "--strategy", "greedy"], capsys)
    assert code == 130, err
    assert f"mtp bench: interrupted; 2 finished calls are kept in {out / 'calls.jsonl'}: run the same command " \
           "again to measure only the rest" in err, err


def test_generate_clears_its_bar_while_answers_print(tiny_mtp_folder, tmp_path, capsys, monkeypatch):
    """On a terminal the bar (stderr) and the answers (stdout) share the screen: every answer is printed with the
    bar cleared (tqdm's external write mode), so no answer lands in the middle of a bar's line."""
    import contextlib

    from tqdm import tqdm

    printing = []
    original = tqdm.external_write_mode

    @contextlib.contextmanager
    def recorded(*args, **kwargs):
        printing.append(True)
        with original(*args, **kwargs):
            yield
        printing.append(False)

    answers = []
    monkeypatch.setattr(tqdm, "external_write_mode", recorded)
    monkeypatch.setattr("builtins.print", lambda *a, **k: answers.append(bool(printing) and printing[-1]))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Janet has 3 eggs\nWhat is 7 + 5?\n")
    code, err = run_cli(["generate", "--model", tiny_mtp_folder, "--prompts", prompts, "--max-new-tokens", "2",
                         "--batch-size", "1"], capsys)
    assert code == 0, err
    assert answers[:2] == [True] * 2, answers  # two prompts: an answer and its blank line each, inside
    assert answers[2:] == [False], answers  # (the speed line, on stderr, after the bar)
