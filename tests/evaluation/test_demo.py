"""`mtp demo` stages with a tiny model standing in for the default: training is cached, the bench report lands."""

from __future__ import annotations

import json

import pytest
from eval_helpers import make_model

from mtp.errors import MTPError
from mtp.evaluation.demo import RUN_NAME, is_finished_run, run_demo, train_settings
from mtp.training.commands import train

pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file


class FakeTrain:
    """Stands in for `mtp.training.commands.train`: records its arguments, saves a tiny model like a run."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, output, **kwargs):
        self.calls.append(kwargs)
        model = make_model(self.tokenizer, num_heads=4)
        model.save_pretrained(output, tokenizer=self.tokenizer)
        with open(f"{output}/eval.json", "w") as f:
            json.dump({"epochs": kwargs["epochs"]}, f)
        return 0


def _demo(root, fake, **kwargs):
    settings = {"limit": 2, "max_new_tokens": 4, "int8": False, "taus": (0.5,), **kwargs}
    return run_demo(root, train_limit=4, train_epochs=2, progress=False, llamacpp=False,
                    ensure_base=lambda: "(tiny)", train_fn=fake, **settings)


def test_demo_trains_once_then_reuses(tiny_tokenizer, tmp_path, capsys):
    fake = FakeTrain(tiny_tokenizer)
    assert _demo(tmp_path, fake) == 0
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["freeze_trunk"] is True and call["targets"] == "self" and call["num_heads"] == 4
    assert call["resume"] is False and call["limit"] == 4 and call["epochs"] == 2
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["hf-greedy", "greedy", "speculative", "confadapt-tau0.5",
                                                        "static-k2", "static-k4", "greedy-fp16", "speculative-fp16"]
    assert report["gsm8k_scored"] is True
    assert (tmp_path / "bench" / "speed_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "[1/3]" in out and "[2/3]" in out and "[3/3]" in out and "| speculative |" in out
    assert "plot:" in out

    assert _demo(tmp_path, fake, hf=False, limit=1) == 0  # second run: the heads are reused, only the bench runs
    assert len(fake.calls) == 1
    assert "reusing the trained heads" in capsys.readouterr().out


def test_demo_resumes_an_interrupted_training(tiny_tokenizer, tmp_path):
    run_dir = tmp_path / RUN_NAME
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text("{}")  # started, never finished
    assert not is_finished_run(run_dir)
    fake = FakeTrain(tiny_tokenizer)
    _demo(tmp_path, fake, hf=False, limit=1, taus=())
    assert fake.calls[0]["resume"] is True


def test_demo_settings_are_train_arguments():
    import inspect

    params = inspect.signature(train).parameters
    assert set(train_settings(8, 2)) <= set(params)  # every demo setting is a flag of `mtp train`


def test_demo_bad_input(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MTPError, match="is a file"):
        run_demo(tmp_path / "f", ensure_base=lambda: "x", train_fn=lambda **k: 0)
    with pytest.raises(MTPError, match="train-limit"):
        run_demo(tmp_path, train_limit=1)
