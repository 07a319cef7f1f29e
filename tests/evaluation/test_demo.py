"""`mtp demo` stages with a tiny model standing in for the default: training is cached, the bench report lands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import make_model

from mtp.errors import MTPError
from mtp.evaluation.demo import (
    CPU_PLAN,
    GPU_PLAN,
    MIN_ANSWER_MINUTES,
    RUN_NAME,
    answer_minutes,
    is_finished_run,
    run_demo,
    train_settings,
    trunk_layers,
)
from mtp.training.commands import install_model, train, train_defaults

BENCH_MINUTES, TRAIN_PER_ANSWER = CPU_PLAN.bench_minutes, CPU_PLAN.train_per_answer

pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file


class FakeTrain:
    """Stands in for `mtp.training.commands.train`: records its arguments, saves a tiny model like a run."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, output, **kwargs):
        from mtp.training.loop import RESUME_HINT

        self.calls.append({**kwargs, "resume_hint": RESUME_HINT.get()})  # what a stopped run would say
        model = make_model(self.tokenizer, num_heads=4)
        Path(output).mkdir(parents=True, exist_ok=True)
        install_model(model, Path(output))  # as a run does: beside what the run folder already holds
        with open(f"{output}/eval.json", "w") as f:
            json.dump({"epochs": kwargs["epochs"]}, f)
        return 0


def _demo(root, fake, **kwargs):
    settings = {"limit": 2, "max_new_tokens": 4, "int8": False, "tau": (0.5,), **kwargs}
    return run_demo(root, train_limit=4, train_epochs=2, progress=False, llamacpp=False,
                    ensure_base=lambda: "(tiny)", train_fn=fake, **settings)


def test_demo_trains_once_then_reuses(tiny_tokenizer, tmp_path, capsys):
    fake = FakeTrain(tiny_tokenizer)
    assert _demo(tmp_path, fake) == 0
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["freeze_trunk"] is True and call["targets"] == "self" and call["num_heads"] == 4
    assert call["resume"] is False and call["limit"] == 4 and call["epochs"] == 2
    assert call["resume_hint"] == "the same mtp demo command goes on from it"  # (demo has no --resume)
    # the default budget (30 min) less the bench's share, split between answering and training 2 epochs
    assert 0.99 * (30 - BENCH_MINUTES) / (1 + TRAIN_PER_ANSWER * 2 / 3) < call["answer_minutes"] <= \
        (30 - BENCH_MINUTES) / (1 + TRAIN_PER_ANSWER * 2 / 3)
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert [r["method"] for r in report["methods"]] == [
        "hf-greedy", "greedy", "speculative", "confadapt-tau0.5", "static-k2", "static-k4", "greedy-fp16",
        "speculative-fp16", "speculative-fp16-tree4", "speculative-fp16-lookup6", "speculative-fp16-tree4-lookup6"]
    assert all(r["equal_to_lossless_reference"] == 2 for r in report["methods"] if r["method"].startswith("spec"))
    assert report["gsm8k_scored"] is True
    assert (tmp_path / "bench" / "speed_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "[1/3]" in out and "[2/3]" in out and "[3/3]" in out and "| speculative |" in out
    assert "plot:" in out
    assert f"Next: mtp chat --model {tmp_path / 'smollm2-mtp4'} --quantize fp16" in out  # the heads it trained

    assert _demo(tmp_path, fake, hf=False, limit=1) == 0  # second run: the heads are reused, only the bench runs
    assert len(fake.calls) == 1
    assert "reusing the trained heads" in capsys.readouterr().out


def test_demo_resumes_an_interrupted_training(tiny_tokenizer, tmp_path):
    run_dir = tmp_path / RUN_NAME
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text("{}")  # started, never finished
    assert not is_finished_run(run_dir)
    fake = FakeTrain(tiny_tokenizer)
    _demo(tmp_path, fake, hf=False, limit=1, tau=())
    assert fake.calls[0]["resume"] is True
    assert fake.calls[0]["answer_minutes"] is None  # the run's own budget and measured count (train_config.json)


def test_answer_minutes_split_the_budget():
    assert answer_minutes(30, 1, 3) == (30 - 1 - BENCH_MINUTES) / (1 + TRAIN_PER_ANSWER)
    assert answer_minutes(60, 1, 3) > 2 * answer_minutes(30, 1, 3)  # the bench's share does not grow
    assert answer_minutes(30, 1, 6) < answer_minutes(30, 1, 3)  # more epochs: more of the budget for training
    assert answer_minutes(3, 0, 3) == MIN_ANSWER_MINUTES  # nothing left after the bench: one batch all the same


def test_a_small_budget_answers_one_batch_and_the_demo_completes(tiny_tokenizer, gsm8k_file, tmp_path, capsys):
    """The real `mtp train` on a tiny 4-head model: a budget spent before answering answers one batch of 2 of
    the 5 questions, and the demo trains on them and benchmarks."""
    folder = tmp_path / "tiny4"
    make_model(tiny_tokenizer, num_heads=4).save_pretrained(folder, tokenizer=tiny_tokenizer)

    def tiny_train(**kwargs):
        return train(**{**kwargs, "model": str(folder), "data": str(gsm8k_file), "seq_len": 96,
                        "max_new_tokens": 6, "gen_batch_size": 2})

    root = tmp_path / "demo"
    assert run_demo(root, budget_minutes=1.0, train_epochs=1, limit=1, max_new_tokens=4, progress=False,
                    llamacpp=False, hf=False, tau=(), ensure_base=lambda: "(tiny)", train_fn=tiny_train) == 0
    out = capsys.readouterr().out
    assert "no time to answer" in out and "2 of 5 questions fit" in out
    config = json.loads((root / RUN_NAME / "train_config.json").read_text())
    assert config["args"]["_answer_count"] == 2 and config["args"]["answer_minutes"] == MIN_ANSWER_MINUTES
    assert is_finished_run(root / RUN_NAME) and (root / "bench" / "report.json").is_file()


def test_heads_of_two_layers_and_a_reused_run_that_has_others(tiny_tokenizer, tmp_path):
    """--num-trunk-layers reaches training; a finished run with other heads is refused, not benchmarked as if."""
    fake = FakeTrain(tiny_tokenizer)  # saves a 3-layer model on 2 trunk layers
    assert _demo(tmp_path, fake, hf=False, num_trunk_layers=2) == 0
    assert fake.calls[0]["num_trunk_layers"] == 2
    assert _demo(tmp_path, fake, hf=False, num_trunk_layers=2) == 0 and len(fake.calls) == 1  # reused
    with pytest.raises(MTPError, match="2 trunk layers, not 1"):
        _demo(tmp_path, fake, hf=False, num_trunk_layers=1)


def test_a_plan_of_two_layer_heads_trains_them_and_reuses_any_finished_run(tiny_tokenizer, tiny_model_dir,
                                                                           tmp_path, capsys):
    """The GPU's plan (heads of two layers) on the tiny 3-layer base: training gets 1 trunk layer unless
    --num-trunk-layers says otherwise; a finished run is reused whatever its heads unless the flag asks others."""
    from dataclasses import replace

    assert GPU_PLAN.head_layers == 2 and CPU_PLAN.head_layers == 1
    plan = replace(CPU_PLAN, head_layers=2)
    fake = FakeTrain(tiny_tokenizer)  # saves a 3-layer model on 2 trunk layers

    def run(**kw):
        return run_demo(tmp_path, train_limit=4, train_epochs=1, progress=False, llamacpp=False, hf=False, limit=1,
                        max_new_tokens=2, tau=(), ensure_base=lambda: tiny_model_dir, train_fn=fake, plan=plan, **kw)

    assert run() == 0 and fake.calls[0]["num_trunk_layers"] == 1
    assert "heads of 2 layers each: --num-trunk-layers 1" in capsys.readouterr().out
    assert run() == 0 and len(fake.calls) == 1  # the saved run (2 trunk layers) is the plan's default's: reused
    with pytest.raises(MTPError, match="2 trunk layers, not 1"):
        run(num_trunk_layers=1)
    capsys.readouterr()
    (tmp_path / RUN_NAME / "eval.json").unlink()  # unfinished: trains again, the flag wins over the plan
    assert run(num_trunk_layers=2) == 0 and fake.calls[1]["num_trunk_layers"] == 2
    assert "heads of 2 layers each" not in capsys.readouterr().out
    assert trunk_layers(tiny_model_dir, CPU_PLAN, None) is None  # one-layer heads: mtp train's own default
    assert trunk_layers(tiny_model_dir, replace(CPU_PLAN, head_layers=3), None) is None  # no layer left


def test_demo_settings_are_train_arguments():
    assert set(train_settings(8, 2)) <= set(train_defaults())  # every demo setting is a flag of `mtp train`


def test_demo_bad_input(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MTPError, match="is a file"):
        run_demo(tmp_path / "f", ensure_base=lambda: "x", train_fn=lambda **k: 0)
    with pytest.raises(MTPError, match="train-limit"):
        run_demo(tmp_path, train_limit=1)
    with pytest.raises(MTPError, match="budget-minutes"):
        run_demo(tmp_path, budget_minutes=0)


def test_a_reused_run_says_which_training_flags_it_did_not_apply(tiny_tokenizer, tmp_path, capsys):
    fake = FakeTrain(tiny_tokenizer)
    assert _demo(tmp_path, fake, hf=False, limit=1, tau=()) == 0
    (tmp_path / RUN_NAME / "train_config.json").write_text(json.dumps({"args": {"epochs": 2, "limit": 4}}))
    capsys.readouterr()
    assert run_demo(tmp_path, train_limit=9, train_epochs=1, progress=False, llamacpp=False, hf=False, limit=1,
                    max_new_tokens=2, tau=(), ensure_base=lambda: "(tiny)", train_fn=fake) == 0
    out = capsys.readouterr().out
    assert "not applied: --train-epochs 1 (it trained 2), --train-limit 9 (it had 4)" in out
    assert len(fake.calls) == 1
    assert _demo(tmp_path, fake, hf=False, limit=1, tau=()) == 0  # the run's own flags: nothing to say
    assert "not applied" not in capsys.readouterr().out
