"""`mtp train` and `mtp bench-train` end to end on tiny random models saved as folders."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import folder_tensors, tiny_gpt2, tiny_llama, train_tokenizer

from mtp.cli import build_parser, run
from mtp.decoding.corpus import LookupCorpus, folder_corpus
from mtp.errors import MTPError
from mtp.models.parallel_heads import MTPModel
from mtp.models.safetensors_io import SHARD_NAMES
from mtp.training.commands import bench_train, train
from mtp.training.loop import Trainer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def write_data(path, n: int = 30) -> str:
    records = [{"question": f"Tom has {i} apples and buys {i % 7 + 1}. How many apples does he have?",
                "answer": f"Tom has {i} + {i % 7 + 1} = {i + i % 7 + 1} apples. The answer is {i + i % 7 + 1}."}
               for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def mtp_folder(tmp_path, tok) -> str:
    model = tiny_llama(vocab_size=len(tok), num_heads=3, tokenizer=tok)
    model.save_pretrained(tmp_path / "base-mtp")
    return str(tmp_path / "base-mtp")


@pytest.fixture
def hf_llama_folder(tmp_path, tok) -> str:
    model = tiny_llama(vocab_size=len(tok), num_heads=1, tokenizer=tok)
    model.base.save_pretrained(tmp_path / "hf-llama")
    tok.save_pretrained(tmp_path / "hf-llama")
    return str(tmp_path / "hf-llama")


def test_train_cli_frozen_self_targets(tmp_path, mtp_folder, capsys) -> None:
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    code = run(["train", "--model", mtp_folder, "--data", data, "--output", str(out), "--steps", "6",
                "--seq-len", "64", "--holdout", "0.2", "--freeze-trunk", "--targets", "self",
                "--max-new-tokens", "12", "--save-every", "3", "--eval-every", "3", "--no-progress"])
    assert code == 0
    assert "s, trunk cache + training + eval " in capsys.readouterr().out  # the summary's split of the time
    trained = MTPModel.from_pretrained(out)
    base = MTPModel.from_pretrained(mtp_folder)
    assert trained.num_heads == 3 and trained.tokenizer is not None
    assert trained.draft_vocab is None  # the tiny vocabulary is smaller than the default draft vocabulary
    before, after = base.checkpoint_state_dict(), trained.checkpoint_state_dict()
    for name in before:  # trunk, head 0, embeddings, norm, unembedding: exactly the base model
        assert torch.equal(before[name], after[name]) == (not name.startswith("extra_heads.")), name
    assert trained.reads_next_token and after["next_token_in.weight"].any()  # added (at zero), then trained
    report = json.loads((out / "eval.json").read_text())
    assert [h["predicts"] for h in report["heads"]] == ["t+1", "t+2", "t+3"]
    assert report["heads"][0]["top1_accuracy"] == 1.0  # its own greedy answers
    assert report["held_out_rows"] == 6
    assert report["trunk_cache"] == "disk" and report["peak_memory_gb"]["host"] > 0.1  # features read from disk
    assert (out / "trunk_features.bin").stat().st_size > 0
    # where it trained, and how fast (this machine has no GPU: no GPU memory)
    assert report["runtime"] == {"device": "cpu", "gpu": None, "dtype": "float32", "autocast": "float32"}
    speed = report["training_speed"]
    assert speed["steps_timed"] == 6 and speed["tokens_per_second"] > 0 and speed["step_seconds_median"] > 0
    assert speed["peak_gpu_memory_mb"] is None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" not in x] == [1, 2, 3, 4, 5, 6]
    assert all(x["seconds"] > 0 for x in lines if "eval" not in x)
    assert [x["step"] for x in lines if "eval" in x] == [3, 6]
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    # the frozen weights are written once: every checkpoint and the model hold the same file (hard links)
    frozen = [folder / SHARD_NAMES[0] for folder in (out / "checkpoints" / "step-000003",
                                                     out / "checkpoints" / "step-000006", out)]
    assert len({f.stat().st_ino for f in frozen}) == 1 and frozen[0].stat().st_nlink == 3
    assert (out / SHARD_NAMES[1]).stat().st_size < frozen[0].stat().st_size / 2  # the trained heads only
    assert not (out / "model.safetensors").exists()
    assert len((out / "self_targets.jsonl").read_text().splitlines()) == 30
    # the answers as a lookup corpus, which decoding the folder with --lookup reads
    answers = [json.loads(x)["tokens"] for x in (out / "self_targets.jsonl").read_text().splitlines()]
    corpus = folder_corpus(out)
    assert corpus.fingerprint == LookupCorpus.build(a for a in answers if a).fingerprint
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("freeze_trunk", [False, True])
def test_interrupted_run_resumes_exactly(tmp_path, hf_llama_folder, monkeypatch, freeze_trunk, capsys) -> None:
    """Ctrl-C at step 3 saves a checkpoint; the same command with --resume ends where an uninterrupted run does,
    weight for weight (a frozen trunk's checkpoints keep it in a shard of their own, linked between them)."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = {"model": hf_llama_folder, "data": data, "steps": 6, "seq_len": 48, "batch_size": 2,
              "grad_accum": 2, "num_heads": 2, "save_every": 2, "progress": False, "lr": 1e-3, "holdout": 0.0,
              "draft_vocab": 24, "freeze_trunk": freeze_trunk}
    train(output=str(tmp_path / "a"), **common)
    summary = capsys.readouterr().out
    assert ("trunk cache + training + eval" in summary) == freeze_trunk and "training + eval" in summary

    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        m = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return m

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(output=str(tmp_path / "b"), **common)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (tmp_path / "b" / "checkpoints" / "step-000003").is_dir()
    with pytest.raises(MTPError, match="--resume"):
        train(output=str(tmp_path / "b"), **common)  # not without --resume
    assert train(output=str(tmp_path / "b"), resume=True, progress=False) == 0  # flags come from the run
    # --save-every 2 too (a flag free to change on resume, not dropped for its default): steps 4 and 6 kept
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    a, b = folder_tensors(tmp_path / "a"), folder_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["mtp.draft_vocab"].numel() == 24  # the extra head trained on a draft vocabulary (tied unembedding)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    trunk = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[trunk], load_file(str(tmp_path / "hf-llama" / "model.safetensors"))[trunk]) == freeze_trunk
    if freeze_trunk:  # the resumed run linked the frozen shard of the checkpoint it resumed from
        steps = [tmp_path / "b" / "checkpoints" / s / SHARD_NAMES[0] for s in ("step-000004", "step-000006")]
        assert steps[0].stat().st_ino == steps[1].stat().st_ino == (tmp_path / "b" / SHARD_NAMES[0]).stat().st_ino
    with pytest.raises(MTPError, match="seq-len"):
        train(output=str(tmp_path / "b"), resume=True, seq_len=32, progress=False)
    with pytest.raises(MTPError, match=r"--warmup-steps 3 \(the run left it to its default\)"):  # (not "used None")
        train(output=str(tmp_path / "b"), resume=True, warmup_steps=3, progress=False)


def test_gpt2_plain_template_naive_checkpointing(tmp_path, tok) -> None:
    model = tiny_gpt2(vocab_size=len(tok), num_heads=1)
    model.base.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    data = write_data(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    train(output=str(out), model=str(tmp_path / "gpt2"), data=data, template="plain", num_heads=2, epochs=1.0,
          seq_len=48, loss_order="naive", gradient_checkpointing=True, progress=False, pack=True)
    loaded = MTPModel.from_pretrained(out)
    assert loaded.num_heads == 2 and loaded.config.model_type == "gpt2"
    report = json.loads((out / "eval.json").read_text())
    assert len(report["heads"]) == 2


def test_bad_arguments_and_data(tmp_path, mtp_folder) -> None:
    data = write_data(tmp_path / "d.jsonl", n=10)
    out = str(tmp_path / "o")
    base = {"model": mtp_folder, "data": data, "output": out, "progress": False, "seq_len": 48}
    cases = [
        ({"steps": 2, "epochs": 1.0}, "not both"),
        ({"num_heads": 2}, "num-heads"),  # the MTP folder has 3 heads
        ({"freeze_trunk": True, "num_heads": 1}, "num-heads 2"),
        ({"head_weights": "1,2"}, "head weights"),
        ({"device": "tpu9"}, "device"),
        ({"holdout": 1.5}, "holdout"),
        ({"steps": 0}, "steps"),
        ({"data": str(tmp_path / "missing.jsonl")}, "not found"),
        ({"prefix_loss": 1.0, "entropy_loss": 0.5}, "--prefix-loss, --entropy-loss: for --method selfdistill"),
        ({"k_min": 2, "adapter": "gated-lora"}, "--k-min, --adapter: for --method selfdistill"),
    ]
    for extra, message in cases:
        with pytest.raises(MTPError, match=message):
            train(**{**base, **extra})
    text = tmp_path / "doc.txt"
    text.write_text("Some plain text.\n\nAnother paragraph.\n")
    with pytest.raises(MTPError, match="targets self needs prompts"):
        train(**{**base, "data": str(text), "targets": "self"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": "a2"}\n{"question": \n')
    with pytest.raises(MTPError, match="bad.jsonl:3"):
        train(**{**base, "data": str(bad)})
    with pytest.raises(MTPError, match="nothing|not found"):
        train(output=str(tmp_path / "nothing-here"), resume=True, progress=False)
    reading = tmp_path / "reading"
    MTPModel.from_pretrained(mtp_folder).add_next_token_input().save_pretrained(reading)
    with pytest.raises(MTPError, match="read the next token; --no-next-token-input"):
        train(**{**base, "model": str(reading), "next_token_input": False, "steps": 1,
                 "output": str(tmp_path / "o2")})
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_cli_flags_render(capsys) -> None:
    parser = build_parser(only="train")
    args = parser.parse_args(["train", "--output", "x", "--freeze-trunk", "--targets", "self", "--num-heads", "4",
                              "--loss-order", "naive", "--trunk-cache", "off"])
    assert args.freeze_trunk and args.targets == "self" and args.num_heads == 4 and args.trunk_cache == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--output", "x", "--targets", "teacher"])
    bench_parser = build_parser(only="bench-train")
    assert bench_parser.parse_args(["bench-train", "--num-heads", "1", "4"]).num_heads == [1, 4]
    for argv in (["train", "--help"], ["bench-train", "--help"]):  # help text renders (no stray % etc.)
        with pytest.raises(SystemExit):
            run(argv)
        assert "--" in capsys.readouterr().out


def test_bench_train_reports_memory_efficient_saving(tmp_path, tok) -> None:
    # A vocabulary much larger than the hidden size, as in real models, so the logits dominate memory.
    model = tiny_llama(vocab_size=4000, num_heads=1)
    model.base.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "bench.json"
    assert bench_train(model=str(tmp_path / "m"), seq_len=32, batch_size=2, steps=1, output=str(out)) == 0
    result = json.loads(out.read_text())
    rows = {(r["num_heads"], r["order"]): r for r in result["results"]}
    assert set(rows) == {(1, "naive"), (1, "memory-efficient"), (4, "naive"), (4, "memory-efficient")}
    assert rows[(4, "memory-efficient")]["step_alloc_mb"] < rows[(4, "naive")]["step_alloc_mb"]
    assert result["ratios"]["memory-efficient"]["peak"] < result["ratios"]["naive"]["peak"]
    assert "TorchDispatchMode" in result["method"]


def test_answer_budget_stops_early_and_the_run_completes(tmp_path, mtp_folder, monkeypatch) -> None:
    import mtp.training.targets as targets

    data = write_data(tmp_path / "d.jsonl", n=30)
    out = tmp_path / "run"
    code = run(["train", "--model", mtp_folder, "--data", data, "--output", str(out), "--steps", "2",
                "--seq-len", "64", "--holdout", "0.25", "--freeze-trunk", "--targets", "self",
                "--max-new-tokens", "8", "--gen-batch-size", "4", "--answer-minutes", "0.000001", "--no-progress"])
    assert code == 0  # a budget far below one batch: the measured batch of 4 is the whole run
    assert len((out / "self_targets.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "train_config.json").read_text())["args"]["_answer_count"] == 4
    report = json.loads((out / "eval.json").read_text())
    assert report["held_out_rows"] == 1 and MTPModel.from_pretrained(out).num_heads == 3

    # resumable: the count is the run's, not measured again (a resume would otherwise answer other questions)
    (out / "config.json").unlink()
    monkeypatch.setattr(targets, "answers_within_minutes", lambda *a, **k: pytest.fail("measured again"))
    assert train(output=str(out), resume=True, progress=False) == 0
    assert len((out / "self_targets.jsonl").read_text().splitlines()) == 4  # no new answers
    assert json.loads((out / "eval.json").read_text())["held_out_rows"] == 1


def test_answer_budget_needs_self_targets(tmp_path, mtp_folder) -> None:
    data = write_data(tmp_path / "d.jsonl", n=10)
    with pytest.raises(MTPError, match="targets self"):
        train(output=str(tmp_path / "o"), model=mtp_folder, data=data, answer_minutes=5.0, progress=False)


def test_train_minutes_ends_the_run_when_the_budget_is_spent(tmp_path, mtp_folder, capsys) -> None:
    """--train-minutes without --steps or --epochs: as many steps as fit; a budget spent before the pace is known
    ends the run there (here after its first step), evaluated and saved like any run. A budget of 0 is refused."""
    data = write_data(tmp_path / "d.jsonl", n=20)
    out = tmp_path / "run"
    code = run(["train", "--model", mtp_folder, "--data", data, "--output", str(out), "--seq-len", "64",
                "--holdout", "0.2", "--freeze-trunk", "--train-minutes", "0.0001", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "as many steps as fit in 0.0001 min of 4x1 rows" in printed  # the plan: no cap, no epoch count
    assert "the budget is spent after step 1: 1 step in about 0.0001 min (--train-minutes)" in printed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" not in x] == [1]
    assert json.loads((out / "train_config.json").read_text())["args"]["train_minutes"] == 0.0001
    assert (out / "eval.json").is_file() and MTPModel.from_pretrained(out).num_heads == 3
    with pytest.raises(MTPError, match="--train-minutes must be > 0"):
        run(["train", "--model", mtp_folder, "--data", data, "--output", str(tmp_path / "o2"), "--train-minutes", "0"])
    assert not (tmp_path / "o2").exists()


def test_head_weights_are_checked_before_anything_loads(tmp_path, mtp_folder, monkeypatch) -> None:
    """A --head-weights that is not numbers, or whose count differs from the --model folder's heads, is refused
    before the model loads and before the run folder is written."""
    import mtp.training.heads as heads

    monkeypatch.setattr(heads, "load_model_for_training", lambda *a, **k: pytest.fail("loaded the model"))
    data = write_data(tmp_path / "d.jsonl", n=10)
    for spec, says in (("foo", "--head-weights: head weights must be 'equal', 'medusa' or comma-separated"),
                       ("1,2", "--head-weights: 2 head weights given for 3 heads"),
                       ("1,0,-1", "finite and >= 0")):
        with pytest.raises(MTPError, match=says):
            train(output=str(tmp_path / "o"), model=mtp_folder, data=data, head_weights=spec, progress=False)
        assert not (tmp_path / "o").exists()
    with pytest.raises(MTPError, match="2 head weights given for 4 heads"):
        train(output=str(tmp_path / "o"), data=data, num_heads=4, head_weights="1,1", progress=False)


@pytest.mark.parametrize("name", ["metrics.jsonl", "self_targets.jsonl", "eval.json", "checkpoints/qa.jsonl"])
def test_a_data_file_the_run_would_write_over_is_refused(tmp_path, mtp_folder, name) -> None:
    """--data kept in the run folder under a name the run writes (its metrics, its answers' cache, a checkpoint's
    folder) was appended to, replaced or pruned: the user's data lost, and the run's log read their records."""
    out = tmp_path / "run"
    data = out / name
    data.parent.mkdir(parents=True)
    write_data(data, n=8)
    before = data.read_bytes()
    with pytest.raises(MTPError, match="--data .* is a file the run writes"):
        train(output=str(out), model=mtp_folder, data=str(data), steps=1, seq_len=48, targets="self",
              max_new_tokens=4, holdout=0.0, progress=False)
    assert data.read_bytes() == before


def test_a_file_where_the_checkpoints_go_is_refused_first(tmp_path, mtp_folder) -> None:
    """A file named checkpoints in the run folder failed the first save, after the model had loaded and trained
    (FileExistsError, a traceback)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("mine")
    with pytest.raises(MTPError, match="checkpoints is a file"):
        train(output=str(out), model=mtp_folder, data=write_data(tmp_path / "d.jsonl", n=8), steps=1, seq_len=48,
              holdout=0.0, progress=False)
    assert (out / "checkpoints").read_text() == "mine" and not (out / "train_config.json").exists()
