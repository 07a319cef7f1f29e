"""One run per output folder, and SIGTERM handled as Ctrl-C: with real processes, each bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_base, tiny_tokenizer
from mtp.cli import main
from mtp.errors import MTPError
from mtp.process import output_lock

SRC = Path(__file__).parents[1] / "src"
WAIT = 120  # seconds any one process may take here: a hung test fails instead of hanging the suite


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {WAIT} s")
        time.sleep(0.2)


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def test_a_held_folder_is_refused_naming_the_holder_and_kill_9_frees_it(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mtp.process import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(folder)],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MTPError, match=rf"--output {folder} is in use by another mtp run \(pid {holder.pid}\)"):
            with output_lock(folder):
                pass
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        holder.wait(WAIT)
    finally:
        holder.kill()
    with output_lock(folder):  # no stale lock to clear by hand
        pass


def test_a_run_that_wrote_nothing_leaves_no_folders_it_created(tmp_path, monkeypatch, capsys):
    """`mtp eval` writes to eval/<name>/ by default: stopped before writing anything (here a missing model), it
    leaves neither folder; a folder that was there already, or one that holds another file, stays."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["eval", "gsm8k", "--model", str(tmp_path / "no-model")], capsys)
    assert code == 2 and "not found" in err
    assert list(tmp_path.iterdir()) == []
    with output_lock(tmp_path / "a" / "b" / "c"):
        (tmp_path / "a" / "kept.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["kept.txt"]  # b/c went, a stays
    with output_lock(tmp_path / "a"):
        pass
    assert (tmp_path / "a" / "kept.txt").is_file()


@pytest.mark.parametrize("command", [["eval", "gsm8k"], ["bench"]])
def test_eval_and_bench_refuse_a_folder_in_use(tmp_path, command, capsys):
    folder, model = tmp_path / "out", tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")  # a model there is (the lock is taken before it loads)
    with output_lock(folder):
        code, err = run_cli([*command, "--model", model, "--output", folder], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"in use by another mtp run (pid {os.getpid()})" in err


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = tiny_tokenizer()
    tiny_base("llama", vocab_size=len(tok)).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    data = root / "text.txt"
    data.write_text("\n\n".join(f"Janet has {i} eggs and {i + 1} ducks; the answer is {2 * i + 1}." for i in range(40)))
    return root / "hf", data


def test_sigterm_saves_a_checkpoint_and_a_second_run_is_refused(model_and_data, tmp_path, capsys, monkeypatch):
    """`mtp train --save-every 0` stopped by SIGTERM (as schedulers and torchrun stop it) saves its step and
    exits 143; a second `mtp train` on the folder meanwhile is refused, naming the first; --resume continues from
    the saved step."""
    from mtp.training.checkpoints import latest_checkpoint, load_trainer_state

    model, data = model_and_data
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mtp", "train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--seq-len", "32", "--batch-size", "2", "--steps", "100000", "--save-every", "0", "--holdout", "0",
            "--threads", "1", "--no-progress"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, first, "training steps")
        second = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=WAIT)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"mtp: error: --output {out} is in use by another mtp run (pid {first.pid}); wait for it to end, or "
            "choose another folder")
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=WAIT)
    finally:
        first.kill()
    assert first.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "mtp: terminated"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and load_trainer_state(checkpoint)["step"] == steps[-1] >= 2
    assert f"stopped at step {steps[-1]}; checkpoint saved" in stdout

    from mtp.training.loop import Trainer

    resumed_at = []

    def stop_at_once(self, *a, **k):
        resumed_at.append(self.step)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", stop_at_once)
    code, _ = run_cli(["train", "--output", out, "--resume", "--no-progress"], capsys)
    assert code == 130 and resumed_at == [steps[-1]]


def test_sigterm_during_eval_keeps_the_finished_problems(tmp_path, capsys, monkeypatch):
    """Evaluation on SIGTERM: the problems already answered stay in samples.jsonl (exit 143), and the next run
    answers only the rest."""
    import mtp.evaluation.evaluate as evaluate
    from conftest import tiny_mtp

    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from eval_helpers import QUESTIONS, train_tokenizer

    tok = train_tokenizer()
    model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok), context=4096)
    model.tokenizer = tok
    folder = model.save_pretrained(tmp_path / "model")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    real = evaluate.append_records
    answered, terminate_after = [], [2]

    def terminate_after_two(f, records):
        real(f, records)
        answered.extend(records)
        if len(answered) == terminate_after[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread, while the next decodes

    monkeypatch.setattr(evaluate, "append_records", terminate_after_two)
    args = ["eval", "gsm8k", "--model", folder, "--data", data, "--shots", "0", "--max-new-tokens", "3",
            "--batch-size", "1", "--output", tmp_path / "ev", "--no-progress"]
    code, err = run_cli(args, capsys)
    assert code == 143 and err.strip().splitlines()[-1] == "mtp: terminated", err
    saved = [json.loads(line)["id"] for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert saved == [0, 1]
    answered.clear()
    terminate_after[0] = None
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert [r["id"] for r in answered] == [2, 3, 4]
